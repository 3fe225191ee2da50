//! One entry point for every checkpoint kind: a local HF directory, an HF repo id in the hf-hub cache, or
//! a GGUF file. All three end in the same [`Llama`] and `tokenizers::Tokenizer`.
use std::fmt;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::config::{HfConfig, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::model::{Attention, DecoderLayer, DenseLinear, Linear, Llama, Mlp, RmsNorm, Rope};
use crate::tokenizer;
use crate::weights::{resolve_hub_repo, safetensors_files, TensorMap};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory with `config.json`, `model.safetensors` (or a sharded index) and `tokenizer.json`.
    HfDir(PathBuf),
    /// An HF repo id (`owner/name`, optionally `@revision`) resolved through the hf-hub cache.
    Hub {
        repo_id: String,
        revision: Option<String>,
    },
    /// A `.gguf` file.
    Gguf(PathBuf),
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::HfDir(p) => write!(f, "hf-dir:{}", p.display()),
            ModelSource::Hub {
                repo_id,
                revision: None,
            } => write!(f, "hub:{repo_id}"),
            ModelSource::Hub {
                repo_id,
                revision: Some(r),
            } => write!(f, "hub:{repo_id}@{r}"),
            ModelSource::Gguf(p) => write!(f, "gguf:{}", p.display()),
        }
    }
}

impl ModelSource {
    /// Parse a `--model` argument: an existing `.gguf` file, an existing directory, or `owner/name[@rev]`.
    pub fn parse(s: &str) -> Result<Self> {
        let p = Path::new(s);
        if p.is_file() {
            if p.extension().is_some_and(|e| e == "gguf") {
                return Ok(ModelSource::Gguf(p.to_path_buf()));
            }
            return Err(ModelError::Input(format!(
                "--model {s}: a file must be a .gguf checkpoint"
            )));
        }
        if p.is_dir() {
            return Ok(ModelSource::HfDir(p.to_path_buf()));
        }
        if s.ends_with(".gguf") || s.starts_with('/') || s.starts_with('.') {
            return Err(ModelError::Input(format!(
                "--model {s}: no such file or directory"
            )));
        }
        let (repo, rev) = match s.split_once('@') {
            Some((r, v)) => (r, Some(v.to_string())),
            None => (s, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|x| !x.is_empty()) {
            Ok(ModelSource::Hub {
                repo_id: repo.to_string(),
                revision: rev,
            })
        } else {
            Err(ModelError::Input(format!(
                "--model {s}: not an existing path and not a hub repo id of the form owner/name[@revision]"
            )))
        }
    }
}

/// `$QTALE_HOME`, default `~/.cache/qtale` (where `scripts/setup.sh` puts the venv and the assets).
pub fn qtale_home() -> PathBuf {
    if let Some(h) = std::env::var_os("QTALE_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("qtale")
}

/// The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) as unpacked by `scripts/setup.sh`.
pub fn default_gguf_path() -> PathBuf {
    qtale_home()
        .join("assets")
        .join("smollm2")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The default GGUF for tests that need the real asset: `Some(path)` when the set-up has run; `None`
/// (with a line on stderr) when it is absent and `QTALE_SKIP_ASSET_TESTS=1` asks to skip; otherwise a
/// panic that says how to get it. One rule for every crate's asset tests.
pub fn test_asset_gguf() -> Option<PathBuf> {
    let p = default_gguf_path();
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("QTALE_SKIP_ASSET_TESTS").is_ok_and(|v| v == "1") {
        eprintln!(
            "QTALE_SKIP_ASSET_TESTS=1: skipping, {} is absent",
            p.display()
        );
        return None;
    }
    panic!(
        "{} not found: run `bash scripts/setup.sh` (or set QTALE_SKIP_ASSET_TESTS=1)",
        p.display()
    );
}

/// A loaded model with its tokenizer and where it came from.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: tokenizers::Tokenizer,
    pub source: ModelSource,
}

/// Load any [`ModelSource`] onto `device` with weights stored and computed in `kind` (f32, or bf16 on CUDA).
pub fn load_model(src: &ModelSource, device: Device, kind: Kind) -> Result<LoadedModel> {
    let (model, tokenizer) = match src {
        ModelSource::HfDir(dir) => load_hf_dir(dir, device, kind)?,
        ModelSource::Hub { repo_id, revision } => {
            let dir = resolve_hub_repo(
                repo_id,
                revision.as_deref(),
                &["config.json", "tokenizer.json"],
            )?;
            // Shards are checked by `safetensors_files` (each must be in the snapshot).
            load_hf_dir(&dir, device, kind)?
        }
        ModelSource::Gguf(path) => {
            let g = GgufFile::open(path)?;
            let cfg = LlamaConfig::from_gguf(&g)?;
            let tok = tokenizer::tokenizer_from_gguf(&g)?;
            let map = TensorMap::from_gguf(&g, &cfg)?;
            (Llama::from_tensors(cfg, map, device, kind)?, tok)
        }
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        source: src.clone(),
    })
}

/// The weights of any [`ModelSource`] without its tokenizer, for callers that need only logits: an
/// HF directory (or hub snapshot) without `tokenizer.json` loads here.
pub fn load_model_weights(src: &ModelSource, device: Device, kind: Kind) -> Result<Llama> {
    match src {
        ModelSource::HfDir(dir) => load_hf_model(dir, device, kind),
        ModelSource::Hub { repo_id, revision } => {
            let dir = resolve_hub_repo(repo_id, revision.as_deref(), &["config.json"])?;
            load_hf_model(&dir, device, kind)
        }
        ModelSource::Gguf(path) => {
            let g = GgufFile::open(path)?;
            let cfg = LlamaConfig::from_gguf(&g)?;
            let map = TensorMap::from_gguf(&g, &cfg)?;
            Llama::from_tensors(cfg, map, device, kind)
        }
    }
}

/// An HF directory with its tokenizer (checked first: a missing `tokenizer.json` is named before the
/// weights are read).
fn load_hf_dir(dir: &Path, device: Device, kind: Kind) -> Result<(Llama, tokenizers::Tokenizer)> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ModelError::Input(format!(
            "{}: missing; encoding text needs the tokenizer (`load_model_weights` loads the weights \
             alone)",
            tok_path.display()
        )));
    }
    let tok = tokenizer::load_tokenizer(&tok_path)?;
    Ok((load_hf_model(dir, device, kind)?, tok))
}

