//! AdamW with parameter groups and a state that can be checkpointed (tch's built-in optimizer state is
//! opaque), plus the schedules of the D-LLM recipe: linear warmup then cosine decay for learning rates, and
//! the sine ramp of the ratio-loss weight lambda_1.
use std::collections::BTreeMap;
use std::f64::consts::FRAC_PI_2;

use tch::{Kind, Tensor};

use crate::{config_err, Result};

/// Parameters sharing a learning rate and weight decay (decoupled, as in Loshchilov & Hutter).
pub struct ParamGroup {
    pub name: String,
    pub params: Vec<(String, Tensor)>,
    pub lr: f64,
    pub weight_decay: f64,
}

/// Named parameters.
pub type Named = Vec<(String, Tensor)>;

/// Split named parameters into "matrices" (decayed) and the rest (biases, norm weights: not decayed),
/// D-LLM's rule ("weight decay on matrices only").
pub fn split_decay(params: Named) -> (Named, Named) {
    params.into_iter().partition(|(_, t)| t.dim() >= 2)
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub groups: Vec<ParamGroup>,
    m: Vec<Vec<Tensor>>,
    v: Vec<Vec<Tensor>>,
    /// Number of updates applied so far.
    pub step: i64,
}

impl AdamW {
    /// D-LLM's betas (0.9, 0.95).
    pub fn new(groups: Vec<ParamGroup>, beta1: f64, beta2: f64) -> Result<Self> {
        for (f, b) in [("beta1", beta1), ("beta2", beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(config_err(f, format!("{b} must be in [0, 1)")));
            }
        }
        let zeros = |g: &ParamGroup| {
            g.params
                .iter()
                .map(|(_, p)| p.zeros_like().detach())
                .collect::<Vec<_>>()
        };
        let m = groups.iter().map(zeros).collect();
        let v = groups.iter().map(zeros).collect();
        Ok(AdamW {
            beta1,
            beta2,
            eps: 1e-8,
            groups,
            m,
            v,
            step: 0,
        })
    }

    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            for (_, p) in &mut g.params {
                let mut grad = p.grad();
                if grad.defined() {
                    let _ = grad.detach_().zero_();
                }
            }
        }
    }

    /// Global L2 norm of all gradients; scales them down to `max` if above. Returns the norm before.
    pub fn clip_grad_norm(&mut self, max: f64) -> f64 {
        let _g = tch::no_grad_guard();
        let mut sq = 0.0;
        for g in &self.groups {
            for (_, p) in &g.params {
                let grad = p.grad();
                if grad.defined() {
                    sq += grad
                        .to_kind(Kind::Double)
                        .pow_tensor_scalar(2)
                        .sum(Kind::Double)
                        .double_value(&[]);
                }
            }
        }
        let norm = sq.sqrt();
        if norm > max && norm.is_finite() {
            let s = max / (norm + 1e-6);
            for g in &self.groups {
                for (_, p) in &g.params {
                    let mut grad = p.grad();
                    if grad.defined() {
                        let _ = grad.g_mul_scalar_(s);
                    }
                }
            }
        }
        norm
    }

    /// One update with every group's learning rate multiplied by `lr_factor` (the schedule).
    pub fn step(&mut self, lr_factor: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (gi, g) in self.groups.iter_mut().enumerate() {
            let lr = g.lr * lr_factor;
            for (pi, (_, p)) in g.params.iter_mut().enumerate() {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                if g.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * g.weight_decay);
                }
                let m = &mut self.m[gi][pi];
                let v = &mut self.v[gi][pi];
                let _ = m.g_mul_scalar_(b1).g_add_(&(&grad * (1.0 - b1)));
                let _ = v.g_mul_scalar_(b2).g_add_(&(grad.square() * (1.0 - b2)));
                let denom = (&*v / bc2).sqrt() + self.eps;
                let _ = p.g_sub_(&((&*m / bc1) / denom * lr));
            }
        }
    }

    /// Moments and step count as named tensors (`adam.m.<param>`, `adam.v.<param>`, `adam.step`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("adam.step".to_string(), Tensor::from_slice(&[self.step]))];
        for (gi, g) in self.groups.iter().enumerate() {
            for (pi, (name, _)) in g.params.iter().enumerate() {
                out.push((format!("adam.m.{name}"), self.m[gi][pi].shallow_clone()));
                out.push((format!("adam.v.{name}"), self.v[gi][pi].shallow_clone()));
            }
        }
        out
    }

    /// Restore what [`AdamW::state`] produced; every moment must be present with its shape.
    pub fn load_state(
        &mut self,
        saved: &BTreeMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        let step = saved.get("adam.step").ok_or("missing `adam.step`")?;
        self.step = step.int64_value(&[0]);
        let _g = tch::no_grad_guard();
        for (gi, g) in self.groups.iter().enumerate() {
            for (pi, (name, p)) in g.params.iter().enumerate() {
                for (which, store) in [("m", &mut self.m), ("v", &mut self.v)] {
                    let key = format!("adam.{which}.{name}");
                    let t = saved.get(&key).ok_or_else(|| format!("missing `{key}`"))?;
                    if t.size() != p.size() {
                        return Err(format!(
                            "`{key}` has shape {:?}, expected {:?}",
                            t.size(),
                            p.size()
                        ));
                    }
                    store[gi][pi].copy_(&t.to_kind(p.kind()).to_device(p.device()));
                }
            }
        }
        Ok(())
    }
}

