//! A native CPU decoder for batch 1: the same LLaMA step as [`crate::model`] (HF semantics), computed by
//! the kernel crate's ops on f32 activations, with no libtorch call, no allocation and no device sync
//! per token.
//!
//! Why: at batch 1 a 135M model spends microseconds per op, and the tch path pays per token a host sync,
//! a `Tensor::cat` of every layer's K/V, masks rebuilt per layer and ~20 small libtorch ops per layer.
//! Here a step is a handful of kernels per layer on one persistent thread team
//! ([`qtale_quant::kernels::pool`]): RMSNorm, one fused pass over the q/k/v rows, RoPE, attention of
//! the one query over a preallocated per-layer K/V cache (grown in blocks), the o rows, one pass over
//! the gate/up rows with SwiGLU fused, the down rows; then the final norm and the head.
//!
//! Weights ([`NativeDecoder::from_llama`]) are copied out of the [`Llama`]: block linears that hold an
//! int4 kernel matrix ([`crate::model::Linear::int4`], i.e. packed 4-bit `QuantLinear`s) run through
//! the int4 kernel (activations quantized to int8 per weight group, as the tch path does for up to 8
//! tokens); every other linear runs as f32. The tied LM head can be an int8 matrix with ggml's Q8_0
//! blocks ([`HeadFormat`]): SmolLM2's GGUF stores it in Q8_0, so re-quantizing its dequantized values
//! gives back those blocks exactly, which [`NativeDecoder::from_llama`] checks before it uses them.
//!
//! Seams for callers that route tokens (the router crate): [`NativeDecoder::begin_token`] (embedding and
//! RoPE tables), [`NativeDecoder::step_layer`] (one decoder layer; a caller that skips layer `l` for
//! this token simply does not call it, and no K/V is written for it, as eviction does in the tch
//! path), [`NativeDecoder::finish_token`] (final norm, head, argmax). [`NativeDecoder::forward_token`]
//! runs all three for every layer in one dispatch to the thread team, and
//! [`NativeDecoder::forward_token_gated`] does the same with a [`LayerGate`] deciding per layer inside
//! that dispatch (a router's MLP split over the team, no extra dispatch per layer).
use half::f16;
use qtale_quant::kernels::int4::{quantize_groups, Backend, Int4Matrix, QuantActs};
use qtale_quant::kernels::int8::{Q8Acts, Q8Matrix};
use qtale_quant::kernels::ops::{self, HeadView};
use qtale_quant::kernels::pool::{Ctx, Pool, SharedSlice};
use qtale_quant::kernels::KernelError;
use tch::{Device, Kind, Tensor};

use crate::error::ModelError;
use crate::model::{KvCache, Linear, Llama};

/// Errors of the native decoder.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("native decoder: {0}")]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("native decoder: {0}")]
    Input(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type NResult<T> = std::result::Result<T, NativeError>;

/// Storage of the LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadFormat {
    /// Int8 with ggml Q8_0 blocks when they represent the head exactly, else f32.
    Auto,
    /// f32 `[vocab, hidden]`.
    F32,
    /// Int8 with one f16 scale per 32 (ggml Q8_0). `int8_acts`: quantize the final hidden state to
    /// int8 per 32 as well (ggml's Q8_0 x Q8_0 dot; faster, adds the activation rounding); otherwise
    /// f32 activations (exact up to summation order when the blocks are exact).
    Q8 { int8_acts: bool },
}

/// Options of [`NativeDecoder::from_llama`].
#[derive(Debug, Clone)]
pub struct NativeOptions {
    /// Threads of the team (the caller counts as one).
    pub threads: usize,
    pub head: HeadFormat,
    /// Kernel backend (default: the fastest this CPU has).
    pub backend: Backend,
    /// K/V slots added per growth of a layer's cache.
    pub kv_block: usize,
    pub kv_dtype: KvDtype,
}

impl Default for NativeOptions {
    fn default() -> Self {
        NativeOptions {
            threads: qtale_quant::kernels::int4::default_threads(),
            head: HeadFormat::Auto,
            backend: Backend::detect(),
            kv_block: 256,
            kv_dtype: KvDtype::F32,
        }
    }
}

/// A block linear in the native decoder.
#[derive(Debug)]
pub enum NativeLinear {
    /// Row-major f32 `[rows, cols]`.
    F32 {
        w: Vec<f32>,
        rows: usize,
        cols: usize,
    },
    Int4(Int4Matrix),
}

impl NativeLinear {
    pub fn rows(&self) -> usize {
        match self {
            NativeLinear::F32 { rows, .. } => *rows,
            NativeLinear::Int4(m) => m.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            NativeLinear::F32 { cols, .. } => *cols,
            NativeLinear::Int4(m) => m.cols(),
        }
    }
    pub fn bytes(&self) -> usize {
        match self {
            NativeLinear::F32 { w, .. } => 4 * w.len(),
            NativeLinear::Int4(m) => m.bytes(),
        }
    }
    fn group(&self) -> Option<usize> {
        match self {
            NativeLinear::F32 { .. } => None,
            NativeLinear::Int4(m) => Some(m.group()),
        }
    }
    /// Rows `r0..r1` of `W x` into `out`.
    fn rows_into(
        &self,
        x: &[f32],
        acts: &QuantActs,
        r0: usize,
        r1: usize,
        out: &mut [f32],
        backend: Backend,
    ) -> Result<(), KernelError> {
        match self {
            NativeLinear::F32 { w, .. } => ops::gemv_f32_rows(w, x, r0, r1, out, backend),
            NativeLinear::Int4(m) => m.rows_into(x, acts, 1, r0, r1, out, backend),
        }
    }
}

/// One linear with its optional bias.
#[derive(Debug)]
struct Lin {
    w: NativeLinear,
    bias: Option<Vec<f32>>,
}

impl Lin {
    fn rows_into(
        &self,
        x: &[f32],
        acts: &QuantActs,
        r0: usize,
        r1: usize,
        out: &mut [f32],
        backend: Backend,
    ) -> Result<(), KernelError> {
        self.w.rows_into(x, acts, r0, r1, out, backend)?;
        if let Some(b) = &self.bias {
            for (o, b) in out.iter_mut().zip(&b[r0..r1]) {
                *o += b;
            }
        }
        Ok(())
    }
}

/// One decoder layer's weights.
#[derive(Debug)]
struct NativeLayer {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    gate: Lin,
    up: Lin,
    down: Lin,
    /// Int4 group of the linears reading each input: (q,k,v), o, (gate,up), down.
    groups: [Option<usize>; 4],
}

