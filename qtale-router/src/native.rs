//! Routed batch-1 decode on the model crate's native CPU decoder
//! ([`qtale_model::native::NativeDecoder`]): the same decisions as [`crate::RoutedLlama`] in inference
//! mode (execute iff `p_exec >= theta`; layers before `start_layer` and the first `reserved_tokens`
//! positions always run; a skipped token writes no K/V, i.e. the `evict` policy), made per token by a
//! [`NativeGate`] on the f32 residual stream, with no libtorch call per token.
//!
//! Why: the per-token cost of the tch decode path, not the skipping, is what keeps routed decode far
//! from llama.cpp; here a skipped layer costs one router MLP (`2 d h` FLOPs) and nothing else.
use std::cell::UnsafeCell;

use qtale_model::native::{LayerGate, NativeDecoder, NativeState};
use qtale_model::Llama;
use qtale_quant::kernels::int4::Backend;
use qtale_quant::kernels::ops;
use qtale_quant::kernels::pool::Ctx;
use tch::{Kind, Tensor};

use crate::config::{KvPolicy, RoutingConfig};
use crate::error::{Result, RouterError};
use crate::routed::{ForwardOptions, Mode, RoutedLlama};
use crate::router::{Router, SURE};

/// A router's decision function on one token, in plain f32 (no tensors), for the native decoder.
pub trait NativeGate: Send + Sync {
    /// Every thread of the decoder's team, same arguments, before [`NativeGate::p_exec`]: the heavy
    /// part (a matrix-vector product) split with [`Ctx::chunks`] into the gate's own scratch.
    fn parallel(&self, _ctx: &Ctx, _layer: usize, _x: &[f32]) {}
    /// `p(execute)` at routed layer `layer` for one token whose residual stream entering the layer is
    /// `x` (`d` values) at absolute position `pos`: the same value as `softmax(Router::logits)[1]`.
    /// Called by one thread after [`NativeGate::parallel`] (or alone, with `ctx = None` semantics: see
    /// [`NativeGate::p_exec_alone`]).
    fn p_exec(&self, layer: usize, x: &[f32], pos: usize) -> f32;
    /// [`NativeGate::p_exec`] without a team (tests, analysis): runs the parallel part on one thread.
    fn p_exec_alone(&self, layer: usize, x: &[f32], pos: usize) -> f32 {
        let pool = qtale_quant::kernels::pool::Pool::new(1);
        pool.run(|ctx| self.parallel(ctx, layer, x));
        self.p_exec(layer, x, pos)
    }
}

/// `softmax([0, +SURE])[1]` and `softmax([0, -SURE])[1]`: the rule-based routers' probabilities, so that
/// theta 0 still executes everything, as in the tch path.
pub(crate) fn rule_p(run: bool) -> f32 {
    if run {
        1.0
    } else {
        (1.0 / (1.0 + SURE.exp())) as f32
    }
}

/// The D-LLM router MLP of one layer in f32 row-major vectors:
/// `Linear(d -> h) -> RMSNorm(h) -> SiLU -> Linear(h -> 2)`.
#[derive(Debug, Clone)]
pub(crate) struct NativeMlp {
    pub fc1_w: Vec<f32>,
    pub fc1_b: Vec<f32>,
    pub norm_w: Vec<f32>,
    pub fc2_w: Vec<f32>,
    pub fc2_b: Vec<f32>,
}

/// The first linear's output of the current token, written by the team in disjoint row chunks.
pub(crate) struct Scratch(Box<[UnsafeCell<f32>]>);

// SAFETY: written only in [`NativeGate::parallel`] (disjoint chunks per thread) and read only in
// [`NativeGate::p_exec`] after the team's barrier; the decoder runs one token at a time.
unsafe impl Sync for Scratch {}

impl Scratch {
    pub fn new(n: usize) -> Self {
        Scratch((0..n).map(|_| UnsafeCell::new(0.0)).collect())
    }
    /// The values as one raw pointer (`UnsafeCell<f32>` has `f32`'s layout).
    fn ptr(&self) -> *mut f32 {
        UnsafeCell::raw_get(self.0.as_ptr())
    }
}

