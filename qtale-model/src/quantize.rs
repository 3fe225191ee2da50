//! The model-level quantization driver: calibration capture layer by layer, sequential GPTQ, AWQ search
//! and application, RTN, and the packed [`QuantLinear`] that replaces the dense linears.
//!
//! Only q/k/v/o/gate/up/down of each block are quantized; embeddings, norms and the LM head stay in
//! high precision (AWQ folds its scales into the norms, which stay f32).
//!
//! * GPTQ: layers in order; each layer's linears see the outputs of the already quantized earlier
//!   layers (one Hessian per distinct input: q/k/v share one, gate/up share one).
//! * AWQ: each layer's searches run on full-precision activations (the outputs of the unquantized,
//!   scaled layer feed the next one): scales for (q,k,v) scored on the decoder block's output, (gate,up)
//!   on the MLP output, down on its own output, folded into input_layernorm / post_attention_layernorm /
//!   up_proj; o_proj is not scaled (with grouped-query attention v_proj's output does not match its
//!   input). Then a clip search per linear, then RTN with those clips. The artefacts are returned.
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use qtale_quant::awq::{search_clip, search_scales, AwqClip, AwqScales};
use qtale_quant::gptq::{Gptq, GptqReport};
use qtale_quant::kernels::int4::Int4Matrix;
use qtale_quant::packed::{
    read_quantization_config, save_safetensors, Checkpoint, GptqPacked, HfQuantizationConfig,
    PackedLayout, StoredLinear,
};
use qtale_quant::rtn::quantize_rtn;
use qtale_quant::{QuantConfig, QuantError, QuantizedWeight};

use crate::config::HfConfig;
use crate::error::ModelError;
use crate::load::{LoadedModel, ModelSource};
use crate::model::{DecoderLayer, DenseLinear, LayerCache, Linear, Llama};
use crate::weights::{safetensors_files, TensorMap};

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Input(String),
}

pub type QResult<T> = std::result::Result<T, QuantizeError>;

/// The quantization methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Method {
    Rtn,
    Gptq,
    Awq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
        }
    }
}

impl FromStr for Method {
    type Err = QuantizeError;
    fn from_str(s: &str) -> QResult<Self> {
        match s.to_ascii_lowercase().as_str() {
            "rtn" => Ok(Method::Rtn),
            "gptq" => Ok(Method::Gptq),
            "awq" => Ok(Method::Awq),
            _ => Err(QuantizeError::Input(format!(
                "unknown method {s:?} (rtn, gptq, awq)"
            ))),
        }
    }
}

/// The seven block linears, in HF order.
pub const LINEARS: [&str; 7] = crate::model::BLOCK_LINEARS;

/// HF name prefix of a block linear: `model.layers.{i}.self_attn.q_proj` / `model.layers.{i}.mlp.up_proj`.
pub fn hf_prefix(layer: usize, name: &str) -> String {
    let part = DecoderLayer::module_of(name);
    format!("model.layers.{layer}.{part}.{name}")
}

fn slot<'a>(layer: &'a mut DecoderLayer, name: &str) -> &'a mut Box<dyn Linear> {
    layer
        .linear_mut(name)
        .unwrap_or_else(|| unreachable!("not a block linear: {name}"))
}

fn dense(w: Tensor) -> Box<dyn Linear> {
    Box::new(DenseLinear {
        weight: w,
        bias: None,
    })
}

/// A linear layer stored in the GPTQ packed layout. On CPU, 4-bit weights with in-order groups run
/// through the int4 AVX2 kernel for up to 8 tokens; larger batches (and other bit widths, and CUDA)
/// dequantize with tch and call the dense matmul. With `cache_dense` the dequantized weight is kept
/// after first use (as fast as dense, at dense memory cost; always on for CUDA).
#[derive(Debug)]
pub struct QuantLinear {
    packed: GptqPacked,
    kernel: Option<Int4Matrix>,
    bias: Option<Tensor>,
    cache_dense: bool,
    cache: Mutex<Option<Tensor>>,
}

/// Token count up to which the int4 kernel is used on CPU.
pub const KERNEL_MAX_TOKENS: i64 = 8;

impl QuantLinear {
    pub fn new(packed: GptqPacked, cache_dense: bool) -> Self {
        QuantLinear {
            kernel: packed.to_int4(),
            packed,
            bias: None,
            cache_dense,
            cache: Mutex::new(None),
        }
    }

    /// The same linear with a (dense) bias `[out]` added to its output.
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    pub fn from_quantized(q: &QuantizedWeight, cache_dense: bool) -> QResult<Self> {
        Ok(Self::new(GptqPacked::from_quantized(q)?, cache_dense))
    }

    pub fn packed(&self) -> &GptqPacked {
        &self.packed
    }

    /// Whether the int4 CPU kernel serves small batches.
    pub fn has_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    fn dense_weight(&self, device: Device, kind: Kind) -> Tensor {
        let make = || self.packed.dequantize().to_device(device).to_kind(kind);
        if !(self.cache_dense || device.is_cuda()) {
            return make();
        }
        let mut c = self.cache.lock().expect("cache lock");
        match c.as_ref() {
            Some(t) if t.device() == device && t.kind() == kind => t.shallow_clone(),
            _ => {
                let t = make();
                *c = Some(t.shallow_clone());
                t
            }
        }
    }
}