#[derive(Debug)]
enum Head {
    F32(Vec<f32>),
    Q8 { m: Q8Matrix, int8_acts: bool },
}

#[derive(Debug)]
enum Embed {
    F32(Vec<f32>),
    /// Rows of the Q8 head (tied and exact).
    FromHead,
}

/// Model dimensions.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub inter: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub layers: usize,
}

impl Dims {
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// The native batch-1 decoder (weights and thread team). Per-sequence state lives in [`NativeState`].
#[derive(Debug)]
pub struct NativeDecoder {
    dims: Dims,
    eps: f32,
    inv_freq: Vec<f32>,
    layers: Vec<NativeLayer>,
    final_norm: Vec<f32>,
    embed: Embed,
    head: Head,
    head_exact: bool,
    backend: Backend,
    pool: Pool,
    kv_block: usize,
    kv_dtype: KvDtype,
}

fn to_f32_vec(t: &Tensor) -> NResult<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        t.to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .view([-1]),
    )?)
}

fn convert_linear(name: &str, lin: &dyn Linear) -> NResult<Lin> {
    let (rows, cols) = (lin.out_features() as usize, lin.in_features() as usize);
    let w = match lin.int4() {
        Some(m) => {
            if m.rows() != rows || m.cols() != cols {
                return Err(NativeError::Input(format!(
                    "{name}: int4 matrix [{}, {}] does not match the linear [{rows}, {cols}]",
                    m.rows(),
                    m.cols()
                )));
            }
            NativeLinear::Int4(m.clone())
        }
        None => NativeLinear::F32 {
            w: to_f32_vec(&lin.weight())?,
            rows,
            cols,
        },
    };
    let bias = lin.bias().map(|b| to_f32_vec(&b)).transpose()?;
    if let Some(b) = &bias {
        if b.len() != rows {
            return Err(NativeError::Input(format!(
                "{name}: bias of {} values for {rows} outputs",
                b.len()
            )));
        }
    }
    Ok(Lin { w, bias })
}

/// The one int4 group of the linears that read the same input (they share one quantization of it).
fn site_group(layer: usize, lins: &[(&str, &Lin)]) -> NResult<Option<usize>> {
    let mut g = None;
    for (name, l) in lins {
        match (g, l.w.group()) {
            (_, None) => {}
            (None, Some(x)) => g = Some(x),
            (Some(a), Some(b)) if a != b => {
                return Err(NativeError::Input(format!(
                "layer {layer}: {name} has int4 group {b}, another linear on the same input has \
                     {a}; the native decoder quantizes each input once, so they must agree"
            )))
            }
            _ => {}
        }
    }
    Ok(g)
}

impl NativeDecoder {
    /// Copy the weights of `model` into the native formats (see the module doc).
    pub fn from_llama(model: &Llama, opts: &NativeOptions) -> NResult<Self> {
        let c = &model.config;
        let dims = Dims {
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab: c.vocab_size,
            layers: model.layers.len(),
        };
        if !opts.backend.is_available() {
            return Err(NativeError::Input(format!(
                "backend {:?} is not supported by this CPU",
                opts.backend
            )));
        }
        if dims.kv_heads == 0 || !dims.heads.is_multiple_of(dims.kv_heads) {
            return Err(NativeError::Input(format!(
                "{} attention heads are not a multiple of {} kv heads",
                dims.heads, dims.kv_heads
            )));
        }
        if opts.kv_block == 0 {
            return Err(NativeError::Input("kv_block must be positive".into()));
        }
        let inv_freq = to_f32_vec(&model.rope.inv_freq)?;
        if inv_freq.len() * 2 != dims.head_dim {
            return Err(NativeError::Input(format!(
                "RoPE inv_freq has {} values for head_dim {}",
                inv_freq.len(),
                dims.head_dim
            )));
        }
        let mut layers = Vec::with_capacity(dims.layers);
        for (i, l) in model.layers.iter().enumerate() {
            let a = &l.self_attn;
            let conv = |n: &str, x: &dyn Linear| convert_linear(&format!("layer {i} {n}"), x);
            let (q, k, v, o) = (
                conv("q_proj", a.q_proj.as_ref())?,
                conv("k_proj", a.k_proj.as_ref())?,
                conv("v_proj", a.v_proj.as_ref())?,
                conv("o_proj", a.o_proj.as_ref())?,
            );
            let (gate, up, down) = (
                conv("gate_proj", l.mlp.gate_proj.as_ref())?,
                conv("up_proj", l.mlp.up_proj.as_ref())?,
                conv("down_proj", l.mlp.down_proj.as_ref())?,
            );
            let groups = [
                site_group(i, &[("q_proj", &q), ("k_proj", &k), ("v_proj", &v)])?,
                site_group(i, &[("o_proj", &o)])?,
                site_group(i, &[("gate_proj", &gate), ("up_proj", &up)])?,
                site_group(i, &[("down_proj", &down)])?,
            ];
            let want = [
                (&q, dims.q_dim(), dims.hidden, "q_proj"),
                (&k, dims.kv_dim(), dims.hidden, "k_proj"),
                (&v, dims.kv_dim(), dims.hidden, "v_proj"),
                (&o, dims.hidden, dims.q_dim(), "o_proj"),
                (&gate, dims.inter, dims.hidden, "gate_proj"),
                (&up, dims.inter, dims.hidden, "up_proj"),
                (&down, dims.hidden, dims.inter, "down_proj"),
            ];
            for (lin, r, cc, n) in want {
                if lin.w.rows() != r || lin.w.cols() != cc {
                    return Err(NativeError::Input(format!(
                        "layer {i} {n}: [{}, {}], expected [{r}, {cc}]",
                        lin.w.rows(),
                        lin.w.cols()
                    )));
                }
            }
            layers.push(NativeLayer {
                attn_norm: to_f32_vec(&l.input_layernorm.weight)?,
                mlp_norm: to_f32_vec(&l.post_attention_layernorm.weight)?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
                groups,
            });
        }
        let embed_w = to_f32_vec(&model.embed_tokens)?;
        let head_w = match &model.lm_head {
            Some(h) => Some(to_f32_vec(h)?),
            None => None,
        };
        let tied = head_w.is_none();
        let hw: &[f32] = head_w.as_deref().unwrap_or(&embed_w);
        if hw.len() != dims.vocab * dims.hidden || embed_w.len() != dims.vocab * dims.hidden {
            return Err(NativeError::Input(format!(
                "embedding / head of {} / {} values, expected [{}, {}]",
                embed_w.len(),
                hw.len(),
                dims.vocab,
                dims.hidden
            )));
        }
        let q8 = if matches!(opts.head, HeadFormat::F32) {
            None
        } else {
            Some(Q8Matrix::quantize(dims.vocab, dims.hidden, hw)?)
        };
        let exact = q8.as_ref().map(|m| {
            let mut row = vec![0f32; dims.hidden];
            (0..dims.vocab).all(|r| {
                m.dequantize_row(r, &mut row).expect("in range");
                row.as_slice() == &hw[r * dims.hidden..(r + 1) * dims.hidden]
            })
        });
        let (head, head_exact) = match (opts.head, q8, exact) {
            (HeadFormat::Auto, Some(m), Some(true)) => (
                Head::Q8 {
                    m,
                    int8_acts: false,
                },
                true,
            ),
            (HeadFormat::Q8 { int8_acts }, Some(m), Some(e)) => (Head::Q8 { m, int8_acts }, e),
            _ => (Head::F32(hw.to_vec()), true),
        };
        let embed = match &head {
            Head::Q8 { .. } if tied && head_exact => Embed::FromHead,
            _ => Embed::F32(embed_w),
        };
        Ok(NativeDecoder {
            dims,
            eps: c.rms_norm_eps as f32,
            inv_freq,
            layers,
            final_norm: to_f32_vec(&model.norm.weight)?,
            embed,
            head,
            head_exact,
            backend: opts.backend,
            pool: Pool::new(opts.threads),
            kv_block: opts.kv_block,
            kv_dtype: opts.kv_dtype,
        })
    }

