//! Typed errors of the model crate. Every variant names the file and the tensor or field at fault, so a
//! user with a truncated checkpoint or a wrong config learns what to fix without a backtrace.
use std::path::PathBuf;

use crate::gguf::GgufError;

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: config field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error("{source_name}: missing tensors: {}", names.join(", "))]
    MissingTensors {
        source_name: String,
        names: Vec<String>,
    },
    #[error("{source_name}: unexpected tensors (not used by the model): {}", names.join(", "))]
    UnexpectedTensors {
        source_name: String,
        names: Vec<String>,
    },
    #[error("{source_name}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        source_name: String,
        name: String,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error("{source_name}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        source_name: String,
        name: String,
        dtype: String,
    },
    #[error("tokenizer {source_name}: {msg}")]
    Tokenizer { source_name: String, msg: String },
    #[error("hf-hub cache: {0}")]
    Hub(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// An error of a decoder implemented in another crate (a routed model's router), passed through the
    /// [`crate::decoder::Decoder`] interface with its source kept.
    #[error(transparent)]
    Decoder(Box<dyn std::error::Error + Send + Sync>),
    /// A quantized checkpoint (GPTQ / AWQ layout) that cannot be loaded.
    #[error("{path}: quantized checkpoint: {source}")]
    Quantized {
        path: PathBuf,
        #[source]
        source: Box<qtale_quant::QuantError>,
    },
    /// A quantizer or packed-format error outside a checkpoint (calibration, a method's options).
    #[error(transparent)]
    Quant(#[from] qtale_quant::QuantError),
}

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        ModelError::Config {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }
}
