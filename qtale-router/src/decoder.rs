//! The routed model as a [`Decoder`]: scorers, perplexity and theta calibration see it through the
//! model crate's interface, in inference mode (real skipping at its `theta`).
use std::borrow::Borrow;
use std::cell::RefCell;

use tch::{Device, Tensor};

use qtale_model::decoder::{Decoder, ExecSummary};
use qtale_model::{KvCache, Llama, ModelError};

use crate::error::RouterError;
use crate::routed::{ForwardOptions, Mode, RoutedLlama};
use crate::router::Router;

/// A routed decoder scored in inference mode (real skipping at its `theta`), collecting what it
/// executed for [`Decoder::take_exec_stats`].
pub struct RoutedDecoder<M, R> {
    pub routed: RoutedLlama<M, R>,
    /// Collect execution statistics on every forward (default). Timing runs turn it off: the
    /// statistics (visible keys per layer, per-token FLOPs) are bookkeeping the dense model does not do.
    pub collect_stats: bool,
    exec: RefCell<Option<ExecSummary>>,
}

impl<M: Borrow<Llama>, R: Router> RoutedDecoder<M, R> {
    pub fn new(routed: RoutedLlama<M, R>) -> Self {
        RoutedDecoder {
            routed,
            collect_stats: true,
            exec: RefCell::new(None),
        }
    }
}

impl<M: Borrow<Llama>, R: Router> Decoder for RoutedDecoder<M, R> {
    fn num_layers(&self) -> usize {
        self.routed.llama().layers.len()
    }
    fn device(&self) -> Device {
        self.routed.llama().device
    }
    fn max_length(&self) -> usize {
        self.routed.llama().config.max_position_embeddings
    }
    fn forward_hidden(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> qtale_model::Result<Tensor> {
        let opts = ForwardOptions {
            forced: None,
            stats: self.collect_stats,
            ..Default::default()
        };
        // The scorer applies the head to the continuation positions only.
        let out = self
            .routed
            .forward_hidden_cached(ids, Some(mask), cache, Mode::Infer, &opts)
            .map_err(|e| match e {
                RouterError::Model(m) => m,
                other => ModelError::Decoder(Box::new(other)),
            })?;
        if let Some(s) = &out.stats {
            let mut acc = self.exec.borrow_mut();
            match acc.as_mut() {
                Some(a) => a.merge(&s.summary()),
                None => *acc = Some(s.summary()),
            }
        }
        Ok(out.hidden)
    }
    fn head(&self, hidden: &Tensor) -> Tensor {
        self.routed.llama().lm_logits(hidden)
    }
    /// The decoder's weights plus the routers' (kept in high precision).
    fn weight_bytes(&self) -> usize {
        self.routed.llama().weight_bytes() + self.routed.router.weight_bytes()
    }
    fn take_exec_stats(&self) -> Option<ExecSummary> {
        self.exec.borrow_mut().take()
    }
}
