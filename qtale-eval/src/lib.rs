//! `qtale-eval`: the benchmark harness of QTALE-rs, scoring multiple-choice tasks exactly as
//! lm-evaluation-harness does (rules in `docs/eval-protocol.md`), plus GPTQ-style perplexity,
//! KL divergence against a reference model, and efficiency accounting.
//!
//! * [`data`]: Arrow IPC stream / Parquet / gzip JSONL readers into rows that name file, row and field
//!   in their errors.
//! * [`tasks`]: the task registry (PIQA, BoolQ, SIQA, ARC-e, ARC-c, WinoGrande, OBQA, HellaSwag, COPA,
//!   CommonsenseQA, SciQ; one [`tasks::TaskSpec`] file each, more by [`tasks::register`]): where their
//!   docs are and how a row becomes `(context, continuation)` pairs.
//! * [`encode`]: lm-eval's pair tokenization (trailing-space move, prefix token, BOS flag).
//! * [`scorer`]: the [`scorer::Scorer`] interface and the batched, context-sharing [`scorer::LmScorer`]
//!   over any `qtale_model::Decoder` (the dense `Llama`, quantized ones included, and the router
//!   crate's `RoutedDecoder`): the harness depends on that interface, not on any model variant.
//! * [`metrics`]: acc / acc_norm with standard errors, the CSQA-7 average.
//! * [`paired`]: paired per-doc comparisons of two variants (bootstrap intervals, McNemar's exact test,
//!   docs needed to resolve a difference).
//! * [`ppl`]: perplexity over non-overlapping windows and KL divergence.
//! * [`run`], [`report`]: scoring a task list ([`run::evaluate_tasks`], shared by the `eval` binary and
//!   the experiment cells), and the results JSON / CSV / per-doc log.
pub mod data;
pub mod encode;
pub mod error;
pub mod metrics;
pub mod paired;
pub mod ppl;
pub mod provenance;
pub mod report;
pub mod run;
pub mod scorer;
pub mod tasks;

pub use encode::EncodeConfig;
pub use error::{EvalError, Result};
pub use scorer::{LlRequest, LlResult, LmScorer, Scorer};
pub use tasks::{load_task, McDoc, TaskData, TaskId, TaskSpec};

/// Re-exported for binaries that draw the progress bar.
pub use indicatif;
