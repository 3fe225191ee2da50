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
//! * [`packed`]: HF GPTQ (`checkpoint_format` gptq / gptq_v2) and AutoAWQ "gemm" checkpoint layouts
//!   (`qweight`, `qzeros`, `scales`, `g_idx`, a typed `quantization_config`), save and load with named
//!   errors, one in-memory form ([`packed::GptqPacked`]) and its conversion to the int4 CPU kernel.
//!
//! The model-level driver (calibration capture, sequential quantization) lives in `qtale-model`.
pub mod awq;
pub mod config;
pub mod error;
pub mod gptq;
pub mod packed;
pub mod rtn;
pub mod weight;

pub use config::QuantConfig;
pub use error::{QuantError, Result};
/// The kernel crate, re-exported so users of the packed formats need no second dependency.
pub use qtale_kernels as kernels;
pub use weight::QuantizedWeight;

/// The small core interface of a weight quantizer: turn a dense weight `[out, in]` into a
/// [`QuantizedWeight`] using whatever statistics the quantizer has collected (none for RTN, a Hessian
/// for GPTQ). Methods that need more (AWQ's block-level search) expose free functions instead.
pub trait WeightQuantizer {
    fn name(&self) -> &'static str;
    fn quantize(&mut self, weight: &tch::Tensor) -> Result<QuantizedWeight>;
}