/// Linear warmup over `warmup` steps, then cosine decay to `min_factor` at `total` steps.
#[derive(Debug, Clone, Copy)]
pub struct WarmupCosine {
    pub warmup: usize,
    pub total: usize,
    pub min_factor: f64,
}

impl WarmupCosine {
    /// Multiplier of the base learning rate for update number `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup {
            return (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let p = ((step - self.warmup) as f64 / span as f64).min(1.0);
        self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// D-LLM's ramp of the ratio-loss weight: `final * sin(pi/2 * min(1, step / ramp_steps))`, from 0 to
/// `final` over `ramp_steps`.
pub fn sine_ramp(step: usize, ramp_steps: usize, final_value: f64) -> f64 {
    if ramp_steps == 0 {
        return final_value;
    }
    final_value * (FRAC_PI_2 * (step as f64 / ramp_steps as f64).min(1.0)).sin()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};
    use tch::Device;

    /// Our AdamW equals torch's AdamW (decoupled decay) step for step.
    #[test]
    fn adamw_matches_torch() {
        let target = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0, -1.0, 2.0]).view([2, 3]);
        let init = Tensor::from_slice(&[0.3f32, 0.1, -0.2, 0.0, 0.7, -0.4]).view([2, 3]);
        let loss = |p: &Tensor| (p - &target).pow_tensor_scalar(4).sum(Kind::Float);

        let vs = nn::VarStore::new(Device::Cpu);
        let p_ref = vs.root().var_copy("w", &init);
        let mut opt = nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.1,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&vs, 0.01)
        .unwrap();

        let p_ours = init.copy().set_requires_grad(true);
        let mut ours = AdamW::new(
            vec![ParamGroup {
                name: "g".into(),
                params: vec![("w".into(), p_ours.shallow_clone())],
                lr: 0.01,
                weight_decay: 0.1,
            }],
            0.9,
            0.95,
        )
        .unwrap();
        for _ in 0..20 {
            opt.zero_grad();
            loss(&p_ref).backward();
            opt.step();
            ours.zero_grad();
            loss(&p_ours).backward();
            ours.step(1.0);
        }
        let d = (&p_ours - &p_ref).abs().max().double_value(&[]);
        assert!(d < 1e-6, "AdamW differs from torch's by {d}");

        // State round trip.
        let state: BTreeMap<String, Tensor> = ours.state().into_iter().collect();
        let mut fresh = AdamW::new(
            vec![ParamGroup {
                name: "g".into(),
                params: vec![("w".into(), p_ours.shallow_clone())],
                lr: 0.01,
                weight_decay: 0.1,
            }],
            0.9,
            0.95,
        )
        .unwrap();
        fresh.load_state(&state).unwrap();
        assert_eq!(fresh.step, 20);
        let mut bad: BTreeMap<String, Tensor> = ours.state().into_iter().collect();
        bad.remove("adam.v.w");
        assert!(fresh.load_state(&bad).unwrap_err().contains("adam.v.w"));
    }

    #[test]
    fn clipping_scales_to_the_bound() {
        let p = Tensor::from_slice(&[1.0f32, 1.0]).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, 4.0]))
            .sum(Kind::Float)
            .backward();
        let mut opt = AdamW::new(
            vec![ParamGroup {
                name: "g".into(),
                params: vec![("p".into(), p.shallow_clone())],
                lr: 0.1,
                weight_decay: 0.0,
            }],
            0.9,
            0.95,
        )
        .unwrap();
        let n = opt.clip_grad_norm(1.0);
        assert!((n - 5.0).abs() < 1e-9);
        let g: Vec<f32> = Vec::try_from(p.grad()).unwrap();
        assert!(
            (g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5,
            "{g:?}"
        );
    }

    #[test]
    fn schedules_hit_their_end_points() {
        let s = WarmupCosine {
            warmup: 10,
            total: 110,
            min_factor: 0.1,
        };
        assert!((s.factor(0) - 0.1).abs() < 1e-12);
        assert!((s.factor(9) - 1.0).abs() < 1e-12);
        assert!((s.factor(10) - 1.0).abs() < 1e-12);
        assert!((s.factor(60) - 0.55).abs() < 1e-12); // half way down the cosine
        assert!((s.factor(110) - 0.1).abs() < 1e-12);
        assert_eq!(sine_ramp(0, 100, 5.0), 0.0);
        assert!(
            (sine_ramp(50, 100, 5.0) - 5.0 * (std::f64::consts::FRAC_PI_4).sin()).abs() < 1e-12
        );
        assert_eq!(sine_ramp(200, 100, 5.0), 5.0);
    }
}