    pub fn dims(&self) -> Dims {
        self.dims
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the head reproduces the model's head exactly (f32, or int8 blocks that dequantize to
    /// the model's values bit for bit).
    pub fn head_is_exact(&self) -> bool {
        self.head_exact
    }

    /// The int8 head, when the head is stored that way.
    pub fn head_q8(&self) -> Option<&Q8Matrix> {
        match &self.head {
            Head::Q8 { m, .. } => Some(m),
            Head::F32(_) => None,
        }
    }

    /// A short description of the weight formats ("int4 g64 x210, f32 x0; head q8 (f32 acts)").
    pub fn describe(&self) -> String {
        let mut int4 = std::collections::BTreeMap::<usize, usize>::new();
        let mut f32n = 0;
        for l in &self.layers {
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                match &lin.w {
                    NativeLinear::Int4(m) => *int4.entry(m.group()).or_default() += 1,
                    NativeLinear::F32 { .. } => f32n += 1,
                }
            }
        }
        let int4: Vec<String> = int4
            .iter()
            .map(|(g, n)| format!("int4 g{g} x{n}"))
            .collect();
        let head = match &self.head {
            Head::F32(_) => "f32".to_string(),
            Head::Q8 { int8_acts, .. } => format!(
                "q8_0 ({} acts{})",
                if *int8_acts { "int8" } else { "f32" },
                if self.head_exact {
                    ", exact"
                } else {
                    ", approximate"
                }
            ),
        };
        format!(
            "linears: {}{}f32 x{f32n}; head {head}; kv {:?}; {} threads, {:?}",
            int4.join(", "),
            if int4.is_empty() { "" } else { ", " },
            self.kv_dtype,
            self.threads(),
            self.backend
        )
    }

