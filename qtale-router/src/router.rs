//! Routers: given a routed layer's index and its input hidden states, return execute/skip logits.
//!
//! * [`DllmRouter`]: the D-LLM router, `Linear(d -> h) -> RMSNorm(h) -> SiLU -> Linear(h -> 2)`, its
//!   weights in a [`tch::nn::VarStore`] of their own (for the training crate's optimizer), saved and
//!   loaded as a separate safetensors file.
//! * Baselines for ablations: [`DenseRouter`] (always execute), [`StaticRouter`] (a fixed set of layers
//!   skipped by every token, e.g. the layers whose input and output are most similar on calibration
//!   text) and [`RandomRouter`] (execute with probability `p`).
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use qtale_model::Llama;
use rand::{Rng, SeedableRng};
use tch::{nn, Device, Kind, Tensor};

use crate::batch::CalibBatch;
use crate::config::RoutingConfig;
use crate::error::{Result, RouterError};
use crate::gate::{f32_vec, rule_p, DllmGate, NativeGate, NativeMlp, Scratch};
use crate::splitmix::splitmix64;

/// Logit gap used by the rule-based routers: `softmax([0, SURE])[1]` is exactly 1.0 in f32, and
/// `softmax([0, -SURE])[1]` is about 1e-13, so `theta = 0` still executes everything.
pub const SURE: f64 = 30.0;

/// A per-layer router. Index 0 of the last dimension is "skip", 1 is "execute".
pub trait Router {
    /// Logits `[B, T, 2]` (f32) for routed layer `layer`, from the block input `x: [B, T, d]` (the
    /// residual stream before the attention norm, in f32) at `positions: [B, T]`.
    fn logits(&self, layer: usize, x: &Tensor, positions: &Tensor) -> Tensor;
    /// FLOPs (2 per multiply-add) the router spends per token at `layer`.
    fn flops_per_token(&self, _layer: usize) -> f64 {
        0.0
    }
    /// A short name for reports.
    fn name(&self) -> String;
    /// Bytes of the router's own parameters (reported with the model's weight memory).
    fn weight_bytes(&self) -> usize {
        0
    }
    /// The same decision function in plain f32 for the native CPU decoder ([`crate::native`]); `None`
    /// when this router has no native form.
    fn native_gate(&self) -> Result<Option<Box<dyn NativeGate>>> {
        Ok(None)
    }
}

impl<R: Router + ?Sized> Router for &R {
    fn native_gate(&self) -> Result<Option<Box<dyn NativeGate>>> {
        (**self).native_gate()
    }
    fn logits(&self, layer: usize, x: &Tensor, positions: &Tensor) -> Tensor {
        (**self).logits(layer, x, positions)
    }
    fn flops_per_token(&self, layer: usize) -> f64 {
        (**self).flops_per_token(layer)
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn weight_bytes(&self) -> usize {
        (**self).weight_bytes()
    }
}

impl<R: Router + ?Sized> Router for Box<R> {
    fn native_gate(&self) -> Result<Option<Box<dyn NativeGate>>> {
        (**self).native_gate()
    }
    fn logits(&self, layer: usize, x: &Tensor, positions: &Tensor) -> Tensor {
        (**self).logits(layer, x, positions)
    }
    fn flops_per_token(&self, layer: usize) -> f64 {
        (**self).flops_per_token(layer)
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn weight_bytes(&self) -> usize {
        (**self).weight_bytes()
    }
}

/// `[B, T, 2]` logits from an execute mask `[B, T]`: `[0, +SURE]` where true, `[0, -SURE]` where false.
pub fn logits_from_mask(exec: &Tensor) -> Tensor {
    let gap = exec.to_kind(Kind::Float) * (2.0 * SURE) - SURE;
    Tensor::stack(&[&gap.zeros_like(), &gap], -1)
}

/// Always execute (the dense model).
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseRouter;

impl Router for DenseRouter {
    fn logits(&self, _layer: usize, x: &Tensor, _positions: &Tensor) -> Tensor {
        let s = x.size();
        logits_from_mask(&Tensor::ones([s[0], s[1]], (Kind::Bool, x.device())))
    }
    fn name(&self) -> String {
        "dense".into()
    }
    fn native_gate(&self) -> Result<Option<Box<dyn NativeGate>>> {
        Ok(Some(Box::new(*self)))
    }
}

impl NativeGate for DenseRouter {
    fn p_exec(&self, _layer: usize, _x: &[f32], _pos: usize) -> f32 {
        rule_p(SURE, true)
    }
}

/// Static layer removal: every token skips the layers in `skipped`.
#[derive(Debug, Clone)]
pub struct StaticRouter {
    pub skipped: Vec<usize>,
}

impl StaticRouter {
    pub fn new(mut skipped: Vec<usize>) -> Self {
        skipped.sort_unstable();
        skipped.dedup();
        StaticRouter { skipped }
    }

