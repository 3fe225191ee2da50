//! Shared helpers: a tiny random LLaMA built in code (deeper than the HF fixtures, so several layers
//! are routed), the HF fixtures, and the SmolLM2 asset.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use qtale_model::config::{HfConfig, LlamaConfig, RopeScaling};
use qtale_model::load::load_hf_weights;
use qtale_model::model::{Attention, DecoderLayer, DenseLinear, Linear, Llama, Mlp, RmsNorm, Rope};
use qtale_router::{DllmRouter, RoutingConfig};
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

pub fn tiny_config(layers: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 96,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        max_position_embeddings: 256,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

fn rnd(rng: &mut rand::rngs::StdRng, shape: &[i64], scale: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.gen_range(-scale..scale) as f32)
        .collect();
    Tensor::from_slice(&v).view(shape)
}

fn lin(rng: &mut rand::rngs::StdRng, out: i64, inp: i64) -> Box<dyn Linear> {
    let bound = (3.0 / inp as f64).sqrt();
    Box::new(DenseLinear {
        weight: rnd(rng, &[out, inp], bound),
        bias: None,
    })
}

fn norm(rng: &mut rand::rngs::StdRng, d: i64, eps: f64) -> RmsNorm {
    RmsNorm {
        weight: rnd(rng, &[d], 0.3) + 1.0,
        eps,
    }
}

/// A random tiny LLaMA (f32, CPU) with `layers` blocks, deterministic in `seed`.
pub fn tiny_model(layers: usize, seed: u64) -> Llama {
    let cfg = tiny_config(layers);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (d, h, kv, hd, i, v) = (32i64, 4i64, 2i64, 8i64, 64i64, 96i64);
    let blocks = (0..layers)
        .map(|_| DecoderLayer {
            input_layernorm: norm(&mut rng, d, cfg.rms_norm_eps),
            self_attn: Attention {
                q_proj: lin(&mut rng, h * hd, d),
                k_proj: lin(&mut rng, kv * hd, d),
                v_proj: lin(&mut rng, kv * hd, d),
                o_proj: lin(&mut rng, d, h * hd),
                num_heads: h,
                num_kv_heads: kv,
                head_dim: hd,
            },
            post_attention_layernorm: norm(&mut rng, d, cfg.rms_norm_eps),
            mlp: Mlp {
                gate_proj: lin(&mut rng, i, d),
                up_proj: lin(&mut rng, i, d),
                down_proj: lin(&mut rng, d, i),
            },
        })
        .collect();
    let embed = rnd(&mut rng, &[v, d], 1.0);
    let final_norm = norm(&mut rng, d, cfg.rms_norm_eps);
    let rope = Rope::new(&cfg, Device::Cpu);
    Llama {
        config: cfg,
        embed_tokens: embed,
        layers: blocks,
        norm: final_norm,
        lm_head: None,
        rope,
        device: Device::Cpu,
        kind: Kind::Float,
    }
}

/// An HF fixture of qtale-model (tiny random LLaMA saved by transformers).
pub fn fixture_model(name: &str) -> Llama {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../qtale-model/tests/fixtures/tiny")
        .join(name);
    let cfg_path = dir.join("config.json");
    let cfg = HfConfig::from_file(&cfg_path)
        .unwrap()
        .resolve(&cfg_path)
        .unwrap();
    load_hf_weights(&dir, cfg, Device::Cpu, Kind::Float).unwrap()
}

/// A D-LLM router with random weights and its last bias set to `[0, 0]`, so that at theta = 0.5
/// decisions are mixed (the D-LLM init `[0.1, 2.0]` executes almost everything).
pub fn mixed_router(cfg: &RoutingConfig, model: &Llama, seed: u64) -> DllmRouter {
    let r = DllmRouter::new(
        cfg,
        model.config.hidden_size,
        model.layers.len(),
        Device::Cpu,
        seed,
    )
    .unwrap();
    for (name, mut v) in r.vs.variables() {
        if name.ends_with("fc2.bias") {
            tch::no_grad(|| {
                let _ = v.zero_();
            });
        }
        if name.ends_with("fc2.weight") {
            // Wider spread of gaps than the default init, so decisions differ across tokens.
            tch::no_grad(|| {
                let _ = v.g_mul_scalar_(4.0);
            });
        }
    }
    r
}

/// Random ids `[B, T]` in `3..vocab`, deterministic.
pub fn random_ids(b: i64, t: i64, vocab: i64, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<i64> = (0..b * t).map(|_| rng.gen_range(3..vocab)).collect();
    Tensor::from_slice(&v).view([b, t])
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Max |a - b| over the positions where `valid [B, T]` is true, for `[B, T, V]` tensors.
pub fn max_diff_valid(a: &Tensor, b: &Tensor, valid: &Tensor) -> f64 {
    let m = valid.unsqueeze(-1).to_kind(Kind::Float);
    ((a - b) * m).abs().max().double_value(&[])
}

/// The SmolLM2 GGUF, or `None` when the caller asked to skip asset tests.
pub fn gguf() -> Option<PathBuf> {
    qtale_model::load::test_asset_gguf()
}
