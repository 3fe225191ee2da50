//! LoRA adapters (Hu et al. 2021; D-LLM fine-tunes with them): `y = W x + (alpha / r) B A dropout(x)`,
//! `A ~ N(0, 1/r)`, `B = 0`, so training starts exactly at the base model. The adapters live in their own
//! [`tch::nn::VarStore`] (the base stays frozen and out of the optimizer), save/load as their own
//! safetensors file under PEFT-style names, and merge into the base weights for inference and PTQ.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use qtale_model::model::{DecoderLayer, DenseLinear, Linear, BLOCK_LINEARS};
use qtale_model::Llama;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::{config_err, Result, TrainError};

/// The linears LoRA may target, by their HF names inside a decoder block.
pub const TARGETS: [&str; 7] = BLOCK_LINEARS;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank r (D-LLM: 8).
    pub rank: i64,
    /// Scaling numerator: the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the adapter input during training (D-LLM: 0.05).
    pub dropout: f64,
    /// Target linears (default q/k/v, as D-LLM).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank < 1 {
            return Err(config_err(
                "lora.rank",
                format!("{} must be >= 1", self.rank),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(config_err(
                "lora.dropout",
                format!("{} must be in [0, 1)", self.dropout),
            ));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(config_err(
                "lora.alpha",
                format!("{} must be > 0", self.alpha),
            ));
        }
        if self.targets.is_empty() {
            return Err(config_err("lora.targets", "empty"));
        }
        for t in &self.targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(config_err(
                    "lora.targets",
                    format!("unknown `{t}` (one of {})", TARGETS.join(", ")),
                ));
            }
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// A base linear plus a low-rank update.
#[derive(Debug)]
pub struct LoraLinear {
    pub base: Box<dyn Linear>,
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    /// Shared by all adapters of a model: dropout is active only while training.
    pub train: Arc<AtomicBool>,
}

impl Linear for LoraLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let train = self.train.load(Ordering::Relaxed);
        let xd = if train && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let delta = xd
            .to_kind(self.a.kind())
            .linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None);
        self.base.forward(x) + (delta * self.scale).to_kind(x.kind())
    }
    fn in_features(&self) -> i64 {
        self.base.in_features()
    }
    fn out_features(&self) -> i64 {
        self.base.out_features()
    }
    /// The merged weight `W + scale * B A`.
    fn weight(&self) -> Tensor {
        let w = self.base.weight();
        (&w + (self.b.matmul(&self.a) * self.scale).to_kind(w.kind())).detach()
    }
    fn weight_bytes(&self) -> usize {
        self.base.weight_bytes()
            + (self.a.numel() + self.b.numel()) * self.a.kind().elt_size_in_bytes()
    }
    fn bias(&self) -> Option<Tensor> {
        self.base.bias()
    }
}

/// The adapters attached to a model: their variable store and the training switch.
pub struct Lora {
    pub config: LoraConfig,
    pub vs: nn::VarStore,
    pub train: Arc<AtomicBool>,
}

fn slot<'a>(model: &'a mut Llama, layer: usize, target: &str) -> &'a mut Box<dyn Linear> {
    model.layers[layer]
        .linear_mut(target)
        .expect("validated target")
}

fn placeholder() -> Box<dyn Linear> {
    Box::new(DenseLinear {
        weight: Tensor::zeros([0, 0], (Kind::Float, tch::Device::Cpu)),
        bias: None,
    })
}

impl Lora {
    /// Wrap the target linears of every layer of `model`. Adapter tensors are f32 on the model's device
    /// (trained in f32 even when the base is bf16), named
    /// `model.layers.{i}.{self_attn|mlp}.{target}.lora_A.weight` / `lora_B.weight` (PEFT's names).
    pub fn attach(model: &mut Llama, config: LoraConfig, seed: i64) -> Result<Self> {
        config.validate()?;
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(model.device);
        let train = Arc::new(AtomicBool::new(true));
        let root = vs.root();
        for i in 0..model.layers.len() {
            for t in &config.targets {
                let path = root
                    .sub("model")
                    .sub("layers")
                    .sub(i)
                    .sub(DecoderLayer::module_of(t))
                    .sub(t);
                let s = slot(model, i, t);
                let base = std::mem::replace(s, placeholder());
                let (inp, out) = (base.in_features(), base.out_features());
                let std = (1.0 / config.rank as f64).sqrt();
                let a = path
                    .sub("lora_A")
                    .randn("weight", &[config.rank, inp], 0.0, std);
                let b = path.sub("lora_B").zeros("weight", &[out, config.rank]);
                *s = Box::new(LoraLinear {
                    base,
                    a,
                    b,
                    scale: config.scale(),
                    dropout: config.dropout,
                    train: train.clone(),
                });
            }
        }
        Ok(Lora { config, vs, train })
    }

    /// Dropout on (training) or off (evaluation).
    pub fn set_train(&self, on: bool) {
        self.train.store(on, Ordering::Relaxed);
    }