    /// The rule of "layers are redundant where they change the residual stream least": run the dense
    /// model on `calib`, take the mean cosine similarity (over real tokens) between each layer's input and
    /// output hidden states, and skip the `n_skip` most similar layers among `start_layer..L`.
    /// Returns the router and the per-layer similarities.
    pub fn by_similarity(
        model: &Llama,
        calib: &[CalibBatch],
        n_skip: usize,
        start_layer: usize,
    ) -> Result<(Self, Vec<f64>)> {
        let n = model.layers.len();
        if start_layer > n || n_skip > n - start_layer {
            return Err(RouterError::Input(format!(
                "cannot skip {n_skip} of the {} routable layers",
                n.saturating_sub(start_layer)
            )));
        }
        if calib.is_empty() {
            return Err(RouterError::Input("no calibration batches".into()));
        }
        let _g = tch::no_grad_guard();
        let mut sum = vec![0f64; n];
        let mut count = 0f64;
        for b in calib {
            let mut cache = qtale_model::KvCache::new(n);
            let p = model.prepare_step(&b.ids, b.mask.as_ref(), &mut cache)?;
            let w = p.valid.to_kind(Kind::Float);
            count += w.sum(Kind::Float).double_value(&[]);
            let mut x = model.embed(&p.ids);
            for (l, (layer, lc)) in model.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
                let y = layer.forward(&x, &p.positions, &p.valid, &p.cos_sin, lc);
                let cos = Tensor::cosine_similarity(
                    &x.to_kind(Kind::Float),
                    &y.to_kind(Kind::Float),
                    -1,
                    1e-8,
                );
                sum[l] += (cos * &w).sum(Kind::Float).double_value(&[]);
                x = y;
            }
        }
        let sims: Vec<f64> = sum.iter().map(|s| s / count.max(1.0)).collect();
        let mut order: Vec<usize> = (start_layer..n).collect();
        order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
        Ok((StaticRouter::new(order[..n_skip].to_vec()), sims))
    }
}

impl Router for StaticRouter {
    fn logits(&self, layer: usize, x: &Tensor, _positions: &Tensor) -> Tensor {
        let s = x.size();
        let run = !self.skipped.contains(&layer);
        logits_from_mask(&Tensor::full(
            [s[0], s[1]],
            i64::from(run),
            (Kind::Bool, x.device()),
        ))
    }
    fn name(&self) -> String {
        format!("static(skip {:?})", self.skipped)
    }
    fn native_gate(&self) -> Result<Option<Box<dyn NativeGate>>> {
        Ok(Some(Box::new(self.clone())))
    }
}

impl NativeGate for StaticRouter {
    fn p_exec(&self, layer: usize, _x: &[f32], _pos: usize) -> f32 {
        rule_p(SURE, !self.skipped.contains(&layer))
    }
}

/// Executes each (row, position, layer) with probability `p`, independently and deterministically: the
/// decision is a hash of `(seed, layer, row, position)`, so the same token makes the same decision in
/// prefill and in decode, and benches are repeatable.
#[derive(Debug, Clone, Copy)]
pub struct RandomRouter {
    pub p: f64,
    pub seed: u64,
}

impl RandomRouter {
    pub fn new(p: f64, seed: u64) -> Self {
        RandomRouter { p, seed }
    }
    /// Whether `(layer, row, position)` executes.
    pub fn decide(&self, layer: usize, row: i64, pos: i64) -> bool {
        let h = splitmix64(
            splitmix64(splitmix64(self.seed ^ layer as u64) ^ row as u64) ^ (pos as u64),
        );
        ((h >> 11) as f64 / (1u64 << 53) as f64) < self.p
    }
}

impl Router for RandomRouter {
    fn logits(&self, layer: usize, x: &Tensor, positions: &Tensor) -> Tensor {
        let (b, t) = (positions.size()[0], positions.size()[1]);
        let pos: Vec<i64> = Vec::try_from(positions.to_device(Device::Cpu).reshape([-1]))
            .expect("positions are i64");
        let bits: Vec<bool> = pos
            .iter()
            .enumerate()
            .map(|(i, &p)| self.decide(layer, i as i64 / t.max(1), p))
            .collect();
        logits_from_mask(&Tensor::from_slice(&bits).view([b, t]).to_device(x.device()))
    }
    fn name(&self) -> String {
        format!("random(p={})", self.p)
    }
    fn native_gate(&self) -> Result<Option<Box<dyn NativeGate>>> {
        Ok(Some(Box::new(*self)))
    }
}

/// Batch 1: row 0, as in the tch path's single-sequence decode.
impl NativeGate for RandomRouter {
    fn p_exec(&self, layer: usize, _x: &[f32], pos: usize) -> f32 {
        rule_p(SURE, self.decide(layer, 0, pos as i64))
    }
}

/// One layer's router weights.
#[derive(Debug)]
struct RouterMlp {
    fc1_w: Tensor,
    fc1_b: Tensor,
    norm_w: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
}

/// The D-LLM router, one per layer from `start_layer` on. Variables live in `vs` under
/// `layers.{l}.fc1.{weight,bias}`, `layers.{l}.norm.weight`, `layers.{l}.fc2.{weight,bias}`, in f32.
pub struct DllmRouter {
    pub vs: nn::VarStore,
    layers: Vec<Option<RouterMlp>>,
    pub d_model: usize,
    pub hidden: usize,
    pub start_layer: usize,
    pub eps: f64,
}

impl std::fmt::Debug for DllmRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DllmRouter")
            .field("d_model", &self.d_model)
            .field("hidden", &self.hidden)
            .field("start_layer", &self.start_layer)
            .field("num_layers", &self.layers.len())
            .finish()
    }
}

