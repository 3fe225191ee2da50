use std::path::PathBuf;

/// Errors of the quantizers and packed formats; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("invalid quantization config: {0}")]
    Config(String),
    #[error("unsupported bit width {0} (supported: 2, 3, 4, 8)")]
    UnsupportedBits(u32),
    #[error("shape error: {0}")]
    Shape(String),
    #[error("GPTQ: Cholesky of the damped Hessian failed after {attempts} attempts (last damping {damp:.3e} of the mean diagonal)")]
    Cholesky { attempts: usize, damp: f64 },
    #[error("GPTQ: no calibration samples were added")]
    NoSamples,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: no `quantization_config` in config.json")]
    MissingQuantConfig { path: PathBuf },
    #[error("unsupported quantization method {0:?} (supported: gptq, awq)")]
    UnsupportedMethod(String),
    /// A `quantization_config` field whose value this crate does not implement (AWQ `version`,
    /// GPTQ `checkpoint_format`, `zero_point: false`, a quantized `lm_head`, ...).
    #[error("{method}: unsupported {field} = {value} (supported: {supported})")]
    UnsupportedOption {
        method: String,
        field: String,
        value: String,
        supported: String,
    },
    #[error("{path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name}: expected dtype {expected}, found {found}")]
    TensorDtype {
        name: String,
        expected: String,
        found: String,
    },
    #[error("tensor {name}: {msg}")]
    BadTensor { name: String, msg: String },
    #[error(transparent)]
    Kernel(#[from] qtale_kernels::KernelError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, QuantError>;
