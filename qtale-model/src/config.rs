//! Model configuration: [`HfConfig`] mirrors HF `config.json` (optional fields, HF defaults), and is
//! resolved once into [`LlamaConfig`], where every default is settled. GGUF `llama.*` metadata resolves
//! into the same [`LlamaConfig`], so every loader feeds one forward.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// The fields of a LLaMA-family HF `config.json` that the decoder uses. Unknown fields are ignored
/// (HF configs carry many that do not affect the forward).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// Present in GPTQ/AWQ checkpoints; kept verbatim for the quantization crate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
}

/// RoPE frequency scaling, as HF `rope_scaling` (`rope_type` or the older `type` key).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq_i = theta^(-2i/d)`.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// LLaMA-3.1 scaling (HF `_compute_llama3_parameters`): low frequencies divided by `factor`, high
    /// ones kept, a smooth ramp between `low_freq_factor` and `high_freq_factor` wavelengths.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The resolved decoder configuration. Every field is settled; nothing downstream applies defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// True for finite-or-infinite positive values; false for zero, negatives and NaN.
fn positive(x: f64) -> bool {
    x > 0.0
}

fn token_id(path: &Path, field: &str, v: &Option<serde_json::Value>) -> Result<Option<u32>> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| ModelError::config(path, field, format!("not a token id: {n}"))),
        // HF allows a list of eos ids; the first one is the canonical one.
        Some(serde_json::Value::Array(a)) if !a.is_empty() => {
            token_id(path, field, &Some(a[0].clone()))
        }
        Some(other) => Err(ModelError::config(
            path,
            field,
            format!("not a token id: {other}"),
        )),
    }
}

impl RopeScaling {
    /// Parse HF `rope_scaling` (`null`, or an object with `rope_type`/`type`).
    pub fn from_hf(path: &Path, v: &Option<serde_json::Value>) -> Result<Self> {
        let Some(v) = v else {
            return Ok(RopeScaling::Default);
        };
        if v.is_null() {
            return Ok(RopeScaling::Default);
        }
        let obj = v.as_object().ok_or_else(|| {
            ModelError::config(path, "rope_scaling", "expected an object or null")
        })?;
        let ty = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| ModelError::config(path, "rope_scaling.rope_type", "missing"))?;
        let num = |k: &str| -> Result<f64> {
            obj.get(k).and_then(|x| x.as_f64()).ok_or_else(|| {
                ModelError::config(path, format!("rope_scaling.{k}"), "missing or not a number")
            })
        };
        let s = match ty {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: num("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            },
            other => {
                return Err(ModelError::config(
                    path,
                    "rope_scaling.rope_type",
                    format!("unsupported `{other}` (supported: default, linear, llama3)"),
                ))
            }
        };
        s.validate(path)?;
        Ok(s)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |f: &str, m: &str| {
            Err(ModelError::config(
                path,
                format!("rope_scaling.{f}"),
                m.to_string(),
            ))
        };
        match *self {
            RopeScaling::Default => Ok(()),
            RopeScaling::Linear { factor } if !positive(factor) => bad("factor", "must be > 0"),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                if !positive(factor) {
                    bad("factor", "must be > 0")
                } else if !positive(high_freq_factor - low_freq_factor) {
                    bad("high_freq_factor", "must be greater than low_freq_factor")
                } else if original_max_position_embeddings == 0 {
                    bad("original_max_position_embeddings", "must be > 0")
                } else {
                    Ok(())
                }
            }
            RopeScaling::Linear { .. } => Ok(()),
        }
    }

    /// HF `rope_scaling` JSON for this scaling (`None` for default).
    pub fn to_hf(&self) -> Option<serde_json::Value> {
        match self {
            RopeScaling::Default => None,
            other => serde_json::to_value(other).ok(),
        }
    }

    /// Inverse frequencies `[head_dim / 2]` in f64, HF's rule for each scaling type.
    pub fn inv_freq(&self, head_dim: usize, theta: f64) -> Vec<f64> {
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        match *self {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

impl HfConfig {
    /// Read and parse `config.json`; a missing field or wrong type names the field (its dotted path,
    /// tracked by `serde_path_to_error`, e.g. `rope_scaling.factor`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.to_string();
            // A missing field is reported at its parent (`.`); serde names it in backticks.
            let field = if at == "." {
                msg.split('`')
                    .nth(1)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("line {} column {}", inner.line(), inner.column()))
            } else {
                at
            };
            ModelError::config(path, field, msg)
        })
    }

    /// Resolve every default once (HF LlamaConfig defaults) and validate.
    pub fn resolve(&self, path: &Path) -> Result<LlamaConfig> {
        // Only LLaMA's forward is implemented: another architecture's config (gpt2, mistral with its
        // sliding window, qwen2 with q/k/v biases by default, ...) would load wrong silently.
        if let Some(t) = &self.model_type {
            if t != "llama" {
                return Err(ModelError::config(
                    path,
                    "model_type",
                    format!("unsupported `{t}` (only llama)"),
                ));
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(ModelError::config(
                    path,
                    "hidden_act",
                    format!("unsupported `{act}` (only silu)"),
                ));
            }
        }
        let heads = self.num_attention_heads;
        let cfg = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size.checked_div(heads).unwrap_or(0)),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self.rope_theta.unwrap_or(10000.0),
            rope_scaling: RopeScaling::from_hf(path, &self.rope_scaling)?,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention_bias: self.attention_bias.unwrap_or(false),
            mlp_bias: self.mlp_bias.unwrap_or(false),
            bos_token_id: token_id(path, "bos_token_id", &self.bos_token_id)?,
            eos_token_id: token_id(path, "eos_token_id", &self.eos_token_id)?,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