    /// Save the adapters (only them) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.vs.save(path).map_err(|e| TrainError::Checkpoint {
            path: path.into(),
            msg: e.to_string(),
        })
    }

    /// Load adapters saved by [`Lora::save`]: every expected tensor must be present with its shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| TrainError::Checkpoint {
                path: path.into(),
                msg: e.to_string(),
            })?
            .into_iter()
            .collect();
        let vars = self.vs.variables();
        let missing: Vec<&String> = vars.keys().filter(|k| !saved.contains_key(*k)).collect();
        if !missing.is_empty() {
            return Err(TrainError::Checkpoint {
                path: path.into(),
                msg: format!(
                    "missing adapter tensors: {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let unexpected: Vec<&String> = saved.keys().filter(|k| !vars.contains_key(*k)).collect();
        if !unexpected.is_empty() {
            return Err(TrainError::Checkpoint {
                path: path.into(),
                msg: format!(
                    "unexpected tensors (another LoRA config?): {}",
                    unexpected
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        tch::no_grad(|| -> Result<()> {
            for (name, mut var) in vars {
                let src = &saved[&name];
                if src.size() != var.size() {
                    return Err(TrainError::Checkpoint {
                        path: path.into(),
                        msg: format!(
                            "`{name}` has shape {:?}, expected {:?}",
                            src.size(),
                            var.size()
                        ),
                    });
                }
                var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
            }
            Ok(())
        })
    }

    /// Merge every adapter into its base weight (`W <- W + scale * B A`) and drop the adapters: the
    /// model is plain dense again, ready for PTQ (QTALE's order: fine-tune, merge, quantize).
    pub fn merge(self, model: &mut Llama) {
        let _g = tch::no_grad_guard();
        let kind = model.kind;
        for i in 0..model.layers.len() {
            for t in &self.config.targets {
                let s = slot(model, i, t);
                let lin = std::mem::replace(s, placeholder());
                let weight = lin.weight().to_kind(kind).detach();
                *s = Box::new(DenseLinear {
                    weight,
                    bias: lin.bias(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qtale_model::config::HfConfig;
    use qtale_model::load::load_hf_weights;
    use tch::Device;

    fn tiny() -> Llama {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../qtale-model/tests/fixtures/tiny/gqa_tied");
        let p = dir.join("config.json");
        let cfg = HfConfig::from_file(&p).unwrap().resolve(&p).unwrap();
        load_hf_weights(&dir, cfg, Device::Cpu, Kind::Float).unwrap()
    }

    fn logits(m: &Llama, ids: &[i64]) -> Tensor {
        m.forward(&Tensor::from_slice(ids).view([1, -1]), None)
            .unwrap()
            .logits
    }

    #[test]
    fn starts_at_the_base_model_and_merges_exactly() {
        let ids = [3i64, 17, 42, 5, 60, 1];
        let mut m = tiny();
        let base = logits(&m, &ids);
        let lora = Lora::attach(&mut m, LoraConfig::default(), 0).unwrap();
        lora.set_train(false);
        // B = 0: identical to the base.
        assert_eq!(
            (logits(&m, &ids) - &base).abs().max().double_value(&[]),
            0.0
        );
        // Give B values, then merged == adapted.
        tch::no_grad(|| {
            for (n, mut v) in lora.vs.variables() {
                if n.contains("lora_B") {
                    v.copy_(&(Tensor::randn_like(&v) * 0.1));
                }
            }
        });
        let adapted = logits(&m, &ids);
        assert!((&adapted - &base).abs().max().double_value(&[]) > 1e-3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lora.safetensors");
        lora.save(&path).unwrap();
        lora.merge(&mut m);
        let merged = logits(&m, &ids);
        assert!((&merged - &adapted).abs().max().double_value(&[]) < 1e-5);

        // Load into a fresh model: the same adapted logits.
        let mut m2 = tiny();
        let mut l2 = Lora::attach(&mut m2, LoraConfig::default(), 99).unwrap();
        l2.set_train(false);
        l2.load(&path).unwrap();
        assert!((logits(&m2, &ids) - &adapted).abs().max().double_value(&[]) < 1e-6);
        // Variable names follow PEFT.
        assert!(l2
            .vs
            .variables()
            .contains_key("model.layers.1.self_attn.v_proj.lora_A.weight"));

        // Another config's file is refused by name.
        let mut m3 = tiny();
        let mut l3 = Lora::attach(
            &mut m3,
            LoraConfig {
                targets: vec!["o_proj".into()],
                ..LoraConfig::default()
            },
            0,
        )
        .unwrap();
        let e = l3.load(&path).unwrap_err().to_string();
        assert!(
            e.contains("o_proj.lora_A.weight") && e.contains("lora.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn a_has_the_documented_init_and_bad_configs_are_named() {
        let mut m = tiny();
        let cfg = LoraConfig {
            rank: 4,
            ..LoraConfig::default()
        };
        let lora = Lora::attach(&mut m, cfg, 1).unwrap();
        let a =
            lora.vs.variables()["model.layers.0.self_attn.q_proj.lora_A.weight"].shallow_clone();
        assert_eq!(a.size(), [4, 32]);
        let std = a.std(true).double_value(&[]);
        assert!((std - 0.5).abs() < 0.1, "A ~ N(0, 1/r): std {std}");
        let bad = LoraConfig {
            targets: vec!["qkv".into()],
            ..LoraConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lora.targets"));
        let bad = LoraConfig {
            dropout: 1.5,
            ..LoraConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lora.dropout"));
    }
}