/// An HF directory's weights; one whose config.json has a `quantization_config` (GPTQ or AWQ layout,
/// e.g. a hub checkpoint) loads its block linears packed, as `QuantLinear`s, without a dense copy.
fn load_hf_model(dir: &Path, device: Device, kind: Kind) -> Result<Llama> {
    let cfg_path = dir.join("config.json");
    let hf = HfConfig::from_file(&cfg_path)?;
    if hf.quantization_config.is_some() {
        let model =
            crate::quantized_io::load_quantized_hf_dir(dir, device, kind, false).map_err(|e| {
                match e {
                    ModelError::Quant(q) => ModelError::Quantized {
                        path: dir.to_path_buf(),
                        source: Box::new(q),
                    },
                    other => other,
                }
            })?;
        return Ok(model);
    }
    let cfg = hf.resolve(&cfg_path)?;
    load_hf_weights(dir, cfg, device, kind)
}

/// Load the weights of an HF directory for an already resolved config (no tokenizer needed).
pub fn load_hf_weights(dir: &Path, cfg: LlamaConfig, device: Device, kind: Kind) -> Result<Llama> {
    let files = safetensors_files(dir)?;
    let map = TensorMap::from_safetensors(&files)?;
    Llama::from_tensors(cfg, map, device, kind)
}

impl Llama {
    /// Build the decoder from a name-checked tensor map (every missing, unexpected or mis-shaped tensor
    /// is an error), moving weights to `device` in `kind`.
    pub fn from_tensors(
        cfg: LlamaConfig,
        map: TensorMap,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        map.check(&cfg)?;
        // Shapes were checked above: every block linear is a dense `weight` (+ `bias`).
        Self::from_tensors_with_linears(cfg, map, device, kind, |map, p, _, _, bias| {
            let mut get =
                |n: String| -> Result<Tensor> { Ok(map.take(&n)?.to_kind(kind).to_device(device)) };
            let weight = get(format!("{p}.weight"))?;
            let bias = if bias {
                Some(get(format!("{p}.bias"))?)
            } else {
                None
            };
            Ok(Box::new(DenseLinear { weight, bias }) as Box<dyn Linear>)
        })
    }
}

