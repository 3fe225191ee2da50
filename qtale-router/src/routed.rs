//! [`RoutedLlama`]: the decoder with a router in front of every block from `start_layer` on, in two
//! execution modes.
//!
//! * **Training** ([`Mode::Train`]): every token computes every layer; the decision is a hard
//!   Gumbel-softmax sample with straight-through gradients, the block output is
//!   `w * block(x) + (1 - w) * x`, and (under `evict`) a skipped token's key is marked invalid in the
//!   layer's cache, so later queries never attend to it. Differentiable.
//! * **Inference** ([`Mode::Infer`]): execute iff `p_exec >= theta`; per layer, the executing tokens of the
//!   whole batch are packed into `[B, T', d]` with their true positions and a query-valid mask, the block
//!   runs on them only, and the results are scattered back. Skipped tokens write no K/V (`evict`) or only
//!   their K/V projections (`compute_kv`). The same code serves prefill and decode: each layer's
//!   [`LayerCache`] holds its own number of keys, with validity flags for the padding that batching adds.
use std::borrow::Borrow;

use qtale_model::model::{LayerCache, Step};
use qtale_model::{KvCache, Llama};
use tch::{Kind, Tensor};

use crate::config::{KvPolicy, RoutingConfig};
use crate::error::{Result, RouterError};
use crate::router::Router;
use crate::stats::ExecStats;
use qtale_model::decoder::FlopModel;

/// Execution mode of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every token computes every layer; hard Gumbel-softmax straight-through gates.
    Train,
    /// Real skipping at threshold `theta`.
    Infer,
}

/// Options of one forward.
#[derive(Debug)]
pub struct ForwardOptions<'a> {
    /// Decisions to use instead of the router's: `[B, T, L]` bool (entries of always-run layers are
    /// ignored; reserved tokens and padding follow the usual rules). The router still runs (its logits
    /// are returned). For tests and analysis: the same decisions in both modes.
    pub forced: Option<&'a Tensor>,
    /// Compute [`ExecStats`] (visible-key counts, FLOPs, KV bytes; a few extra small ops per layer).
    pub stats: bool,
    /// Gumbel-softmax temperature of a training-mode forward (the trainer's schedule; default 1). The
    /// hard sample does not depend on it, only the straight-through gradient does.
    pub temperature: f64,
}

impl Default for ForwardOptions<'_> {
    fn default() -> Self {
        ForwardOptions {
            forced: None,
            stats: false,
            temperature: 1.0,
        }
    }
}

/// Output of a routed forward.
#[derive(Debug)]
pub struct RoutedOutput {
    /// Final hidden states after the last norm, `[B, T, d]`.
    pub hidden: Tensor,
    /// Logits `[B, T, vocab]`, f32, every position.
    pub logits: Tensor,
    /// Per layer: router logits `[B, T, 2]` (f32, differentiable in training mode); `None` for
    /// always-run layers.
    pub router_logits: Vec<Option<Tensor>>,
    /// Per layer: the gate `w` `[B, T]` (f32). Training mode: the straight-through hard Gumbel sample
    /// (forward 0/1, backward soft), 1 for reserved tokens, 0 for padding. Inference: the 0/1 decision.
    /// `None` for always-run layers.
    pub gates: Vec<Option<Tensor>>,
    /// Execute bit per (token, layer) `[B, T, L]` bool; always-run layers are true for real tokens;
    /// padding is false everywhere.
    pub exec: Tensor,
    /// Real tokens `[B, T]` bool.
    pub valid: Tensor,
    /// True positions `[B, T]`.
    pub positions: Tensor,
    /// Reserved tokens (position < `reserved_tokens`, real) `[B, T]`.
    pub reserved: Tensor,
    /// Statistics, when [`ForwardOptions::stats`] was set.
    pub stats: Option<ExecStats>,
}

/// [`RoutedOutput`] without the logits (see [`RoutedLlama::forward_hidden_cached`]); the fields mean
/// the same.
#[derive(Debug)]
pub struct RoutedHidden {
    pub hidden: Tensor,
    pub router_logits: Vec<Option<Tensor>>,
    pub gates: Vec<Option<Tensor>>,
    pub exec: Tensor,
    pub valid: Tensor,
    pub positions: Tensor,
    pub reserved: Tensor,
    pub stats: Option<ExecStats>,
}

impl RoutedOutput {
    /// Per-token execution ratio `r_t` `[B, T]` f32 from the gates (differentiable in training mode):
    /// mean over all L layers, always-run layers counting 1. The ratio loss is
    /// `mean |r_t - target|` over [`RoutedOutput::ratio_mask`].
    pub fn token_ratio(&self) -> Tensor {
        let l = self.gates.len() as f64;
        let mut sum = self.valid.to_kind(Kind::Float) * 0.0;
        for g in &self.gates {
            sum = match g {
                Some(g) => sum + g,
                None => sum + 1.0,
            };
        }
        sum / l
    }

