//! The LLaMA decoder (HF `LlamaForCausalLM` semantics) in tch.
//!
//! Attention is position-based rather than index-based: a query at position `p` attends every stored key
//! whose position is `<= p` and that is marked valid. That one rule covers the causal mask, left or right
//! padding, decode with a KV cache, and (for the router crate) layers that run on a subset of the tokens
//! and store K/V only for those: [`DecoderLayer::forward`] takes any packed subset of tokens with their
//! true positions.
use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// A linear map `y = x W^T (+ b)` with `W` of shape `[out, in]`. Dense here; the quantization crate adds
/// packed implementations behind the same trait.
pub trait Linear: std::fmt::Debug + Send {
    fn forward(&self, x: &Tensor) -> Tensor;
    fn in_features(&self) -> i64;
    fn out_features(&self) -> i64;
    /// The effective weight `[out, in]` (dequantized for packed formats), for calibration and merging.
    fn weight(&self) -> Tensor;
    /// Bytes the weight (and bias) occupy in memory as stored.
    fn weight_bytes(&self) -> usize;
    /// The bias `[out]`, if any (kept apart from `weight()` so merging and re-quantizing keep it).
    fn bias(&self) -> Option<Tensor> {
        None
    }
    /// The weight in the int4 CPU kernel's format, for layers that hold one (packed 4-bit with in-order
    /// groups): the native decoder ([`crate::native`]) runs those through the kernel instead of
    /// `weight()`.
    fn int4(&self) -> Option<&qtale_quant::kernels::int4::Int4Matrix> {
        None
    }
}

/// Plain dense linear layer.
#[derive(Debug)]
pub struct DenseLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

pub(crate) fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

impl Linear for DenseLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
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
        tensor_bytes(&self.weight) + self.bias.as_ref().map_or(0, tensor_bytes)
    }
    fn bias(&self) -> Option<Tensor> {
        self.bias.as_ref().map(Tensor::shallow_clone)
    }
}

/// RMSNorm as HF computes it: in f32, cast back to the input dtype, then scaled by the weight.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        normed * &self.weight
    }
}

/// Rotary position embedding (half-split "rotate_half" convention, as HF checkpoints use).
#[derive(Debug)]
pub struct Rope {
    /// `[head_dim / 2]`, f32, from [`crate::config::RopeScaling::inv_freq`].
    pub inv_freq: Tensor,
}

impl Rope {
    pub fn new(cfg: &LlamaConfig, device: Device) -> Self {
        let f: Vec<f32> = cfg
            .rope_scaling
            .inv_freq(cfg.head_dim, cfg.rope_theta)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        Rope {
            inv_freq: Tensor::from_slice(&f).to_device(device),
        }
    }

    /// `(cos, sin)` of shape `[B, 1, T, head_dim]` for positions `[B, T]`, in `kind`. Angles are
    /// computed in f32 from the positions, like HF's `LlamaRotaryEmbedding`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    /// Apply to `x: [B, H, T, head_dim]`.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let x1 = x.narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
        x * cos + rotated * sin
    }
}

/// Keys and values one layer holds, with each key's position and a validity flag. Rows of a batch may
/// hold different numbers of real keys (padding, or tokens that skipped the layer): invalid slots are
/// masked out of attention.
#[derive(Debug, Default)]
pub struct LayerCache {
    /// `[B, n_kv_heads, S, head_dim]`
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
    /// `[B, S]` i64
    pub pos: Option<Tensor>,
    /// `[B, S]` bool
    pub valid: Option<Tensor>,
}

impl LayerCache {
    /// Append K/V `[B, KV, T, hd]` with positions and validity `[B, T]`.
    pub fn append(&mut self, k: Tensor, v: Tensor, pos: &Tensor, valid: &Tensor) {
        fn cat(old: &Option<Tensor>, new: Tensor, dim: i64) -> Tensor {
            match old {
                Some(o) => Tensor::cat(&[o, &new], dim),
                None => new,
            }
        }
        self.k = Some(cat(&self.k, k, 2));
        self.v = Some(cat(&self.v, v, 2));
        self.pos = Some(cat(&self.pos, pos.shallow_clone(), 1));
        self.valid = Some(cat(&self.valid, valid.shallow_clone(), 1));
    }

