//! MagR (Zhang et al. 2024, "MagR: Weight Magnitude Reduction for Enhancing Post-Training
//! Quantization"): before quantizing a linear, replace its weight `W` by the solution of
//!
//! `min_W'  1/2 ||X W'^T - X W^T||_F^2 / L  +  alpha * sum_j ||w'_j||_inf`      (paper, eq. 4)
//!
//! where `w'_j` is row `j` of `W'` (one output channel; per group of `group_size` input columns when
//! the quantization is grouped), `X` the calibration inputs and `L = lambda_max(X^T X)`. The layer
//! output barely changes while the largest weight of each row shrinks, so the quantization grid gets
//! finer. Solved by proximal gradient descent (paper, Alg. 1) with step `1 / L`:
//!
//! `W' <- prox_{alpha ||.||_inf}( W' - (W' - W) X^T X / L )`, row by row,
//!
//! the prox of the l-inf norm by Moreau decomposition, `prox_{a||.||_inf}(v) = v - a P_B1(v / a)`,
//! with `P_B1` the Euclidean projection onto the unit l1 ball (Duchi et al. 2008, Fig. 1).
//!
//! Only `X^T X` enters, so the driver's GPTQ Hessian `H = 2/n X^T X` serves: `H / lambda_max(H) =
//! X^T X / L` exactly. The reference (AozhongZhang/MagR, `MagR.py` / `optq.py`) normalizes `X` by its
//! largest singular value, which is the same matrix; it uses `alpha = 1e-3` per channel and `1e-4` per
//! group with 200 iterations, the defaults here. Two differences: the reference builds `X^T X` from
//! the last calibration batch it saw (one sequence), this uses the Hessian of all calibration inputs;
//! and every linear of a block is preprocessed on its input's full-precision Hessian before the inner
//! quantizer runs (the reference preprocesses inside its GPTQ call, on the input re-captured for that
//! stage). The reference's own GPTQ variant (a scale factor `beta` and a coordinate-descent pass after
//! GPTQ) is not part of MagR and not reproduced: the inner quantizer is the project's `rtn` / `gptq`.
use std::sync::Arc;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::config::QuantConfig;
use crate::error::{QuantError, Result};
use crate::method::{
    parse_options, quantizer, BlockAccess, Calibration, Compressed, Needs, Quantizer,
};
use crate::rtn::pad_groups;

/// Options of the `magr` method.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MagrOptions {
    /// The quantizer that runs on the preprocessed weights (a registered name; default `gptq`).
    pub then: Option<String>,
    /// Penalty weight on the normalized objective; default 1e-3 per channel (`group_size = 0`),
    /// 1e-4 per group (the reference's values).
    pub alpha: Option<f64>,
    /// Proximal gradient iterations (default 200, the reference's).
    pub iters: Option<usize>,
}

/// Default penalty per output channel and per group (reference README / `MagR.py`).
pub const ALPHA_PER_CHANNEL: f64 = 1e-3;
pub const ALPHA_PER_GROUP: f64 = 1e-4;
/// Default iterations (reference README: 200).
pub const ITERS: usize = 200;

/// MagR followed by another quantizer.
pub struct Magr {
    alpha: Option<f64>,
    iters: usize,
    then: Arc<dyn Quantizer>,
}

/// Registry factory: `options = { then = "gptq", alpha = 1e-4, iters = 200 }`, all optional.
pub fn factory(options: &serde_json::Value) -> Result<Box<dyn Quantizer>> {
    let o: MagrOptions = parse_options("magr", options)?;
    if let Some(a) = o.alpha {
        if !(a.is_finite() && a >= 0.0) {
            return Err(QuantError::Config(format!(
                "magr: option `alpha` = {a} must be finite and >= 0"
            )));
        }
    }
    let iters = o.iters.unwrap_or(ITERS);
    if iters == 0 {
        return Err(QuantError::Config(
            "magr: option `iters` must be at least 1".into(),
        ));
    }
    let then_name = o.then.as_deref().unwrap_or("gptq");
    if then_name == "magr" {
        return Err(QuantError::Config(
            "magr: option `then` = `magr` (MagR twice) is not a quantizer".into(),
        ));
    }
    let then = quantizer(then_name, &serde_json::Value::Null)
        .map_err(|e| QuantError::Config(format!("magr: option `then`: {e}")))?;
    Ok(Box::new(Magr {
        alpha: o.alpha,
        iters,
        then,
    }))
}

