//! The per-architecture post-training-quantization driver for the LLaMA decoder: which linears, in
//! which order, with which calibration inputs. The methods themselves (RTN, GPTQ, AWQ, ... by name)
//! live in `qtale_quant::method`; this file only walks the blocks and gives each method a
//! [`BlockAccess`] view of one block (the GPTQ reference's split of solver and driver).
//!
//! Only q/k/v/o/gate/up/down of each block are compressed; embeddings, norms and the LM head stay in
//! high precision (AWQ folds its scales into the norms, which stay f32).
//!
//! * The calibration windows pass through the embedding, then block by block. For each block, one
//!   forward with capturing linears collects the statistics the method asks for ([`Needs`]) on each
//!   distinct input: attention input (q, k, v), attention output (o), MLP input (gate, up), MLP middle
//!   (down).
//! * [`Calibration::Sequential`] (GPTQ): the next block's inputs are this block's outputs after
//!   compression, so later layers see the error of earlier ones.
//!   [`Calibration::FullPrecision`] (AWQ): they are the full-precision outputs.
//! * Output errors for AWQ-style searches: the attention input is scored on the block output, the MLP
//!   input on the MLP output of the captured inputs, the MLP middle on down_proj's own output, each
//!   against the block as it was before the method touched it.
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use qtale_quant::gptq::{Gptq, GptqReport};
use qtale_quant::method::{BlockAccess, Calibration, Compressed, InputStats, Needs, Quantizer};
use qtale_quant::packed::GptqPacked;
use qtale_quant::{QuantConfig, QuantError, QuantLinear};

use crate::error::{ModelError, Result};
use crate::model::{DecoderLayer, DenseLinear, LayerCache, Linear, Llama, BLOCK_LINEARS};

/// HF name prefix of a block linear: `model.layers.{i}.self_attn.q_proj` / `model.layers.{i}.mlp.up_proj`.
pub fn hf_prefix(layer: usize, name: &str) -> String {
    let part = DecoderLayer::module_of(name);
    format!("model.layers.{layer}.{part}.{name}")
}

/// The distinct inputs of a LLaMA block and the linears reading each, in forward order.
const INPUTS: [&[&str]; 4] = [
    &["q_proj", "k_proj", "v_proj"],
    &["o_proj"],
    &["gate_proj", "up_proj"],
    &["down_proj"],
];

fn input_of(linear: &str) -> usize {
    INPUTS
        .iter()
        .position(|g| g.contains(&linear))
        .expect("a block linear")
}

pub(crate) fn slot<'a>(layer: &'a mut DecoderLayer, name: &str) -> Result<&'a mut Box<dyn Linear>> {
    layer
        .linear_mut(name)
        .ok_or_else(|| ModelError::Input(format!("`{name}` is not a block linear")))
}

pub(crate) fn install(
    layer: &mut DecoderLayer,
    name: &str,
    lin: Box<dyn Linear>,
) -> Result<Box<dyn Linear>> {
    Ok(std::mem::replace(slot(layer, name)?, lin))
}

fn mse(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).square().mean(Kind::Float).double_value(&[])
}

/// Options of [`quantize_model`] that belong to the driver, not the method.
#[derive(Debug, Clone)]
pub struct PtqOptions {
    /// Quantize only the first `n` blocks (tests, ablations).
    pub max_layers: Option<usize>,
    /// Calibration sequences per forward.
    pub batch: usize,
    /// Keep each quantized linear's dequantized weight after first use (fast prefill, dense memory).
    pub cache_dense: bool,
    /// Print a per-linear report (error, time, damping) as the reference tools do.
    pub verbose: bool,
}

impl Default for PtqOptions {
    fn default() -> Self {
        PtqOptions {
            max_layers: None,
            batch: 8,
            cache_dense: false,
            verbose: false,
        }
    }
}

/// Per-linear report.
#[derive(Debug, Clone, Serialize)]
pub struct LinearReport {
    pub layer: usize,
    pub linear: String,
    pub method: String,
    pub seconds: f64,
    /// Relative weight change `||W - Q||_F / ||W||_F` against the weight the method started from.
    pub weight_rel_err: f64,
    /// Stored bits per weight (dense replacements: the dense width).
    pub bits_per_weight: f64,
    /// Fraction of exactly zero weights (pruning).
    pub zeros: f64,
    pub gptq: Option<GptqReport>,
}