    /// Number of key slots (including invalid ones).
    pub fn len(&self) -> i64 {
        self.pos.as_ref().map_or(0, |p| p.size()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of K/V actually held for valid keys (what an implementation that stores only real keys
    /// needs; the padded slots are an artefact of batching).
    pub fn valid_bytes(&self) -> usize {
        match (&self.k, &self.valid) {
            (Some(k), Some(valid)) => {
                let s = k.size();
                let per_key = (s[1] * s[3]) as usize * k.kind().elt_size_in_bytes() * 2;
                let n = valid.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]) as usize;
                n * per_key
            }
            _ => 0,
        }
    }
}

/// Per-layer KV caches plus, per batch row, the next free position.
#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// `[B]` i64: position the next token of each row gets.
    pub next_pos: Option<Tensor>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
            next_pos: None,
        }
    }

    /// K/V bytes held for valid keys, over all layers.
    pub fn valid_bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::valid_bytes).sum()
    }
}

/// Boolean attention mask `[B, 1, Tq, S]`: key `j` is visible to query `i` iff it is valid and
/// `k_pos[j] <= q_pos[i]`. Rows with no visible key (padding queries) see every key instead, so the
/// softmax stays finite; their outputs are never read.
pub fn attention_mask(q_pos: &Tensor, k_pos: &Tensor, k_valid: &Tensor) -> Tensor {
    let mask = k_pos
        .unsqueeze(1)
        .le_tensor(&q_pos.unsqueeze(2))
        .logical_and(&k_valid.unsqueeze(1));
    let any = mask.any_dim(-1, true);
    mask.logical_or(&any.logical_not()).unsqueeze(1)
}

/// Grouped-query self-attention.
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Box<dyn Linear>,
    pub k_proj: Box<dyn Linear>,
    pub v_proj: Box<dyn Linear>,
    pub o_proj: Box<dyn Linear>,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
}

impl Attention {
    fn heads(x: Tensor, n: i64, hd: i64) -> Tensor {
        let s = x.size();
        x.view([s[0], s[1], n, hd]).transpose(1, 2)
    }

    /// Queries with RoPE applied: `[B, T, d] -> [B, H, T, hd]`.
    pub fn project_q(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let q = Self::heads(self.q_proj.forward(x), self.num_heads, self.head_dim);
        Rope::apply(&q, cos, sin)
    }

    /// Keys (with RoPE) and values: `[B, T, d] -> [B, KV, T, hd]` each.
    pub fn project_kv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor) {
        let k = Self::heads(self.k_proj.forward(x), self.num_kv_heads, self.head_dim);
        let v = Self::heads(self.v_proj.forward(x), self.num_kv_heads, self.head_dim);
        (Rope::apply(&k, cos, sin), v)
    }

    /// Scaled dot-product attention of `q: [B, H, T, hd]` over `k, v: [B, KV, S, hd]` with a boolean
    /// mask `[B, 1, T, S]`, then the output projection: returns `[B, T, d]`.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
        let groups = self.num_heads / self.num_kv_heads;
        let (k, v) = if groups > 1 {
            (
                k.repeat_interleave_self_int(groups, 1, None),
                v.repeat_interleave_self_int(groups, 1, None),
            )
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        let out =
            Tensor::scaled_dot_product_attention(q, &k, &v, Some(mask), 0.0, false, None, false);
        let s = out.size();
        let out = out
            .transpose(1, 2)
            .contiguous()
            .view([s[0], s[2], s[1] * s[3]]);
        self.o_proj.forward(&out)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Box<dyn Linear>,
    pub up_proj: Box<dyn Linear>,
    pub down_proj: Box<dyn Linear>,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

/// One pre-norm decoder block.
#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// The linears of a block, by their HF names (the names LoRA targets and quantizers walk).
pub const BLOCK_LINEARS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl DecoderLayer {
    /// The block linear named `name` (one of [`BLOCK_LINEARS`]), to read or replace it.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Box<dyn Linear>> {
        Some(match name {
            "q_proj" => &mut self.self_attn.q_proj,
            "k_proj" => &mut self.self_attn.k_proj,
            "v_proj" => &mut self.self_attn.v_proj,
            "o_proj" => &mut self.self_attn.o_proj,
            "gate_proj" => &mut self.mlp.gate_proj,
            "up_proj" => &mut self.mlp.up_proj,
            "down_proj" => &mut self.mlp.down_proj,
            _ => return None,
        })
    }

    /// HF module path of a block linear: `self_attn` for q/k/v/o, `mlp` for the rest.
    pub fn module_of(name: &str) -> &'static str {
        if matches!(name, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
            "self_attn"
        } else {
            "mlp"
        }
    }
}