/// Euclidean projection of each row of `x: [r, d]` onto the unit l1 ball (Duchi et al. 2008, Fig. 1):
/// rows already inside are kept; otherwise, with `mu` the sorted magnitudes and
/// `rho = max { j : mu_j > (sum_{i<=j} mu_i - 1) / j }`, `theta = (sum_{i<=rho} mu_i - 1) / rho` and
/// the result is `sign(x) max(|x| - theta, 0)`.
pub fn project_l1_ball(x: &Tensor) -> Tensor {
    let d = x.size()[x.dim() - 1];
    let ax = x.abs();
    let inside = ax.sum_dim_intlist(-1, true, Kind::Float).lt(1.0);
    let (mu, _) = ax.sort(-1, true);
    let cs = mu.cumsum(-1, Kind::Float);
    let j = Tensor::arange_start(1, d + 1, (Kind::Float, x.device()));
    let ok = (&mu * &j).gt_tensor(&(&cs - 1.0));
    let rho = (ok.to_kind(Kind::Float) * &j).amax(-1, true).clamp_min(1.0);
    let at = (&rho - 1.0).to_kind(Kind::Int64);
    let theta = (cs.gather(-1, &at, false) - 1.0) / &rho;
    let proj = (&ax - theta).clamp_min(0.0) * x.sign();
    x.where_self(&inside, &proj)
}

/// `prox_{a ||.||_inf}(v) = v - a P_B1(v / a)` on each row of `v` (Moreau decomposition); `a > 0`.
pub fn prox_linf(v: &Tensor, a: f64) -> Tensor {
    v - project_l1_ball(&(v / a)) * a
}

/// `H / lambda_max(H)` (the reference's `X^T X` with `X` scaled to unit spectral norm), or `None` when
/// `H` has no positive eigenvalue (no input signal: nothing to preserve, MagR is skipped).
pub fn normalized_gram(h: &Tensor) -> Result<Option<Tensor>> {
    let h = h.to_kind(Kind::Float);
    let s = h.size();
    if s.len() != 2 || s[0] != s[1] {
        return Err(QuantError::Shape(format!(
            "MagR: the Hessian must be square, got {s:?}"
        )));
    }
    // eigvalsh needs a symmetric matrix; the accumulated one is, up to rounding.
    let sym = (&h + h.transpose(0, 1)) * 0.5;
    let top = sym
        .to_kind(Kind::Double)
        .linalg_eigvalsh("L")
        .max()
        .double_value(&[]);
    if !(top.is_finite() && top > 0.0) {
        return Ok(None);
    }
    Ok(Some(sym / top))
}

/// MagR of `w: [out, in]` given the normalized Gram matrix `a = X^T X / L` `[in, in]`: `iters`
/// proximal gradient steps, the l-inf prox on each row's groups of `group` columns (`group >= in`:
/// whole rows). A ragged last group is zero-padded, which is exact (padding zeros stay zero and do
/// not change the projection of the others).
pub fn magr(w: &Tensor, a: &Tensor, alpha: f64, iters: usize, group: i64) -> Result<Tensor> {
    let (o, i) = match w.size().as_slice() {
        [o, i] => (*o, *i),
        s => {
            return Err(QuantError::Shape(format!(
                "MagR: weight must be [out, in], got {s:?}"
            )))
        }
    };
    if a.size() != [i, i] {
        return Err(QuantError::Shape(format!(
            "MagR: weight [{o}, {i}] does not match the Gram matrix {:?}",
            a.size()
        )));
    }
    let dev = w.device();
    let w0 = w.to_device(a.device()).to_kind(Kind::Float);
    if alpha == 0.0 {
        return Ok(w0.to_device(dev));
    }
    let g = group.clamp(1, i);
    let mut wh = w0.copy();
    for _ in 0..iters {
        let v = &wh - (&wh - &w0).matmul(a);
        let (vg, ng) = pad_groups(&v, g);
        wh = prox_linf(&vg.reshape([o * ng, g]), alpha)
            .reshape([o, ng * g])
            .narrow(1, 0, i);
    }
    Ok(wh.to_device(dev))
}

impl Magr {
    fn alpha(&self, cfg: &QuantConfig) -> f64 {
        self.alpha.unwrap_or(if cfg.group_size == 0 {
            ALPHA_PER_CHANNEL
        } else {
            ALPHA_PER_GROUP
        })
    }
}

