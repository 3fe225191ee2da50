//! Optional distillation: the token-mean `KL(dense || routed)` of the next-token distributions over real
//! tokens, the frozen dense model being the teacher. Off unless the config names it.
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

/// The distillation term.
pub struct Kd {
    weight: f64,
}

pub fn factory(v: &Value) -> Result<Box<dyn LossTerm>> {
    let o: Options = parse("kd", v)?;
    check_weight("kd", o.weight)?;
    Ok(Box::new(Kd { weight: o.weight }))
}

impl LossTerm for Kd {
    fn name(&self) -> &str {
        "kd"
    }
    fn weight(&self, _step: usize, _total: usize) -> f64 {
        self.weight
    }
    fn needs_dense(&self) -> bool {
        true
    }
    fn value(&self, x: &LossInput) -> Tensor {
        let d = x
            .dense_logits
            .expect("the trainer computes dense logits for terms that need them");
        let t = x.out.logits.size()[1];
        let lp = x.out.logits.log_softmax(-1, Kind::Float);
        let lq = d.log_softmax(-1, Kind::Float);
        let kl = (lq.exp() * (&lq - &lp)).sum_dim_intlist(-1, false, Kind::Float);
        let mask = x.batch.attention_mask.to_kind(Kind::Float).narrow(1, 0, t);
        (kl * &mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0)
    }
}
