//! Round-to-nearest: min-max ranges (always including 0) per group, optional clip ratios. A group
//! size that does not divide the input width leaves a ragged last group.
use tch::{Kind, Tensor};

use crate::config::QuantConfig;
use crate::error::{QuantError, Result};
use crate::method::{each_linear, no_options, BlockAccess, Calibration, Compressed, Quantizer};
use crate::weight::QuantizedWeight;

/// Scale and zero point of each row of `w: [..., g]` (over its last dimension), shapes `[..., 1]`.
/// `clip: [..., 1]` shrinks the range (`min * c`, `max * c`).
///
/// The range always includes 0, as in the GPTQ reference's quantizer (IST-DASLab/gptq `quant.py`,
/// `find_params`: `xmin = min(min, 0)`, `xmax = max(max, 0)`). Asymmetric: `scale = (xmax - xmin) /
/// maxq`, `zero = round(-xmin / scale)`, which then lies in `0..=maxq` by construction, so the integer
/// zero point the packed formats store is never clamped. Without that rule a one-sided group (every
/// weight in `[0.5, 0.6]`) got `zero = round(-0.5 / scale) < 0`, clamped to 0, and every weight
/// collapsed onto the top code (`maxq * scale = 0.1`, error 0.5). Widening to 0 costs such a group
/// resolution (step `max / maxq` instead of `(max - min) / maxq`), but a zero point outside the code
/// range is not representable in the GPTQ/AWQ layouts, and the rule matches the reference exactly
/// on every mixed-sign group. It also makes zero-padding a ragged group exact (see [`pad_groups`]).
/// All-zero groups use `[-1, 1]` (the reference's rule).
///
/// Symmetric: `scale = 2 max|w| / maxq`, `zero = (maxq + 1) / 2`: the reference's grid for every
/// group with a negative weight; on an all-positive group the reference keeps `xmin = 0` and halves
/// the scale (clipping the weights above `7/15` of the maximum at 4 bits), which is not followed here.
pub fn group_params(w: &Tensor, cfg: &QuantConfig, clip: Option<&Tensor>) -> (Tensor, Tensor) {
    let maxq = cfg.maxq();
    let mut xmin = w.amin(-1, true).clamp_max(0.0);
    let mut xmax = w.amax(-1, true).clamp_min(0.0);
    if let Some(c) = clip {
        xmin *= c;
        xmax *= c;
    }
    if cfg.sym {
        let a = xmin.abs().maximum(&xmax);
        let a = a.where_scalarother(&a.gt(0.0), 1.0);
        let scale = a * (2.0 / maxq);
        let zero = scale.full_like(((maxq + 1.0) / 2.0).floor());
        return (scale, zero);
    }
    let nonzero = (&xmax - &xmin).gt(0.0);
    let xmin = xmin.where_scalarother(&nonzero, -1.0);
    let xmax = xmax.where_scalarother(&nonzero, 1.0);
    let scale = (&xmax - &xmin) / maxq;
    let zero = (-xmin / &scale).round().clamp(0.0, maxq);
    (scale, zero)
}

/// `w: [out, in]` as `[out, n_groups, g]` groups, the ragged last group (`in % g` columns, or all of
/// them when `g > in`) padded with zeros. The padding is exact for [`group_params`] (the range
/// includes 0 anyway), for [`fake`] (0 maps to the zero point and back to exactly 0) and for the
/// error sums of the clip searches (padded columns add 0). Returns the groups and `n_groups`.
pub fn pad_groups(w: &Tensor, g: i64) -> (Tensor, i64) {
    let (o, i) = (w.size()[0], w.size()[1]);
    let ng = (i + g - 1) / g;
    let w = w.to_kind(Kind::Float);
    let padded = if ng * g == i {
        w
    } else {
        w.constant_pad_nd([0, ng * g - i])
    };
    (padded.reshape([o, ng, g]), ng)
}

/// Integer codes (as f32) of `w` for broadcastable `scale`, `zero`.
pub fn codes(w: &Tensor, scale: &Tensor, zero: &Tensor, maxq: f64) -> Tensor {
    ((w / scale).round() + zero).clamp(0.0, maxq)
}

/// Quantize then dequantize (f32) with broadcastable parameters.
pub fn fake(w: &Tensor, scale: &Tensor, zero: &Tensor, maxq: f64) -> Tensor {
    (codes(w, scale, zero, maxq) - zero) * scale
}