    /// Tokens that count for the ratio: real and not reserved `[B, T]` bool.
    pub fn ratio_mask(&self) -> Tensor {
        self.valid.logical_and(&self.reserved.logical_not())
    }
}

/// Tokens selected from a `[B, T]` set, packed left into `[B, T']`.
struct Packed {
    x: Tensor,
    pos: Tensor,
    valid: Tensor,
    /// Flat indices into `B * T` of the selected tokens (row-major).
    src: Tensor,
    /// Flat indices into `B * T'` of their packed slots (same order).
    dst: Tensor,
}

fn pack(x: &Tensor, positions: &Tensor, sel: &Tensor) -> Option<Packed> {
    let s = x.size();
    let (b, d) = (s[0], s[2]);
    let counts = sel
        .to_kind(Kind::Int64)
        .sum_dim_intlist(1, false, Kind::Int64);
    let tp = counts.max().int64_value(&[]);
    if tp == 0 {
        return None;
    }
    let dev = x.device();
    let src = sel.reshape([-1]).nonzero().squeeze_dim(1);
    let valid = Tensor::arange(tp, (Kind::Int64, dev))
        .unsqueeze(0)
        .lt_tensor(&counts.unsqueeze(1));
    let dst = valid.reshape([-1]).nonzero().squeeze_dim(1);
    let xs = x.reshape([-1, d]).index_select(0, &src);
    let xp = Tensor::zeros([b * tp, d], (x.kind(), dev))
        .index_copy(0, &dst, &xs)
        .view([b, tp, d]);
    let ps = positions.reshape([-1]).index_select(0, &src);
    let pp = Tensor::zeros([b * tp], (Kind::Int64, dev))
        .index_copy(0, &dst, &ps)
        .view([b, tp]);
    Some(Packed {
        x: xp,
        pos: pp,
        valid,
        src,
        dst,
    })
}

/// Write the packed results `y: [B, T', d]` back into `x: [B, T, d]`.
fn unpack(x: &Tensor, p: &Packed, y: &Tensor) -> Tensor {
    let s = x.size();
    let d = s[2];
    let ys = y.reshape([-1, d]).index_select(0, &p.dst);
    x.reshape([-1, d])
        .index_copy(0, &p.src, &ys)
        .view(s.as_slice())
}

/// Number of keys in `cache` visible to each query `[B, T]` (valid and at a position <= the query's).
pub(crate) fn visible_keys(cache: &LayerCache, q_pos: &Tensor) -> Tensor {
    match (&cache.pos, &cache.valid) {
        (Some(kp), Some(kv)) => kp
            .unsqueeze(1)
            .le_tensor(&q_pos.unsqueeze(2))
            .logical_and(&kv.unsqueeze(1))
            .to_kind(Kind::Int64)
            .sum_dim_intlist(-1, false, Kind::Int64),
        _ => q_pos.zeros_like(),
    }
}

/// The decoder with routers. Owns or borrows the model (`M` is `Llama` or `&Llama`) and the router.
/// `config` is what the routers were trained with; `theta` is the inference-time threshold, chosen
/// after training (QTALE's execution-ratio adjustment), so it is not part of the training config.
pub struct RoutedLlama<M, R> {
    pub model: M,
    pub router: R,
    pub config: RoutingConfig,
    /// Inference decision: execute iff `p_exec >= theta`. D-LLM's 0.5 by default; 0 executes
    /// everything. Set with [`RoutedLlama::set_theta`].
    pub theta: f64,
}

/// D-LLM's inference threshold.
pub const DEFAULT_THETA: f64 = 0.5;

impl<M: Borrow<Llama>, R: Router> RoutedLlama<M, R> {
    /// Check the config against the model; theta starts at D-LLM's 0.5.
    pub fn new(model: M, router: R, config: RoutingConfig) -> Result<Self> {
        config.validate_for(model.borrow().layers.len())?;
        Ok(RoutedLlama {
            model,
            router,
            config,
            theta: DEFAULT_THETA,
        })
    }

    /// [`RoutedLlama::new`] at threshold `theta`.
    pub fn with_theta(model: M, router: R, config: RoutingConfig, theta: f64) -> Result<Self> {
        let mut r = Self::new(model, router, config)?;
        r.set_theta(theta)?;
        Ok(r)
    }

    pub fn llama(&self) -> &Llama {
        self.model.borrow()
    }