impl DecoderLayer {
    /// Run the block on the tokens `x: [B, T, d]` at `positions: [B, T]`; `valid: [B, T]` marks real
    /// tokens (false for padding). Their K/V are appended to `cache`, and each query attends over
    /// everything the cache then holds. `(cos, sin)` come from [`Rope::cos_sin`] for `positions`.
    ///
    /// The tokens need not be contiguous: the router crate packs the tokens that execute this layer and
    /// passes their true positions.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        valid: &Tensor,
        cos_sin: &(Tensor, Tensor),
        cache: &mut LayerCache,
    ) -> Tensor {
        let (cos, sin) = cos_sin;
        let h = self.input_layernorm.forward(x);
        let q = self.self_attn.project_q(&h, cos, sin);
        let (k, v) = self.self_attn.project_kv(&h, cos, sin);
        cache.append(k, v, positions, valid);
        let (ck, cv, cpos, cvalid) = (
            cache.k.as_ref().expect("appended"),
            cache.v.as_ref().expect("appended"),
            cache.pos.as_ref().expect("appended"),
            cache.valid.as_ref().expect("appended"),
        );
        let mask = attention_mask(positions, cpos, cvalid);
        let x = x + self.self_attn.attend(&q, ck, cv, &mask);
        let h = self.post_attention_layernorm.forward(&x);
        &x + self.mlp.forward(&h)
    }
}

/// One step's resolved inputs (see [`Llama::prepare_step`]).
#[derive(Debug)]
pub struct Step {
    /// `[B, T]` i64 on the model's device.
    pub ids: Tensor,
    /// `[B, T]` bool: real tokens.
    pub valid: Tensor,
    /// `[B, T]` i64: true positions.
    pub positions: Tensor,
    /// RoPE `(cos, sin)` for `positions`.
    pub cos_sin: (Tensor, Tensor),
}

/// Output of a forward pass: every position, because scoring needs all of them.
#[derive(Debug)]
pub struct ForwardOutput {
    /// Final hidden states after the last norm, `[B, T, d]` (HF `hidden_states[-1]`).
    pub hidden: Tensor,
    /// Logits `[B, T, vocab]` in f32.
    pub logits: Tensor,
}

/// A LLaMA-family causal LM.
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    /// `[vocab, d]`
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    pub rope: Rope,
    pub device: Device,
    pub kind: Kind,
}