impl Quantizer for Magr {
    fn name(&self) -> &str {
        "magr"
    }
    /// The inner quantizer's flow; sequential (GPTQ's rule, the reference's driver) when it needs none.
    fn calibration(&self) -> Calibration {
        match self.then.calibration() {
            Calibration::None => Calibration::Sequential,
            c => c,
        }
    }
    fn needs(&self) -> Needs {
        Needs {
            hessian: true,
            ..Needs::default()
        }
        .union(self.then.needs())
    }
    /// Each linear preprocessed on its input's Hessian and installed dense, then the inner quantizer
    /// on the whole block (it reads the preprocessed weights).
    fn quantize_block(&self, block: &mut dyn BlockAccess, cfg: &QuantConfig) -> Result<()> {
        let alpha = self.alpha(cfg);
        let mut report = Vec::new();
        for i in 0..block.n_inputs() {
            let hess = block.stats(i).hessian()?;
            if hess.samples() == 0 {
                return Err(QuantError::NoSamples);
            }
            let Some(a) = normalized_gram(hess.hessian())? else {
                continue;
            };
            for name in block.linears(i) {
                let w = block.weight(name)?;
                let g = cfg.group_for(w.size()[1] as usize)? as i64;
                let w2 = magr(&w, &a, alpha, self.iters, g)?;
                let before = w.abs().amax(1, false).mean(Kind::Float).double_value(&[]);
                let after = w2.abs().amax(1, false).mean(Kind::Float).double_value(&[]);
                report.push(serde_json::json!({
                    "linear": name, "mean_row_max_before": before, "mean_row_max_after": after
                }));
                block.set(name, Compressed::Dense(w2))?;
            }
        }
        let layer = block.layer();
        block.record(serde_json::json!({
            "layer": layer, "magr": { "alpha": alpha, "iters": self.iters, "linears": report }
        }));
        self.then.quantize_block(block, cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_projection_hand_cases() {
        // |x|_1 = 6 > 1: mu = [3, 2, 1], cumsum - 1 = [2, 4, 5], j mu = [3, 4, 3] -> rho = 1,
        // theta = 2: [1, 0, 0]. Inside the ball: unchanged. Zero row: unchanged.
        let x =
            Tensor::from_slice(&[3.0f32, 1.0, -2.0, 0.2, -0.3, 0.1, 0.0, 0.0, 0.0]).view([3, 3]);
        let p = Vec::<f32>::try_from(project_l1_ball(&x).reshape([-1])).unwrap();
        assert_eq!(p, [1.0, 0.0, 0.0, 0.2, -0.3, 0.1, 0.0, 0.0, 0.0]);
        // [0.8, -0.6]: |x|_1 = 1.4, theta = 0.2 -> [0.6, -0.4]
        let y = Tensor::from_slice(&[0.8f32, -0.6]).view([1, 2]);
        let p = Vec::<f32>::try_from(project_l1_ball(&y).reshape([-1])).unwrap();
        assert!(
            (p[0] - 0.6).abs() < 1e-6 && (p[1] + 0.4).abs() < 1e-6,
            "{p:?}"
        );
        // The prox of a * |.|_inf caps the largest magnitudes: v = [3, 1, -2], a = 1.5 -> the l1 mass
        // 1.5 is taken off the top: [1.75, 1, -1.75].
        let v = Tensor::from_slice(&[3.0f32, 1.0, -2.0]).view([1, 3]);
        let p = Vec::<f32>::try_from(prox_linf(&v, 1.5).reshape([-1])).unwrap();
        for (a, b) in p.iter().zip([1.75f32, 1.0, -1.75]) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn bad_options_are_named() {
        let e = |o: serde_json::Value| factory(&o).err().unwrap().to_string();
        assert!(e(serde_json::json!({"alpha": -1.0})).contains("`alpha`"));
        assert!(e(serde_json::json!({"iters": 0})).contains("`iters`"));
        let t = e(serde_json::json!({"then": "zip"}));
        assert!(t.contains("`then`") && t.contains("zip"), "{t}");
        assert!(e(serde_json::json!({"alfa": 1.0})).contains("alfa"));
        assert!(factory(&serde_json::json!({"then": "rtn", "alpha": 0.0})).is_ok());
    }
}
