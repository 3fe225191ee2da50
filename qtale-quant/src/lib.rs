//! Weight quantizers and packed formats, independent of any model.
//!
//! * [`config::QuantConfig`]: bits (2/3/4/8), group size (a ragged last group when it does not
//!   divide the input width), symmetric or asymmetric, act-order, static groups, damping, block size,
//!   true-sequential order; validated.
//! * [`weight::QuantizedWeight`]: the common artefact of every method (integer codes, group scales and
//!   zero points, `g_idx`), with the reference dequantization `w = scale[g] * (q - zero[g])`.
//! * [`rtn`]: round-to-nearest with min-max ranges that always include 0, as the GPTQ reference's
//!   quantizer (optionally an MSE-optimal clip grid, or given clip ratios as AWQ's clip search
//!   produces).
//! * [`gptq::Gptq`]: Hessian accumulation and the GPTQ column-by-column solver (tch linear algebra),
//!   matching the reference implementation's codes on the same Hessian.
//! * [`awq`]: AWQ's activation-aware scale search and clip search; the search results are artefacts
//!   ([`awq::AwqScales`], [`awq::AwqClip`]) that a driver applies separately.
//! * [`magr`]: MagR's weight-magnitude reduction (l-inf proximal gradient on the layer's Hessian)
//!   before an inner quantizer (`magr`, `then = "gptq"` by default).
//! * [`prune`]: magnitude and Wanda pruning, unstructured or n:m (`magnitude`, `wanda`), optionally
//!   followed by a quantizer that keeps the mask.
//! * [`packed`]: HF GPTQ (`checkpoint_format` gptq / gptq_v2) and AutoAWQ "gemm" checkpoint layouts
//!   (`qweight`, `qzeros`, `scales`, `g_idx`, a typed `quantization_config`), save and load with named
//!   errors, one in-memory form ([`packed::GptqPacked`]) and its conversion to the int4 CPU kernel.
//!
//! * [`linear`]: the [`linear::Linear`] interface models are built from, the dense linear, and the
//!   packed [`linear::QuantLinear`] that runs the int4 CPU kernel.
//! * [`method`]: the seam to add a method: the [`method::Quantizer`] trait (calibration needs, one
//!   block's compression), the block view a method works on ([`method::BlockAccess`]), and the registry
//!   by name (`rtn`, `gptq`, `awq`, ...). Add a method = one file implementing `Quantizer` + one
//!   registry line ([`method::register`] at run time, or the built-in list).
//!
//! The per-architecture driver (calibration capture, sequential blocks) lives in `qtale-model`
//! (`qtale_model::ptq`), as the GPTQ reference keeps solver, driver and packed layer apart.
pub mod awq;
pub mod config;
pub mod error;
pub mod gptq;
pub mod linear;
pub mod magr;
pub mod method;
pub mod packed;
pub mod prune;
pub mod rtn;
pub mod weight;

pub use config::QuantConfig;
pub use error::{QuantError, Result};
pub use linear::{DenseLinear, Linear, QuantLinear};
pub use method::{quantizer, Quantizer};
/// The kernel crate, re-exported so users of the packed formats need no second dependency.
pub use qtale_kernels as kernels;
pub use weight::QuantizedWeight;
