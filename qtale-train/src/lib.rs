//! Fine-tuning for token-adaptive execution: LoRA adapters on the frozen base ([`lora`]), the objective
//! as a list of loss terms ([`loss`]: CE, ratio, entropy, KD; add a term = one file, one registry line
//! and its config key), the loop over any router kind ([`trainer`]), a checkpointable AdamW with warmup +
//! cosine schedules ([`optim`]), and atomic checkpoints ([`checkpoint`]).
pub mod checkpoint;
pub mod data;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod trainer;

/// Errors of the training crate; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config field `{field}`: {msg}")]
    Config { field: String, msg: String },
    #[error("{path}: {msg}")]
    Checkpoint {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The caller's stop flag was set (e.g. SIGTERM at a Slurm time limit): the step in flight finished
    /// and a checkpoint was written.
    #[error("stopped on request after step {step} of {steps}; checkpoint written to {path}")]
    Stopped {
        step: usize,
        steps: usize,
        path: std::path::PathBuf,
    },
    #[error("non-finite loss at step {step}: {what}")]
    NonFinite { step: usize, what: String },
    #[error(transparent)]
    Model(#[from] qtale_model::ModelError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

pub fn config_err(field: &str, msg: impl Into<String>) -> TrainError {
    TrainError::Config {
        field: field.into(),
        msg: msg.into(),
    }
}