    /// Bytes of the weights held (what one decode step streams, apart from the embedding table).
    pub fn weight_bytes(&self) -> usize {
        let mut n = 4 * self.final_norm.len();
        for l in &self.layers {
            n += 4 * (l.attn_norm.len() + l.mlp_norm.len());
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                n += lin.w.bytes() + 4 * lin.bias.as_ref().map_or(0, Vec::len);
            }
        }
        n += match &self.head {
            Head::F32(w) => 4 * w.len(),
            Head::Q8 { m, .. } => m.bytes(),
        };
        n + match &self.embed {
            Embed::F32(w) => 4 * w.len(),
            Embed::FromHead => 0,
        }
    }

    /// A fresh state with room for `capacity` tokens per layer before its first growth.
    pub fn new_state(&self, capacity: usize) -> NResult<NativeState> {
        NativeState::new(self, capacity)
    }

    fn check_state(&self, st: &NativeState) -> NResult<()> {
        if st.cache.layers.len() != self.dims.layers || st.x.len() != self.dims.hidden {
            return Err(NativeError::Input(format!(
                "state made for another model ({} layers, hidden {}; this one {} / {})",
                st.cache.layers.len(),
                st.x.len(),
                self.dims.layers,
                self.dims.hidden
            )));
        }
        Ok(())
    }

    /// Start a token: its embedding into the state's hidden vector and the RoPE tables of its position
    /// (the state's next position).
    pub fn begin_token(&self, token: i64, st: &mut NativeState) -> NResult<()> {
        self.check_state(st)?;
        if token < 0 || token as usize >= self.dims.vocab {
            return Err(NativeError::Input(format!(
                "token id {token} out of range [0, {})",
                self.dims.vocab
            )));
        }
        let t = token as usize;
        let d = self.dims.hidden;
        match &self.embed {
            Embed::F32(w) => st.x.copy_from_slice(&w[t * d..(t + 1) * d]),
            Embed::FromHead => match &self.head {
                Head::Q8 { m, .. } => m.dequantize_row(t, &mut st.x)?,
                Head::F32(_) => unreachable!("FromHead is only built with a Q8 head"),
            },
        }
        ops::rope_tables(st.cache.pos, &self.inv_freq, &mut st.cos, &mut st.sin)?;
        st.started = true;
        Ok(())
    }

    /// Run decoder layer `l` on the current token (after [`NativeDecoder::begin_token`]): its K/V are
    /// appended to layer `l`'s cache and its query attends over everything that cache holds. A token
    /// that skips layer `l` simply does not call this (no K/V is written for it).
    pub fn step_layer(&self, l: usize, st: &mut NativeState) -> NResult<()> {
        self.check_state(st)?;
        if l >= self.layers.len() {
            return Err(NativeError::Input(format!(
                "layer {l} out of range ({} layers)",
                self.layers.len()
            )));
        }
        if !st.started {
            return Err(NativeError::Input(
                "step_layer before begin_token".to_string(),
            ));
        }
        st.reserve_layer(l, self.kv_block, &self.dims);
        let bufs = Bufs::new(st);
        let err = ErrSlot::default();
        self.pool.run(|ctx| {
            let r = self.layer_job(ctx, l, &bufs);
            err.set(r);
        });
        err.take()?;
        st.cache.layers[l].len += 1;
        Ok(())
    }

    /// Finish the token: final norm and head into the state's logits, the position advanced; returns
    /// the argmax of the logits (the first on ties).
    pub fn finish_token(&self, st: &mut NativeState) -> NResult<usize> {
        self.check_state(st)?;
        if !st.started {
            return Err(NativeError::Input(
                "finish_token before begin_token".to_string(),
            ));
        }
        let bufs = Bufs::new(st);
        let err = ErrSlot::default();
        self.pool.run(|ctx| {
            let r = self.head_job(ctx, &bufs);
            err.set(r);
        });
        err.take()?;
        st.started = false;
        st.cache.pos += 1;
        Ok(st.best_token())
    }

    /// One full token (every layer) in one dispatch to the thread team; returns the argmax of its
    /// logits (the logits are in [`NativeState::logits`]).
    pub fn forward_token(&self, token: i64, st: &mut NativeState) -> NResult<usize> {
        self.run_token(token, st, None, &mut [])
    }

    /// One token through the layers that `gate` lets execute, in one dispatch to the thread team.
    /// Before layer `l`, the team runs [`LayerGate::parallel`] on the residual stream `x` entering that
    /// layer (what a D-LLM router reads), then thread 0 calls [`LayerGate::decide`] and the team's
    /// barrier publishes the decision; a skipped layer writes no K/V for this token (eviction).
    /// `executed[l]` receives the decisions (its length must be the number of layers). Returns the
    /// argmax of the logits.
    pub fn forward_token_gated(
        &self,
        token: i64,
        st: &mut NativeState,
        gate: &dyn LayerGate,
        executed: &mut [bool],
    ) -> NResult<usize> {
        self.run_token(token, st, Some(gate), executed)
    }

    /// [`NativeDecoder::forward_token_gated`], or every layer without the per-layer barriers when
    /// `gate` is `None` (then `executed` is ignored).
    fn run_token(
        &self,
        token: i64,
        st: &mut NativeState,
        gate: Option<&dyn LayerGate>,
        executed: &mut [bool],
    ) -> NResult<usize> {
        if gate.is_some() && executed.len() != self.layers.len() {
            return Err(NativeError::Input(format!(
                "executed has {} entries, the decoder {} layers",
                executed.len(),
                self.layers.len()
            )));
        }
        self.begin_token(token, st)?;
        for l in 0..self.layers.len() {
            st.reserve_layer(l, self.kv_block, &self.dims);
        }
        let d = self.dims.hidden;
        let bufs = Bufs::new(st);
        let decisions = SharedSlice::new(executed);
        let err = ErrSlot::default();
        self.pool.run(|ctx| {
            let mut r = Ok(());
            for l in 0..self.layers.len() {
                // SAFETY: thread 0 did the previous layer's last residual add after that layer's last
                // barrier, so a barrier makes `x` complete for the team; between the barriers the
                // team only reads `x`; thread 0 alone writes decision `l`, the last barrier
                // publishes it.
                let run = match gate {
                    None => true,
                    Some(g) => unsafe {
                        ctx.barrier(); // x complete for everyone
                        g.parallel(ctx, l, bufs.x.range(0, d));
                        ctx.barrier();
                        if ctx.tid() == 0 {
                            decisions.range_mut(l, l + 1)[0] = g.decide(l, bufs.x.range(0, d));
                        }
                        ctx.barrier();
                        decisions.range(l, l + 1)[0]
                    },
                };
                if run {
                    r = self.layer_job(ctx, l, &bufs);
                    if r.is_err() {
                        break;
                    }
                }
            }
            if r.is_ok() {
                r = self.head_job(ctx, &bufs);
            }
            err.set(r);
        });
        err.take()?;
        for (l, lc) in st.cache.layers.iter_mut().enumerate() {
            lc.len += usize::from(gate.is_none() || executed[l]);
        }
        st.started = false;
        st.cache.pos += 1;
        Ok(st.best_token())
    }

    /// Quantize `x[a..z]` (whole groups) into site `site` of layer `l`'s activation buffers.
    ///
    /// # Safety
    /// No other thread may touch those groups of the buffers meanwhile.
    unsafe fn quantize_range(
        &self,
        b: &Bufs,
        l: usize,
        site: usize,
        x: &[f32],
        a: usize,
        z: usize,
    ) -> Result<(), KernelError> {
        let Some(g) = self.layers[l].groups[site] else {
            return Ok(());
        };
        let (q, d, s) = b.act_bufs[4 * l + site];
        quantize_groups(
            &x[a..z],
            g,
            q.range_mut(a, z),
            d.range_mut(a / g, z / g),
            s.range_mut(a / g, z / g),
            self.backend,
        );
        Ok(())
    }

    /// One decoder layer on the team; every thread calls this with the same arguments. Six phases,
    /// each ended by a barrier: (0) RMSNorm and the activation quantization on thread 0; (1) the q, k
    /// and v rows one head per chunk, each chunk applying RoPE to its head and writing its key or value
    /// into the cache; (2) attention one query head per chunk, each quantizing its output head for
    /// o_proj; (3) the o rows; (4) residual, RMSNorm and quantization on thread 0; (5) gate and up rows
    /// with SwiGLU and the quantization of their slice for down_proj; (6) the down rows, whose
    /// residual add thread 0 does after the last barrier. Returns the first kernel error (shape
    /// errors only, i.e. bugs).
    fn layer_job(&self, ctx: &Ctx, l: usize, b: &Bufs) -> Result<(), KernelError> {
        let lay = &self.layers[l];
        let dm = &self.dims;
        let (d, qd, kvd, hd, inter) = (dm.hidden, dm.q_dim(), dm.kv_dim(), dm.head_dim, dm.inter);
        let be = self.backend;
        let t0 = ctx.tid() == 0;
        let slot = b.kv_len[l];
        let acts = |site: usize| unsafe { &b.acts.range(4 * l + site, 4 * l + site + 1)[0] };
        let mut res = Ok(());
        let mut keep = |r: Result<(), KernelError>| {
            if res.is_ok() {
                res = r;
            }
        };
        // SAFETY (all `unsafe` blocks below): the buffers outlive the job (they belong to the state
        // that `Bufs::new` borrowed); each phase writes disjoint ranges (thread 0 alone in serial
        // phases, distinct chunks in parallel phases) and barriers separate writers from readers.
        if t0 {
            keep((|| unsafe {
                ops::rms_norm(
                    b.x.range(0, d),
                    &lay.attn_norm,
                    self.eps,
                    b.h.range_mut(0, d),
                    be,
                )?;
                self.quantize_range(b, l, 0, b.h.range(0, d), 0, d)
            })());
        }
        ctx.barrier();
        // (1) One head of q, k or v per chunk.
        let (nq, nkv) = (dm.heads, dm.kv_heads);
        for c in ctx.chunks(nq + 2 * nkv) {
            keep((|| unsafe {
                let (lin, i, off) = if c < nq {
                    (&lay.q, c, 0)
                } else if c < nq + nkv {
                    (&lay.k, c - nq, qd)
                } else {
                    (&lay.v, c - nq - nkv, qd + kvd)
                };
                let (r0, r1) = (i * hd, (i + 1) * hd);
                let out = b.qkv.range_mut(off + r0, off + r1);
                lin.rows_into(b.h.range(0, d), acts(0), r0, r1, out, be)?;
                let cos = b.cos.range(0, hd / 2);
                let sin = b.sin.range(0, hd / 2);
                if c < nq + nkv {
                    ops::rope(out, hd, cos, sin, be)?;
                }
                if c >= nq {
                    let cache = if c < nq + nkv { b.k[l] } else { b.v[l] };
                    cache.write(slot * kvd + r0, out);
                }
                Ok(())
            })());
        }
        ctx.barrier();
        // (2) Attention, one query head per chunk; its output head quantized for o_proj when the
        // groups tile the head.
        let group = dm.heads / dm.kv_heads;
        let len = slot + 1;
        let scale = 1.0 / (hd as f32).sqrt();
        let cap = b.score_cap;
        let fused_o = lay.groups[1].is_none_or(|g| hd.is_multiple_of(g));
        for h in ctx.chunks(dm.heads) {
            keep((|| unsafe {
                let (q, sc, out) = (
                    b.qkv.range(h * hd, (h + 1) * hd),
                    b.scores.range_mut(h * cap, (h + 1) * cap),
                    b.attn.range_mut(h * hd, (h + 1) * hd),
                );
                let offset = (h / group) * hd;
                match (b.k[l], b.v[l]) {
                    (KvView::F32(k), KvView::F32(v)) => {
                        let kv = HeadView {
                            keys: k.range(0, len * kvd),
                            values: v.range(0, len * kvd),
                            len,
                            stride: kvd,
                            offset,
                        };
                        ops::attend(q, kv, scale, sc, out, be)?
                    }
                    (KvView::F16(k), KvView::F16(v)) => {
                        let kv = HeadView {
                            keys: k.range(0, len * kvd),
                            values: v.range(0, len * kvd),
                            len,
                            stride: kvd,
                            offset,
                        };
                        ops::attend(q, kv, scale, sc, out, be)?
                    }
                    _ => unreachable!("keys and values share one dtype"),
                }
                if fused_o {
                    self.quantize_range(b, l, 1, b.attn.range(0, qd), h * hd, (h + 1) * hd)?;
                }
                Ok(())
            })());
        }
        ctx.barrier();
        if !fused_o {
            if t0 {
                keep(unsafe { self.quantize_range(b, l, 1, b.attn.range(0, qd), 0, qd) });
            }
            ctx.barrier();
        }
        // (3) o rows.
        const R: usize = 32;
        for c in ctx.chunks(d.div_ceil(R)) {
            let (r0, r1) = (c * R, ((c + 1) * R).min(d));
            keep(unsafe {
                lay.o.rows_into(
                    b.attn.range(0, qd),
                    acts(1),
                    r0,
                    r1,
                    b.tmp.range_mut(r0, r1),
                    be,
                )
            });
        }
        ctx.barrier();
        // (4) Residual and the MLP's norm.
        if t0 {
            keep((|| unsafe {
                ops::add_assign(b.x.range_mut(0, d), b.tmp.range(0, d))?;
                ops::rms_norm(
                    b.x.range(0, d),
                    &lay.mlp_norm,
                    self.eps,
                    b.h.range_mut(0, d),
                    be,
                )?;
                self.quantize_range(b, l, 2, b.h.range(0, d), 0, d)
            })());
        }
        ctx.barrier();
        // (5) gate/up rows, SwiGLU, and the quantization of this slice for down_proj (chunks are
        // whole groups of down_proj's input).
        let rm = lay.groups[3].map_or(64, |g| lcm(64, g));
        for c in ctx.chunks(inter.div_ceil(rm)) {
            let (r0, r1) = (c * rm, ((c + 1) * rm).min(inter));
            keep((|| unsafe {
                let x = b.h.range(0, d);
                lay.gate
                    .rows_into(x, acts(2), r0, r1, b.gate.range_mut(r0, r1), be)?;
                lay.up
                    .rows_into(x, acts(2), r0, r1, b.up.range_mut(r0, r1), be)?;
                ops::swiglu(
                    b.gate.range(r0, r1),
                    b.up.range(r0, r1),
                    b.mid.range_mut(r0, r1),
                    be,
                )?;
                self.quantize_range(b, l, 3, b.mid.range(0, inter), r0, r1)
            })());
        }
        ctx.barrier();
        // (6) down rows.
        for c in ctx.chunks(d.div_ceil(R)) {
            let (r0, r1) = (c * R, ((c + 1) * R).min(d));
            keep(unsafe {
                lay.down.rows_into(
                    b.mid.range(0, inter),
                    acts(3),
                    r0,
                    r1,
                    b.tmp.range_mut(r0, r1),
                    be,
                )
            });
        }
        ctx.barrier();
        if t0 {
            keep(unsafe { ops::add_assign(b.x.range_mut(0, d), b.tmp.range(0, d)) });
        }
        // The next phase (another layer or the head) starts with a serial step on thread 0, which
        // already sees this write; other threads wait at its barrier.
        res
    }

    /// Final norm and head on the team; per-chunk argmax into `best`.
    fn head_job(&self, ctx: &Ctx, b: &Bufs) -> Result<(), KernelError> {
        let d = self.dims.hidden;
        let vocab = self.dims.vocab;
        let be = self.backend;
        let mut res = Ok(());
        if ctx.tid() == 0 {
            res = (|| unsafe {
                ops::rms_norm(
                    b.x.range(0, d),
                    &self.final_norm,
                    self.eps,
                    b.h.range_mut(0, d),
                    be,
                )?;
                b.head_acts.range_mut(0, 1)[0].set(b.h.range(0, d))
            })();
        }
        ctx.barrier();
        for c in ctx.chunks(b.best.len()) {
            let (r0, r1) = (c * HEAD_ROWS, ((c + 1) * HEAD_ROWS).min(vocab));
            let r = (|| unsafe {
                let out = b.logits.range_mut(r0, r1);
                match &self.head {
                    Head::F32(w) => ops::gemv_f32_rows(w, b.h.range(0, d), r0, r1, out, be)?,
                    Head::Q8 { m, .. } => {
                        m.gemv_rows(&b.head_acts.range(0, 1)[0], r0, r1, out, be)?
                    }
                }
                let i = ops::argmax(out).unwrap_or(0);
                b.best.range_mut(c, c + 1)[0] = (r0 + i, out.get(i).copied().unwrap_or(f32::NAN));
                Ok(())
            })();
            if res.is_ok() {
                res = r;
            }
        }
        ctx.barrier();
        res
    }

    /// Greedy decoding of one prompt: prefill (native token by token, or tch in one batch whose K/V
    /// cache is then imported), then native decode steps until `max_new` tokens or `eos`. No allocation
    /// and no device sync per generated token (the returned vector is allocated once).
    pub fn generate_greedy(
        &self,
        prompt: &[i64],
        max_new: usize,
        eos: Option<i64>,
        prefill: Prefill<'_>,
        st: &mut NativeState,
    ) -> NResult<Vec<i64>> {
        if prompt.is_empty() {
            return Err(NativeError::Input("empty prompt".into()));
        }
        let mut out = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok(out);
        }
        st.reset();
        let first = match prefill {
            Prefill::Native => {
                let mut last = 0;
                for &t in prompt {
                    last = self.forward_token(t, st)?;
                }
                last as i64
            }
            Prefill::Tch(model) => self.prefill_tch(model, prompt, st)?,
        };
        st.reserve_all(st.cache.pos + max_new, self.kv_block, &self.dims);
        let mut next = first;
        loop {
            out.push(next);
            if out.len() == max_new || Some(next) == eos {
                break;
            }
            next = self.forward_token(next, st)? as i64;
        }
        Ok(out)
    }

    /// Prefill `prompt` with the tch model (one batched forward; logits of the last position only),
    /// import its K/V cache into `st`, and return the greedy next token.
    pub fn prefill_tch(&self, model: &Llama, prompt: &[i64], st: &mut NativeState) -> NResult<i64> {
        let _g = tch::no_grad_guard();
        let mut cache = KvCache::new(model.layers.len());
        let ids = Tensor::from_slice(prompt).view([1, -1]);
        let hidden = model.forward_hidden_cached(&ids, None, &mut cache)?;
        let last = hidden.narrow(1, prompt.len() as i64 - 1, 1);
        let logits = model.lm_logits(&last);
        let next = logits.view([-1]).argmax(0, false).int64_value(&[]);
        st.import_tch_cache(&cache, self)?;
        Ok(next)
    }
}

