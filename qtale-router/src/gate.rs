//! [`NativeGate`]: a router's execute decision for one token in plain f32, for the native CPU decoder
//! ([`crate::native`]), and its forms for the D-LLM router ([`DllmGate`]: the first linear split over
//! the decoder's thread team) and the rule-based routers (`rule_p`). Depends on no other module of
//! this crate; the routers ([`crate::router`]) build their gates from it.
use std::cell::UnsafeCell;

use qtale_quant::kernels::int4::Backend;
use qtale_quant::kernels::ops;
use qtale_quant::kernels::pool::Ctx;
use tch::{Kind, Tensor};

use crate::error::Result;

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

/// `softmax([0, +gap])[1]` and `softmax([0, -gap])[1]`: the rule-based routers' probabilities for
/// their logit gap (`crate::router::SURE`), so that theta 0 still executes everything, as in the tch
/// path.
pub(crate) fn rule_p(gap: f64, run: bool) -> f32 {
    if run {
        1.0
    } else {
        (1.0 / (1.0 + gap.exp())) as f32
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