impl Linear for QuantLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let inf = self.packed.in_features as i64;
        let out = self.packed.out_features as i64;
        let n = x.numel() as i64 / inf.max(1);
        if let Some(k) = &self.kernel {
            if x.device() == Device::Cpu && x.kind() == Kind::Float && n <= KERNEL_MAX_TOKENS {
                let xs: Vec<f32> = Vec::try_from(x.contiguous().view([-1])).expect("f32 input");
                let mut y = vec![0f32; (n * out) as usize];
                k.gemm(&xs, n as usize, &mut y).expect("shapes checked");
                let mut shape = x.size();
                *shape.last_mut().expect("input has a feature dimension") = out;
                let y = Tensor::from_slice(&y).view(shape.as_slice());
                return match &self.bias {
                    Some(b) => y + b.to_kind(Kind::Float),
                    None => y,
                };
            }
        }
        let b = self
            .bias
            .as_ref()
            .map(|b| b.to_device(x.device()).to_kind(x.kind()));
        x.linear(&self.dense_weight(x.device(), x.kind()), b.as_ref())
    }
    fn in_features(&self) -> i64 {
        self.packed.in_features as i64
    }
    fn out_features(&self) -> i64 {
        self.packed.out_features as i64
    }
    fn weight(&self) -> Tensor {
        self.packed.dequantize()
    }
    /// Bytes of the packed GPTQ tensors and the bias (the CPU kernel's int4 copy is a run-time form,
    /// not counted).
    fn weight_bytes(&self) -> usize {
        self.packed.bytes()
            + self
                .bias
                .as_ref()
                .map_or(0, |b| b.numel() * b.kind().elt_size_in_bytes())
    }
    fn bias(&self) -> Option<Tensor> {
        self.bias.as_ref().map(Tensor::shallow_clone)
    }
    fn int4(&self) -> Option<&Int4Matrix> {
        self.kernel.as_ref()
    }
}

/// What the calibration capture records about one linear's input.
struct Sink {
    gptq: Option<Gptq>,
    abs_sum: Option<Tensor>,
    count: usize,
    kept: Vec<Tensor>,
    kept_rows: usize,
    max_rows: usize,
}

impl Sink {
    fn new(gptq: Option<Gptq>, max_rows: usize) -> Self {
        Sink {
            gptq,
            abs_sum: None,
            count: 0,
            kept: Vec::new(),
            kept_rows: 0,
            max_rows,
        }
    }
    fn record(&mut self, x: &Tensor) {
        let d = *x.size().last().expect("feature dim");
        let x2 = x.reshape([-1, d]).to_kind(Kind::Float);
        if let Some(g) = &mut self.gptq {
            g.add_batch(&x2).expect("shape matches the Hessian");
        }
        let s = x2.abs().sum_dim_intlist(0, false, Kind::Float);
        self.abs_sum = Some(match self.abs_sum.take() {
            Some(a) => a + s,
            None => s,
        });
        self.count += x2.size()[0] as usize;
        if self.kept_rows < self.max_rows {
            let take = (self.max_rows - self.kept_rows).min(x2.size()[0] as usize) as i64;
            self.kept.push(x2.narrow(0, 0, take).copy());
            self.kept_rows += take as usize;
        }
    }
    fn absmean(&self) -> Tensor {
        self.abs_sum.as_ref().expect("recorded") / self.count.max(1) as f64
    }
    fn kept(&self) -> Tensor {
        Tensor::cat(&self.kept, 0)
    }
}

/// A dense linear that records its inputs into a shared sink.
#[derive(Debug)]
struct Capture {
    weight: Tensor,
    sink: Option<Arc<Mutex<Sink>>>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sink({} rows)", self.count)
    }
}

