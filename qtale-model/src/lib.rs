//! The LLaMA decoder of QTALE-rs, in tch, and everything needed to get real weights into it.
//!
//! * [`config`]: a serde mirror of HF `config.json`, resolved once into [`config::LlamaConfig`]; GGUF
//!   `llama.*` metadata resolves into the same struct.
//! * [`gguf`]: a GGUF v2/v3 reader (F32, F16, BF16, Q8_0, Q4_0, Q4_1 dequantized on load) and a writer.
//! * [`weights`]: name-checked tensor maps from safetensors (single or sharded) and GGUF (HF names,
//!   Q/K RoPE permutation undone), and the hf-hub cache resolver.
//! * [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate, or built from GGUF metadata.
//! * [`model`]: embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, LM head, KV cache; the
//!   decoder layer runs on any subset of tokens with given positions (the router crate relies on it).
//! * [`decoder`]: the [`decoder::Decoder`] interface every model variant answers through (scorers,
//!   perplexity, theta calibration), with FLOPs and execution accounting.
//! * [`native`]: a native CPU batch-1 decoder over the same weights (no libtorch in the decode step),
//!   built from a loaded [`Llama`]; prefill can stay in tch and hand over its KV cache.
//! * [`convert`]: GGUF -> HF directory (safetensors + config.json + tokenizer.json).
//! * [`ptq`]: the LLaMA driver of post-training quantization (any `qtale_quant` method by name, block by
//!   block on calibration windows); [`quantized_io`]: quantized checkpoints (a delta over the base, or
//!   a hub-style GPTQ / AWQ directory).
pub mod config;
pub mod convert;
pub mod corpus;
pub mod cuda;
pub mod decoder;
pub mod error;
pub mod gguf;
pub mod load;
pub mod model;
pub mod native;
pub mod ptq;
pub mod quantized_io;
pub mod tokenizer;
pub mod weights;

pub use config::{HfConfig, LlamaConfig, RopeScaling};
pub use decoder::Decoder;
pub use error::{ModelError, Result};
pub use load::{load_model, load_model_weights, LoadedModel, ModelSource};
pub use model::{KvCache, Llama};
