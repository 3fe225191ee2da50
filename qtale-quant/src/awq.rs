//! AWQ (Lin et al.): activation-aware per-input-channel scaling, then per-group clipping.
//!
//! The searches only produce artefacts: [`AwqScales`] (one vector per group of linears that share an
//! input, to be folded into whatever produces that input) and [`AwqClip`] (per-group clip ratios of
//! one linear, consumed by [`crate::rtn::quantize_rtn`]). Applying them is the caller's business.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::QuantConfig;
use crate::error::{QuantError, Result};
use crate::method::{parse_options, BlockAccess, Calibration, Compressed, Needs, Quantizer};
use crate::rtn::{fake, fake_quantize, group_params, pad_groups, quantize_rtn};

/// Points of the alpha grid: `alpha = k / 20`, `k = 0..20` (0 means no scaling, i.e. plain RTN).
pub const ALPHA_GRID: usize = 20;

/// Result of the scale search for linears sharing one input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AwqScales {
    /// Best exponent.
    pub alpha: f64,
    /// Per input channel: multiply the weights' columns by these, divide the input by them.
    pub scales: Vec<f32>,
    /// Block-output loss at each grid point.
    pub losses: Vec<f64>,
}

impl AwqScales {
    pub fn tensor(&self) -> Tensor {
        Tensor::from_slice(&self.scales)
    }
}

/// The scales `s = mean|x|^alpha`, normalized so that `max(s) * min(s) = 1`.
pub fn scales_for(x_absmean: &Tensor, alpha: f64) -> Tensor {
    let s = x_absmean
        .to_kind(Kind::Float)
        .clamp_min(1e-8)
        .pow_tensor_scalar(alpha)
        .clamp_min(1e-4);
    let norm = (s.max() * s.min()).sqrt();
    s / norm
}

/// Search `alpha` on the 20-point grid. For each candidate, every weight `[out, in]` of `weights` is
/// scaled by `s` along its input, quantized with RTN, and scaled back; `loss` receives those
/// fake-quantized weights (same order) and returns the output error of the block they feed.
pub fn search_scales(
    x_absmean: &Tensor,
    weights: &[&Tensor],
    cfg: &QuantConfig,
    mut loss: impl FnMut(&[Tensor]) -> Result<f64>,
) -> Result<AwqScales> {
    cfg.validate()?;
    let n = x_absmean.size();
    for w in weights {
        if w.size().len() != 2 || w.size()[1] != n[0] {
            return Err(QuantError::Shape(format!(
                "AWQ: weight {:?} does not take the {n:?} input channels",
                w.size()
            )));
        }
    }
    let mut losses = Vec::with_capacity(ALPHA_GRID);
    let mut best = (f64::INFINITY, 0.0, None::<Tensor>);
    for k in 0..ALPHA_GRID {
        let alpha = k as f64 / ALPHA_GRID as f64;
        let s = scales_for(x_absmean, alpha).to_device(weights[0].device());
        let fq = weights
            .iter()
            .map(|w| {
                let ws = w.to_kind(Kind::Float) * s.unsqueeze(0);
                Ok(fake_quantize(&ws, cfg, None)? / s.unsqueeze(0))
            })
            .collect::<Result<Vec<_>>>()?;
        let l = loss(&fq)?;
        losses.push(l);
        if l < best.0 {
            best = (l, alpha, Some(s));
        }
    }
    let (_, alpha, s) = best;
    let s = s.ok_or_else(|| QuantError::Config("AWQ: every candidate loss was NaN".into()))?;
    Ok(AwqScales {
        alpha,
        scales: Vec::try_from(s.to_device(tch::Device::Cpu).contiguous()).expect("f32"),
        losses,
    })
}

/// Per-group clip ratios of one linear.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AwqClip {
    /// `[out, n_groups]` row-major.
    pub ratios: Vec<f32>,
    pub out_features: usize,
    pub n_groups: usize,
}

impl AwqClip {
    pub fn tensor(&self) -> Tensor {
        Tensor::from_slice(&self.ratios).view([self.out_features as i64, self.n_groups as i64])
    }
}

/// Search the clip ratio of every (row, group) of `w: [out, in]` on `grid` points from 1.0 down to
/// `1 - max_shrink` (AWQ: 20 points, 0.5), minimizing the mean squared output error on the input
/// samples `x: [n, in]` (a few hundred tokens suffice). Rows are processed in chunks of `row_chunk`.
pub fn search_clip(
    w: &Tensor,
    x: &Tensor,
    cfg: &QuantConfig,
    grid: usize,
    max_shrink: f64,
) -> Result<AwqClip> {
    cfg.validate()?;
    let ws = w.size();
    if ws.len() != 2 || x.size().len() != 2 || x.size()[1] != ws[1] {
        return Err(QuantError::Shape(format!(
            "AWQ clip: weight {ws:?} and inputs {:?}",
            x.size()
        )));
    }
    let (o, i) = (ws[0], ws[1]);
    let g = cfg.group_for(i as usize)? as i64;
    let _guard = tch::no_grad_guard();
    // A ragged last group is zero-padded in both (exact: padded columns add nothing to the error).
    let (wg, ng) = pad_groups(w, g);
    let (xg, _) = pad_groups(&x.to_device(w.device()), g);
    let xg = xg.view([-1, ng, g]);
    let row_chunk = 256;
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < o {
        let rc = row_chunk.min(o - r0);
        let wc = wg.narrow(0, r0, rc);
        let mut best_err: Option<Tensor> = None;
        let mut best = Tensor::ones([rc, ng, 1], (Kind::Float, w.device()));
        for k in 0..grid {
            let ratio = 1.0 - max_shrink * k as f64 / grid as f64;
            let c = Tensor::full([rc, ng, 1], ratio, (Kind::Float, w.device()));
            let (s, z) = group_params(&wc, cfg, Some(&c));
            let diff = &wc - fake(&wc, &s, &z, cfg.maxq());
            // per (row, group): mean over samples of (sum_j diff[o,g,j] x[n,g,j])^2
            let e = Tensor::einsum("ngj,ogj->nog", &[&xg, &diff], None::<i64>)
                .square()
                .mean_dim(0, false, Kind::Float)
                .unsqueeze(-1);
            match &best_err {
                None => best_err = Some(e),
                Some(be) => {
                    let better = e.lt_tensor(be);
                    best = c.where_self(&better, &best);
                    best_err = Some(e.where_self(&better, be));
                }
            }
        }
        out.push(best.squeeze_dim(-1));
        r0 += rc;
    }
    let t = Tensor::cat(&out, 0)
        .to_device(tch::Device::Cpu)
        .contiguous();
    Ok(AwqClip {
        ratios: Vec::try_from(t.view([-1])).expect("f32"),
        out_features: o as usize,
        n_groups: ng as usize,
    })
}

