//! The interface every model variant answers through (dense, quantized, routed), and what a decoder
//! reports about the work it did: the per-token FLOPs of a LLaMA config ([`FlopModel`]) and mergeable
//! execution counts ([`ExecSummary`]).
//!
//! The harness (`qtale-eval`) depends on this interface only; the router crate implements it for its
//! routed model, so scorers, perplexity and theta calibration treat every variant alike.
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::model::{KvCache, Llama};

/// The decoder interface the batched scorer needs. Dense, quantized and routed decoders implement it.
pub trait Decoder {
    fn num_layers(&self) -> usize;
    fn device(&self) -> Device;
    /// Longest sequence the model accepts (lm-eval's `max_length`).
    fn max_length(&self) -> usize;
    /// Run new tokens `ids: [B, T]` with `mask: [B, T]` (1 = token) through the body, continuing from
    /// `cache`; returns the final normed hidden states `[B, T, d]`.
    fn forward_hidden(&self, ids: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// The LM head: hidden states `[N, d]` to f32 logits `[N, vocab]`.
    fn head(&self, hidden: &Tensor) -> Tensor;
    /// Bytes of all weights as stored.
    fn weight_bytes(&self) -> usize;
    /// Execution statistics since the last call (routed decoders); `None` for dense ones.
    fn take_exec_stats(&self) -> Option<ExecSummary> {
        None
    }
}

impl Decoder for Llama {
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn device(&self) -> Device {
        self.device
    }
    fn max_length(&self) -> usize {
        self.config.max_position_embeddings
    }
    fn forward_hidden(&self, ids: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_hidden_cached(ids, Some(mask), cache)
    }
    fn head(&self, hidden: &Tensor) -> Tensor {
        self.lm_logits(hidden)
    }
    fn weight_bytes(&self) -> usize {
        Llama::weight_bytes(self)
    }
}

/// Per-token FLOPs of a LLaMA-family model. FLOPs count 2 per multiply-add of the matmuls (norms, RoPE,
/// softmax and the residual adds are ignored: they are O(d) per token against O(d^2)). Per token and
/// executed layer: attention projections `2 d (H hd) + 2 * 2 d (KV hd) + 2 (H hd) d`; attention
/// `4 H hd n_vis` where `n_vis` is the number of keys the query really sees at that layer; MLP
/// `3 * 2 d I`; the LM head `2 d V` once per token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FlopModel {
    pub num_layers: usize,
    /// q, k, v, o projections.
    pub attn_proj: f64,
    /// k and v projections only.
    pub kv_proj: f64,
    /// Per visible key: `q.k` and `p.v` over all heads.
    pub attn_per_key: f64,
    pub mlp: f64,
    pub lm_head: f64,
    /// Bytes of K and V of one key at one layer, in the model's dtype.
    pub kv_bytes_per_key: f64,
}

impl FlopModel {
    pub fn new(c: &LlamaConfig) -> Self {
        let (d, h, kv, hd, i, v) = (
            c.hidden_size as f64,
            c.num_attention_heads as f64,
            c.num_key_value_heads as f64,
            c.head_dim as f64,
            c.intermediate_size as f64,
            c.vocab_size as f64,
        );
        FlopModel {
            num_layers: c.num_hidden_layers,
            attn_proj: 2.0 * d * h * hd + 4.0 * d * kv * hd + 2.0 * h * hd * d,
            kv_proj: 4.0 * d * kv * hd,
            attn_per_key: 4.0 * h * hd,
            mlp: 6.0 * d * i,
            lm_head: 2.0 * d * v,
            // f32 assumed here; `ExecStats::kv_bytes` reads the real cache.
            kv_bytes_per_key: 2.0 * kv * hd * 4.0,
        }
    }

    /// Dense FLOPs of a token at `position` (0-based) with all previous tokens real.
    pub fn dense_token(&self, position: i64) -> f64 {
        let l = self.num_layers as f64;
        l * (self.attn_proj + self.mlp + self.attn_per_key * (position + 1) as f64) + self.lm_head
    }
}

/// Counts that add up over forwards (and batches, and processes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecSummary {
    pub forwards: u64,
    pub num_layers: usize,
    pub valid_tokens: u64,
    /// Real non-reserved tokens.
    pub counted_tokens: u64,
    /// Per layer: counted tokens that executed it.
    pub layer_exec: Vec<u64>,
    pub flops: f64,
    pub dense_flops: f64,
    /// Sums of the per-forward KV bytes held.
    pub kv_bytes: f64,
    pub dense_kv_bytes: f64,
}

impl ExecSummary {
    pub fn merge(&mut self, other: &ExecSummary) {
        if self.layer_exec.is_empty() {
            self.layer_exec = vec![0; other.layer_exec.len()];
            self.num_layers = other.num_layers;
        }
        assert_eq!(
            self.layer_exec.len(),
            other.layer_exec.len(),
            "merging summaries of models with different depths"
        );
        self.forwards += other.forwards;
        self.valid_tokens += other.valid_tokens;
        self.counted_tokens += other.counted_tokens;
        for (a, b) in self.layer_exec.iter_mut().zip(&other.layer_exec) {
            *a += b;
        }
        self.flops += other.flops;
        self.dense_flops += other.dense_flops;
        self.kv_bytes += other.kv_bytes;
        self.dense_kv_bytes += other.dense_kv_bytes;
    }

    /// Overall execution ratio (counted tokens, all layers).
    pub fn ratio(&self) -> f64 {
        if self.counted_tokens == 0 || self.num_layers == 0 {
            return 1.0;
        }
        self.layer_exec.iter().sum::<u64>() as f64
            / (self.counted_tokens as f64 * self.num_layers as f64)
    }

    pub fn layer_ratio(&self) -> Vec<f64> {
        let n = self.counted_tokens.max(1) as f64;
        self.layer_exec.iter().map(|&c| c as f64 / n).collect()
    }

    pub fn flops_fraction(&self) -> f64 {
        self.flops / self.dense_flops.max(f64::MIN_POSITIVE)
    }

    pub fn flops_per_token(&self) -> f64 {
        self.flops / self.valid_tokens.max(1) as f64
    }
}