/// A per-layer execute decision made by the decoder's thread team before each layer runs (the router
/// crate implements it for its routers).
pub trait LayerGate: Sync {
    /// Every thread of the team, same arguments: the heavy part of the decision on `x` (the residual
    /// stream entering layer `l`), split with [`Ctx::chunks`]; results go to the gate's own scratch.
    fn parallel(&self, _ctx: &Ctx, _l: usize, _x: &[f32]) {}
    /// Thread 0, after the team's [`LayerGate::parallel`]: whether layer `l` runs for this token.
    fn decide(&self, l: usize, x: &[f32]) -> bool;
}

/// How [`NativeDecoder::generate_greedy`] runs the prompt.
#[derive(Debug, Clone, Copy)]
pub enum Prefill<'a> {
    /// Token by token through the native step.
    Native,
    /// One batched tch forward (GEMM-shaped, faster for long prompts); its K/V cache is imported.
    Tch(&'a Llama),
}

/// Rows of the head per chunk (one argmax candidate per chunk).
const HEAD_ROWS: usize = 512;

/// One layer's K/V, token-major `[capacity, kv_heads * head_dim]`; `len` slots are filled.
/// Storage of one layer's keys or values.
#[derive(Debug)]
enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl KvBuf {
    fn new(dtype: KvDtype) -> Self {
        match dtype {
            KvDtype::F32 => KvBuf::F32(Vec::new()),
            KvDtype::F16 => KvBuf::F16(Vec::new()),
        }
    }
    fn len(&self) -> usize {
        match self {
            KvBuf::F32(v) => v.len(),
            KvBuf::F16(v) => v.len(),
        }
    }
    fn resize(&mut self, n: usize) {
        match self {
            KvBuf::F32(v) => v.resize(n, 0.0),
            KvBuf::F16(v) => v.resize(n, f16::ZERO),
        }
    }
    /// Store `src` at element offset `at`.
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvBuf::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(v) => {
                for (d, &x) in v[at..at + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(x);
                }
            }
        }
    }
    fn read(&self, at: usize, n: usize) -> Vec<f32> {
        match self {
            KvBuf::F32(v) => v[at..at + n].to_vec(),
            KvBuf::F16(v) => v[at..at + n].iter().map(|x| x.to_f32()).collect(),
        }
    }
    fn view(&mut self) -> KvView {
        match self {
            KvBuf::F32(v) => KvView::F32(SharedSlice::new(v)),
            KvBuf::F16(v) => KvView::F16(SharedSlice::new(v)),
        }
    }
}

