//! Routed batch-1 decode on the model crate's native CPU decoder
//! ([`qtale_model::native::NativeDecoder`]): the same decisions as [`crate::RoutedLlama`] in inference
//! mode (execute iff `p_exec >= theta`; layers before `start_layer` and the first `reserved_tokens`
//! positions always run; a skipped token writes no K/V, i.e. the `evict` policy), made per token by a
//! [`NativeGate`] on the f32 residual stream, with no libtorch call per token.
//!
//! Why: the per-token cost of the tch decode path, not the skipping, is what keeps routed decode far
//! from llama.cpp; here a skipped layer costs one router MLP (`2 d h` FLOPs) and nothing else.
use qtale_model::native::{LayerGate, NativeDecoder, NativeState};
use qtale_model::Llama;
use qtale_quant::kernels::pool::Ctx;
use tch::Tensor;

use crate::config::{KvPolicy, RoutingConfig};
use crate::error::{Result, RouterError};
use crate::gate::NativeGate;
use crate::routed::{ForwardOptions, Mode, RoutedLlama};
use crate::router::Router;

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