impl LlamaConfig {
    /// Check the invariants the forward relies on; the error names the field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |f: &str, m: String| Err(ModelError::config(path, f, m));
        for (f, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return err(f, "must be > 0".into());
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return err(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return err(
                "head_dim",
                format!("{} must be even for RoPE", self.head_dim),
            );
        }
        if !positive(self.rms_norm_eps) {
            return err("rms_norm_eps", format!("{} must be > 0", self.rms_norm_eps));
        }
        if !positive(self.rope_theta) {
            return err("rope_theta", format!("{} must be > 0", self.rope_theta));
        }
        Ok(())
    }

    /// Queries per KV head (GQA group size).
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Resolve GGUF `llama.*` metadata. `has_output` says whether the file carries `output.weight`
    /// (an untied LM head); GGUF has no tie flag of its own.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path.clone();
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::config(
                &path,
                "general.architecture",
                format!("unsupported `{arch}` (only llama)"),
            ));
        }
        let u = |k: &str| -> Result<usize> { Ok(g.get_u64(k)? as usize) };
        let heads = u("llama.attention.head_count")?;
        let hidden = u("llama.embedding_length")?;
        let vocab = match g.get("llama.vocab_size").and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| {
                    ModelError::config(
                        &path,
                        "llama.vocab_size",
                        "missing (and no tokenizer.ggml.tokens)",
                    )
                })?,
        };
        let head_dim = match g.get("llama.rope.dimension_count").and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        let opt_f = |k: &str| g.get(k).and_then(|v| v.as_f64());
        let rope_scaling = match g.get("llama.rope.scaling.type").and_then(|v| v.as_str()) {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear {
                factor: g.get_f64("llama.rope.scaling.factor")?,
            },
            Some(other) => {
                return Err(ModelError::config(
                    &path,
                    "llama.rope.scaling.type",
                    format!("unsupported `{other}`"),
                ))
            }
        };
        let opt_id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|x| x as u32);
        let cfg = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("llama.feed_forward_length")?,
            num_hidden_layers: u("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: g
                .get("llama.attention.head_count_kv")
                .and_then(|v| v.as_u64())
                .map(|x| x as usize)
                .unwrap_or(heads),
            head_dim,
            max_position_embeddings: u("llama.context_length")?,
            rms_norm_eps: opt_f("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: opt_f("llama.rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: opt_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: opt_id("tokenizer.ggml.eos_token_id"),
        };
        cfg.validate(&path)?;
        Ok(cfg)
    }

    /// The HF `config.json` that describes this model (used by the GGUF -> HF converter).
    pub fn to_hf(&self) -> HfConfig {
        HfConfig {
            architectures: Some(vec!["LlamaForCausalLM".into()]),
            model_type: Some("llama".into()),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: Some(self.num_key_value_heads),
            head_dim: Some(self.head_dim),
            hidden_act: Some("silu".into()),
            max_position_embeddings: Some(self.max_position_embeddings),
            rms_norm_eps: Some(self.rms_norm_eps),
            rope_theta: Some(self.rope_theta),
            rope_scaling: self.rope_scaling.to_hf(),
            tie_word_embeddings: Some(self.tie_word_embeddings),
            attention_bias: Some(self.attention_bias),
            mlp_bias: Some(self.mlp_bias),
            bos_token_id: self.bos_token_id.map(|x| x.into()),
            eos_token_id: self.eos_token_id.map(|x| x.into()),
            pad_token_id: None,
            torch_dtype: Some("float32".into()),
            quantization_config: None,
        }
    }

    /// Parameter count of the decoder (embedding and LM head counted once if tied).
    pub fn num_parameters(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size + 2 * d;
        let embed = self.vocab_size * d;
        embed
            + if self.tie_word_embeddings { 0 } else { embed }
            + self.num_hidden_layers * per_layer
            + d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<LlamaConfig> {
        let hf: HfConfig = serde_json::from_str(json).unwrap();
        hf.resolve(Path::new("config.json"))
    }

    #[test]
    fn defaults_are_resolved_once() {
        let c = parse(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap();
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn llama3_inv_freq_matches_hf_rule() {
        // Hand-checked against HF `_compute_llama3_parameters` for head_dim 8, theta 500000,
        // factor 8, low 1, high 4, original 32: wavelengths 6.28, 167, 4443, 118k.
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        };
        let base = RopeScaling::Default.inv_freq(8, 500000.0);
        let got = s.inv_freq(8, 500000.0);
        assert_eq!(got[0], base[0]); // high frequency kept
        for i in 1..4 {
            assert!(
                (got[i] - base[i] / 8.0).abs() < 1e-15,
                "low frequency {i} divided by factor"
            );
        }
        let lin = RopeScaling::Linear { factor: 2.0 }.inv_freq(8, 10000.0);
        assert!((lin[1] - 0.5 * 10000f64.powf(-0.25)).abs() < 1e-15);
    }

    #[test]
    fn bad_configs_name_the_field() {
        // A missing required field is caught by serde; from_file names it and the file.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#)
            .unwrap();
        let msg = HfConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            msg.contains("intermediate_size") && msg.contains("config.json"),
            "{msg}"
        );
        // A wrong type names the key, also inside a nested object.
        std::fs::write(
            &p,
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": "small"}"#,
        )
        .unwrap();
        let msg = HfConfig::from_file(&p).unwrap_err().to_string();
        assert!(msg.contains("`rms_norm_eps`"), "{msg}");
        std::fs::write(
            &p,
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "architectures": ["A", 3]}"#,
        )
        .unwrap();
        let msg = HfConfig::from_file(&p).unwrap_err().to_string();
        assert!(msg.contains("`architectures[1]`"), "{msg}");
        let msg = parse(
            r#"{"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("model_type") && msg.contains("gpt2"), "{msg}");

        let msg = parse(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 3, "num_key_value_heads": 2}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("num_key_value_heads"), "{msg}");
        let msg = parse(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("rope_scaling.rope_type") && msg.contains("yarn"),
            "{msg}"
        );
        let msg = parse(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "rope_scaling": {"type": "linear"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("rope_scaling.factor"), "{msg}");
    }
}
