//! Next-token cross-entropy on the target tokens (the task loss).
use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

use super::{check_weight, parse, LossInput, LossTerm};
use crate::data::masked_ce;
use crate::Result;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    #[serde(default = "one")]
    weight: f64,
}

fn one() -> f64 {
    1.0
}

/// `CE` with a constant weight (1 by default).
pub struct Ce {
    weight: f64,
}

pub fn factory(v: &Value) -> Result<Box<dyn LossTerm>> {
    let o: Options = parse("ce", v)?;
    check_weight("ce", o.weight)?;
    Ok(Box::new(Ce { weight: o.weight }))
}

impl LossTerm for Ce {
    fn name(&self) -> &str {
        "ce"
    }
    fn weight(&self, _step: usize, _total: usize) -> f64 {
        self.weight
    }
    fn value(&self, x: &LossInput) -> Tensor {
        masked_ce(&x.out.logits, x.batch)
    }
}