/// Options of the `awq` method (the reference's defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwqOptions {
    /// Calibration tokens scored by the scale search's output losses.
    pub eval_rows: usize,
    /// Input rows used by the clip search.
    pub clip_rows: usize,
    /// Clip grid points and the largest shrink (20 points down to 0.5).
    pub clip_grid: usize,
    pub max_shrink: f64,
}

impl Default for AwqOptions {
    fn default() -> Self {
        AwqOptions {
            eval_rows: 4096,
            clip_rows: 512,
            clip_grid: 20,
            max_shrink: 0.5,
        }
    }
}

/// AWQ as a [`Quantizer`]: on full-precision activations, for every input of the block whose
/// producer can absorb a scale (LLaMA: the two norms and up_proj; not v_proj -> o_proj under
/// grouped-query attention), search the scale on the output error of what consumes it, fold it; then a
/// clip search per linear on the scaled inputs and RTN with those clips. The scales and clips are kept
/// as the block's artefact.
#[derive(Debug, Clone, Default)]
pub struct Awq {
    pub options: AwqOptions,
}

/// Registry factory.
pub fn factory(options: &serde_json::Value) -> Result<Box<dyn Quantizer>> {
    let o: AwqOptions = parse_options("awq", options)?;
    if o.eval_rows == 0
        || o.clip_rows == 0
        || o.clip_grid == 0
        || !(0.0..1.0).contains(&o.max_shrink)
    {
        return Err(QuantError::Config(
            "awq options: eval_rows, clip_rows and clip_grid must be > 0, max_shrink in [0, 1)"
                .into(),
        ));
    }
    Ok(Box::new(Awq { options: o }))
}

impl Quantizer for Awq {
    fn name(&self) -> &str {
        "awq"
    }
    fn calibration(&self) -> Calibration {
        Calibration::FullPrecision
    }
    fn needs(&self) -> Needs {
        Needs {
            absmean: true,
            rows: self.options.eval_rows.max(self.options.clip_rows),
            ..Needs::default()
        }
    }
    fn quantize_block(&self, block: &mut dyn BlockAccess, cfg: &QuantConfig) -> Result<()> {
        let n = block.n_inputs();
        // 1. Scale search and folding, input by input in forward order.
        let mut applied: Vec<Option<Tensor>> = (0..n).map(|_| None).collect();
        let mut scales = serde_json::Map::new();
        for (i, slot) in applied.iter_mut().enumerate() {
            if !block.scalable(i) {
                continue;
            }
            let names = block.linears(i);
            let ws = names
                .iter()
                .map(|l| block.weight(l))
                .collect::<Result<Vec<_>>>()?;
            let wrefs: Vec<&Tensor> = ws.iter().collect();
            let absmean = block.stats(i).absmean()?.shallow_clone();
            let found = search_scales(&absmean, &wrefs, cfg, |fq| block.output_error(i, fq))?;
            let s = found.tensor().to_device(ws[0].device());
            block.scale_input(i, &s)?;
            for (l, w) in names.iter().zip(&ws) {
                block.set(l, Compressed::Dense(w * s.unsqueeze(0)))?;
            }
            scales.insert(names.join("+"), serde_json::to_value(&found).expect("json"));
            *slot = Some(s);
        }
        // 2. Clip search on the scaled weights with the correspondingly scaled inputs, then RTN.
        let mut clips = serde_json::Map::new();
        for (i, s) in applied.iter().enumerate() {
            let x = block.stats(i).rows()?.shallow_clone();
            let x = match s {
                Some(s) => &x / s.to_device(x.device()).unsqueeze(0),
                None => x,
            };
            let x = x.narrow(0, 0, (self.options.clip_rows as i64).min(x.size()[0]));
            for l in block.linears(i) {
                let w = block.weight(l)?;
                let clip =
                    search_clip(&w, &x, cfg, self.options.clip_grid, self.options.max_shrink)?;
                let q = quantize_rtn(&w, cfg, Some(&clip.tensor().to_device(w.device())))?;
                block.set(
                    l,
                    Compressed::Quantized {
                        weight: q,
                        gptq: None,
                    },
                )?;
                clips.insert(l.to_string(), serde_json::to_value(&clip).expect("json"));
            }
        }
        block.record(serde_json::json!({
            "layer": block.layer(), "scales": scales, "clips": clips,
        }));
        Ok(())
    }
}
