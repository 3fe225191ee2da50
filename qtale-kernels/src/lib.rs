//! Compute kernels for packed low-bit weights.
//!
//! * [`pack`]: exact bit packing of 2/3/4/8-bit codes into little-endian `u32` streams (the layout HF
//!   GPTQ checkpoints use along their packed dimension).
//! * [`int4`]: a group-wise asymmetric int4 matrix ([`int4::Int4Matrix`]) and its GEMV / small-batch
//!   GEMM `y = x W^T`: an AVX2+FMA kernel chosen at run time (activations quantized to int8 once per
//!   call, `maddubs` integer dot products, one float FMA per group and token, up to 8 tokens per
//!   pass over the weights) and a scalar f32 reference, multithreaded by output-row chunks on rayon's
//!   pool.
//! * [`int8`]: ggml-Q8_0-style int8 weights (one f16 scale per 32) and their row kernels, for the tied
//!   LM head that SmolLM2's GGUF stores in Q8_0.
//! * [`ops`]: the f32 ops of one LLaMA decoder step at batch 1 (RMSNorm, RoPE, one-token attention
//!   over a KV cache, SwiGLU, f32 GEMV), each with a scalar reference.
//! * [`pool`]: a persistent thread team with a spin barrier, for running a decode step's ops on all
//!   cores with one wake-up per step instead of one fan-out per op.
pub mod int4;
pub mod int8;
pub mod ops;
pub mod pack;
pub mod pool;

pub use int4::Backend;

/// Errors of the kernel crate: always name the offending quantity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("unsupported bit width {0} (supported: 2, 3, 4, 8)")]
    UnsupportedBits(u32),
    #[error("code {code} at index {index} does not fit in {bits} bits")]
    CodeOutOfRange { index: usize, code: u8, bits: u32 },
    #[error("shape error: {0}")]
    Shape(String),
    /// The int4 kernel works on whole blocks of 32 columns; a ragged last group must be too.
    #[error("int4 kernel: {cols} columns at group {group} leave a ragged last group of {last} columns, not a multiple of 32")]
    RaggedGroup {
        cols: usize,
        group: usize,
        last: usize,
    },
}

pub type Result<T> = std::result::Result<T, KernelError>;
