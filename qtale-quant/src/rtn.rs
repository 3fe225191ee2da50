//! Round-to-nearest: min-max ranges per group, optional clip ratios.
use tch::{Kind, Tensor};

use crate::config::QuantConfig;
use crate::error::{QuantError, Result};
use crate::method::{each_linear, no_options, BlockAccess, Calibration, Compressed, Quantizer};
use crate::weight::QuantizedWeight;

/// Scale and zero point of each row of `w: [..., g]` (over its last dimension), shapes `[..., 1]`.
/// `clip: [..., 1]` shrinks the range (`min * c`, `max * c`). Asymmetric: `scale = (max - min) / maxq`,
/// `zero = clamp(round(-min / scale), 0, maxq)`; symmetric: `scale = 2 max|w| / maxq`,
/// `zero = (maxq + 1) / 2`. A degenerate range (all equal) is widened to include 0; all zero to [-1, 1].
pub fn group_params(w: &Tensor, cfg: &QuantConfig, clip: Option<&Tensor>) -> (Tensor, Tensor) {
    let maxq = cfg.maxq();
    let mut xmin = w.amin(-1, true);
    let mut xmax = w.amax(-1, true);
    if let Some(c) = clip {
        xmin *= c;
        xmax *= c;
    }
    if cfg.sym {
        let a = xmin.abs().maximum(&xmax.abs());
        let a = a.where_scalarother(&a.gt(0.0), 1.0);
        let scale = a * (2.0 / maxq);
        let zero = scale.full_like(((maxq + 1.0) / 2.0).floor());
        return (scale, zero);
    }
    let deg = (&xmax - &xmin).le(1e-12);
    let xmin2 = xmin.where_self(&deg.logical_not(), &xmin.clamp_max(0.0));
    let xmax2 = xmax.where_self(&deg.logical_not(), &xmax.clamp_min(0.0));
    let zero_range = (&xmax2 - &xmin2).le(1e-12);
    let xmin3 = xmin2.where_scalarother(&zero_range.logical_not(), -1.0);
    let xmax3 = xmax2.where_scalarother(&zero_range.logical_not(), 1.0);
    let scale = (&xmax3 - &xmin3) / maxq;
    let zero = (-xmin3 / &scale).round().clamp(0.0, maxq);
    (scale, zero)
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
    let wg = w.to_kind(Kind::Float).reshape([o, i / g, g]);
    let c = clip.map(|c| c.reshape([o, i / g, 1]));
    let (s, z) = group_params(&wg, cfg, c.as_ref());
    Ok(fake(&wg, &s, &z, cfg.maxq()).reshape([o, i]))
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
    let wg = w.to_kind(Kind::Float).reshape([o, i / g, g]);
    let mut best_err: Option<Tensor> = None;
    let mut best = Tensor::ones([o, i / g, 1], (Kind::Float, w.device()));
    for p in mse_clip_grid() {
        let c = Tensor::full([o, i / g, 1], p, (Kind::Float, w.device()));
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
    Ok(best.reshape([o, i / g]))
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
    let searched;
    let clip = match clip {
        Some(c) => {
            if c.size() != [o, i / g] {
                return Err(QuantError::Shape(format!(
                    "clip ratios {:?}, expected [{o}, {}]",
                    c.size(),
                    i / g
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
    let wg = w.to_kind(Kind::Float).reshape([o, i / g, g]);
    let c = clip.map(|c| c.reshape([o, i / g, 1]));
    let (s, z) = group_params(&wg, cfg, c.as_ref());
    let q = codes(&wg, &s, &z, cfg.maxq());
    Ok(QuantizedWeight {
        bits: cfg.bits,
        group_size: g as usize,
        sym: cfg.sym,
        codes: q.reshape([o, i]).to_kind(Kind::Uint8),
        scales: s.reshape([o, i / g]),
        zeros: z.reshape([o, i / g]),
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
