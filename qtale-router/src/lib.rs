//! Token-adaptive layer execution (D-LLM routers) with real compute skipping, and QTALE's post-training
//! execution-ratio adjustment.
//!
//! * [`router`]: the [`Router`] trait; the D-LLM router ([`DllmRouter`], own `VarStore`, own safetensors
//!   file) and the baselines [`DenseRouter`], [`StaticRouter`], [`RandomRouter`].
//! * [`config`]: [`RoutingConfig`] (start layer, reserved tokens, KV policy, theta, router size, Gumbel
//!   temperature).
//! * [`routed`]: [`RoutedLlama`], training mode (hard Gumbel straight-through, masked) and inference mode
//!   (gather the executing tokens per layer, run the block on them only, scatter back; prefill and
//!   decode, batched).
//! * [`stats`]: [`ExecStats`] per forward (execute bits, ratios, FLOPs, KV bytes), summarized into the
//!   model crate's mergeable `ExecSummary`.
//! * [`decoder`]: [`RoutedDecoder`], the routed model behind the model crate's `Decoder` interface (what
//!   scorers and perplexity use).
//! * [`kinds`]: router kinds by name (`dllm`, `static`, `random`, `dense`) behind the small
//!   [`TrainableRouter`] trait the trainer and the experiment cells use; add a kind = one file + one
//!   registry line.
//! * [`native`]: [`NativeRouted`], routed batch-1 decode on the model crate's native CPU decoder
//!   ([`gate`]: each router's [`NativeGate`], the same decision in plain f32).
//! * [`calibrate`]: theta by bisection to a target ratio, or by a grid search on a caller's score.
//! * [`analysis`]: router logit-gap histograms and Gumbel flip rates per layer.
//! * [`splitmix`]: the SplitMix64 hash (random router decisions, the trainer's per-step seeds).
pub mod analysis;
pub mod batch;
pub mod calibrate;
pub mod config;
pub mod decoder;
pub mod error;
pub mod gate;
pub mod kinds;
pub mod native;
pub mod routed;
pub mod router;
pub mod splitmix;
pub mod stats;

pub use analysis::{analyze, AnalysisOptions, LayerAnalysis, RouterAnalysis};
pub use batch::CalibBatch;
pub use calibrate::{
    calibrate_grid, calibrate_ratio, measure, routed_nll, BisectOptions, ThetaPoint, ThetaReport,
    ThetaRule,
};
pub use config::{KvPolicy, RoutingConfig};
pub use decoder::RoutedDecoder;
pub use error::{Result, RouterError};
pub use gate::NativeGate;
pub use kinds::{RouterBuild, RouterSpec, TrainableRouter};
pub use native::{NativeExecCounts, NativeRouted};
pub use routed::{hard_gumbel, ForwardOptions, Mode, RoutedHidden, RoutedLlama, RoutedOutput};
pub use router::{logits_from_mask, DenseRouter, DllmRouter, RandomRouter, Router, StaticRouter};
pub use stats::ExecStats;
