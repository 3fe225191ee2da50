//! Routed batch-1 decode on the model crate's native CPU decoder
//! ([`qtale_model::native::NativeDecoder`]): the same decisions as [`crate::RoutedLlama`] in inference
//! mode (execute iff `p_exec >= theta`; layers before `start_layer` and the first `reserved_tokens`
//! positions always run; a skipped token writes no K/V, i.e. the `evict` policy), made per token by a
//! [`NativeGate`] on the f32 residual stream, with no libtorch call per token.
//!
//! Why: the per-token cost of the tch decode path, not the skipping, is what keeps routed decode far
//! from llama.cpp; here a skipped layer costs one router MLP (`2 d h` FLOPs) and nothing else.
use qtale_model::native::{NativeDecoder, NativeState};
use qtale_model::Llama;
use tch::{Kind, Tensor};

use crate::config::{KvPolicy, RoutingConfig};
use crate::error::{Result, RouterError};
use crate::routed::{ForwardOptions, Mode, RoutedLlama};
use crate::router::{Router, SURE};

/// A router's decision function on one token, in plain f32 (no tensors), for the native decoder.
pub trait NativeGate: Send + Sync {
    /// `p(execute)` at routed layer `layer` for one token whose residual stream entering the layer is
    /// `x` (`d` values) at absolute position `pos`: the same value as `softmax(Router::logits)[1]`.
    fn p_exec(&self, layer: usize, x: &[f32], pos: usize) -> f32;
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

/// [`NativeGate`] of a [`crate::DllmRouter`]: one [`NativeMlp`] per routed layer.
#[derive(Debug, Clone)]
pub(crate) struct DllmGate {
    pub layers: Vec<Option<NativeMlp>>,
    pub d: usize,
    pub h: usize,
    pub eps: f32,
}

impl NativeGate for DllmGate {
    fn p_exec(&self, layer: usize, x: &[f32], _pos: usize) -> f32 {
        let Some(Some(m)) = self.layers.get(layer) else {
            return 1.0;
        };
        let (d, h) = (self.d, self.h);
        let mut hid = vec![0f32; h];
        for (j, o) in hid.iter_mut().enumerate() {
            let w = &m.fc1_w[j * d..(j + 1) * d];
            *o = m.fc1_b[j] + w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
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
                    .zip(&hid)
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
        let (gate, start, theta) = (&*self.gate, self.start_layer, self.theta);
        let decide = move |l: usize, x: &[f32]| -> bool {
            reserved || l < start || gate.p_exec(l, x, pos) >= theta
        };
        let next = self
            .decoder
            .forward_token_gated(token, st, &decide, &mut self.executed)?;
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
