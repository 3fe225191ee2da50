//! GPTQ (Frantar et al.): quantize the columns of a weight one at a time, compensating each rounding
//! error on the not yet quantized columns through the inverse Hessian of the layer-wise least-squares
//! objective `||W X - Q X||^2`, `H = 2/n sum x x^T`.
//!
//! The solver follows the reference implementation (IST-DASLab/gptq `GPTQ.fasterquant`) step for
//! step, and gives its codes bit for bit on the same Hessian (`qtale-model/tests/gptq_reference.rs`):
//! dead columns (`H_jj = 0`) zeroed, damping `percdamp * mean(diag H)` added in f32, the upper
//! Cholesky factor of `H^-1`, blocks of 128 columns with the lazy update after each, act-order by
//! decreasing `diag H`, static groups from the original weight. Two details matter for parity:
//! a dynamic group's scale and zero point come from the weight as it was when the current block
//! started (the reference reads `W`, not the block's working copy), and per channel from the weight
//! before the dead columns are zeroed. A group size that does not divide the input width leaves a
//! ragged last group, as in the reference.
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::config::QuantConfig;
use crate::error::{QuantError, Result};
use crate::method::{no_options, BlockAccess, Calibration, Compressed, Needs, Quantizer};
use crate::rtn::group_params;
use crate::weight::QuantizedWeight;

/// What one GPTQ solve did.
#[derive(Debug, Clone, Serialize)]
pub struct GptqReport {
    /// `sum (w - q)^2 / [H^-1]_jj / 2` over columns: GPTQ's proxy of the added output error.
    pub loss: f64,
    pub seconds: f64,
    /// Damping used, as a fraction of the mean Hessian diagonal.
    pub damp: f64,
    /// Cholesky failures before the damping that worked.
    pub retries: usize,
    /// Input columns that never saw a non-zero activation (their weights are zeroed).
    pub dead_columns: usize,
    pub samples: usize,
}

/// Hessian accumulator and solver for one linear layer.
#[derive(Debug)]
pub struct Gptq {
    pub config: QuantConfig,
    h: Tensor,
    n: usize,
}

impl Gptq {
    pub fn new(in_features: usize, config: QuantConfig, device: Device) -> Result<Self> {
        config.validate()?;
        Ok(Gptq {
            config,
            h: Tensor::zeros(
                [in_features as i64, in_features as i64],
                (Kind::Float, device),
            ),
            n: 0,
        })
    }

    /// Add calibration inputs `x: [..., in]` (every leading index is one sample).
    pub fn add_batch(&mut self, x: &Tensor) -> Result<()> {
        let d = self.h.size()[0];
        let xs = x.size();
        if xs.last() != Some(&d) {
            return Err(QuantError::Shape(format!(
                "GPTQ inputs {xs:?}, expected [..., {d}]"
            )));
        }
        let x2 = x
            .reshape([-1, d])
            .to_device(self.h.device())
            .to_kind(Kind::Float);
        let m = x2.size()[0] as usize;
        if m == 0 {
            return Ok(());
        }
        let total = self.n + m;
        let _ = self.h.g_mul_scalar_(self.n as f64 / total as f64);
        self.n = total;
        let x2 = x2 * (2.0 / total as f64).sqrt();
        let _ = self.h.g_add_(&x2.transpose(0, 1).matmul(&x2));
        Ok(())
    }

    pub fn samples(&self) -> usize {
        self.n
    }

    /// The accumulated Hessian `[in, in]`.
    pub fn hessian(&self) -> &Tensor {
        &self.h
    }

    /// Upper Cholesky factor of the inverse of the damped Hessian, with escalating damping.
    ///
    /// The first attempt is the reference's arithmetic to the bit (`damp = percdamp * mean(diag H)`
    /// as an f32 tensor op, added to the diagonal in place; Cholesky, `cholesky_inverse`, upper
    /// Cholesky): an ill-conditioned Hessian (SmolLM2's first `down_proj`) amplifies a one-ulp
    /// difference in the damping into different codes.
    fn inverse_factor(&self, h: &Tensor) -> Result<(Tensor, f64, usize)> {
        let mean_diag = h.diagonal(0, 0, 1).mean(Kind::Float);
        let mut pct = self.config.damp_percent;
        const ATTEMPTS: usize = 6;
        for attempt in 0..ATTEMPTS {
            let hd = h.copy();
            let _ = hd.diagonal(0, 0, 1).g_add_(&(&mean_diag * pct));
            let (l, info) = hd.linalg_cholesky_ex(false, false);
            if info.int64_value(&[]) == 0 {
                let hinv = l.cholesky_inverse(false);
                let (u, info2) = hinv.linalg_cholesky_ex(true, false);
                if info2.int64_value(&[]) == 0 && u.isfinite().all().int64_value(&[]) != 0 {
                    return Ok((u, pct, attempt));
                }
            }
            pct *= 10.0;
        }
        Err(QuantError::Cholesky {
            attempts: ATTEMPTS,
            damp: pct / 10.0,
        })
    }

