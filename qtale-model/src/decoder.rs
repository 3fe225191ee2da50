//! The interface every model variant answers through (dense, quantized, routed), and what a decoder
//! reports about the work it did: the per-token FLOPs of a LLaMA config ([`FlopModel`]) and mergeable
//! execution counts ([`ExecSummary`]).
//!
//! The harness (`qtale-eval`) depends on this interface only; the router crate implements it for its
//! routed model, so scorers, perplexity and theta calibration treat every variant alike.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
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

/// Mean next-token negative log-likelihood (nats) of one window under any decoder: the window's
/// tokens after the first are the targets, or all of them when `bos` is prepended (GPTQ-paper
/// perplexity uses no BOS). The one home of next-token NLL: perplexity, theta calibration and the
/// quantization reports all call it.
pub fn window_nll(dec: &dyn Decoder, ids: &[i64], bos: Option<i64>) -> Result<f64> {
    let (logits, targets) = window_logits(dec, ids, bos)?;
    let nll = -logits
        .log_softmax(-1, Kind::Float)
        .gather(1, &targets.unsqueeze(1), false)
        .mean(Kind::Double);
    Ok(nll.double_value(&[]))
}

/// The logits `[n, vocab]` of the positions that predict a window's targets, and the targets `[n]`
/// (see [`window_nll`]).
pub fn window_logits(dec: &dyn Decoder, ids: &[i64], bos: Option<i64>) -> Result<(Tensor, Tensor)> {
    let mut input = Vec::with_capacity(ids.len() + 1);
    input.extend(bos);
    input.extend_from_slice(ids);
    if input.len() < 2 {
        return Err(ModelError::Input(
            "need at least two tokens to score".into(),
        ));
    }
    let _g = tch::no_grad_guard();
    let n = input.len() as i64;
    let t = Tensor::from_slice(&input).view([1, n]);
    let mask = Tensor::ones([1, n], (Kind::Int64, Device::Cpu));
    let mut cache = KvCache::new(dec.num_layers());
    let h = dec.forward_hidden(&t, &mask, &mut cache)?;
    let logits = dec.head(&h.squeeze_dim(0).narrow(0, 0, n - 1));
    let targets = Tensor::from_slice(&input[1..]).to_device(logits.device());
    Ok((logits, targets))
}

/// Mean over `windows` of each window's mean next-token NLL (no BOS); `exp` of it is the perplexity.
pub fn mean_nll(dec: &dyn Decoder, windows: &[Vec<i64>]) -> Result<f64> {
    if windows.is_empty() {
        return Err(ModelError::Input("no windows to score".into()));
    }
    let mut s = 0.0;
    for w in windows {
        s += window_nll(dec, w, None)?;
    }
    Ok(s / windows.len() as f64)
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