/// A job's view of one layer's keys or values.
#[derive(Debug, Clone, Copy)]
enum KvView {
    F32(SharedSlice<f32>),
    F16(SharedSlice<f16>),
}

impl KvView {
    /// Store `src` at element offset `at`.
    ///
    /// # Safety
    /// As [`SharedSlice::range_mut`].
    unsafe fn write(&self, at: usize, src: &[f32]) {
        match self {
            KvView::F32(s) => s.range_mut(at, at + src.len()).copy_from_slice(src),
            KvView::F16(s) => {
                for (d, &x) in s.range_mut(at, at + src.len()).iter_mut().zip(src) {
                    *d = f16::from_f32(x);
                }
            }
        }
    }
}

/// Element type of the K/V cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// Exact w.r.t. the tch path.
    F32,
    /// Half the bytes streamed per step at long contexts (llama.cpp's default); keys and values are
    /// rounded to f16 (relative error 2^-11), products still accumulate in f32.
    F16,
}

/// One layer's K/V, token-major `[capacity, kv_heads * head_dim]`; `len` slots are filled.
#[derive(Debug)]
pub struct LayerKv {
    k: KvBuf,
    v: KvBuf,
    len: usize,
}

impl LayerKv {
    fn new(dtype: KvDtype) -> Self {
        LayerKv {
            k: KvBuf::new(dtype),
            v: KvBuf::new(dtype),
            len: 0,
        }
    }
    /// Keys stored.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Slots allocated.
    pub fn capacity(&self, kv_dim: usize) -> usize {
        self.k.len() / kv_dim.max(1)
    }
    /// Key `j`, `[kv_heads * head_dim]` (RoPE applied), as f32.
    pub fn key(&self, j: usize, kv_dim: usize) -> Vec<f32> {
        self.k.read(j * kv_dim, kv_dim)
    }
    /// Value `j`, `[kv_heads * head_dim]`, as f32.
    pub fn value(&self, j: usize, kv_dim: usize) -> Vec<f32> {
        self.v.read(j * kv_dim, kv_dim)
    }
    fn grow_to(&mut self, slots: usize, kv_dim: usize) {
        if self.capacity(kv_dim) < slots {
            self.k.resize(slots * kv_dim);
            self.v.resize(slots * kv_dim);
        }
    }
}

