//! D-LLM's ratio loss: `L_ratio = mean_t |r_t - target|` over real, non-reserved tokens, `r_t` the
//! token's execution ratio over all layers (always-run layers count 1). Its weight lambda_1 ramps from
//! 0 to `weight` with a sine schedule (D-LLM: 5, over the whole run).
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::{check_weight, parse, LossInput, LossTerm};
use crate::optim::sine_ramp;
use crate::{config_err, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    #[serde(default = "five")]
    weight: f64,
    /// Target execution ratio (D-LLM: 0.5).
    #[serde(default = "half")]
    target: f64,
    /// Steps of the ramp; default `ramp_fraction` of the run.
    #[serde(default)]
    ramp_steps: Option<usize>,
    /// Fraction of the run the ramp takes when `ramp_steps` is not set (1 = the whole run; short CPU
    /// runs ramp faster so the ratio reaches its target).
    #[serde(default = "whole")]
    ramp_fraction: f64,
}

fn five() -> f64 {
    5.0
}
fn half() -> f64 {
    DEFAULT_TARGET
}

/// D-LLM's target execution ratio.
pub const DEFAULT_TARGET: f64 = 0.5;
fn whole() -> f64 {
    1.0
}

/// The ratio term.
pub struct Ratio {
    pub weight: f64,
    pub target: f64,
    ramp_steps: Option<usize>,
    ramp_fraction: f64,
}

impl Ratio {
    /// Steps of the lambda_1 ramp in a run of `total` steps.
    pub fn ramp_steps(&self, total: usize) -> usize {
        self.ramp_steps
            .unwrap_or_else(|| ((total as f64 * self.ramp_fraction).ceil() as usize).max(1))
    }
}

pub fn factory(v: &Value) -> Result<Box<dyn LossTerm>> {
    let o: Options = parse("ratio", v)?;
    check_weight("ratio", o.weight)?;
    if !(0.0..=1.0).contains(&o.target) {
        return Err(config_err(
            "loss.ratio.target",
            format!("{} must be in [0, 1]", o.target),
        ));
    }
    if !(o.ramp_fraction > 0.0 && o.ramp_fraction <= 1.0) {
        return Err(config_err(
            "loss.ratio.ramp_fraction",
            format!("{} must be in (0, 1]", o.ramp_fraction),
        ));
    }
    Ok(Box::new(Ratio {
        weight: o.weight,
        target: o.target,
        ramp_steps: o.ramp_steps,
        ramp_fraction: o.ramp_fraction,
    }))
}

impl LossTerm for Ratio {
    fn name(&self) -> &str {
        "ratio"
    }
    fn weight(&self, step: usize, total: usize) -> f64 {
        sine_ramp(step, self.ramp_steps(total), self.weight)
    }
    fn value(&self, x: &LossInput) -> Tensor {
        let m = x.out.ratio_mask().to_kind(Kind::Float);
        let n = m.sum(Kind::Float).clamp_min(1.0);
        ((x.out.token_ratio() - self.target).abs() * &m).sum(Kind::Float) / n
    }
}
