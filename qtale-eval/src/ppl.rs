//! Perplexity, GPTQ-paper style (non-overlapping windows), and KL divergence of a model's next-token
//! distributions against a reference model's (e.g. dense vs quantized).
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::error::{EvalError, Result};
use qtale_model::decoder::{window_logits, window_nll};
use qtale_model::Decoder;

/// Windowing of a token stream.
#[derive(Debug, Clone, Serialize)]
pub struct WindowConfig {
    /// Tokens per window (GPTQ uses the model's evaluation length, e.g. 2048).
    pub window: usize,
    /// Prepend this BOS to every window (not counted in `window`, never a target).
    pub bos: Option<i64>,
    /// Use at most this many windows.
    pub max_windows: Option<usize>,
}

/// The windows GPTQ evaluates: `floor(n / window)` non-overlapping slices, the tail dropped.
pub fn windows<'a>(ids: &'a [i64], cfg: &WindowConfig) -> Vec<&'a [i64]> {
    let n = ids.len() / cfg.window.max(1);
    let n = cfg.max_windows.map_or(n, |m| m.min(n));
    (0..n)
        .map(|i| &ids[i * cfg.window..(i + 1) * cfg.window])
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct PplResult {
    pub ppl: f64,
    /// Mean over windows of each window's mean next-token loss (nats).
    pub mean_nll: f64,
    pub n_windows: usize,
    pub window: usize,
    pub bos: bool,
    pub tokens_scored: usize,
}

/// `ppl = exp(mean over windows of the mean shifted next-token loss)`.
pub fn perplexity(model: &dyn Decoder, ids: &[i64], cfg: &WindowConfig) -> Result<PplResult> {
    let _g = tch::no_grad_guard();
    let ws = windows(ids, cfg);
    if ws.is_empty() || cfg.window < 2 {
        return Err(EvalError::Input(format!(
            "perplexity: {} tokens give no window of {} tokens",
            ids.len(),
            cfg.window
        )));
    }
    let mut losses = Vec::with_capacity(ws.len());
    let mut scored = 0;
    for w in &ws {
        scored += w.len() - usize::from(cfg.bos.is_none());
        losses.push(window_nll(model, w, cfg.bos)?);
    }
    let mean_nll = losses.iter().sum::<f64>() / losses.len() as f64;
    Ok(PplResult {
        ppl: mean_nll.exp(),
        mean_nll,
        n_windows: ws.len(),
        window: cfg.window,
        bos: cfg.bos.is_some(),
        tokens_scored: scored,
    })
}

/// Per-position `KL(P_ref || P)` of two logit tensors `[N, V]` (f32), returned as `[N]` f64.
pub fn kl_from_logits(reference: &Tensor, candidate: &Tensor) -> Tensor {
    let lp_ref = reference
        .to_kind(Kind::Double)
        .log_softmax(-1, Kind::Double);
    let lp = candidate
        .to_kind(Kind::Double)
        .log_softmax(-1, Kind::Double);
    (lp_ref.exp() * (&lp_ref - lp)).sum_dim_intlist(-1, false, Kind::Double)
}

#[derive(Debug, Clone, Serialize)]
pub struct KlResult {
    /// Mean over positions of `KL(P_ref || P)` in nats.
    pub mean_kl: f64,
    pub max_kl: f64,
    /// Fraction of positions where both models' argmax agree.
    pub top1_agreement: f64,
    pub positions: usize,
    pub n_windows: usize,
    pub window: usize,
}

/// KL divergence of `candidate` against `reference` over the same windows of a token stream.
pub fn kl_divergence(
    reference: &dyn Decoder,
    candidate: &dyn Decoder,
    ids: &[i64],
    cfg: &WindowConfig,
) -> Result<KlResult> {
    let _g = tch::no_grad_guard();
    let ws = windows(ids, cfg);
    if ws.is_empty() {
        return Err(EvalError::Input("KL: no complete window".into()));
    }
    let (mut sum, mut max, mut agree, mut n) = (0.0f64, 0.0f64, 0i64, 0usize);
    for w in &ws {
        let a = window_logits(reference, w, cfg.bos)?.0;
        let b = window_logits(candidate, w, cfg.bos)?
            .0
            .to_device(a.device());
        let kl = kl_from_logits(&a, &b);
        sum += kl.sum(Kind::Double).double_value(&[]);
        max = max.max(kl.max().double_value(&[]));
        agree += a
            .argmax(-1, false)
            .eq_tensor(&b.argmax(-1, false))
            .sum(Kind::Int64)
            .int64_value(&[]);
        n += kl.size()[0] as usize;
    }
    Ok(KlResult {
        mean_kl: sum / n as f64,
        max_kl: max,
        top1_agreement: agree as f64 / n as f64,
        positions: n,
        n_windows: ws.len(),
        window: cfg.window,
    })
}
