//! Typed errors of the harness. Data errors name the file, the row and the field at fault.
use std::path::PathBuf;

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that cannot be decoded at all (not Arrow, not Parquet, not gzip, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A row that decodes but lacks a field or has one of the wrong type or value.
    #[error("{path}: row {row}: field `{field}`: {msg}")]
    Field {
        path: PathBuf,
        row: usize,
        field: String,
        msg: String,
    },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] qtale_model::ModelError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl EvalError {
    pub fn field(
        path: impl Into<PathBuf>,
        row: usize,
        field: &str,
        msg: impl Into<String>,
    ) -> Self {
        EvalError::Field {
            path: path.into(),
            row,
            field: field.to_string(),
            msg: msg.into(),
        }
    }
}