impl Llama {
    /// Token embeddings `[B, T, d]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, ids, -1, false, false)
    }

    /// The LM head applied to final (normed) hidden states; logits in f32.
    pub fn lm_logits(&self, hidden: &Tensor) -> Tensor {
        let w = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        hidden.linear::<Tensor>(w, None).to_kind(Kind::Float)
    }

    /// Bytes of all weights as stored (tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let mut n = tensor_bytes(&self.embed_tokens) + tensor_bytes(&self.norm.weight);
        n += self.lm_head.as_ref().map_or(0, tensor_bytes);
        for l in &self.layers {
            let a = &l.self_attn;
            n += [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]
                .iter()
                .map(|p| p.weight_bytes())
                .sum::<usize>();
            n += [&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]
                .iter()
                .map(|p| p.weight_bytes())
                .sum::<usize>();
            n += tensor_bytes(&l.input_layernorm.weight)
                + tensor_bytes(&l.post_attention_layernorm.weight);
        }
        n
    }

    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        if ids.dim() != 2 {
            return Err(ModelError::Input(format!(
                "input ids must be [batch, seq], got {:?}",
                ids.size()
            )));
        }
        if ids.numel() > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= self.config.vocab_size as i64 {
                return Err(ModelError::Input(format!(
                    "token id out of range [0, {}): min {lo}, max {hi}",
                    self.config.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Full forward of `ids: [B, T]` with an optional `attention_mask: [B, T]` (1 = token, 0 = padding;
    /// left or right padding). Positions count real tokens only, as HF `generate` does.
    pub fn forward(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<ForwardOutput> {
        let mut cache = KvCache::new(self.layers.len());
        self.forward_cached(ids, attention_mask, &mut cache)
    }

    /// Forward that continues from `cache` (prefill when it is empty, decode after): new K/V are
    /// appended, positions continue from each row's `next_pos`.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<ForwardOutput> {
        let hidden = self.forward_hidden_cached(ids, attention_mask, cache)?;
        let logits = self.lm_logits(&hidden);
        Ok(ForwardOutput { hidden, logits })
    }

    /// [`Llama::forward_cached`] without the LM head: the final normed hidden states `[B, T, d]`
    /// (scorers apply the head only where they need logits).
    pub fn forward_hidden_cached(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let step = self.prepare_step(ids, attention_mask, cache)?;
        let mut x = self.embed(&step.ids);
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &step.positions, &step.valid, &step.cos_sin, lc);
        }
        Ok(self.norm.forward(&x))
    }

    /// Resolve one step's inputs: validate ids and mask against the model and the cache, move them to
    /// the device, assign true positions (real tokens only, continuing from each row's `next_pos`), advance
    /// `cache.next_pos`, and compute the RoPE tables. Shared by every forward (dense, routed, scorers).
    pub fn prepare_step(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Step> {
        self.check_ids(ids)?;
        if ids.numel() == 0 {
            return Err(ModelError::Input("empty input ids".into()));
        }
        let ids = ids.to_device(self.device);
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let valid = match attention_mask {
            Some(m) => {
                if m.size() != [b, t] {
                    return Err(ModelError::Input(format!(
                        "attention mask shape {:?} does not match input ids {:?}",
                        m.size(),
                        [b, t]
                    )));
                }
                m.to_device(self.device).ne(0)
            }
            None => Tensor::ones([b, t], (Kind::Bool, self.device)),
        };
        if cache.layers.len() != self.layers.len() {
            return Err(ModelError::Input(format!(
                "KV cache has {} layers, model has {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let start = match &cache.next_pos {
            Some(p) if p.size()[0] != b => {
                return Err(ModelError::Input(format!(
                    "KV cache batch {} != input batch {b}",
                    p.size()[0]
                )))
            }
            Some(p) => p.shallow_clone(),
            None => Tensor::zeros([b], (Kind::Int64, self.device)),
        };
        let counts = valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64);
        let positions = (&counts - 1).clamp_min(0) + start.unsqueeze(1);
        cache.next_pos = Some(&start + counts.select(1, t - 1));

        let cos_sin = self.rope.cos_sin(&positions, self.kind);
        Ok(Step {
            ids,
            valid,
            positions,
            cos_sin,
        })
    }

    /// Mean next-token negative log-likelihood of one sequence (no padding), in nats.
    pub fn sequence_nll(&self, ids: &[i64]) -> Result<f64> {
        if ids.len() < 2 {
            return Err(ModelError::Input(
                "need at least two tokens to score".into(),
            ));
        }
        let _guard = tch::no_grad_guard();
        let t = Tensor::from_slice(ids).view([1, -1]);
        let out = self.forward(&t, None)?;
        let n = ids.len() as i64;
        let logp = out.logits.narrow(1, 0, n - 1).log_softmax(-1, Kind::Float);
        let target = t.narrow(1, 1, n - 1).to_device(self.device).unsqueeze(-1);
        let nll = -logp.gather(-1, &target, false).mean(Kind::Float);
        Ok(nll.double_value(&[]))
    }

    /// Greedy decoding of one prompt with the KV cache; stops after `max_new` tokens or at `eos`.
    pub fn generate_greedy(
        &self,
        prompt: &[i64],
        max_new: usize,
        eos: Option<i64>,
    ) -> Result<Vec<i64>> {
        if prompt.is_empty() {
            return Err(ModelError::Input("empty prompt".into()));
        }
        let _guard = tch::no_grad_guard();
        let mut cache = KvCache::new(self.layers.len());
        let mut input = Tensor::from_slice(prompt).view([1, -1]);
        let mut out = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let o = self.forward_cached(&input, None, &mut cache)?;
            let last = o.logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
            out.push(last);
            if Some(last) == eos {
                break;
            }
            input = Tensor::from_slice(&[last]).view([1, 1]);
        }
        Ok(out)
    }
}
