//! Log-likelihood requests and the scorers that answer them.
//!
//! The model side of the harness sees only [`LlRequest`]s: a context and a continuation, as token ids.
//! [`Scorer`] is the one interface every model variant answers through; [`LmScorer`] implements it for
//! any [`Decoder`] (the model crate's interface: the dense [`Llama`], a quantized one, and the router
//! crate's routed decoder).
//!
//! [`LmScorer`] groups requests by identical context tokens, runs each context once (prefill) and
//! continues every continuation of the group from a copy of its KV cache; groups are sorted by length
//! (longest first) and packed into batches of at most `batch_size` continuation rows. Contexts are
//! left-padded and continuations right-padded; positions count real tokens only, so padding does not
//! change a result beyond float rounding.
use std::collections::HashMap;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use qtale_model::decoder::{Decoder, ExecSummary};
use qtale_model::model::KvCache;
use qtale_model::Llama;

use crate::error::{EvalError, Result};

/// One log-likelihood request: score `continuation` given `context` (both token ids).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LlRequest {
    pub context: Vec<i64>,
    pub continuation: Vec<i64>,
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LlResult {
    /// Sum of the log-probabilities of the continuation tokens.
    pub logprob: f64,
    /// Whether every continuation token is the argmax of its position.
    pub is_greedy: bool,
    /// Number of continuation tokens scored.
    pub n_tokens: usize,
}

/// Work counters of a scorer (reset with [`Scorer::take_stats`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScoreStats {
    pub requests: usize,
    /// Real (non-padding) tokens fed through the model: each distinct context once per prefill row
    /// plus the continuation inputs.
    pub tokens_processed: usize,
    /// Tokens a scorer without context sharing would process (`len(context + continuation) - 1` each).
    pub tokens_unshared: usize,
    /// Token slots including padding.
    pub padded_slots: usize,
    pub forward_calls: usize,
    /// Largest K/V bytes held for valid keys in one batch (after expanding shared contexts).
    pub peak_kv_bytes: usize,
    /// What a routed decoder executed (ratio, per-layer ratios, FLOPs vs dense); `None` for dense models.
    pub exec: Option<ExecSummary>,
}

/// Anything that answers log-likelihood requests.
pub trait Scorer {
    /// Score every request; `progress(n)` is called with the number of requests finished so far.
    fn loglikelihood(
        &mut self,
        requests: &[LlRequest],
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<LlResult>>;
    /// The counters since the last call, reset.
    fn take_stats(&mut self) -> ScoreStats;
}

/// Truncate a request the way lm-eval does: the model input is `(context + continuation)` without its
/// last token, keeping the rightmost `max_length`; the context keeps at least one token.
pub fn truncate_request(r: &LlRequest, max_length: usize) -> LlRequest {
    let total = r.context.len() + r.continuation.len();
    if total <= max_length + 1 {
        return r.clone();
    }
    let drop = total - (max_length + 1);
    let keep_ctx = r.context.len().saturating_sub(drop).max(1);
    LlRequest {
        context: r.context[r.context.len() - keep_ctx..].to_vec(),
        continuation: r.continuation.clone(),
    }
}

/// Batched, context-sharing scorer over a [`Decoder`].
pub struct LmScorer<'a, D: Decoder + ?Sized> {
    pub model: &'a D,
    /// Most continuation rows per forward (and most contexts per prefill).
    pub batch_size: usize,
    /// Run each distinct context once per batch and reuse its KV for all continuations (default on).
    /// Off: every request runs its own context (what lm-eval does).
    pub share_context: bool,
    stats: ScoreStats,
}

impl<'a, D: Decoder + ?Sized> LmScorer<'a, D> {
    pub fn new(model: &'a D, batch_size: usize) -> Self {
        LmScorer {
            model,
            batch_size: batch_size.max(1),
            share_context: true,
            stats: ScoreStats::default(),
        }
    }
}

/// A unit of work: one context and a slice of the requests continuing it.
struct Item {
    context: Vec<i64>,
    members: Vec<usize>,
}