/// Rows of the router's first linear per chunk of the team's work.
const GATE_ROWS: usize = 32;

/// [`NativeGate`] of a [`crate::DllmRouter`]: one [`NativeMlp`] per routed layer; the first linear
/// (`h x d`, nearly all of the router's cost) is split over the team by the kernels' f32 GEMV.
pub(crate) struct DllmGate {
    pub layers: Vec<Option<NativeMlp>>,
    pub h: usize,
    pub eps: f32,
    pub backend: Backend,
    pub hid: Scratch,
}

impl NativeGate for DllmGate {
    fn parallel(&self, ctx: &Ctx, layer: usize, x: &[f32]) {
        let Some(Some(m)) = self.layers.get(layer) else {
            return;
        };
        let h = self.h;
        let base = self.hid.ptr();
        for c in ctx.chunks(h.div_ceil(GATE_ROWS)) {
            let (r0, r1) = (c * GATE_ROWS, ((c + 1) * GATE_ROWS).min(h));
            // SAFETY: chunk `c` is this thread's alone (Ctx::chunks), the scratch holds `h` values.
            let out = unsafe { std::slice::from_raw_parts_mut(base.add(r0), r1 - r0) };
            // Shapes are fixed at construction (d columns, h rows), so this cannot fail; a failure
            // would leave NaN, which decides "skip" visibly in the tests rather than silently.
            if ops::gemv_f32_rows(&m.fc1_w, x, r0, r1, out, self.backend).is_err() {
                out.fill(f32::NAN);
            }
        }
    }

    fn p_exec(&self, layer: usize, _x: &[f32], _pos: usize) -> f32 {
        let Some(Some(m)) = self.layers.get(layer) else {
            return 1.0;
        };
        let h = self.h;
        // SAFETY: the team's writes ended at the barrier before this call.
        let hid = unsafe { std::slice::from_raw_parts_mut(self.hid.ptr(), h) };
        for (o, b) in hid.iter_mut().zip(&m.fc1_b) {
            *o += b;
        }
        let ms = hid.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let r = 1.0 / (ms + self.eps).sqrt();
        for (v, g) in hid.iter_mut().zip(&m.norm_w) {
            let y = *v * r * g;
            *v = y / (1.0 + (-y).exp());
        }
        let z = |k: usize| {
            m.fc2_b[k]
                + m.fc2_w[k * h..(k + 1) * h]
                    .iter()
                    .zip(hid.iter())
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
        };
        // softmax([z0, z1])[1]
        1.0 / (1.0 + (z(0) - z(1)).exp())
    }
}

/// Copy a tensor into an f32 vector (router weights are small).
pub(crate) fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        t.to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .reshape([-1]),
    )?)
}

/// The inference rule for one token: always-run layers and reserved positions execute; elsewhere
/// execute iff `p_exec >= theta`.
struct TokenRule<'g, F> {
    gate: &'g dyn NativeGate,
    pos: usize,
    always: F,
    theta: f32,
}

impl<F: Fn(usize) -> bool + Sync> LayerGate for TokenRule<'_, F> {
    fn parallel(&self, ctx: &Ctx, l: usize, x: &[f32]) {
        if !(self.always)(l) {
            self.gate.parallel(ctx, l, x);
        }
    }
    fn decide(&self, l: usize, x: &[f32]) -> bool {
        (self.always)(l) || self.gate.p_exec(l, x, self.pos) >= self.theta
    }
}

/// Execution counts of a native routed decode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NativeExecCounts {
    /// Tokens run.
    pub tokens: u64,
    /// Tokens that count for the ratio (not reserved).
    pub counted: u64,
    /// Per layer: counted tokens that executed it.
    pub layer_exec: Vec<u64>,
}

impl NativeExecCounts {
    /// Execution ratio over counted tokens, always-run layers counting 1 (the method's ratio).
    pub fn ratio(&self) -> Option<f64> {
        (self.counted > 0 && !self.layer_exec.is_empty()).then(|| {
            self.layer_exec.iter().sum::<u64>() as f64
                / (self.counted as f64 * self.layer_exec.len() as f64)
        })
    }
}