/// Per-layer K/V caches and the position of the next token.
#[derive(Debug, Default)]
pub struct NativeCache {
    pub layers: Vec<LayerKv>,
    /// Position of the next token (tokens begun and finished so far, prompt included).
    pub pos: usize,
}

/// Everything one sequence needs between steps: the K/V cache and the scratch buffers of a step
/// (allocated once; the cache grows in blocks of `kv_block` slots).
#[derive(Debug)]
pub struct NativeState {
    pub cache: NativeCache,
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    mid: Vec<f32>,
    scores: Vec<f32>,
    score_cap: usize,
    logits: Vec<f32>,
    best: Vec<(usize, f32)>,
    /// Int4 activations per (layer, input site): sized once, never resized.
    acts: Vec<QuantActs>,
    /// Raw views of `acts`' buffers (the quantizing threads write disjoint groups through them).
    act_bufs: Vec<ActBufs>,
    head_acts: Vec<Q8Acts>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Per-layer views of the K/V buffers and lengths for a job (refreshed at each dispatch).
    kv_views: KvViews,
    started: bool,
}

type KvViews = (Vec<KvView>, Vec<KvView>, Vec<usize>);
type ActBufs = (SharedSlice<i8>, SharedSlice<f32>, SharedSlice<f32>);

impl NativeState {
    fn new(dec: &NativeDecoder, capacity: usize) -> NResult<Self> {
        let dm = dec.dims;
        let head_acts = Q8Acts::new(
            dm.hidden,
            matches!(
                dec.head,
                Head::Q8 {
                    int8_acts: true,
                    ..
                }
            ),
        )?;
        let empty = || QuantActs::new(&[], 0, 1, 1);
        let mut st = NativeState {
            cache: NativeCache {
                layers: (0..dm.layers).map(|_| LayerKv::new(dec.kv_dtype)).collect(),
                pos: 0,
            },
            x: vec![0.0; dm.hidden],
            h: vec![0.0; dm.hidden],
            qkv: vec![0.0; dm.q_dim() + 2 * dm.kv_dim()],
            attn: vec![0.0; dm.q_dim()],
            tmp: vec![0.0; dm.hidden],
            gate: vec![0.0; dm.inter],
            up: vec![0.0; dm.inter],
            mid: vec![0.0; dm.inter],
            scores: Vec::new(),
            score_cap: 0,
            logits: vec![0.0; dm.vocab],
            best: vec![(0, 0.0); dm.vocab.div_ceil(HEAD_ROWS)],
            acts: (0..4 * dm.layers).map(|_| empty()).collect(),
            act_bufs: Vec::new(),
            head_acts: vec![head_acts],
            cos: vec![0.0; dm.head_dim / 2],
            sin: vec![0.0; dm.head_dim / 2],
            kv_views: (
                (0..dm.layers)
                    .map(|_| KvView::F32(SharedSlice::new(&mut [])))
                    .collect(),
                (0..dm.layers)
                    .map(|_| KvView::F32(SharedSlice::new(&mut [])))
                    .collect(),
                vec![0; dm.layers],
            ),
            started: false,
        };
        // Size the activation buffers once for the largest group layout they will see.
        let (d, qd, inter) = (dm.hidden, dm.q_dim(), dm.inter);
        for (l, lay) in dec.layers.iter().enumerate() {
            for (i, cols) in [d, qd, d, inter].into_iter().enumerate() {
                if let Some(g) = lay.groups[i] {
                    let zeros = vec![0f32; cols];
                    st.acts[4 * l + i].quantize_into(&zeros, 1, cols, g);
                }
            }
        }
        st.act_bufs = st
            .acts
            .iter_mut()
            .map(|a| {
                (
                    SharedSlice::new(&mut a.q),
                    SharedSlice::new(&mut a.d),
                    SharedSlice::new(&mut a.sum),
                )
            })
            .collect();
        st.reserve_all(capacity, dec.kv_block, &dm);
        Ok(st)
    }

    /// Logits of the last finished token, `[vocab]`.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// The current token's hidden state `[hidden]` (after the layers run so far; a router reads it to
    /// decide on the next layer).
    pub fn hidden(&self) -> &[f32] {
        &self.x
    }

    /// Position of the next token.
    pub fn pos(&self) -> usize {
        self.cache.pos
    }

    /// Bytes of the keys and values stored for `dec`'s model (filled slots of every layer; a skipped
    /// layer stores none for that token).
    pub fn kv_bytes(&self, dec: &NativeDecoder) -> usize {
        let kvd = dec.dims.kv_dim();
        self.cache
            .layers
            .iter()
            .map(|l| {
                let elt = match l.k {
                    KvBuf::F32(_) => 4,
                    KvBuf::F16(_) => 2,
                };
                2 * l.len * kvd * elt
            })
            .sum()
    }

    /// Forget the sequence (the buffers are kept).
    pub fn reset(&mut self) {
        for l in &mut self.cache.layers {
            l.len = 0;
        }
        self.cache.pos = 0;
        self.started = false;
    }

    /// Roll the sequence back to its first `pos` tokens (e.g. to re-run a decode from the same prompt,
    /// or to drop rejected draft tokens): each layer keeps the keys of those tokens. Only for states
    /// where no layer was skipped (with skipping, which keys belong to which token is the caller's).
    pub fn truncate(&mut self, pos: usize) -> NResult<()> {
        if pos > self.cache.pos {
            return Err(NativeError::Input(format!(
                "truncate to {pos} tokens: the state holds {}",
                self.cache.pos
            )));
        }
        for (l, lc) in self.cache.layers.iter_mut().enumerate() {
            if lc.len != self.cache.pos {
                return Err(NativeError::Input(format!(
                    "truncate: layer {l} holds {} keys for {} tokens (layers were skipped)",
                    lc.len, self.cache.pos
                )));
            }
        }
        for lc in &mut self.cache.layers {
            lc.len = pos;
        }
        self.cache.pos = pos;
        self.started = false;
        Ok(())
    }