impl Llama {
    /// Build the decoder like [`Llama::from_tensors`], except that every block linear
    /// (q/k/v/o/gate/up/down of each layer) is made by `linear(map, prefix, in, out, bias)`, which takes
    /// the tensors it needs out of `map` (a dense `prefix.weight`, or packed `qweight`/`qzeros`/`scales`,
    /// ...); `bias` says whether the config gives this linear a bias. Every other tensor (embedding,
    /// norms, LM head) is checked by name and shape and moved to `device` in `kind`; tensors left in
    /// `map` at the end are reported as unexpected.
    pub fn from_tensors_with_linears<E: From<ModelError>>(
        cfg: LlamaConfig,
        mut map: TensorMap,
        device: Device,
        kind: Kind,
        mut linear: impl FnMut(&mut TensorMap, &str, i64, i64, bool) -> Result<Box<dyn Linear>, E>,
    ) -> Result<Self, E> {
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(ModelError::Input(format!(
                "unsupported compute dtype {kind:?} (f32, bf16 or f16)"
            ))
            .into());
        }
        let is_block_linear = |name: &str| {
            name.starts_with("model.layers.")
                && crate::model::BLOCK_LINEARS
                    .iter()
                    .any(|l| name.contains(&format!(".{l}.")))
        };
        let others: Vec<(String, Vec<i64>)> = crate::weights::expected_tensors(&cfg)
            .into_iter()
            .filter(|(n, _)| !is_block_linear(n))
            .collect();
        let missing: Vec<String> = others
            .iter()
            .filter(|(n, _)| !map.tensors.contains_key(n))
            .map(|(n, _)| n.clone())
            .collect();
        if !missing.is_empty() {
            return Err(ModelError::MissingTensors {
                source_name: map.source_name.clone(),
                names: missing,
            }
            .into());
        }
        for (name, shape) in &others {
            let got = map.tensors[name].size();
            if &got != shape {
                return Err(ModelError::ShapeMismatch {
                    source_name: map.source_name.clone(),
                    name: name.clone(),
                    expected: shape.clone(),
                    got,
                }
                .into());
            }
        }
        let get = |map: &mut TensorMap, name: &str| -> Result<Tensor> {
            Ok(map.take(name)?.to_kind(kind).to_device(device))
        };
        let (d, ff) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let q = (cfg.num_attention_heads * cfg.head_dim) as i64;
        let kv = (cfg.num_key_value_heads * cfg.head_dim) as i64;
        let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
        let eps = cfg.rms_norm_eps;
        let embed_tokens = get(&mut map, "model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let input_layernorm = RmsNorm {
                weight: get(&mut map, &format!("{p}.input_layernorm.weight"))?,
                eps,
            };
            let post_attention_layernorm = RmsNorm {
                weight: get(&mut map, &format!("{p}.post_attention_layernorm.weight"))?,
                eps,
            };
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn: Attention {
                    q_proj: linear(&mut map, &format!("{a}.q_proj"), d, q, ab)?,
                    k_proj: linear(&mut map, &format!("{a}.k_proj"), d, kv, ab)?,
                    v_proj: linear(&mut map, &format!("{a}.v_proj"), d, kv, ab)?,
                    o_proj: linear(&mut map, &format!("{a}.o_proj"), q, d, ab)?,
                    num_heads: cfg.num_attention_heads as i64,
                    num_kv_heads: cfg.num_key_value_heads as i64,
                    head_dim: cfg.head_dim as i64,
                },
                post_attention_layernorm,
                mlp: Mlp {
                    gate_proj: linear(&mut map, &format!("{m}.gate_proj"), d, ff, mb)?,
                    up_proj: linear(&mut map, &format!("{m}.up_proj"), d, ff, mb)?,
                    down_proj: linear(&mut map, &format!("{m}.down_proj"), ff, d, mb)?,
                },
            });
        }
        let norm = RmsNorm {
            weight: get(&mut map, "model.norm.weight")?,
            eps,
        };
        let lm_head = if cfg.tie_word_embeddings {
            map.tensors.remove("lm_head.weight");
            None
        } else {
            Some(get(&mut map, "lm_head.weight")?)
        };
        let unexpected: Vec<String> = map
            .tensors
            .keys()
            .filter(|n| !n.ends_with(".rotary_emb.inv_freq"))
            .cloned()
            .collect();
        if !unexpected.is_empty() {
            return Err(ModelError::UnexpectedTensors {
                source_name: map.source_name.clone(),
                names: unexpected,
            }
            .into());
        }
        let rope = Rope::new(&cfg, device);
        Ok(Llama {
            config: cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device,
            kind,
        })
    }
}

/// Parse `--device`: `cpu`, `cuda` or `cuda:N`; CUDA must be available.
pub fn parse_device(s: &str) -> Result<Device> {
    let dev = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Device::Cuda(n),
            None => {
                return Err(ModelError::Input(format!(
                    "--device {s}: expected cpu, cuda or cuda:N"
                )))
            }
        },
    };
    if let Device::Cuda(n) = dev {
        let count = crate::cuda::device_count() as usize;
        if n >= count {
            return Err(ModelError::Input(format!(
                "--device {s}: CUDA device {n} not available ({count} found)"
            )));
        }
    }
    Ok(dev)
}