/// Everything a quantization run produced.
#[derive(Debug)]
pub struct QuantizeSummary {
    pub method: String,
    pub config: QuantConfig,
    pub reports: Vec<LinearReport>,
    /// The methods' search artefacts (AWQ scales and clips per block).
    pub artifacts: Vec<Value>,
    /// The packed linears by HF prefix (what `quantized_io::save_quantized` writes).
    pub packed: Vec<(String, GptqPacked)>,
    /// Linears left dense but changed (pruned), by HF prefix: saved dense.
    pub dense: Vec<(String, Tensor)>,
    pub seconds: f64,
}

impl QuantizeSummary {
    /// Storage of the compressed linears in bits per weight.
    pub fn bits_per_weight(&self) -> f64 {
        let (mut b, mut n) = self.packed.iter().fold((0usize, 0usize), |(b, n), (_, p)| {
            (b + p.bytes(), n + p.in_features * p.out_features)
        });
        for (_, t) in &self.dense {
            b += t.numel() * t.kind().elt_size_in_bytes();
            n += t.numel();
        }
        b as f64 * 8.0 / n.max(1) as f64
    }

    /// Fraction of exactly zero weights over all compressed linears (pruning's sparsity; quantized
    /// weights count their codes at the zero point).
    pub fn zero_fraction(&self) -> f64 {
        let count = |t: &Tensor| {
            (
                t.eq(0.0).sum(Kind::Int64).int64_value(&[]) as usize,
                t.numel(),
            )
        };
        let (z, n) = self
            .packed
            .iter()
            .map(|(_, p)| count(&p.dequantize()))
            .chain(self.dense.iter().map(|(_, t)| count(t)))
            .fold((0, 0), |(z, n), (a, b)| (z + a, n + b));
        z as f64 / n.max(1) as f64
    }
}

/// Calibration batches through the model up to the current block.
struct Batches {
    xs: Vec<Tensor>,
    pos: Vec<Tensor>,
    valid: Vec<Tensor>,
    cos_sin: Vec<(Tensor, Tensor)>,
}

impl Batches {
    fn new(model: &Llama, calib: &[Vec<i64>], batch: usize) -> Result<Self> {
        let len = calib.first().map_or(0, Vec::len);
        if len < 2 || calib.iter().any(|c| c.len() != len) {
            return Err(ModelError::Input(
                "calibration windows must be non-empty and of equal length >= 2".into(),
            ));
        }
        let dev = model.device;
        let mut b = Batches {
            xs: Vec::new(),
            pos: Vec::new(),
            valid: Vec::new(),
            cos_sin: Vec::new(),
        };
        for chunk in calib.chunks(batch.max(1)) {
            let (n, l) = (chunk.len() as i64, len as i64);
            let ids = Tensor::from_slice(&chunk.concat())
                .view([n, l])
                .to_device(dev);
            let pos = Tensor::arange(l, (Kind::Int64, dev))
                .unsqueeze(0)
                .expand([n, l], false)
                .contiguous();
            b.cos_sin.push(model.rope.cos_sin(&pos, model.kind));
            b.valid.push(Tensor::ones([n, l], (Kind::Bool, dev)));
            b.pos.push(pos);
            b.xs.push(model.embed(&ids));
        }
        Ok(b)
    }

    fn run(&self, layer: &DecoderLayer, i: usize) -> Tensor {
        let mut cache = LayerCache::default();
        layer.forward(
            &self.xs[i],
            &self.pos[i],
            &self.valid[i],
            &self.cos_sin[i],
            &mut cache,
        )
    }

    fn tokens_per_batch(&self) -> i64 {
        self.xs.first().map_or(1, |x| x.size()[0] * x.size()[1])
    }
}

/// What the calibration capture records about one input.
struct Sink {
    stats: InputStats,
    abs_sum: Option<Tensor>,
    count: usize,
    kept: Vec<Tensor>,
    kept_rows: usize,
    max_rows: usize,
    error: Option<QuantError>,
}