    fn best_token(&self) -> usize {
        let mut best = (0usize, f32::NEG_INFINITY);
        for &(i, v) in &self.best {
            // chunks are in row order: ">" keeps the first of equal maxima
            if v > best.1 {
                best = (i, v);
            }
        }
        best.0
    }

    /// Make room for one more key in layer `l` (growing by `block` slots) and for the scores.
    fn reserve_layer(&mut self, l: usize, block: usize, dm: &Dims) {
        let kvd = dm.kv_dim();
        let lc = &mut self.cache.layers[l];
        if lc.len + 1 > lc.capacity(kvd) {
            lc.grow_to((lc.len + 1).next_multiple_of(block), kvd);
        }
        let need = lc.capacity(kvd);
        if self.score_cap < need {
            self.score_cap = need;
            self.scores.resize(dm.heads * need, 0.0);
        }
    }

    fn reserve_all(&mut self, tokens: usize, block: usize, dm: &Dims) {
        let kvd = dm.kv_dim();
        let cap = tokens.max(1).next_multiple_of(block);
        for lc in &mut self.cache.layers {
            lc.grow_to(cap, kvd);
        }
        if self.score_cap < cap {
            self.score_cap = cap;
            self.scores.resize(dm.heads * cap, 0.0);
        }
    }

    /// Replace this state's cache with a tch [`KvCache`] of batch 1 (e.g. after a tch prefill): each
    /// layer's valid keys and values, in order. The next position is the tch cache's `next_pos`.
    pub fn import_tch_cache(&mut self, cache: &KvCache, dec: &NativeDecoder) -> NResult<()> {
        let dm = dec.dims;
        if cache.layers.len() != dm.layers {
            return Err(NativeError::Input(format!(
                "tch cache has {} layers, the decoder {}",
                cache.layers.len(),
                dm.layers
            )));
        }
        let next = match &cache.next_pos {
            Some(p) if p.size() == [1] => p.int64_value(&[0]) as usize,
            Some(p) => {
                return Err(NativeError::Input(format!(
                    "tch cache of batch {:?}: the native decoder runs batch 1",
                    p.size()
                )))
            }
            None => 0,
        };
        self.reset();
        let kvd = dm.kv_dim();
        let mut maxlen = 0;
        for (l, lc) in cache.layers.iter().enumerate() {
            let (Some(k), Some(v), Some(valid)) = (&lc.k, &lc.v, &lc.valid) else {
                continue;
            };
            let s = k.size();
            if s.len() != 4
                || s[0] != 1
                || s[1] as usize != dm.kv_heads
                || s[3] as usize != dm.head_dim
            {
                return Err(NativeError::Input(format!(
                    "tch cache layer {l}: keys {s:?}, expected [1, {}, S, {}]",
                    dm.kv_heads, dm.head_dim
                )));
            }
            // [1, KV, S, hd] -> [S, KV * hd]
            let tok = |t: &Tensor| to_f32_vec(&t.permute([0, 2, 1, 3]));
            let (kf, vf) = (tok(k)?, tok(v)?);
            let valid: Vec<bool> = Vec::<bool>::try_from(valid.to_device(Device::Cpu).view([-1]))?;
            let n = valid.iter().filter(|&&b| b).count();
            maxlen = maxlen.max(n);
            let dst = &mut self.cache.layers[l];
            let cap = n.max(1).next_multiple_of(dec.kv_block);
            dst.grow_to(cap, kvd);
            for (j, (i, _)) in valid.iter().enumerate().filter(|(_, &b)| b).enumerate() {
                dst.k.write(j * kvd, &kf[i * kvd..(i + 1) * kvd]);
                dst.v.write(j * kvd, &vf[i * kvd..(i + 1) * kvd]);
            }
            dst.len = n;
        }
        self.reserve_all(maxlen, dec.kv_block, &dm);
        self.cache.pos = next;
        Ok(())
    }
}

/// Raw views of a state's buffers for one job.
struct Bufs<'a> {
    x: SharedSlice<f32>,
    h: SharedSlice<f32>,
    qkv: SharedSlice<f32>,
    attn: SharedSlice<f32>,
    tmp: SharedSlice<f32>,
    gate: SharedSlice<f32>,
    up: SharedSlice<f32>,
    mid: SharedSlice<f32>,
    scores: SharedSlice<f32>,
    score_cap: usize,
    logits: SharedSlice<f32>,
    best: SharedSlice<(usize, f32)>,
    acts: SharedSlice<QuantActs>,
    act_bufs: &'a [ActBufs],
    head_acts: SharedSlice<Q8Acts>,
    cos: SharedSlice<f32>,
    sin: SharedSlice<f32>,
    k: &'a [KvView],
    v: &'a [KvView],
    kv_len: &'a [usize],
}

impl Bufs<'_> {
    /// Views of `st`'s buffers; the per-layer views are refreshed in place (no allocation).
    fn new(st: &mut NativeState) -> Bufs<'_> {
        for (i, lc) in st.cache.layers.iter_mut().enumerate() {
            st.kv_views.0[i] = lc.k.view();
            st.kv_views.1[i] = lc.v.view();
            st.kv_views.2[i] = lc.len;
        }
        Bufs {
            x: SharedSlice::new(&mut st.x),
            h: SharedSlice::new(&mut st.h),
            qkv: SharedSlice::new(&mut st.qkv),
            attn: SharedSlice::new(&mut st.attn),
            tmp: SharedSlice::new(&mut st.tmp),
            gate: SharedSlice::new(&mut st.gate),
            up: SharedSlice::new(&mut st.up),
            mid: SharedSlice::new(&mut st.mid),
            scores: SharedSlice::new(&mut st.scores),
            score_cap: st.score_cap,
            logits: SharedSlice::new(&mut st.logits),
            best: SharedSlice::new(&mut st.best),
            acts: SharedSlice::new(&mut st.acts),
            act_bufs: &st.act_bufs,
            head_acts: SharedSlice::new(&mut st.head_acts),
            cos: SharedSlice::new(&mut st.cos),
            sin: SharedSlice::new(&mut st.sin),
            k: &st.kv_views.0,
            v: &st.kv_views.1,
            kv_len: &st.kv_views.2,
        }
    }
}

/// The first error any thread of a job reports.
#[derive(Default)]
struct ErrSlot(std::sync::Mutex<Option<KernelError>>);

impl ErrSlot {
    fn set(&self, r: Result<(), KernelError>) {
        if let Err(e) = r {
            let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
            g.get_or_insert(e);
        }
    }
    fn take(&self) -> NResult<()> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}