const FORMAT: &str = "qtale-router/dllm-v1";

fn uniform(rng: &mut rand::rngs::StdRng, shape: &[i64], bound: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.gen_range(-bound..bound) as f32)
        .collect();
    Tensor::from_slice(&v).view(shape)
}

impl DllmRouter {
    /// A freshly initialised router for a model of width `d_model` and depth `num_layers`: both linears
    /// with PyTorch's default `nn.Linear` init (uniform in `+-1/sqrt(fan_in)`) from a seeded RNG (so a
    /// "fixed random router" is reproducible without touching torch's global RNG), RMSNorm weight 1, and
    /// the last bias `[0.1, 2.0]` (p(execute) about 0.87 at start).
    pub fn new(
        cfg: &RoutingConfig,
        d_model: usize,
        num_layers: usize,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate_for(num_layers)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (d, h) = (d_model as i64, cfg.hidden as i64);
        let mut layers = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            if l < cfg.start_layer {
                layers.push(None);
                continue;
            }
            let p = &root / "layers" / l;
            let b1 = 1.0 / (d as f64).sqrt();
            let b2 = 1.0 / (h as f64).sqrt();
            let fc1 = &p / "fc1";
            let fc2 = &p / "fc2";
            let m = RouterMlp {
                fc1_w: fc1.var_copy("weight", &uniform(&mut rng, &[h, d], b1)),
                fc1_b: fc1.var_copy("bias", &uniform(&mut rng, &[h], b1)),
                norm_w: (&p / "norm")
                    .var_copy("weight", &Tensor::ones([h], (Kind::Float, Device::Cpu))),
                fc2_w: fc2.var_copy("weight", &uniform(&mut rng, &[2, h], b2)),
                fc2_b: fc2.var_copy("bias", &Tensor::from_slice(&[0.1f32, 2.0])),
            };
            layers.push(Some(m));
        }
        Ok(DllmRouter {
            vs,
            layers,
            d_model,
            hidden: cfg.hidden,
            start_layer: cfg.start_layer,
            eps: cfg.router_norm_eps,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Save the router weights (only) as a safetensors file, with the shape metadata needed to load it.
    pub fn save(&self, path: &Path) -> Result<()> {
        let vars: BTreeMap<String, Tensor> = self.vs.variables().into_iter().collect();
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, t) in &vars {
            let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            let n = t.numel();
            let mut v = vec![0f32; n];
            t.copy_data(&mut v, n);
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let shape = t.size().iter().map(|&s| s as usize).collect();
            bufs.push((name.clone(), shape, bytes));
        }
        let mut views = Vec::new();
        for (name, shape, bytes) in &bufs {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map_err(|e| RouterError::Safetensors {
                        path: path.to_path_buf(),
                        msg: e.to_string(),
                    })?;
            views.push((name.clone(), view));
        }
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("d_model", self.d_model.to_string()),
            ("hidden", self.hidden.to_string()),
            ("start_layer", self.start_layer.to_string()),
            ("num_layers", self.layers.len().to_string()),
            ("norm_eps", self.eps.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes =
            safetensors::serialize(views, &Some(meta)).map_err(|e| RouterError::Safetensors {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        std::fs::write(path, bytes).map_err(|source| RouterError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Load a router saved by [`DllmRouter::save`]. Shapes come from the file's metadata; every tensor
    /// is checked by name, shape and dtype, and missing or unexpected tensors are reported by name.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| RouterError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st_err = |e: safetensors::SafeTensorError| RouterError::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(st_err)?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(st_err)?;
        let md = meta.metadata().clone().unwrap_or_default();
        let get = |key: &str| -> Result<String> {
            md.get(key).cloned().ok_or_else(|| RouterError::Metadata {
                path: path.to_path_buf(),
                key: key.into(),
                msg: "missing".into(),
            })
        };
        let num = |key: &str| -> Result<usize> {
            get(key)?.parse().map_err(|_| RouterError::Metadata {
                path: path.to_path_buf(),
                key: key.into(),
                msg: "not a non-negative integer".into(),
            })
        };
        let format = get("format")?;
        if format != FORMAT {
            return Err(RouterError::Metadata {
                path: path.to_path_buf(),
                key: "format".into(),
                msg: format!("`{format}`, expected `{FORMAT}`"),
            });
        }
        let eps: f64 = get("norm_eps")?
            .parse()
            .map_err(|_| RouterError::Metadata {
                path: path.to_path_buf(),
                key: "norm_eps".into(),
                msg: "not a number".into(),
            })?;
        let cfg = RoutingConfig {
            start_layer: num("start_layer")?,
            hidden: num("hidden")?,
            router_norm_eps: eps,
            ..RoutingConfig::default()
        };
        cfg.validate().map_err(|e| RouterError::Metadata {
            path: path.to_path_buf(),
            key: "hidden/norm_eps".into(),
            msg: e.to_string(),
        })?;
        let router = DllmRouter::new(&cfg, num("d_model")?, num("num_layers")?, device, 0)?;
        let vars = router.vs.variables();
        let names: Vec<String> = st.names().into_iter().cloned().collect();
        let mut missing: Vec<String> = vars
            .keys()
            .filter(|k| !names.contains(k))
            .cloned()
            .collect();
        missing.sort();
        if !missing.is_empty() {
            return Err(RouterError::MissingTensors {
                path: path.to_path_buf(),
                names: missing,
            });
        }
        let mut unexpected: Vec<String> = names
            .iter()
            .filter(|k| !vars.contains_key(*k))
            .cloned()
            .collect();
        unexpected.sort();
        if !unexpected.is_empty() {
            return Err(RouterError::UnexpectedTensors {
                path: path.to_path_buf(),
                names: unexpected,
            });
        }
        let mut sorted: Vec<(&String, &Tensor)> = vars.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        for (name, var) in sorted {
            let view = st.tensor(name).map_err(st_err)?;
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(RouterError::Dtype {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let got: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
            if got != var.size() {
                return Err(RouterError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: var.size(),
                    got,
                });
            }
            let t = Tensor::from_data_size(view.data(), &got, Kind::Float).to_device(device);
            let mut var = var.shallow_clone();
            tch::no_grad(|| var.copy_(&t));
        }
        Ok(router)
    }
}

impl Router for DllmRouter {
    fn logits(&self, layer: usize, x: &Tensor, _positions: &Tensor) -> Tensor {
        let m = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .unwrap_or_else(|| panic!("DllmRouter has no router for layer {layer}"));
        let x = x.to_kind(Kind::Float);
        let h = x.linear(&m.fc1_w, Some(&m.fc1_b));
        let rms = (h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + self.eps).rsqrt();
        let h = (h * rms * &m.norm_w).silu();
        h.linear(&m.fc2_w, Some(&m.fc2_b))
    }
    fn flops_per_token(&self, _layer: usize) -> f64 {
        let (d, h) = (self.d_model as f64, self.hidden as f64);
        2.0 * d * h + 2.0 * h * 2.0
    }
    fn name(&self) -> String {
        format!("dllm(h={})", self.hidden)
    }
    fn native_gate(&self) -> Result<Option<Box<dyn NativeGate>>> {
        let _g = tch::no_grad_guard();
        let layers = self
            .layers
            .iter()
            .map(|m| {
                m.as_ref()
                    .map(|m| -> Result<NativeMlp> {
                        Ok(NativeMlp {
                            fc1_w: f32_vec(&m.fc1_w)?,
                            fc1_b: f32_vec(&m.fc1_b)?,
                            norm_w: f32_vec(&m.norm_w)?,
                            fc2_w: f32_vec(&m.fc2_w)?,
                            fc2_b: f32_vec(&m.fc2_b)?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Box::new(DllmGate {
            layers,
            h: self.hidden,
            eps: self.eps as f32,
            backend: qtale_quant::kernels::int4::Backend::detect(),
            hid: Scratch::new(self.hidden),
        })))
    }
    fn weight_bytes(&self) -> usize {
        self.vs
            .variables()
            .values()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }
}
