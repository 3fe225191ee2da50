//! Typed errors of the router crate: config errors name the field, weight-file errors name the file and
//! the tensor.
use std::path::PathBuf;

use qtale_model::ModelError;

pub type Result<T, E = RouterError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("routing config field `{field}`: {msg}")]
    Config { field: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("router weights {path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("router weights {path}: metadata `{key}`: {msg}")]
    Metadata {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("router weights {path}: missing tensors: {}", names.join(", "))]
    MissingTensors { path: PathBuf, names: Vec<String> },
    #[error("router weights {path}: unexpected tensors: {}", names.join(", "))]
    UnexpectedTensors { path: PathBuf, names: Vec<String> },
    #[error("router weights {path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error("router weights {path}: tensor `{name}` has dtype {dtype}, expected F32")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Native(#[from] qtale_model::native::NativeError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl RouterError {
    pub fn config(field: &str, msg: impl Into<String>) -> Self {
        RouterError::Config {
            field: field.to_string(),
            msg: msg.into(),
        }
    }
}