/// Parse `--dtype`: `f32` or `bf16` (bf16 is for CUDA; on CPU it is refused, libtorch has no fast path).
pub fn parse_dtype(s: &str, device: Device) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" if device.is_cuda() => Ok(Kind::BFloat16),
        "bf16" | "bfloat16" => {
            let p = cpu_bf16_probe();
            if p.fast {
                Ok(Kind::BFloat16)
            } else {
                Err(ModelError::Input(format!(
                    "--dtype bf16 on this CPU: {} (use f32, auto, or --device cuda)",
                    p.reason
                )))
            }
        }
        "auto" if device.is_cuda() => Ok(Kind::BFloat16),
        "auto" => Ok(if cpu_bf16_probe().fast {
            Kind::BFloat16
        } else {
            Kind::Float
        }),
        _ => Err(ModelError::Input(format!(
            "--dtype {s}: expected f32, bf16 or auto"
        ))),
    }
}

/// Whether this CPU runs libtorch's bf16 matmul fast, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Bf16Probe {
    pub fast: bool,
    pub reason: String,
}

/// The run-time bf16 decision on CPU: without AVX512-BF16 or AMX-BF16 (`/proc/cpuinfo` flags)
/// libtorch has no fast bf16 path (measured: a 2048^2 bf16 matmul takes a minute on Zen 3), so the
/// answer is no without running anything; with them, a 256^3 matmul is timed in f32 and bf16 and bf16
/// must be at least as fast (on an AMX Xeon it is about 5x faster). Computed once per process;
/// `QTALE_CPU_BF16=0|1` overrides it (say so in a result: the dtype is part of its numerics).
pub fn cpu_bf16_probe() -> Bf16Probe {
    static PROBE: std::sync::OnceLock<Bf16Probe> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            if let Ok(v) = std::env::var("QTALE_CPU_BF16") {
                return Bf16Probe {
                    fast: v == "1",
                    reason: format!("QTALE_CPU_BF16={v}"),
                };
            }
            let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let has = |f: &str| flags.split_whitespace().any(|w| w == f);
            if !(has("avx512_bf16") || has("amx_bf16")) {
                return Bf16Probe {
                    fast: false,
                    reason: "no avx512_bf16 / amx_bf16 CPU flag (libtorch's bf16 matmul is slow \
                             without them)"
                        .into(),
                };
            }
            let time = |k: Kind| {
                let _g = tch::no_grad_guard();
                let a = Tensor::ones([256, 256], (k, Device::Cpu));
                let _ = a.matmul(&a); // warm-up
                let t0 = std::time::Instant::now();
                for _ in 0..4 {
                    let _ = a.matmul(&a);
                }
                t0.elapsed().as_secs_f64()
            };
            let (f, b) = (time(Kind::Float), time(Kind::BFloat16));
            Bf16Probe {
                fast: b <= f,
                reason: format!(
                    "256^3 matmul: bf16 {:.2} ms vs f32 {:.2} ms",
                    b * 250.0,
                    f * 250.0
                ),
            }
        })
        .clone()
}

#[cfg(test)]
mod dtype_tests {
    use super::*;

    /// The CPU dtype follows the probe: `auto` is bf16 exactly where the probe finds it fast, and an
    /// explicit bf16 is refused (naming the reason) where it does not; CUDA is bf16 under `auto`.
    #[test]
    fn dtype_follows_the_bf16_probe() {
        let p = cpu_bf16_probe();
        let auto = parse_dtype("auto", Device::Cpu).unwrap();
        assert_eq!(auto == Kind::BFloat16, p.fast, "{p:?}");
        match parse_dtype("bf16", Device::Cpu) {
            Ok(k) => assert!(p.fast && k == Kind::BFloat16),
            Err(e) => assert!(!p.fast && e.to_string().contains(&p.reason), "{e}"),
        }
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if std::env::var("QTALE_CPU_BF16").is_err()
            && !flags.contains("avx512_bf16")
            && !flags.contains("amx_bf16")
        {
            assert!(!p.fast && p.reason.contains("flag"), "{p:?}");
        }
        assert_eq!(parse_dtype("f32", Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(
            parse_dtype("auto", Device::Cuda(0)).unwrap(),
            Kind::BFloat16
        );
        assert!(parse_dtype("f16", Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("f32, bf16 or auto"));
    }
}