impl Sink {
    fn new(needs: Needs, in_features: usize, cfg: &QuantConfig, device: Device) -> Result<Self> {
        let hessian = if needs.hessian {
            Some(Gptq::new(in_features, cfg.clone(), device)?)
        } else {
            None
        };
        Ok(Sink {
            stats: InputStats {
                hessian,
                absmean: None,
                rows: None,
            },
            abs_sum: None,
            count: 0,
            kept: Vec::new(),
            kept_rows: 0,
            max_rows: needs.rows,
            error: None,
        })
    }

    fn record(&mut self, x: &Tensor, needs: Needs) {
        let d = *x.size().last().expect("feature dim");
        let x2 = x.reshape([-1, d]).to_kind(Kind::Float);
        if let Some(g) = &mut self.stats.hessian {
            if let Err(e) = g.add_batch(&x2) {
                self.error.get_or_insert(e);
            }
        }
        if needs.absmean {
            let s = x2.abs().sum_dim_intlist(0, false, Kind::Float);
            self.abs_sum = Some(match self.abs_sum.take() {
                Some(a) => a + s,
                None => s,
            });
        }
        self.count += x2.size()[0] as usize;
        if self.kept_rows < self.max_rows {
            let take = (self.max_rows - self.kept_rows).min(x2.size()[0] as usize) as i64;
            self.kept.push(x2.narrow(0, 0, take).copy());
            self.kept_rows += take as usize;
        }
    }

    fn finish(mut self) -> Result<InputStats> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        self.stats.absmean = self.abs_sum.map(|a| a / self.count.max(1) as f64);
        if !self.kept.is_empty() {
            self.stats.rows = Some(Tensor::cat(&self.kept, 0));
        }
        Ok(self.stats)
    }
}

/// A dense linear that records its inputs into a shared sink.
struct Capture {
    weight: Tensor,
    sink: Option<Arc<Mutex<Sink>>>,
    needs: Needs,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Capture({:?})", self.weight.size())
    }
}

impl Linear for Capture {
    fn forward(&self, x: &Tensor) -> Tensor {
        if let Some(s) = &self.sink {
            s.lock().expect("sink lock").record(x, self.needs);
        }
        x.linear::<Tensor>(&self.weight, None)
    }
    fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
    fn weight(&self) -> Tensor {
        self.weight.shallow_clone()
    }
    fn weight_bytes(&self) -> usize {
        0
    }
}

/// One block as a method sees it.
struct Block<'a> {
    layer: &'a mut DecoderLayer,
    index: usize,
    method: &'a str,
    stats: Vec<InputStats>,
    batches: Option<&'a Batches>,
    /// Full-precision block outputs of the first `n_eval` batches.
    fp_out: &'a [Tensor],
    n_eval: usize,
    /// Dense weights at the start of the block (the reference of every output error).
    original: Vec<(&'static str, Tensor)>,
    opts: &'a PtqOptions,
    cfg: &'a QuantConfig,
    needs: Needs,
    summary: &'a mut QuantizeSummary,
    started: Instant,
}

impl Block<'_> {
    fn original(&self, name: &str) -> &Tensor {
        &self
            .original
            .iter()
            .find(|(n, _)| *n == name)
            .expect("block linear")
            .1
    }
}

fn dense(w: Tensor) -> Box<dyn Linear> {
    Box::new(DenseLinear::new(w))
}