    /// Quantize `w: [out, in]` with the Hessian collected so far.
    pub fn solve(&self, weight: &Tensor) -> Result<(QuantizedWeight, GptqReport)> {
        let t0 = Instant::now();
        let cfg = &self.config;
        if self.n == 0 {
            return Err(QuantError::NoSamples);
        }
        let cols = self.h.size()[0];
        let ws = weight.size();
        if ws.len() != 2 || ws[1] != cols {
            return Err(QuantError::Shape(format!(
                "GPTQ weight {ws:?} does not match the Hessian of {cols} inputs"
            )));
        }
        let rows = ws[0];
        let g = cfg.group_for(cols as usize)? as i64;
        let ng = (cols + g - 1) / g;
        // Width of group `k` (the last one is ragged when `g` does not divide `cols`).
        let width = |k: i64| g.min(cols - k * g);
        let per_channel = g >= cols;
        let maxq = cfg.maxq();
        let dev = self.h.device();
        let _guard = tch::no_grad_guard();
        let mut w = weight.to_device(dev).to_kind(Kind::Float).copy();
        let mut h = self.h.copy();
        // Per channel, the reference takes the row ranges before zeroing the dead columns.
        let channel_params = per_channel.then(|| group_params(&w, cfg, None));

        let dead = h.diagonal(0, 0, 1).eq(0.0);
        let dead_columns = dead.sum(Kind::Int64).int64_value(&[]) as usize;
        if dead_columns > 0 {
            let _ = h.diagonal(0, 0, 1).masked_fill_(&dead, 1.0);
            let _ = w.masked_fill_(&dead.unsqueeze(0), 0.0);
        }

        // Static groups: parameters from the original (dead-zeroed) weight, in column order.
        let static_params: Option<Vec<(Tensor, Tensor)>> = (cfg.static_groups && !per_channel)
            .then(|| {
                (0..ng)
                    .map(|k| group_params(&w.narrow(1, k * g, width(k)), cfg, None))
                    .collect()
            });

        let perm = cfg.act_order.then(|| h.diagonal(0, 0, 1).argsort(0, true));
        if let Some(p) = &perm {
            w = w.index_select(1, p);
            h = h.index_select(0, p).index_select(1, p);
        }
        let perm_vec: Option<Vec<i64>> =
            perm.as_ref().map(|p| Vec::<i64>::try_from(p).expect("i64"));

        let (u, damp, retries) = self.inverse_factor(&h)?;

        // The column loop runs on host vectors (one block at a time); the lazy update of the columns
        // after each block is one tch matmul.
        let (ru, cu) = (rows as usize, cols as usize);
        let mut q_codes = vec![0f32; ru * cu];
        let mut scales: Vec<Tensor> = Vec::new();
        let mut zeros: Vec<Tensor> = Vec::new();
        let host = |t: &Tensor| -> Vec<f32> {
            Vec::try_from(t.to_device(Device::Cpu).contiguous().view([-1])).expect("f32")
        };
        let (mut cur_s, mut cur_z) = match &channel_params {
            Some((s, z)) => {
                scales.push(s.shallow_clone());
                zeros.push(z.shallow_clone());
                (host(s), host(z))
            }
            None => (vec![0f32; ru], vec![0f32; ru]),
        };
        let static_host: Option<Vec<(Vec<f32>, Vec<f32>)>> = static_params
            .as_ref()
            .map(|sp| sp.iter().map(|(s, z)| (host(s), host(z))).collect());
        let maxq32 = maxq as f32;
        let mut loss = 0.0f64;
        let bs = cfg.block_size as i64;
        let mut i1 = 0;
        while i1 < cols {
            let cnt = bs.min(cols - i1);
            let i2 = i1 + cnt;
            let cn = cnt as usize;
            let mut w1 = host(&w.narrow(1, i1, cnt));
            let mut err1 = vec![0f32; ru * cn];
            let hinv1 = host(&u.narrow(0, i1, cnt).narrow(1, i1, cnt));
            for i in 0..cn {
                let col = i1 as usize + i;
                if !per_channel {
                    if let Some(sp) = &static_host {
                        let orig = perm_vec.as_ref().map_or(col as i64, |p| p[col]);
                        let (s, z) = &sp[(orig / g) as usize];
                        cur_s.copy_from_slice(s);
                        cur_z.copy_from_slice(z);
                    } else if col as i64 % g == 0 {
                        // The reference's rule (`find_params(W[:, i1 + i : i1 + i + g])`): the
                        // group's columns as they were when this block started, i.e. with the
                        // updates of the earlier blocks but not those of the columns quantized
                        // so far in this block (which only reach its working copy).
                        let part = w.narrow(1, col as i64, g.min(cols - col as i64));
                        let (s, z) = group_params(&part, cfg, None);
                        cur_s = host(&s);
                        cur_z = host(&z);
                        scales.push(s);
                        zeros.push(z);
                    }
                }
                let d = hinv1[i * cn + i];
                let hrow = &hinv1[i * cn..(i + 1) * cn];
                for r in 0..ru {
                    let row = &mut w1[r * cn..(r + 1) * cn];
                    let wv = row[i];
                    let q = ((wv / cur_s[r]).round_ties_even() + cur_z[r]).clamp(0.0, maxq32);
                    let dq = (q - cur_z[r]) * cur_s[r];
                    q_codes[r * cu + col] = q;
                    let diff = wv - dq;
                    loss += (diff as f64 / d as f64).powi(2) / 2.0;
                    let e = diff / d;
                    err1[r * cn + i] = e;
                    for (x, h) in row[i + 1..].iter_mut().zip(&hrow[i + 1..]) {
                        *x -= e * h;
                    }
                }
            }
            if i2 < cols {
                let e = Tensor::from_slice(&err1).view([rows, cnt]).to_device(dev);
                let upd = e.matmul(&u.narrow(0, i1, cnt).narrow(1, i2, cols - i2));
                let _ = w.narrow(1, i2, cols - i2).g_sub_(&upd);
            }
            i1 = i2;
        }
        let q_codes = Tensor::from_slice(&q_codes)
            .view([rows, cols])
            .to_device(dev);

        let ar = Tensor::arange(cols, (Kind::Int64, dev));
        let (q_codes, g_idx) = match &perm {
            Some(p) => {
                let inv = p.argsort(0, false);
                let q = q_codes.index_select(1, &inv);
                let gi = if static_params.is_some() {
                    ar.divide_scalar_mode(g, "floor")
                } else {
                    ar.divide_scalar_mode(g, "floor").index_select(0, &inv)
                };
                (q, gi)
            }
            None => (q_codes, ar.divide_scalar_mode(g, "floor")),
        };
        let (scales, zeros) = match static_params {
            Some(sp) => (
                Tensor::cat(&sp.iter().map(|x| &x.0).collect::<Vec<_>>(), 1),
                Tensor::cat(&sp.iter().map(|x| &x.1).collect::<Vec<_>>(), 1),
            ),
            None => (Tensor::cat(&scales, 1), Tensor::cat(&zeros, 1)),
        };
        let qw = QuantizedWeight {
            bits: cfg.bits,
            group_size: g as usize,
            sym: cfg.sym,
            codes: q_codes.to_kind(Kind::Uint8),
            scales,
            zeros,
            g_idx,
        };
        let report = GptqReport {
            loss,
            seconds: t0.elapsed().as_secs_f64(),
            damp,
            retries,
            dead_columns,
            samples: self.n,
        };
        Ok((qw, report))
    }
}