impl<D: Decoder + ?Sized> Scorer for LmScorer<'_, D> {
    fn loglikelihood(
        &mut self,
        requests: &[LlRequest],
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<LlResult>> {
        let _guard = tch::no_grad_guard();
        let max_len = self.model.max_length();
        let reqs: Vec<LlRequest> = requests
            .iter()
            .map(|r| truncate_request(r, max_len))
            .collect();
        for (i, r) in reqs.iter().enumerate() {
            if r.context.is_empty() || r.continuation.is_empty() {
                return Err(EvalError::Input(format!(
                    "request {i}: empty context or continuation (an empty context must be replaced by the prefix token)"
                )));
            }
        }
        // Group by identical context tokens (first-appearance order).
        let mut items: Vec<Item> = Vec::new();
        if self.share_context {
            let mut index: HashMap<&[i64], usize> = HashMap::new();
            for (i, r) in reqs.iter().enumerate() {
                match index.get(r.context.as_slice()) {
                    Some(&g) => items[g].members.push(i),
                    None => {
                        index.insert(r.context.as_slice(), items.len());
                        items.push(Item {
                            context: r.context.clone(),
                            members: vec![i],
                        });
                    }
                }
            }
        } else {
            items = reqs
                .iter()
                .enumerate()
                .map(|(i, r)| Item {
                    context: r.context.clone(),
                    members: vec![i],
                })
                .collect();
        }
        // Split groups larger than a batch.
        let bs = self.batch_size;
        let items: Vec<Item> = items
            .into_iter()
            .flat_map(|it| {
                it.members
                    .chunks(bs)
                    .map(|m| Item {
                        context: it.context.clone(),
                        members: m.to_vec(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        // Longest first (like lm-eval), ties in input order.
        let total_len = |it: &Item| {
            it.context.len()
                + it.members
                    .iter()
                    .map(|&m| reqs[m].continuation.len())
                    .max()
                    .unwrap_or(0)
        };
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(total_len(&items[i])), i));

        let mut results: Vec<Option<LlResult>> = vec![None; reqs.len()];
        let mut done = 0usize;
        let mut batch: Vec<&Item> = Vec::new();
        let mut rows = 0usize;
        for &i in &order {
            let it = &items[i];
            if rows + it.members.len() > bs && !batch.is_empty() {
                self.run_batch(&batch, &reqs, &mut results)?;
                done += rows;
                progress(done);
                batch.clear();
                rows = 0;
            }
            rows += it.members.len();
            batch.push(it);
        }
        if !batch.is_empty() {
            self.run_batch(&batch, &reqs, &mut results)?;
            done += rows;
            progress(done);
        }
        self.stats.requests += reqs.len();
        self.stats.tokens_unshared += reqs
            .iter()
            .map(|r| r.context.len() + r.continuation.len() - 1)
            .sum::<usize>();
        if let Some(e) = self.model.take_exec_stats() {
            match &mut self.stats.exec {
                Some(acc) => acc.merge(&e),
                None => self.stats.exec = Some(e),
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request scored"))
            .collect())
    }

    fn take_stats(&mut self) -> ScoreStats {
        std::mem::take(&mut self.stats)
    }
}

impl<D: Decoder + ?Sized> LmScorer<'_, D> {
    fn run_batch(
        &mut self,
        items: &[&Item],
        reqs: &[LlRequest],
        results: &mut [Option<LlResult>],
    ) -> Result<()> {
        let dev = self.model.device();
        // Prefill: contexts left-padded, so every row's last context token sits in the last column.
        let p = items.len();
        let tc = items.iter().map(|it| it.context.len()).max().unwrap_or(0);
        let mut ids = vec![0i64; p * tc];
        let mut mask = vec![0i64; p * tc];
        for (r, it) in items.iter().enumerate() {
            let off = r * tc + tc - it.context.len();
            ids[off..off + it.context.len()].copy_from_slice(&it.context);
            mask[off..off + it.context.len()]
                .iter_mut()
                .for_each(|m| *m = 1);
        }
        let ids_t = Tensor::from_slice(&ids).view([p as i64, tc as i64]);
        let mask_t = Tensor::from_slice(&mask).view([p as i64, tc as i64]);
        let mut cache = KvCache::new(self.model.num_layers());
        let hidden = self.model.forward_hidden(&ids_t, &mask_t, &mut cache)?;
        self.stats.forward_calls += 1;
        self.stats.padded_slots += p * tc;
        self.stats.tokens_processed += items.iter().map(|it| it.context.len()).sum::<usize>();
        let last_logits = self.model.head(&hidden.select(1, tc as i64 - 1)); // [P, V]
        let last_lsm = last_logits.log_softmax(-1, Kind::Float);
        let last_arg = last_logits.argmax(-1, false);

        // Rows: one per request of the batch.
        let mut row_item: Vec<i64> = Vec::new();
        let mut row_req: Vec<usize> = Vec::new();
        for (r, it) in items.iter().enumerate() {
            for &m in &it.members {
                row_item.push(r as i64);
                row_req.push(m);
            }
        }
        let n_rows = row_req.len();
        // First continuation token of each row, from the prefill's last position.
        let first_tok: Vec<i64> = row_req.iter().map(|&m| reqs[m].continuation[0]).collect();
        let row_item_t = Tensor::from_slice(&row_item).to_device(dev);
        let first_t = Tensor::from_slice(&first_tok).to_device(dev);
        let first_lp = last_lsm
            .index_select(0, &row_item_t)
            .gather(1, &first_t.unsqueeze(1), false)
            .squeeze_dim(1)
            .to_kind(Kind::Double);
        let first_ok = last_arg.index_select(0, &row_item_t).eq_tensor(&first_t);
        let mut lp: Vec<f64> = Vec::<f64>::try_from(first_lp.to_device(Device::Cpu))?;
        let mut greedy: Vec<bool> = Vec::<bool>::try_from(first_ok.to_device(Device::Cpu))?;

        // Continuations: inputs are all but the last continuation token, right-padded.
        let tk = row_req
            .iter()
            .map(|&m| reqs[m].continuation.len() - 1)
            .max()
            .unwrap_or(0);
        let mut kv_bytes = cache.valid_bytes();
        if tk > 0 {
            let mut cids = vec![0i64; n_rows * tk];
            let mut cmask = vec![0i64; n_rows * tk];
            // Flat positions (row * tk + j) whose output predicts continuation token j + 1.
            let mut gather_pos: Vec<i64> = Vec::new();
            let mut gather_tok: Vec<i64> = Vec::new();
            let mut gather_row: Vec<usize> = Vec::new();
            for (r, &m) in row_req.iter().enumerate() {
                let c = &reqs[m].continuation;
                for j in 0..c.len() - 1 {
                    cids[r * tk + j] = c[j];
                    cmask[r * tk + j] = 1;
                    gather_pos.push((r * tk + j) as i64);
                    gather_tok.push(c[j + 1]);
                    gather_row.push(r);
                }
            }
            let mut ccache = cache.select_rows(&row_item_t);
            let cids_t = Tensor::from_slice(&cids).view([n_rows as i64, tk as i64]);
            let cmask_t = Tensor::from_slice(&cmask).view([n_rows as i64, tk as i64]);
            let h = self.model.forward_hidden(&cids_t, &cmask_t, &mut ccache)?;
            self.stats.forward_calls += 1;
            self.stats.padded_slots += n_rows * tk;
            self.stats.tokens_processed += gather_pos.len();
            kv_bytes = ccache.valid_bytes();
            let d = h.size()[2];
            let pos_t = Tensor::from_slice(&gather_pos).to_device(dev);
            let tok_t = Tensor::from_slice(&gather_tok).to_device(dev);
            let hsel = h.view([-1, d]).index_select(0, &pos_t);
            let logits = self.model.head(&hsel);
            let lps = logits
                .log_softmax(-1, Kind::Float)
                .gather(1, &tok_t.unsqueeze(1), false)
                .squeeze_dim(1)
                .to_kind(Kind::Double);
            let oks = logits.argmax(-1, false).eq_tensor(&tok_t);
            let lps = Vec::<f64>::try_from(lps.to_device(Device::Cpu))?;
            let oks = Vec::<bool>::try_from(oks.to_device(Device::Cpu))?;
            for ((&r, l), o) in gather_row.iter().zip(lps).zip(oks) {
                lp[r] += l;
                greedy[r] &= o;
            }
        }
        self.stats.peak_kv_bytes = self.stats.peak_kv_bytes.max(kv_bytes);
        for (r, &m) in row_req.iter().enumerate() {
            results[m] = Some(LlResult {
                logprob: lp[r],
                is_greedy: greedy[r],
                n_tokens: reqs[m].continuation.len(),
            });
        }
        Ok(())
    }
}

/// Reference scorer: one unpadded full forward per request, no batching, no sharing (for tests).
pub fn score_one_by_one(model: &Llama, reqs: &[LlRequest]) -> Result<Vec<LlResult>> {
    let _guard = tch::no_grad_guard();
    let mut out = Vec::with_capacity(reqs.len());
    for r in reqs {
        let mut all = r.context.clone();
        all.extend_from_slice(&r.continuation);
        let input = &all[..all.len() - 1];
        let t = Tensor::from_slice(input).view([1, -1]);
        let logits = model.forward(&t, None)?.logits.squeeze_dim(0);
        let n = r.continuation.len() as i64;
        let tail = logits.narrow(0, input.len() as i64 - n, n);
        let target = Tensor::from_slice(&r.continuation).to_device(model.device);
        let lp = tail
            .log_softmax(-1, Kind::Float)
            .gather(1, &target.unsqueeze(1), false)
            .sum(Kind::Double)
            .double_value(&[]);
        let greedy = tail
            .argmax(-1, false)
            .eq_tensor(&target)
            .all()
            .to_kind(Kind::Int64)
            .int64_value(&[])
            != 0;
        out.push(LlResult {
            logprob: lp,
            is_greedy: greedy,
            n_tokens: r.continuation.len(),
        });
    }
    Ok(out)
}