impl Linear for Capture {
    fn forward(&self, x: &Tensor) -> Tensor {
        if let Some(s) = &self.sink {
            s.lock().expect("sink lock").record(x);
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

/// Options of [`quantize_model`].
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub method: Method,
    pub config: QuantConfig,
    /// Quantize only the first `n` blocks (tests, ablations).
    pub max_layers: Option<usize>,
    /// Calibration sequences per forward.
    pub batch: usize,
    /// AWQ: input rows kept per linear for the scale loss (and the block output).
    pub awq_eval_rows: usize,
    /// AWQ: input rows used by the clip search.
    pub awq_clip_rows: usize,
    /// Keep each quantized linear's dequantized weight after first use (fast prefill, dense memory).
    pub cache_dense: bool,
    pub verbose: bool,
}

impl QuantizeOptions {
    pub fn new(method: Method, config: QuantConfig) -> Self {
        QuantizeOptions {
            method,
            config,
            max_layers: None,
            batch: 8,
            awq_eval_rows: 4096,
            awq_clip_rows: 512,
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
    /// Relative weight change `||W - Q||_F / ||W||_F`.
    pub weight_rel_err: f64,
    pub bits_per_weight: f64,
    pub gptq: Option<GptqReport>,
}

/// AWQ's search results for one block.
#[derive(Debug, Clone, Serialize)]
pub struct AwqLayerArtifact {
    pub layer: usize,
    pub qkv: AwqScales,
    pub gate_up: AwqScales,
    pub down: AwqScales,
    pub clips: Vec<(String, AwqClip)>,
}

/// Everything a quantization run produced.
#[derive(Debug)]
pub struct QuantizeSummary {
    pub method: Method,
    pub config: QuantConfig,
    pub reports: Vec<LinearReport>,
    pub awq: Vec<AwqLayerArtifact>,
    /// The packed linears by HF prefix (what [`save_quantized`] writes).
    pub packed: Vec<(String, GptqPacked)>,
    pub seconds: f64,
}

impl QuantizeSummary {
    /// Storage of the quantized linears in bits per weight.
    pub fn bits_per_weight(&self) -> f64 {
        let (b, n) = self.packed.iter().fold((0usize, 0usize), |(b, n), (_, p)| {
            (b + p.bytes(), n + p.in_features * p.out_features)
        });
        b as f64 * 8.0 / n.max(1) as f64
    }
}

struct Batches {
    xs: Vec<Tensor>,
    pos: Vec<Tensor>,
    valid: Vec<Tensor>,
    cos_sin: Vec<(Tensor, Tensor)>,
}

fn run_layer(layer: &DecoderLayer, b: &Batches, i: usize) -> Tensor {
    let mut cache = LayerCache::default();
    layer.forward(&b.xs[i], &b.pos[i], &b.valid[i], &b.cos_sin[i], &mut cache)
}

fn install(layer: &mut DecoderLayer, name: &str, lin: Box<dyn Linear>) -> Box<dyn Linear> {
    std::mem::replace(slot(layer, name), lin)
}

fn mse(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).square().mean(Kind::Float).double_value(&[])
}

/// Quantize the block linears of `model` with `calib` windows (equal lengths) as calibration data.
pub fn quantize_model(
    model: &mut Llama,
    calib: &[Vec<i64>],
    opts: &QuantizeOptions,
) -> QResult<QuantizeSummary> {
    opts.config.validate()?;
    let t0 = Instant::now();
    let _guard = tch::no_grad_guard();
    let nl = opts
        .max_layers
        .unwrap_or(usize::MAX)
        .min(model.layers.len());
    let mut summary = QuantizeSummary {
        method: opts.method,
        config: opts.config.clone(),
        reports: Vec::new(),
        awq: Vec::new(),
        packed: Vec::new(),
        seconds: 0.0,
    };
    let cfg = &opts.config;
    if opts.method == Method::Awq && (model.config.attention_bias || model.config.mlp_bias) {
        return Err(QuantizeError::Input(
            "AWQ scale folding does not handle linear biases (attention_bias / mlp_bias)".into(),
        ));
    }

    let finish = |summary: &mut QuantizeSummary,
                  layer: &mut DecoderLayer,
                  li: usize,
                  name: &str,
                  w: &Tensor,
                  q: QuantizedWeight,
                  seconds: f64,
                  gptq: Option<GptqReport>|
     -> QResult<()> {
        let bias = slot(layer, name).bias();
        let ql = QuantLinear::from_quantized(&q, opts.cache_dense)?.with_bias(bias);
        let wq = ql.packed().dequantize();
        let w = w.to_device(Device::Cpu).to_kind(Kind::Float);
        let rel = ((&w - &wq).norm().double_value(&[]) / w.norm().double_value(&[]).max(1e-30))
            .min(f64::MAX);
        let rep = LinearReport {
            layer: li,
            linear: name.to_string(),
            method: opts.method.name().into(),
            seconds,
            weight_rel_err: rel,
            bits_per_weight: ql.packed().bits_per_weight(),
            gptq,
        };
        if opts.verbose {
            eprintln!(
                "  layer {li:2} {name:9} {}: rel err {rel:.4}, {:.3} bpw, {:.2}s{}",
                rep.method,
                rep.bits_per_weight,
                seconds,
                rep.gptq
                    .as_ref()
                    .map(|g| format!(
                        ", loss {:.4e}, damp {:.0e}, dead {}",
                        g.loss, g.damp, g.dead_columns
                    ))
                    .unwrap_or_default()
            );
        }
        summary
            .packed
            .push((hf_prefix(li, name), ql.packed().clone()));
        summary.reports.push(rep);
        install(layer, name, Box::new(ql));
        Ok(())
    };

    if opts.method == Method::Rtn {
        for li in 0..nl {
            for name in LINEARS {
                let t = Instant::now();
                let w = slot(&mut model.layers[li], name).weight();
                let q = quantize_rtn(&w, cfg, None)?;
                finish(
                    &mut summary,
                    &mut model.layers[li],
                    li,
                    name,
                    &w,
                    q,
                    t.elapsed().as_secs_f64(),
                    None,
                )?;
            }
        }
        summary.seconds = t0.elapsed().as_secs_f64();
        return Ok(summary);
    }

    // Calibration batches through the embedding.
    let len = calib.first().map_or(0, Vec::len);
    if len < 2 || calib.iter().any(|c| c.len() != len) {
        return Err(QuantizeError::Input(
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
    for chunk in calib.chunks(opts.batch.max(1)) {
        let flat: Vec<i64> = chunk.concat();
        let ids = Tensor::from_slice(&flat)
            .view([chunk.len() as i64, len as i64])
            .to_device(dev);
        let pos = Tensor::arange(len as i64, (Kind::Int64, dev))
            .unsqueeze(0)
            .expand([chunk.len() as i64, len as i64], false)
            .contiguous();
        b.cos_sin.push(model.rope.cos_sin(&pos, model.kind));
        b.valid.push(Tensor::ones(
            [chunk.len() as i64, len as i64],
            (Kind::Bool, dev),
        ));
        b.pos.push(pos);
        b.xs.push(model.embed(&ids));
    }

    for li in 0..nl {
        let lt = Instant::now();
        let layer = &mut model.layers[li];
        // Capture: which linear records into which sink (k/v share q's input, up shares gate's).
        let in_of = |n: &str| slot_weight_in(n, layer_dims(layer));
        let recorders = ["q_proj", "o_proj", "gate_proj", "down_proj"];
        let max_rows = if opts.method == Method::Awq {
            opts.awq_eval_rows.max(opts.awq_clip_rows)
        } else {
            0
        };
        let sinks: Vec<Arc<Mutex<Sink>>> = recorders
            .iter()
            .map(|n| -> QResult<_> {
                let g = if opts.method == Method::Gptq {
                    Some(Gptq::new(in_of(n), cfg.clone(), dev)?)
                } else {
                    None
                };
                Ok(Arc::new(Mutex::new(Sink::new(g, max_rows))))
            })
            .collect::<QResult<_>>()?;
        let sink_of = |n: &str| -> usize {
            match n {
                "q_proj" | "k_proj" | "v_proj" => 0,
                "o_proj" => 1,
                "gate_proj" | "up_proj" => 2,
                _ => 3,
            }
        };
        let mut originals: Vec<(&str, Box<dyn Linear>)> = Vec::new();
        for name in LINEARS {
            let w = slot(layer, name).weight();
            let sink = recorders
                .contains(&name)
                .then(|| sinks[sink_of(name)].clone());
            originals.push((
                name,
                install(layer, name, Box::new(Capture { weight: w, sink })),
            ));
        }
        let fp_out: Vec<Tensor> = (0..b.xs.len()).map(|i| run_layer(layer, &b, i)).collect();
        for (name, lin) in originals {
            install(layer, name, lin);
        }
        let mut sinks: Vec<Sink> = sinks
            .into_iter()
            .map(|s| {
                Arc::try_unwrap(s)
                    .expect("captures dropped")
                    .into_inner()
                    .expect("sink lock")
            })
            .collect();

        match opts.method {
            Method::Gptq => {
                for name in LINEARS {
                    let t = Instant::now();
                    let w = slot(layer, name).weight();
                    let g = sinks[sink_of(name)].gptq.as_mut().expect("gptq sink");
                    let (q, rep) = g.solve(&w)?;
                    finish(
                        &mut summary,
                        layer,
                        li,
                        name,
                        &w,
                        q,
                        t.elapsed().as_secs_f64(),
                        Some(rep),
                    )?;
                }
                // Later layers see this layer quantized.
                b.xs = (0..b.xs.len()).map(|i| run_layer(layer, &b, i)).collect();
            }
            Method::Awq => {
                let art = awq_layer(
                    layer,
                    li,
                    &b,
                    &fp_out,
                    &mut sinks,
                    opts,
                    &mut |layer, name, w, q, s| {
                        finish(&mut summary, layer, li, name, w, q, s, None)
                    },
                )?;
                summary.awq.push(art);
                b.xs = fp_out;
            }
            Method::Rtn => unreachable!(),
        }
        if opts.verbose {
            eprintln!("layer {li} done in {:.1}s", lt.elapsed().as_secs_f64());
        }
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

#[derive(Clone, Copy)]
struct Dims {
    hidden: usize,
    ffn: usize,
    attn: usize,
}

fn layer_dims(layer: &DecoderLayer) -> Dims {
    Dims {
        hidden: layer.self_attn.q_proj.in_features() as usize,
        ffn: layer.mlp.down_proj.in_features() as usize,
        attn: layer.self_attn.o_proj.in_features() as usize,
    }
}

fn slot_weight_in(name: &str, d: Dims) -> usize {
    match name {
        "o_proj" => d.attn,
        "down_proj" => d.ffn,
        _ => d.hidden,
    }
}

type Finish<'f> =
    dyn FnMut(&mut DecoderLayer, &str, &Tensor, QuantizedWeight, f64) -> QResult<()> + 'f;

#[allow(clippy::too_many_arguments)]
fn awq_layer(
    layer: &mut DecoderLayer,
    li: usize,
    b: &Batches,
    fp_out: &[Tensor],
    sinks: &mut [Sink],
    opts: &QuantizeOptions,
    finish: &mut Finish<'_>,
) -> QResult<AwqLayerArtifact> {
    let cfg = &opts.config;
    let t = Instant::now();
    // Batches for the block-output loss: as many as fit in awq_eval_rows tokens.
    let per = b.xs[0].size()[0] * b.xs[0].size()[1];
    let n_eval = ((opts.awq_eval_rows as i64 / per.max(1)).max(1) as usize).min(b.xs.len());
    let w_of = |layer: &mut DecoderLayer, n: &str| slot(layer, n).weight().to_kind(Kind::Float);

    // 1. q, k, v: loss on the decoder block output.
    let ws: Vec<Tensor> = ["q_proj", "k_proj", "v_proj"]
        .iter()
        .map(|n| w_of(layer, n))
        .collect();
    let wrefs: Vec<&Tensor> = ws.iter().collect();
    let qkv = {
        let absmean = sinks[0].absmean();
        let layer_cell = std::cell::RefCell::new(&mut *layer);
        search_scales(&absmean, &wrefs, cfg, |fq| {
            let mut l = layer_cell.borrow_mut();
            let saved: Vec<_> = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .zip(fq)
                .map(|(n, w)| (*n, install(&mut l, n, dense(w.shallow_clone()))))
                .collect();
            let mut err = 0.0;
            for (i, want) in fp_out.iter().enumerate().take(n_eval) {
                err += mse(&run_layer(&l, b, i), want);
            }
            for (n, lin) in saved {
                install(&mut l, n, lin);
            }
            Ok(err / n_eval as f64)
        })?
    };
    let s = qkv.tensor().to_device(ws[0].device());
    layer.input_layernorm.weight =
        &layer.input_layernorm.weight / s.to_kind(layer.input_layernorm.weight.kind());
    for (n, w) in ["q_proj", "k_proj", "v_proj"].iter().zip(&ws) {
        install(layer, n, dense(w * s.unsqueeze(0)));
    }

    // 2. gate, up: loss on the MLP output for the captured post-attention-norm inputs.
    let h2 = sinks[2].kept();
    let (wg, wu, wd) = (
        w_of(layer, "gate_proj"),
        w_of(layer, "up_proj"),
        w_of(layer, "down_proj"),
    );
    let mlp_ref = (h2.linear::<Tensor>(&wg, None).silu() * h2.linear::<Tensor>(&wu, None))
        .linear::<Tensor>(&wd, None);
    let gate_up = search_scales(&sinks[2].absmean(), &[&wg, &wu], cfg, |fq| {
        let y = (h2.linear::<Tensor>(&fq[0], None).silu() * h2.linear::<Tensor>(&fq[1], None))
            .linear::<Tensor>(&wd, None);
        Ok(mse(&y, &mlp_ref))
    })?;
    let s2 = gate_up.tensor().to_device(wg.device());
    layer.post_attention_layernorm.weight = &layer.post_attention_layernorm.weight
        / s2.to_kind(layer.post_attention_layernorm.weight.kind());
    let wg = &wg * s2.unsqueeze(0);
    let wu = &wu * s2.unsqueeze(0);

    // 3. down: loss on its own output; scales folded into up_proj's rows.
    let act = sinks[3].kept();
    let down_ref = act.linear::<Tensor>(&wd, None);
    let down = search_scales(&sinks[3].absmean(), &[&wd], cfg, |fq| {
        Ok(mse(&act.linear::<Tensor>(&fq[0], None), &down_ref))
    })?;
    let s3 = down.tensor().to_device(wd.device());
    let wu = &wu / s3.unsqueeze(1);
    let wd = &wd * s3.unsqueeze(0);
    install(layer, "gate_proj", dense(wg.shallow_clone()));
    install(layer, "up_proj", dense(wu.shallow_clone()));
    install(layer, "down_proj", dense(wd.shallow_clone()));
    let search_secs = t.elapsed().as_secs_f64();

    // 4. clip search on the scaled weights with the correspondingly scaled inputs, then RTN.
    let rows = opts.awq_clip_rows as i64;
    let x_qkv = sinks[0].kept() / s.unsqueeze(0);
    let x_o = sinks[1].kept();
    let x_gu = h2 / s2.unsqueeze(0);
    let x_d = act / s3.unsqueeze(0);
    let mut clips = Vec::new();
    for name in LINEARS {
        let t = Instant::now();
        let x = match name {
            "q_proj" | "k_proj" | "v_proj" => &x_qkv,
            "o_proj" => &x_o,
            "gate_proj" | "up_proj" => &x_gu,
            _ => &x_d,
        };
        let x = x.narrow(0, 0, rows.min(x.size()[0]));
        let w = slot(layer, name).weight().to_kind(Kind::Float);
        let clip = search_clip(&w, &x, cfg, 20, 0.5)?;
        let q = quantize_rtn(&w, cfg, Some(&clip.tensor().to_device(w.device())))?;
        let secs = t.elapsed().as_secs_f64() + search_secs / 7.0;
        finish(layer, name, &w, q, secs)?;
        clips.push((name.to_string(), clip));
    }
    if opts.verbose {
        eprintln!(
            "  layer {li}: awq alpha qkv {:.2}, gate/up {:.2}, down {:.2}",
            qkv.alpha, gate_up.alpha, down.alpha
        );
    }
    Ok(AwqLayerArtifact {
        layer: li,
        qkv,
        gate_up,
        down,
        clips,
    })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> QuantizeError + '_ {
    move |source| {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()
    }
}

/// Write the quantized linears (GPTQ layout) and the block norms (AWQ changes them) to
/// `dir/model.safetensors`, and `dir/config.json` with `quantization_config`: a delta over the base
/// model, read back by [`load_quantized`]. [`save_quantized_hf_dir`] writes a standalone directory.
pub fn save_quantized(model: &Llama, summary: &QuantizeSummary, dir: &Path) -> QResult<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let packed: Vec<(String, &GptqPacked)> =
        summary.packed.iter().map(|(n, p)| (n.clone(), p)).collect();
    let mut dense = Vec::new();
    for (i, l) in model.layers.iter().enumerate() {
        dense.push((
            format!("model.layers.{i}.input_layernorm.weight"),
            l.input_layernorm.weight.shallow_clone(),
        ));
        dense.push((
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            l.post_attention_layernorm.weight.shallow_clone(),
        ));
    }
    let dense: Vec<(String, &Tensor)> = dense.iter().map(|(n, t)| (n.clone(), t)).collect();
    save_safetensors(
        &dir.join("model.safetensors"),
        PackedLayout::Gptq,
        &packed,
        &dense,
    )?;
    let qc = HfQuantizationConfig::for_layout(PackedLayout::Gptq, &summary.config)?;
    let cfg = serde_json::json!({
        "model_type": "llama",
        "quantization_config": qc.to_json(),
        "qtale_quant_method": summary.method.name(),
    });
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).map_err(io_err(&p))?;
    Ok(())
}

/// Write a standalone, hub-style quantized HF directory: `config.json` (the model's config plus
/// `quantization_config` for `layout`) and `model.safetensors` holding the packed linears of
/// `summary` in `layout` (GPTQ or AutoAWQ "gemm"), every other tensor dense in f32 (embedding, norms,
/// LM head, biases, and block linears left unquantized). [`load_quantized_hf_dir`] reads it back.
pub fn save_quantized_hf_dir(
    model: &Llama,
    summary: &QuantizeSummary,
    dir: &Path,
    layout: PackedLayout,
) -> QResult<()> {
    let qc = HfQuantizationConfig::for_layout(layout, &summary.config)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let by_prefix: std::collections::HashMap<&str, &GptqPacked> = summary
        .packed
        .iter()
        .map(|(n, p)| (n.as_str(), p))
        .collect();
    let mut packed: Vec<(String, &GptqPacked)> = Vec::new();
    let mut dense: Vec<(String, Tensor)> = vec![(
        "model.embed_tokens.weight".into(),
        model.embed_tokens.shallow_clone(),
    )];
    for (i, l) in model.layers.iter().enumerate() {
        dense.push((
            format!("model.layers.{i}.input_layernorm.weight"),
            l.input_layernorm.weight.shallow_clone(),
        ));
        dense.push((
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            l.post_attention_layernorm.weight.shallow_clone(),
        ));
        for name in LINEARS {
            let prefix = hf_prefix(i, name);
            let lin = match name {
                "q_proj" => &l.self_attn.q_proj,
                "k_proj" => &l.self_attn.k_proj,
                "v_proj" => &l.self_attn.v_proj,
                "o_proj" => &l.self_attn.o_proj,
                "gate_proj" => &l.mlp.gate_proj,
                "up_proj" => &l.mlp.up_proj,
                _ => &l.mlp.down_proj,
            };
            match by_prefix.get(prefix.as_str()) {
                Some(p) => packed.push((prefix.clone(), *p)),
                None => dense.push((format!("{prefix}.weight"), lin.weight())),
            }
            if let Some(b) = lin.bias() {
                dense.push((format!("{prefix}.bias"), b));
            }
        }
    }
    dense.push((
        "model.norm.weight".into(),
        model.norm.weight.shallow_clone(),
    ));
    if let Some(h) = &model.lm_head {
        dense.push(("lm_head.weight".into(), h.shallow_clone()));
    }
    let dense: Vec<(String, &Tensor)> = dense.iter().map(|(n, t)| (n.clone(), t)).collect();
    save_safetensors(&dir.join("model.safetensors"), layout, &packed, &dense)?;
    let mut cfg = serde_json::to_value(model.config.to_hf()).expect("config serializes");
    cfg["quantization_config"] = qc.to_json();
    cfg["qtale_quant_method"] = summary.method.name().into();
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).map_err(io_err(&p))?;
    Ok(())
}

/// Replace the block linears of `model` by those of a quantized checkpoint (GPTQ or AWQ layout)
/// written by [`save_quantized`] or [`save_quantized_hf_dir`] (or any single-file checkpoint with the
/// same tensor names); block norms present in it are loaded too. Returns how many linears were
/// replaced.
pub fn load_quantized(model: &mut Llama, dir: &Path, cache_dense: bool) -> QResult<usize> {
    let qc = read_quantization_config(&dir.join("config.json"))?;
    let ck = Checkpoint::open(&dir.join("model.safetensors"))?;
    let names: std::collections::HashSet<String> = ck.names().into_iter().collect();
    let mut n = 0;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for name in LINEARS {
            let prefix = hf_prefix(i, name);
            if !names.contains(&format!("{prefix}.qweight")) {
                continue;
            }
            let (inf, outf, bias) = {
                let s = slot(layer, name);
                (
                    s.in_features() as usize,
                    s.out_features() as usize,
                    s.bias(),
                )
            };
            let p = ck.packed(&prefix, inf, outf, &qc)?;
            install(
                layer,
                name,
                Box::new(QuantLinear::new(p, cache_dense).with_bias(bias)),
            );
            n += 1;
        }
        for (norm, w) in [
            ("input_layernorm", &mut layer.input_layernorm.weight),
            (
                "post_attention_layernorm",
                &mut layer.post_attention_layernorm.weight,
            ),
        ] {
            let key = format!("model.layers.{i}.{norm}.weight");
            if names.contains(&key) {
                let t = ck.dense(&key)?;
                if t.size() != w.size() {
                    return Err(QuantError::TensorShape {
                        name: key,
                        expected: w.size().iter().map(|&d| d as usize).collect(),
                        found: t.size().iter().map(|&d| d as usize).collect(),
                    }
                    .into());
                }
                *w = t.to_device(w.device()).to_kind(w.kind());
            }
        }
    }
    Ok(n)
}

/// Load a hub-style quantized HF directory in one call: `config.json` with `quantization_config`
/// (`quant_method` `"gptq"`, any `checkpoint_format`/`desc_act`/`sym` we support, or `"awq"` with
/// `version: "gemm"`), and `model.safetensors` (or shards with an index). Embedding, norms and LM head
/// load dense onto `device` in `kind`; each block linear becomes a [`QuantLinear`] built directly from
/// its `qweight`/`qzeros`/`scales`(/`g_idx`), with no dense copy, or a dense linear where the
/// checkpoint stores `prefix.weight` instead (modules left unquantized). Every missing, unexpected or
/// mis-shaped tensor and every unsupported config value is a named error. No tokenizer is needed (see
/// [`load_quantized_model`]).
pub fn load_quantized_hf_dir(
    dir: &Path,
    device: Device,
    kind: Kind,
    cache_dense: bool,
) -> QResult<Llama> {
    let cfg_path = dir.join("config.json");
    let hf = HfConfig::from_file(&cfg_path)?;
    let qc_json =
        hf.quantization_config
            .as_ref()
            .ok_or_else(|| QuantError::MissingQuantConfig {
                path: cfg_path.clone(),
            })?;
    let qc = HfQuantizationConfig::from_json(&cfg_path, qc_json)?;
    let cfg = hf.resolve(&cfg_path)?;
    let map = TensorMap::from_safetensors(&safetensors_files(dir)?)?;
    Llama::from_tensors_with_linears(
        cfg,
        map,
        device,
        kind,
        |map: &mut TensorMap,
         prefix: &str,
         inf: i64,
         outf: i64,
         bias: bool|
         -> QResult<Box<dyn Linear>> {
            let mut take = |s: &str| map.tensors.remove(&format!("{prefix}.{s}"));
            let bias = if bias {
                Some(
                    take("bias")
                        .ok_or_else(|| QuantError::MissingTensor(format!("{prefix}.bias")))?
                        .to_kind(kind)
                        .to_device(device),
                )
            } else {
                None
            };
            if let Some(w) = take("weight") {
                if w.size() != [outf, inf] {
                    return Err(QuantError::TensorShape {
                        name: format!("{prefix}.weight"),
                        expected: vec![outf as usize, inf as usize],
                        found: w.size().iter().map(|&d| d as usize).collect(),
                    }
                    .into());
                }
                return Ok(Box::new(DenseLinear {
                    weight: w.to_kind(kind).to_device(device),
                    bias,
                }));
            }
            let stored = StoredLinear {
                qweight: take("qweight"),
                qzeros: take("qzeros"),
                scales: take("scales"),
                g_idx: match qc.layout() {
                    PackedLayout::Gptq => take("g_idx"),
                    PackedLayout::Awq => None,
                },
            };
            if stored.qweight.is_none() {
                return Err(QuantError::MissingTensor(format!(
                    "{prefix}.qweight (nor a dense {prefix}.weight) in {}",
                    dir.display()
                ))
                .into());
            }
            let p = qc.unpack(prefix, inf as usize, outf as usize, stored)?;
            Ok(Box::new(QuantLinear::new(p, cache_dense).with_bias(bias)))
        },
    )
}

/// [`load_quantized_hf_dir`] plus the directory's `tokenizer.json`.
pub fn load_quantized_model(
    dir: &Path,
    device: Device,
    kind: Kind,
    cache_dense: bool,
) -> QResult<LoadedModel> {
    let model = load_quantized_hf_dir(dir, device, kind, cache_dense)?;
    let tokenizer = crate::tokenizer::load_tokenizer(&dir.join("tokenizer.json"))?;
    Ok(LoadedModel {
        model,
        tokenizer,
        source: ModelSource::HfDir(dir.to_path_buf()),
    })
}

/// Perplexity `exp(mean NLL)` over equal-length windows.
pub fn perplexity(model: &Llama, windows: &[Vec<i64>]) -> QResult<f64> {
    let mut s = 0.0;
    for w in windows {
        s += model.sequence_nll(w)?;
    }
    Ok((s / windows.len().max(1) as f64).exp())
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

    fn opts(method: Method, bits: u32, layers: Option<usize>) -> QuantizeOptions {
        let mut o = QuantizeOptions::new(method, QuantConfig::new(bits, 64).unwrap());
        o.max_layers = layers;
        o.batch = 4;
        o.awq_eval_rows = 512;
        o.awq_clip_rows = 128;
        o
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
            for m in [Method::Rtn, Method::Gptq, Method::Awq] {
                let mut model = load_model(&lm.source, Device::Cpu, Kind::Float)
                    .unwrap()
                    .model;
                let s = quantize_model(&mut model, &calib, &opts(m, bits, Some(n))).unwrap();
                assert_eq!(s.reports.len(), 7 * n);
                let e = mse(&hidden_after(&model, &held, n), &reference);
                eprintln!(
                    "{bits}-bit g64 {}: block-{n} output MSE {e:.4e} ({:.2}s, {:.3} bpw)",
                    m.name(),
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
        let dense = perplexity(&lm.model, &held).unwrap();
        let mut ppl = Vec::new();
        for m in [Method::Rtn, Method::Gptq] {
            let mut model = load_model(&lm.source, Device::Cpu, Kind::Float)
                .unwrap()
                .model;
            // The first 8 of 30 blocks keep the test fast; quant-ppl runs the whole model.
            let mut o = opts(m, 3, Some(8));
            o.cache_dense = true;
            let s = quantize_model(&mut model, &calib, &o).unwrap();
            let p = perplexity(&model, &held).unwrap();
            eprintln!(
                "3-bit g64 {}: ppl {p:.3} (dense {dense:.3}), {:.1}s",
                m.name(),
                s.seconds
            );
            ppl.push(p);
        }
        assert!(ppl[1] < ppl[0], "GPTQ {} vs RTN {}", ppl[1], ppl[0]);
    }

    fn tiny(name: &str) -> Llama {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny")
            .join(name);
        let p = dir.join("config.json");
        let cfg = HfConfig::from_file(&p).unwrap().resolve(&p).unwrap();
        crate::load::load_hf_weights(&dir, cfg, Device::Cpu, Kind::Float).unwrap()
    }

    fn tiny_calib() -> Vec<Vec<i64>> {
        (0..4)
            .map(|s| {
                (0..16)
                    .map(|i| ((i * 7 + s * 13 + 3) % 96) as i64)
                    .collect()
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn quantize_hf_dir_save_load_matches_in_memory_model_on_tiny_fixtures() {
        tch::set_num_threads(1);
        let _g = tch::no_grad_guard();
        let calib = tiny_calib();
        for (fixture, method, layout) in [
            ("mha_untied", Method::Gptq, PackedLayout::Gptq),
            ("gqa_tied", Method::Rtn, PackedLayout::Gptq),
            ("gqa_llama3", Method::Gptq, PackedLayout::Awq),
            ("mha_untied", Method::Awq, PackedLayout::Awq),
        ] {
            let what = format!("{fixture} {} -> {layout:?}", method.name());
            let mut model = tiny(fixture);
            let mut o = QuantizeOptions::new(method, QuantConfig::new(4, 32).unwrap());
            o.batch = 2;
            o.awq_eval_rows = 64;
            o.awq_clip_rows = 32;
            let s = quantize_model(&mut model, &calib, &o).unwrap();
            assert_eq!(s.packed.len(), 7 * model.layers.len(), "{what}");
            let dir = tempfile::tempdir().unwrap();
            save_quantized_hf_dir(&model, &s, dir.path(), layout).unwrap();
            let back = load_quantized_hf_dir(dir.path(), Device::Cpu, Kind::Float, false).unwrap();
            // the loaded linears are packed, not dense copies
            assert_eq!(back.weight_bytes(), model.weight_bytes(), "{what}");
            for l in &back.layers {
                assert!(l.mlp.down_proj.weight_bytes() < 4 * 32 * 64 / 4, "{what}");
            }
            // 6 tokens run through the int4 kernel, 12 through dequantize + matmul
            for len in [6usize, 12] {
                let ids = Tensor::from_slice(&calib[1][..len]).view([1, -1]);
                let a = model.forward(&ids, None).unwrap().logits;
                let b = back.forward(&ids, None).unwrap().logits;
                let d = max_diff(&a, &b);
                assert!(d <= 1e-5, "{what}, {len} tokens: logits differ by {d}");
            }
        }
    }

    /// Rewrite `dir/model.safetensors` through `edit` (a list of named tensors in, one out).
    fn edit_checkpoint(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
        let st = dir.join("model.safetensors");
        let mut ts = Tensor::read_safetensors(&st).unwrap();
        edit(&mut ts);
        Tensor::write_safetensors(&ts, &st).unwrap();
    }

    fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let p = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    }

    #[test]
    fn quantize_hf_dir_malformed_checkpoints_give_named_errors() {
        tch::set_num_threads(1);
        let mut model = tiny("mha_untied");
        let o = QuantizeOptions::new(Method::Rtn, QuantConfig::new(4, 32).unwrap());
        let s = quantize_model(&mut model, &[], &o).unwrap();
        let write = |layout| {
            let dir = tempfile::tempdir().unwrap();
            save_quantized_hf_dir(&model, &s, dir.path(), layout).unwrap();
            dir
        };
        let load = |dir: &tempfile::TempDir| {
            load_quantized_hf_dir(dir.path(), Device::Cpu, Kind::Float, false).map(|_| ())
        };
        let q = "model.layers.1.self_attn.q_proj";
        for layout in [PackedLayout::Gptq, PackedLayout::Awq] {
            let dir = write(layout);
            load(&dir).unwrap();
            // missing qzeros
            edit_checkpoint(dir.path(), |ts| {
                ts.retain(|(n, _)| n != &format!("{q}.qzeros"))
            });
            let e = load(&dir).unwrap_err();
            assert!(
                matches!(&e, QuantizeError::Quant(QuantError::MissingTensor(n)) if n.contains("qzeros")),
                "{layout:?}: {e}"
            );
            // wrong shape of scales
            let dir = write(layout);
            edit_checkpoint(dir.path(), |ts| {
                for (n, t) in ts.iter_mut() {
                    if n == &format!("{q}.scales") {
                        *t = t.narrow(1, 0, 16).contiguous();
                    }
                }
            });
            let e = load(&dir).unwrap_err();
            assert!(
                matches!(&e, QuantizeError::Quant(QuantError::TensorShape { name, .. }) if name == &format!("{q}.scales")),
                "{layout:?}: {e}"
            );
            // bits 5
            let dir = write(layout);
            edit_config(dir.path(), |v| v["quantization_config"]["bits"] = 5.into());
            let e = load(&dir).unwrap_err();
            assert!(
                matches!(&e, QuantizeError::Quant(QuantError::UnsupportedBits(5))),
                "{layout:?}: {e}"
            );
        }
        // GPTQ: g_idx may be absent only without desc_act
        let dir = write(PackedLayout::Gptq);
        edit_checkpoint(dir.path(), |ts| ts.retain(|(n, _)| !n.ends_with(".g_idx")));
        load(&dir).unwrap();
        edit_config(dir.path(), |v| {
            v["quantization_config"]["desc_act"] = true.into()
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(&e, QuantizeError::Quant(QuantError::MissingTensor(n)) if n.contains("g_idx") && n.contains("desc_act")),
            "{e}"
        );
        // GPTQ checkpoint_format and AWQ version we do not implement
        let dir = write(PackedLayout::Gptq);
        edit_config(dir.path(), |v| {
            v["quantization_config"]["checkpoint_format"] = "marlin".into()
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(&e, QuantizeError::Quant(QuantError::UnsupportedOption { field, .. }) if field == "checkpoint_format"),
            "{e}"
        );
        let dir = write(PackedLayout::Awq);
        edit_config(dir.path(), |v| {
            v["quantization_config"]["version"] = "gemv".into()
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(&e, QuantizeError::Quant(QuantError::UnsupportedOption { field, .. }) if field == "version"),
            "{e}"
        );
        // no quantization_config at all, and a leftover tensor
        let dir = write(PackedLayout::Gptq);
        edit_config(dir.path(), |v| {
            v.as_object_mut().unwrap().remove("quantization_config");
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(
                &e,
                QuantizeError::Quant(QuantError::MissingQuantConfig { .. })
            ),
            "{e}"
        );
        let dir = write(PackedLayout::Awq);
        edit_checkpoint(dir.path(), |ts| {
            ts.push((
                format!("{q}.g_idx"),
                Tensor::zeros([32], (Kind::Int, Device::Cpu)),
            ))
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(&e, QuantizeError::Model(ModelError::UnexpectedTensors { names, .. }) if names == &[format!("{q}.g_idx")]),
            "{e}"
        );
    }

    #[test]
    fn quantize_save_load_gives_identical_logits_and_int4_kernel_path_matches() {
        let Some(lm) = smollm2() else { return };
        let calib = crate::corpus::calibration_windows(&lm.tokenizer, 4, 64).unwrap();
        let mut model = load_model(&lm.source, Device::Cpu, Kind::Float)
            .unwrap()
            .model;
        let s = quantize_model(&mut model, &calib, &opts(Method::Gptq, 4, Some(2))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_quantized(&model, &s, dir.path()).unwrap();
        let mut back = load_model(&lm.source, Device::Cpu, Kind::Float)
            .unwrap()
            .model;
        assert_eq!(load_quantized(&mut back, dir.path(), false).unwrap(), 14);
        let ids = Tensor::from_slice(&calib[0][..24]).view([1, -1]);
        let a = model.forward(&ids, None).unwrap().logits;
        let b = back.forward(&ids, None).unwrap().logits;
        assert!(a.equal(&b), "save -> load changed the logits");
        // decode through the int4 kernel (1 token) vs the dequantized path: same up to int8 activations
        let ql = QuantLinear::new(s.packed[0].1.clone(), false);
        assert!(ql.has_kernel());
        tch::manual_seed(7);
        let x = Tensor::randn([1, 1, 576], (Kind::Float, Device::Cpu));
        let y_kernel = ql.forward(&x);
        let y_dense = x.linear::<Tensor>(&ql.weight(), None);
        // The kernel rounds the activations to int8 with step amax / 127, so each output can differ from
        // the dequantized product by at most step / 2 * sum_j |W_ij| (plus f32 rounding).
        let step = x.abs().max().double_value(&[]) / 127.0;
        let bound =
            ql.weight().abs().sum_dim_intlist(1, false, Kind::Float) * (0.5 * step * 1.001) + 1e-5;
        let err = (&y_kernel - &y_dense).abs().view([-1]);
        let over = err.gt_tensor(&bound).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(
            over, 0,
            "kernel vs dequantized path beyond the int8 rounding bound"
        );
        // On average the rounding errors are uniform (variance step^2 / 12 each): the expected squared
        // error of output i is step^2 / 12 * sum_j W_ij^2.
        let expect = step * step / 12.0 * ql.weight().square().sum(Kind::Float).double_value(&[])
            / y_dense.numel() as f64;
        let got = mse(&y_kernel, &y_dense);
        assert!(
            got < 3.0 * expect,
            "kernel vs dequantized MSE {got}, int8 rounding predicts {expect}"
        );
        // malformed checkpoint: a config with unsupported bits is a named error
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"quantization_config": {"quant_method": "gptq", "bits": 5, "group_size": 64}}"#,
        )
        .unwrap();
        assert!(matches!(
            load_quantized(&mut back, dir.path(), false),
            Err(QuantizeError::Quant(QuantError::UnsupportedBits(5)))
        ));
    }
}