    /// Set the inference threshold (in [0, 1]).
    pub fn set_theta(&mut self, theta: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&theta) {
            return Err(RouterError::config(
                "theta",
                format!("must be in [0, 1], got {theta}"),
            ));
        }
        self.theta = theta;
        Ok(())
    }

    /// The FLOPs model of this (model, router, policy).
    pub fn flop_model(&self) -> FlopModel {
        FlopModel::new(&self.llama().config)
    }

    /// Forward without a cache (prefill of a fresh batch).
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mode: Mode,
        opts: &ForwardOptions,
    ) -> Result<RoutedOutput> {
        let mut cache = KvCache::new(self.llama().layers.len());
        self.forward_cached(ids, attention_mask, &mut cache, mode, opts)
    }

    /// Forward continuing from `cache` (prefill when empty, decode after); new K/V are appended per layer
    /// for the tokens that execute it (and, under `compute_kv`, for the skipped ones).
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        mode: Mode,
        opts: &ForwardOptions,
    ) -> Result<RoutedOutput> {
        let b = self.forward_hidden_cached(ids, attention_mask, cache, mode, opts)?;
        let logits = self.llama().lm_logits(&b.hidden);
        Ok(RoutedOutput {
            hidden: b.hidden,
            logits,
            router_logits: b.router_logits,
            gates: b.gates,
            exec: b.exec,
            valid: b.valid,
            positions: b.positions,
            reserved: b.reserved,
            stats: b.stats,
        })
    }

    /// [`RoutedLlama::forward_cached`] without the LM head (everything else: final hidden states,
    /// decisions, statistics). For callers that apply the head to a few positions only (scoring,
    /// generation): the head over every position costs as much as ~8 of SmolLM2's 30 layers in a
    /// 256-token prefill.
    pub fn forward_hidden_cached(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        mode: Mode,
        opts: &ForwardOptions,
    ) -> Result<RoutedHidden> {
        let model = self.llama();
        let n_layers = model.layers.len();
        let p = model.prepare_step(ids, attention_mask, cache)?;
        let (b, t) = (p.ids.size()[0], p.ids.size()[1]);
        if let Some(f) = opts.forced {
            if f.size() != [b, t, n_layers as i64] || f.kind() != Kind::Bool {
                return Err(RouterError::Input(format!(
                    "forced decisions must be bool [{b}, {t}, {n_layers}], got {:?} {:?}",
                    f.kind(),
                    f.size()
                )));
            }
        }
        let reserved = p
            .positions
            .lt(self.config.reserved_tokens as i64)
            .logical_and(&p.valid);
        let mut x = model.embed(&p.ids);
        let mut router_logits = Vec::with_capacity(n_layers);
        let mut gates = Vec::with_capacity(n_layers);
        let mut exec_bits = Vec::with_capacity(n_layers);
        let mut visible = Vec::with_capacity(n_layers);
        for (l, (layer, lc)) in model.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            if !self.config.is_routed(l) {
                x = layer.forward(&x, &p.positions, &p.valid, &p.cos_sin, lc);
                router_logits.push(None);
                gates.push(None);
                exec_bits.push(p.valid.shallow_clone());
                if opts.stats {
                    visible.push(visible_keys(lc, &p.positions));
                }
                continue;
            }
            let logits = self.router.logits(l, &x.to_kind(Kind::Float), &p.positions);
            let (decision, soft_gate) = match (opts.forced, mode) {
                (Some(f), _) => (f.select(2, l as i64), None),
                (None, Mode::Infer) => {
                    let pe = logits.softmax(-1, Kind::Float).select(-1, 1);
                    (pe.ge(self.theta), None)
                }
                (None, Mode::Train) => {
                    let (hard, st) = hard_gumbel(&logits, opts.temperature);
                    (hard, Some(st))
                }
            };
            let exec = decision.logical_or(&reserved).logical_and(&p.valid);
            let gate = match soft_gate {
                // Straight-through gate on routed tokens, constant 1 on reserved, 0 on padding.
                Some(st) => {
                    let routed = p.valid.logical_and(&reserved.logical_not());
                    st * routed.to_kind(Kind::Float) + reserved.to_kind(Kind::Float)
                }
                None => exec.to_kind(Kind::Float),
            };
            match mode {
                Mode::Train => {
                    let kv_valid = match self.config.kv_policy {
                        KvPolicy::Evict => exec.shallow_clone(),
                        KvPolicy::ComputeKv => p.valid.shallow_clone(),
                    };
                    let y = layer.forward(&x, &p.positions, &kv_valid, &p.cos_sin, lc);
                    let w = gate.to_kind(x.kind()).unsqueeze(-1);
                    x = &w * y + (1.0 - &w) * &x;
                }
                Mode::Infer => {
                    x = self.infer_layer(l, &x, &p, &exec, lc);
                }
            }
            if opts.stats {
                visible.push(visible_keys(lc, &p.positions));
            }
            router_logits.push(Some(logits));
            gates.push(Some(gate));
            exec_bits.push(exec);
        }
        let hidden = model.norm.forward(&x);
        let exec = Tensor::stack(&exec_bits, 2);
        let stats = if opts.stats {
            Some(ExecStats::compute(
                &self.flop_model(),
                &self.config,
                &self.router,
                &exec,
                &p.valid,
                &reserved,
                &p.positions,
                &visible,
                cache,
            ))
        } else {
            None
        };
        Ok(RoutedHidden {
            hidden,
            router_logits,
            gates,
            exec,
            valid: p.valid,
            positions: p.positions,
            reserved,
            stats,
        })
    }

    /// One routed layer in inference mode: K/V of skipped tokens under `compute_kv`, then the block on
    /// the packed executing tokens, scattered back.
    fn infer_layer(
        &self,
        l: usize,
        x: &Tensor,
        p: &Step,
        exec: &Tensor,
        lc: &mut LayerCache,
    ) -> Tensor {
        let model = self.llama();
        let layer = &model.layers[l];
        if self.config.kv_policy == KvPolicy::ComputeKv {
            let skipped = p.valid.logical_and(&exec.logical_not());
            if let Some(s) = pack(x, &p.positions, &skipped) {
                let (cos, sin) = model.rope.cos_sin(&s.pos, model.kind);
                let h = layer.input_layernorm.forward(&s.x);
                let (k, v) = layer.self_attn.project_kv(&h, &cos, &sin);
                lc.append(k, v, &s.pos, &s.valid);
            }
        }
        let n_exec = exec.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        let n_valid = p
            .valid
            .to_kind(Kind::Int64)
            .sum(Kind::Int64)
            .int64_value(&[]);
        if n_exec == n_valid {
            // Everything real executes: the dense path, no gather.
            return layer.forward(x, &p.positions, &p.valid, &p.cos_sin, lc);
        }
        let Some(e) = pack(x, &p.positions, exec) else {
            return x.shallow_clone();
        };
        let b = x.size()[0];
        let active = e.valid.any_dim(1, false);
        let n_active = active
            .to_kind(Kind::Int64)
            .sum(Kind::Int64)
            .int64_value(&[]);
        if n_active == b {
            let cs = model.rope.cos_sin(&e.pos, model.kind);
            let y = layer.forward(&e.x, &e.pos, &e.valid, &cs, lc);
            return unpack(x, &e, &y);
        }
        // Some rows have no executing token (typical in batched decode): run the block on the active
        // rows only, over a row-subset view of the cache, then append their new K/V to the full cache
        // (invalid slots for the inactive rows).
        let rows = active.nonzero().squeeze_dim(1);
        let sel = |t: &Option<Tensor>| t.as_ref().map(|t| t.index_select(0, &rows));
        let mut sub = LayerCache {
            k: sel(&lc.k),
            v: sel(&lc.v),
            pos: sel(&lc.pos),
            valid: sel(&lc.valid),
        };
        let s0 = sub.len();
        let (xs, ps, vs) = (
            e.x.index_select(0, &rows),
            e.pos.index_select(0, &rows),
            e.valid.index_select(0, &rows),
        );
        let cs = model.rope.cos_sin(&ps, model.kind);
        let y = layer.forward(&xs, &ps, &vs, &cs, &mut sub);
        let tp = e.x.size()[1];
        let widen = |t: &Tensor| {
            let mut shape = t.size();
            shape[0] = b;
            Tensor::zeros(shape.as_slice(), (t.kind(), t.device())).index_copy(0, &rows, t)
        };
        let new_k = widen(&sub.k.as_ref().expect("appended").narrow(2, s0, tp));
        let new_v = widen(&sub.v.as_ref().expect("appended").narrow(2, s0, tp));
        lc.append(new_k, new_v, &widen(&ps), &widen(&vs));
        unpack(x, &e, &widen(&y))
    }
}

/// Hard Gumbel-softmax over the last dimension of `logits [B, T, 2]`: returns the hard execute decision
/// `[B, T]` bool and the straight-through execute gate `[B, T]` (forward exactly the one-hot value,
/// backward the gradient of the soft sample).
pub fn hard_gumbel(logits: &Tensor, temperature: f64) -> (Tensor, Tensor) {
    let u = logits.detach().rand_like().clamp(1e-10, 1.0 - 1e-7);
    let g = -(-u.log()).log();
    let y = ((logits + g) / temperature).softmax(-1, Kind::Float);
    let hard_idx = y.argmax(-1, false);
    let hard = hard_idx.eq(1);
    let y1 = y.select(-1, 1);
    let hard_f = hard.to_kind(Kind::Float);
    // hard + (y - y.detach()): forward value is exactly `hard` (y - y.detach() == 0 exactly).
    let st = &hard_f + (&y1 - y1.detach());
    (hard, st)
}