impl BlockAccess for Block<'_> {
    fn layer(&self) -> usize {
        self.index
    }
    fn n_inputs(&self) -> usize {
        INPUTS.len()
    }
    fn linears(&self, i: usize) -> Vec<&'static str> {
        INPUTS[i].to_vec()
    }
    fn stats(&mut self, i: usize) -> &mut InputStats {
        &mut self.stats[i]
    }
    fn recapture(&mut self, i: usize) -> qtale_quant::Result<()> {
        let b = self.batches.ok_or_else(|| {
            QuantError::Config("re-capturing an input needs calibration data".into())
        })?;
        let name = INPUTS[i][0];
        let w = self.weight(name)?;
        let sink =
            Sink::new(self.needs, w.size()[1] as usize, self.cfg, w.device()).map_err(to_quant)?;
        let sink = Arc::new(Mutex::new(sink));
        let capture = Box::new(Capture {
            weight: w,
            sink: Some(sink.clone()),
            needs: self.needs,
        });
        let orig = install(self.layer, name, capture).map_err(to_quant)?;
        for k in 0..b.xs.len() {
            let _ = b.run(self.layer, k);
        }
        install(self.layer, name, orig).map_err(to_quant)?;
        self.stats[i] = Arc::into_inner(sink)
            .expect("capture dropped")
            .into_inner()
            .expect("sink lock")
            .finish()
            .map_err(to_quant)?;
        Ok(())
    }
    fn weight(&self, linear: &str) -> qtale_quant::Result<Tensor> {
        let l = self.layer_ref(linear)?;
        Ok(l.weight().to_kind(Kind::Float))
    }
    fn set(&mut self, linear: &str, c: Compressed) -> qtale_quant::Result<()> {
        let t = Instant::now();
        let w = self.weight(linear)?;
        let bias = self.layer_ref(linear)?.bias();
        let (lin, wq, bpw, gptq, packed): (Box<dyn Linear>, Tensor, f64, _, _) = match c {
            Compressed::Quantized { weight, gptq } => {
                let ql =
                    QuantLinear::from_quantized(&weight, self.opts.cache_dense)?.with_bias(bias);
                let p = ql.packed().expect("packed").clone();
                let wq = p.dequantize();
                let bpw = p.bits_per_weight();
                (Box::new(ql), wq, bpw, gptq, Some(p))
            }
            Compressed::Dense(w2) => {
                let bpw = 8.0 * w2.kind().elt_size_in_bytes() as f64;
                let lin = Box::new(DenseLinear {
                    weight: w2.shallow_clone(),
                    bias,
                });
                (lin, w2, bpw, None, None)
            }
        };
        let wc = w.to_device(Device::Cpu);
        let wq = wq.to_device(Device::Cpu).to_kind(Kind::Float);
        let rel = (&wc - &wq).norm().double_value(&[]) / wc.norm().double_value(&[]).max(1e-30);
        let zeros = wq
            .eq(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let prefix = hf_prefix(self.index, linear);
        // A later step may replace a linear again (AWQ scales, then quantizes): keep the last.
        self.summary
            .reports
            .retain(|r| !(r.layer == self.index && r.linear == linear));
        self.summary.packed.retain(|(n, _)| *n != prefix);
        self.summary.dense.retain(|(n, _)| *n != prefix);
        match packed {
            Some(p) => self.summary.packed.push((prefix, p)),
            None => self.summary.dense.push((prefix, wq.shallow_clone())),
        }
        let rep = LinearReport {
            layer: self.index,
            linear: linear.to_string(),
            method: self.method.to_string(),
            seconds: t.elapsed().as_secs_f64() + self.started.elapsed().as_secs_f64(),
            weight_rel_err: rel,
            bits_per_weight: bpw,
            zeros,
            gptq,
        };
        self.started = Instant::now();
        if self.opts.verbose {
            eprintln!(
                "  layer {:2} {linear:9} {}: rel err {rel:.4}, {:.3} bpw, {:.2}s{}",
                self.index,
                rep.method,
                bpw,
                rep.seconds,
                rep.gptq
                    .as_ref()
                    .map(|g| format!(
                        ", loss {:.4e}, damp {:.0e}, dead {}",
                        g.loss, g.damp, g.dead_columns
                    ))
                    .unwrap_or_default()
            );
        }
        self.summary.reports.push(rep);
        install(self.layer, linear, lin).map_err(to_quant)?;
        Ok(())
    }
    fn scalable(&self, i: usize) -> bool {
        // o_proj's input comes from attention over v_proj's heads: with grouped-query attention its
        // channels do not line up with v_proj's rows, so (as the AWQ reference) no scale is folded.
        i != 1
    }
    fn scale_input(&mut self, i: usize, s: &Tensor) -> qtale_quant::Result<()> {
        let norm = match i {
            0 => &mut self.layer.input_layernorm.weight,
            2 => &mut self.layer.post_attention_layernorm.weight,
            3 => {
                let up = self.weight("up_proj")?;
                let scaled = up / s.to_device(Device::Cpu).to_kind(Kind::Float).unsqueeze(1);
                let bias = self.layer_ref("up_proj")?.bias();
                if bias.is_some() {
                    return Err(QuantError::Config(
                        "AWQ: up_proj has a bias; folding a scale into it is not implemented"
                            .into(),
                    ));
                }
                install(self.layer, "up_proj", dense(scaled)).map_err(to_quant)?;
                return Ok(());
            }
            _ => {
                return Err(QuantError::Config(format!(
                    "input {i} of a LLaMA block cannot absorb a scale"
                )))
            }
        };
        let k = norm.kind();
        *norm = &*norm / s.to_device(norm.device()).to_kind(k);
        Ok(())
    }
    fn output_error(&mut self, i: usize, cand: &[Tensor]) -> qtale_quant::Result<f64> {
        let names = INPUTS[i];
        if cand.len() != names.len() {
            return Err(QuantError::Shape(format!(
                "output_error: {} candidates for {} linears",
                cand.len(),
                names.len()
            )));
        }
        match i {
            0 => {
                let b = self.batches.ok_or_else(|| {
                    QuantError::Config("block output errors need calibration data".into())
                })?;
                let saved = names
                    .iter()
                    .zip(cand)
                    .map(|(n, w)| Ok((*n, install(self.layer, n, dense(w.shallow_clone()))?)))
                    .collect::<Result<Vec<_>>>()
                    .map_err(to_quant)?;
                let mut err = 0.0;
                for (k, want) in self.fp_out.iter().enumerate().take(self.n_eval) {
                    err += mse(&b.run(self.layer, k), want);
                }
                for (n, lin) in saved {
                    install(self.layer, n, lin).map_err(to_quant)?;
                }
                Ok(err / self.n_eval.max(1) as f64)
            }
            2 => {
                let x = self.stats[2].rows()?.shallow_clone();
                let wd = self.weight("down_proj")?;
                let mlp = |g: &Tensor, u: &Tensor, d: &Tensor| {
                    (x.linear::<Tensor>(g, None).silu() * x.linear::<Tensor>(u, None))
                        .linear::<Tensor>(d, None)
                };
                let want = mlp(
                    self.original("gate_proj"),
                    self.original("up_proj"),
                    self.original("down_proj"),
                );
                Ok(mse(&mlp(&cand[0], &cand[1], &wd), &want))
            }
            _ => {
                let x = self.stats[i].rows()?.shallow_clone();
                let want = x.linear::<Tensor>(self.original(names[0]), None);
                Ok(mse(&x.linear::<Tensor>(&cand[0], None), &want))
            }
        }
    }
    fn record(&mut self, artifact: Value) {
        self.summary.artifacts.push(artifact);
    }
}