/// GPTQ as a [`Quantizer`]: Hessians from sequentially propagated calibration inputs, then the solver
/// per linear (each linear of a shared input reuses that input's Hessian).
#[derive(Debug, Clone, Copy, Default)]
pub struct GptqMethod;

/// Registry factory (`gptq` takes no options; its settings are [`QuantConfig`] fields).
pub fn factory(options: &serde_json::Value) -> Result<Box<dyn Quantizer>> {
    no_options("gptq", options)?;
    Ok(Box::new(GptqMethod))
}

impl Quantizer for GptqMethod {
    fn name(&self) -> &str {
        "gptq"
    }
    fn calibration(&self) -> Calibration {
        Calibration::Sequential
    }
    fn needs(&self) -> Needs {
        Needs {
            hessian: true,
            ..Needs::default()
        }
    }
    /// With `true_sequential` (the reference's `--true-sequential`), the inputs are quantized in
    /// forward order, `[q, k, v]`, `[o]`, `[gate, up]`, `[down]`, each from a Hessian re-captured
    /// with the earlier ones already quantized; otherwise every Hessian is the full-precision one.
    fn quantize_block(&self, block: &mut dyn BlockAccess, cfg: &QuantConfig) -> Result<()> {
        for i in 0..block.n_inputs() {
            if i > 0 && cfg.true_sequential {
                block.recapture(i)?;
            }
            for name in block.linears(i) {
                let w = block.weight(name)?;
                let (weight, rep) = block.stats(i).hessian()?.solve(&w)?;
                block.set(
                    name,
                    Compressed::Quantized {
                        weight,
                        gptq: Some(rep),
                    },
                )?;
            }
        }
        Ok(())
    }
}