/// A native decoder with a router in front of every layer from `start_layer` on.
pub struct NativeRouted<'a> {
    pub decoder: &'a NativeDecoder,
    gate: Box<dyn NativeGate>,
    start_layer: usize,
    reserved_tokens: usize,
    theta: f32,
    executed: Vec<bool>,
    pub counts: NativeExecCounts,
}

impl<'a> NativeRouted<'a> {
    /// Route `decoder` with `router` (trained with `config`) at threshold `theta`. Refuses routers
    /// without a native form and the `compute_kv` policy (the native step writes no K/V for a skipped
    /// token).
    pub fn new(
        decoder: &'a NativeDecoder,
        router: &dyn Router,
        config: &RoutingConfig,
        theta: f64,
    ) -> Result<Self> {
        let layers = decoder.dims().layers;
        config.validate_for(layers)?;
        if !(0.0..=1.0).contains(&theta) {
            return Err(RouterError::config(
                "theta",
                format!("must be in [0, 1], got {theta}"),
            ));
        }
        if config.kv_policy != KvPolicy::Evict {
            return Err(RouterError::config(
                "kv_policy",
                "the native decoder supports `evict` only (skipped tokens write no K/V)",
            ));
        }
        let gate = router.native_gate()?.ok_or_else(|| {
            RouterError::Input(format!(
                "router {} has no native form (NativeGate)",
                router.name()
            ))
        })?;
        Ok(NativeRouted {
            decoder,
            gate,
            start_layer: config.start_layer,
            reserved_tokens: config.reserved_tokens,
            theta: theta as f32,
            executed: vec![false; layers],
            counts: NativeExecCounts {
                layer_exec: vec![0; layers],
                ..Default::default()
            },
        })
    }

    /// [`NativeRouted::new`] with the router, config and theta of a tch [`RoutedLlama`].
    pub fn from_routed<M: std::borrow::Borrow<Llama>, R: Router>(
        decoder: &'a NativeDecoder,
        routed: &RoutedLlama<M, R>,
    ) -> Result<Self> {
        Self::new(decoder, &routed.router, &routed.config, routed.theta)
    }

    /// The decisions of the last token, per layer.
    pub fn last_decisions(&self) -> &[bool] {
        &self.executed
    }

    /// One token through the layers its routers execute; returns the argmax of its logits.
    pub fn forward_token(&mut self, token: i64, st: &mut NativeState) -> Result<usize> {
        let pos = st.pos();
        let reserved = pos < self.reserved_tokens;
        let rule = TokenRule {
            gate: &*self.gate,
            pos,
            always: |l: usize| reserved || l < self.start_layer,
            theta: self.theta,
        };
        let next = self
            .decoder
            .forward_token_gated(token, st, &rule, &mut self.executed)?;
        self.counts.tokens += 1;
        if !reserved {
            self.counts.counted += 1;
            for (c, &e) in self.counts.layer_exec.iter_mut().zip(&self.executed) {
                *c += u64::from(e);
            }
        }
        Ok(next)
    }

    /// Prefill `prompt` with the tch routed model in inference mode (one batched forward, the same
    /// decisions per token), import its K/V cache (each layer keeps only its executing tokens) into
    /// `st`, and return the greedy next token.
    pub fn prefill_tch<M: std::borrow::Borrow<Llama>, R: Router>(
        &self,
        routed: &RoutedLlama<M, R>,
        prompt: &[i64],
        st: &mut NativeState,
    ) -> Result<i64> {
        let _g = tch::no_grad_guard();
        let model = routed.llama();
        let mut cache = qtale_model::KvCache::new(model.layers.len());
        let ids = Tensor::from_slice(prompt).view([1, -1]);
        let out = routed.forward_hidden_cached(
            &ids,
            None,
            &mut cache,
            Mode::Infer,
            &ForwardOptions::default(),
        )?;
        let last = out.hidden.narrow(1, prompt.len() as i64 - 1, 1);
        let next = model
            .lm_logits(&last)
            .view([-1])
            .argmax(0, false)
            .int64_value(&[]);
        st.import_tch_cache(&cache, self.decoder)?;
        Ok(next)
    }
}