impl Block<'_> {
    fn layer_ref(&self, name: &str) -> qtale_quant::Result<&dyn Linear> {
        let l = &*self.layer;
        Ok(match name {
            "q_proj" => l.self_attn.q_proj.as_ref(),
            "k_proj" => l.self_attn.k_proj.as_ref(),
            "v_proj" => l.self_attn.v_proj.as_ref(),
            "o_proj" => l.self_attn.o_proj.as_ref(),
            "gate_proj" => l.mlp.gate_proj.as_ref(),
            "up_proj" => l.mlp.up_proj.as_ref(),
            "down_proj" => l.mlp.down_proj.as_ref(),
            _ => {
                return Err(QuantError::Config(format!(
                    "`{name}` is not a block linear"
                )))
            }
        })
    }
}

fn to_quant(e: ModelError) -> QuantError {
    match e {
        ModelError::Quant(q) => q,
        other => QuantError::Config(other.to_string()),
    }
}

/// Compress the block linears of `model` with `method` (any registered `Quantizer`) and `cfg`,
/// using `calib` windows (equal lengths; unused by methods that need no calibration).
pub fn quantize_model(
    model: &mut Llama,
    calib: &[Vec<i64>],
    method: &dyn Quantizer,
    cfg: &QuantConfig,
    opts: &PtqOptions,
) -> Result<QuantizeSummary> {
    cfg.validate()?;
    let t0 = Instant::now();
    let _guard = tch::no_grad_guard();
    let nl = opts
        .max_layers
        .unwrap_or(usize::MAX)
        .min(model.layers.len());
    let mut summary = QuantizeSummary {
        method: method.name().to_string(),
        config: cfg.clone(),
        reports: Vec::new(),
        artifacts: Vec::new(),
        packed: Vec::new(),
        dense: Vec::new(),
        seconds: 0.0,
    };
    let calibration = method.calibration();
    let needs = method.needs();
    let batches = match calibration {
        Calibration::None => None,
        _ => Some(Batches::new(model, calib, opts.batch)?),
    };
    let mut batches = batches;
    for li in 0..nl {
        let lt = Instant::now();
        let layer = &mut model.layers[li];
        let original: Vec<(&'static str, Tensor)> = BLOCK_LINEARS
            .iter()
            .map(|n| Ok((*n, slot(layer, n)?.weight().to_kind(Kind::Float))))
            .collect::<Result<_>>()?;
        let (stats, fp_out) = match &batches {
            None => (
                (0..INPUTS.len()).map(|_| InputStats::default()).collect(),
                Vec::new(),
            ),
            Some(b) => capture(layer, b, needs, cfg)?,
        };
        let n_eval = match &batches {
            Some(b) => {
                ((needs.rows.max(1) as i64 / b.tokens_per_batch()).max(1) as usize).min(b.xs.len())
            }
            None => 0,
        };
        let mut block = Block {
            layer,
            index: li,
            method: method.name(),
            stats,
            batches: batches.as_ref(),
            fp_out: &fp_out,
            n_eval,
            original,
            opts,
            cfg,
            needs,
            summary: &mut summary,
            started: Instant::now(),
        };
        method.quantize_block(&mut block, cfg)?;
        if let Some(b) = &mut batches {
            b.xs = match calibration {
                // Later layers see this layer compressed.
                Calibration::Sequential => (0..b.xs.len())
                    .map(|i| b.run(layer_at(model, li), i))
                    .collect(),
                _ => fp_out,
            };
        }
        if opts.verbose {
            eprintln!("layer {li} done in {:.1}s", lt.elapsed().as_secs_f64());
        }
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

fn layer_at(model: &Llama, li: usize) -> &DecoderLayer {
    &model.layers[li]
}

/// One forward of the full-precision block with capturing linears: the statistics of each input,
/// and the block outputs.
fn capture(
    layer: &mut DecoderLayer,
    b: &Batches,
    needs: Needs,
    cfg: &QuantConfig,
) -> Result<(Vec<InputStats>, Vec<Tensor>)> {
    let dev = layer.input_layernorm.weight.device();
    let sinks: Vec<Arc<Mutex<Sink>>> = INPUTS
        .iter()
        .map(|g| {
            let inf = slot(layer, g[0])?.in_features() as usize;
            Ok(Arc::new(Mutex::new(Sink::new(needs, inf, cfg, dev)?)))
        })
        .collect::<Result<_>>()?;
    let mut originals: Vec<(&str, Box<dyn Linear>)> = Vec::new();
    for name in BLOCK_LINEARS {
        let w = slot(layer, name)?.weight();
        let i = input_of(name);
        // The first linear of each input records it (k/v share q's input, up shares gate's).
        let sink = (INPUTS[i][0] == name).then(|| sinks[i].clone());
        originals.push((
            name,
            install(
                layer,
                name,
                Box::new(Capture {
                    weight: w,
                    sink,
                    needs,
                }),
            )?,
        ));
    }
    let out: Vec<Tensor> = (0..b.xs.len()).map(|i| b.run(layer, i)).collect();
    for (name, lin) in originals {
        install(layer, name, lin)?;
    }
    let stats = sinks
        .into_iter()
        .map(|s| {
            Arc::into_inner(s)
                .expect("captures dropped")
                .into_inner()
                .expect("sink lock")
                .finish()
        })
        .collect::<Result<_>>()?;
    Ok((stats, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{load_model, LoadedModel, ModelSource};

    fn smollm2() -> Option<LoadedModel> {
        let p = crate::load::test_asset_gguf()?;
        Some(load_model(&ModelSource::Gguf(p), Device::Cpu, Kind::Float).unwrap())
    }

    /// Hidden states after the first `n` blocks for the windows.
    fn hidden_after(model: &Llama, windows: &[Vec<i64>], n: usize) -> Tensor {
        let _g = tch::no_grad_guard();
        let len = windows[0].len() as i64;
        let ids = Tensor::from_slice(&windows.concat()).view([windows.len() as i64, len]);
        let pos = Tensor::arange(len, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .expand([windows.len() as i64, len], false)
            .contiguous();
        let valid = Tensor::ones([windows.len() as i64, len], (Kind::Bool, Device::Cpu));
        let cs = model.rope.cos_sin(&pos, model.kind);
        let mut x = model.embed(&ids);
        for l in &model.layers[..n] {
            let mut c = LayerCache::default();
            x = l.forward(&x, &pos, &valid, &cs, &mut c);
        }
        x
    }

    /// A method by name with the tests' small AWQ budgets, 4 calibration sequences per forward.
    fn method(name: &str) -> std::sync::Arc<dyn Quantizer> {
        let o = match name {
            "awq" => serde_json::json!({"eval_rows": 512, "clip_rows": 128}),
            _ => serde_json::Value::Null,
        };
        qtale_quant::quantizer(name, &o).unwrap()
    }

    fn opts(layers: Option<usize>) -> PtqOptions {
        PtqOptions {
            max_layers: layers,
            batch: 4,
            ..Default::default()
        }
    }

    fn perplexity(model: &Llama, windows: &[Vec<i64>]) -> f64 {
        let s: f64 = windows.iter().map(|w| model.sequence_nll(w).unwrap()).sum();
        (s / windows.len() as f64).exp()
    }

    #[test]
    fn quantize_gptq_and_awq_beat_rtn_on_smollm2_layer_outputs() {
        let Some(lm) = smollm2() else { return };
        tch::set_num_threads(2);
        let calib = crate::corpus::calibration_windows(&lm.tokenizer, 8, 128).unwrap();
        let held = crate::corpus::heldout_windows(&lm.tokenizer, 4, 128).unwrap();
        assert_eq!((calib.len(), held.len()), (8, 4));
        let n = 2;
        let reference = hidden_after(&lm.model, &held, n);
        for bits in [4u32, 3] {
            let mut errs = Vec::new();
            for m in ["rtn", "gptq", "awq"] {
                let mut model = load_model(&lm.source, Device::Cpu, Kind::Float)
                    .unwrap()
                    .model;
                let cfg = QuantConfig::new(bits, 64).unwrap();
                let s =
                    quantize_model(&mut model, &calib, &*method(m), &cfg, &opts(Some(n))).unwrap();
                assert_eq!(s.reports.len(), 7 * n);
                let e = mse(&hidden_after(&model, &held, n), &reference);
                eprintln!(
                    "{bits}-bit g64 {m}: block-{n} output MSE {e:.4e} ({:.2}s, {:.3} bpw)",
                    s.seconds,
                    s.bits_per_weight()
                );
                errs.push(e);
            }
            assert!(
                errs[1] < errs[0],
                "{bits}-bit: GPTQ {} vs RTN {}",
                errs[1],
                errs[0]
            );
            assert!(
                errs[2] < errs[0],
                "{bits}-bit: AWQ {} vs RTN {}",
                errs[2],
                errs[0]
            );
        }
    }

    #[test]
    fn quantize_gptq_3bit_perplexity_below_rtn() {
        let Some(lm) = smollm2() else { return };
        tch::set_num_threads(2);
        let calib = crate::corpus::calibration_windows(&lm.tokenizer, 8, 128).unwrap();
        let held = crate::corpus::heldout_windows(&lm.tokenizer, 4, 256).unwrap();
        let dense = perplexity(&lm.model, &held);
        let mut ppl = Vec::new();
        for m in ["rtn", "gptq"] {
            let mut model = load_model(&lm.source, Device::Cpu, Kind::Float)
                .unwrap()
                .model;
            // The first 8 of 30 blocks keep the test fast; quant-ppl runs the whole model.
            let mut o = opts(Some(8));
            o.cache_dense = true;
            let cfg = QuantConfig::new(3, 64).unwrap();
            let s = quantize_model(&mut model, &calib, &*method(m), &cfg, &o).unwrap();
            let p = perplexity(&model, &held);
            eprintln!(
                "3-bit g64 {m}: ppl {p:.3} (dense {dense:.3}), {:.1}s",
                s.seconds
            );
            ppl.push(p);
        }
        assert!(ppl[1] < ppl[0], "GPTQ {} vs RTN {}", ppl[1], ppl[0]);
    }
}