/// RTN of `w: [out, in]`, returning the dequantized weight only (the inner loop of AWQ's searches).
pub fn fake_quantize(w: &Tensor, cfg: &QuantConfig, clip: Option<&Tensor>) -> Result<Tensor> {
    let (o, i) = dims(w)?;
    let g = cfg.group_for(i as usize)? as i64;
    let (wg, ng) = pad_groups(w, g);
    let c = clip.map(|c| c.reshape([o, ng, 1]));
    let (s, z) = group_params(&wg, cfg, c.as_ref());
    Ok(fake(&wg, &s, &z, cfg.maxq())
        .reshape([o, ng * g])
        .narrow(1, 0, i))
}

fn dims(w: &Tensor) -> Result<(i64, i64)> {
    match w.size().as_slice() {
        [o, i] => Ok((*o, *i)),
        s => Err(QuantError::Shape(format!(
            "weight must be [out, in], got {s:?}"
        ))),
    }
}

/// The clip grid of the MSE search: 20 ratios `1.0, 0.99, ..., 0.81`.
pub fn mse_clip_grid() -> Vec<f64> {
    (0..20).map(|k| 1.0 - 0.01 * k as f64).collect()
}

/// Per-group clip ratios `[out, n_groups]` minimizing `sum |w - Q(w)|^2.4` (GPTQ's `mse` option norm).
pub fn mse_clip(w: &Tensor, cfg: &QuantConfig) -> Result<Tensor> {
    let (o, i) = dims(w)?;
    let g = cfg.group_for(i as usize)? as i64;
    let (wg, ng) = pad_groups(w, g);
    let mut best_err: Option<Tensor> = None;
    let mut best = Tensor::ones([o, ng, 1], (Kind::Float, w.device()));
    for p in mse_clip_grid() {
        let c = Tensor::full([o, ng, 1], p, (Kind::Float, w.device()));
        let (s, z) = group_params(&wg, cfg, Some(&c));
        let err = (fake(&wg, &s, &z, cfg.maxq()) - &wg)
            .abs()
            .pow_tensor_scalar(2.4)
            .sum_dim_intlist(-1, true, Kind::Float);
        match &best_err {
            None => best_err = Some(err),
            Some(be) => {
                let better = err.lt_tensor(be);
                best = c.where_self(&better, &best);
                best_err = Some(err.where_self(&better, be));
            }
        }
    }
    Ok(best.reshape([o, ng]))
}

/// RTN of `w: [out, in]` with optional per-group clip ratios `[out, n_groups]` (AWQ's clip artefact);
/// without them and with `cfg.mse_clip`, the ratios come from [`mse_clip`].
pub fn quantize_rtn(
    w: &Tensor,
    cfg: &QuantConfig,
    clip: Option<&Tensor>,
) -> Result<QuantizedWeight> {
    cfg.validate()?;
    let (o, i) = dims(w)?;
    let g = cfg.group_for(i as usize)? as i64;
    let ng = cfg.n_groups(i as usize)? as i64;
    let searched;
    let clip = match clip {
        Some(c) => {
            if c.size() != [o, ng] {
                return Err(QuantError::Shape(format!(
                    "clip ratios {:?}, expected [{o}, {ng}]",
                    c.size(),
                )));
            }
            Some(c)
        }
        None if cfg.mse_clip => {
            searched = mse_clip(w, cfg)?;
            Some(&searched)
        }
        None => None,
    };
    let (wg, _) = pad_groups(w, g);
    let c = clip.map(|c| c.reshape([o, ng, 1]));
    let (s, z) = group_params(&wg, cfg, c.as_ref());
    let q = codes(&wg, &s, &z, cfg.maxq());
    Ok(QuantizedWeight {
        bits: cfg.bits,
        group_size: g as usize,
        sym: cfg.sym,
        codes: q
            .reshape([o, ng * g])
            .narrow(1, 0, i)
            .contiguous()
            .to_kind(Kind::Uint8),
        scales: s.reshape([o, ng]),
        zeros: z.reshape([o, ng]),
        g_idx: Tensor::arange(i, (Kind::Int64, w.device())).divide_scalar_mode(g, "floor"),
    })
}

/// Round-to-nearest as a [`Quantizer`]: no calibration, each linear on its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rtn;

/// Registry factory (`rtn` takes no options).
pub fn factory(options: &serde_json::Value) -> Result<Box<dyn Quantizer>> {
    no_options("rtn", options)?;
    Ok(Box::new(Rtn))
}

impl Quantizer for Rtn {
    fn name(&self) -> &str {
        "rtn"
    }
    fn calibration(&self) -> Calibration {
        Calibration::None
    }
    fn quantize_block(&self, block: &mut dyn BlockAccess, cfg: &QuantConfig) -> Result<()> {
        each_linear(block, |_, w, _| {
            Ok(Compressed::Quantized {
                weight: quantize_rtn(w, cfg, None)?,
                gptq: None,
            })
        })
    }
}
