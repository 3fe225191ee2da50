//! QTALE's quantization-robust training term: `L_entropy = -mean_{t, routed l} H(softmax(router
//! logits))` over real, non-reserved tokens. Minimizing it keeps router logits moderate, so Gumbel noise
//! keeps exploring paths (method.md section 2.1). The paper does not publish lambda_2; the `qtale`
//! preset's 0.25 comes from our sweep.
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::{check_weight, parse, LossInput, LossTerm};
use crate::Result;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    weight: f64,
}

/// The entropy term (constant weight lambda_2).
pub struct Entropy {
    weight: f64,
}

pub fn factory(v: &Value) -> Result<Box<dyn LossTerm>> {
    let o: Options = parse("entropy", v)?;
    check_weight("entropy", o.weight)?;
    Ok(Box::new(Entropy { weight: o.weight }))
}

/// Per-token entropy (nats) of each routed layer's router softmax: `[B, T]` per routed layer.
pub fn router_entropies(x: &qtale_router::RoutedOutput) -> Vec<Tensor> {
    x.router_logits
        .iter()
        .flatten()
        .map(|lg| {
            let p = lg.log_softmax(-1, Kind::Float);
            -(p.exp() * &p).sum_dim_intlist(-1, false, Kind::Float)
        })
        .collect()
}

impl LossTerm for Entropy {
    fn name(&self) -> &str {
        "entropy"
    }
    fn weight(&self, _step: usize, _total: usize) -> f64 {
        self.weight
    }
    fn value(&self, x: &LossInput) -> Tensor {
        let m = x.out.ratio_mask().to_kind(Kind::Float);
        let n = m.sum(Kind::Float).clamp_min(1.0);
        let hs = router_entropies(x.out);
        if hs.is_empty() {
            return Tensor::zeros([], (Kind::Float, x.out.logits.device()));
        }
        let count = hs.len() as f64;
        let sum = hs
            .into_iter()
            .map(|h| (h * &m).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .expect("non-empty");
        -(sum / (n * count))
    }
}
