//! Router analysis as data: per routed layer, the histogram of logit gaps (execute minus skip) and the
//! Gumbel flip rate (how often a hard Gumbel sample disagrees with the argmax decision).
//!
//! The hard sample `argmax((logits + g) / tau)` does not depend on the temperature, so neither does the
//! flip rate; with two classes the difference of two Gumbels is logistic and the expected flip rate of
//! a token is `sigmoid(-|gap|)`. Both the sampled and the expected rates are reported.
use std::borrow::Borrow;

use qtale_model::Llama;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::batch::CalibBatch;
use crate::error::{Result, RouterError};
use crate::routed::{ForwardOptions, Mode, RoutedLlama};
use crate::router::Router;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AnalysisOptions {
    pub bins: usize,
    /// Histogram range of the gap; values outside fall into the first or last bin.
    pub range: (f64, f64),
    /// Gumbel samples per token.
    pub samples: usize,
    pub seed: u64,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        AnalysisOptions {
            bins: 40,
            range: (-10.0, 10.0),
            samples: 16,
            seed: 0,
        }
    }
}

/// One routed layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerAnalysis {
    pub layer: usize,
    /// Tokens analysed (real, not reserved).
    pub tokens: u64,
    /// Bin edges (`bins + 1`) and counts (`bins`).
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
    pub mean_gap: f64,
    pub mean_abs_gap: f64,
    /// Sampled fraction of Gumbel decisions that differ from the argmax.
    pub flip_rate: f64,
    /// Expected flip rate, mean of `sigmoid(-|gap|)`.
    pub expected_flip_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouterAnalysis {
    pub router: String,
    pub layers: Vec<LayerAnalysis>,
}

/// Collect router logits on `batches` (inference mode at the current theta; the logits a layer sees
/// depend on the earlier decisions) and analyse them per routed layer.
pub fn analyze<M: Borrow<Llama>, R: Router>(
    routed: &RoutedLlama<M, R>,
    batches: &[CalibBatch],
    opts: &AnalysisOptions,
) -> Result<RouterAnalysis> {
    if opts.bins == 0
        || opts.range.1.partial_cmp(&opts.range.0) != Some(std::cmp::Ordering::Greater)
    {
        return Err(RouterError::Input(
            "analysis needs bins > 0 and range.1 > range.0".into(),
        ));
    }
    let _g = tch::no_grad_guard();
    let n = routed.llama().layers.len();
    let mut gaps: Vec<Vec<f32>> = vec![Vec::new(); n];
    for b in batches {
        let out = routed.forward(
            &b.ids,
            b.mask.as_ref(),
            Mode::Infer,
            &ForwardOptions::default(),
        )?;
        let keep = out.ratio_mask().reshape([-1]);
        for (l, lg) in out.router_logits.iter().enumerate() {
            if let Some(lg) = lg {
                let gap = (lg.select(-1, 1) - lg.select(-1, 0)).reshape([-1]);
                let gap = gap
                    .masked_select(&keep)
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Float);
                let v: Vec<f32> = Vec::try_from(gap).expect("f32 data");
                gaps[l].extend(v);
            }
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let (lo, hi) = opts.range;
    let width = (hi - lo) / opts.bins as f64;
    let edges: Vec<f64> = (0..=opts.bins).map(|i| lo + i as f64 * width).collect();
    let mut layers = Vec::new();
    for (l, g) in gaps.iter().enumerate() {
        if !routed.config.is_routed(l) {
            continue;
        }
        let mut counts = vec![0u64; opts.bins];
        let (mut sum, mut sum_abs, mut exp_flip) = (0.0, 0.0, 0.0);
        let mut flips = 0u64;
        for &x in g {
            let x = x as f64;
            let bin = (((x - lo) / width).floor().max(0.0) as usize).min(opts.bins - 1);
            counts[bin] += 1;
            sum += x;
            sum_abs += x.abs();
            exp_flip += 1.0 / (1.0 + x.abs().exp());
            let argmax = x >= 0.0;
            for _ in 0..opts.samples {
                let g1 = -(-(rng.gen_range(f64::MIN_POSITIVE..1.0)).ln()).ln();
                let g0 = -(-(rng.gen_range(f64::MIN_POSITIVE..1.0)).ln()).ln();
                if (x + g1 - g0 >= 0.0) != argmax {
                    flips += 1;
                }
            }
        }
        let k = g.len().max(1) as f64;
        layers.push(LayerAnalysis {
            layer: l,
            tokens: g.len() as u64,
            edges: edges.clone(),
            counts,
            mean_gap: sum / k,
            mean_abs_gap: sum_abs / k,
            flip_rate: flips as f64 / (k * opts.samples.max(1) as f64),
            expected_flip_rate: exp_flip / k,
        });
    }
    Ok(RouterAnalysis {
        router: routed.router.name(),
        layers,
    })
}
