//! A tiny random LLaMA (4 layers, hidden 64) as an HF directory, with a word-level tokenizer over 64
//! words (vocab 64, no set-up assets) or with SmolLM2's tokenizer (vocab 49152, to score the real task
//! data), and training text in the 64 words: a model the binaries load in milliseconds.
#![allow(dead_code)]
use std::path::Path;

use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

pub const VOCAB: usize = 64;

/// Word `i` of the tokenizer (id `i`; id 0 is `<unk>`, 1 `<eos>`).
pub fn word(i: usize) -> String {
    match i {
        0 => "<unk>".into(),
        1 => "<eos>".into(),
        _ => format!("w{i}"),
    }
}

/// Where a tiny model's tokenizer comes from; it decides the vocabulary.
#[derive(Clone, Copy)]
pub enum TinyTokenizer<'a> {
    /// Word-level over [`word`] `0..VOCAB` (`<eos>` = 1, no BOS).
    Words,
    /// SmolLM2's tokenizer, read from the set-up's GGUF (49152 tokens, BOS 1, EOS 2).
    Smollm2(&'a Path),
}

/// The word-level tiny model (seed 11).
pub fn tiny_model_dir(dir: &Path) {
    write_tiny_model(dir, TinyTokenizer::Words);
}

/// A random LLaMA with 4 layers, hidden 64, GQA 4/2 and tied embeddings, over `tok`'s vocabulary, as
/// config.json + model.safetensors + tokenizer.json in `dir` (created).
pub fn write_tiny_model(dir: &Path, tok: TinyTokenizer) {
    std::fs::create_dir_all(dir).unwrap();
    let (vocab, seed, max_pos, special) = match tok {
        TinyTokenizer::Words => (
            VOCAB as i64,
            11,
            512,
            serde_json::json!({"eos_token_id": 1}),
        ),
        TinyTokenizer::Smollm2(_) => (
            49152,
            7,
            2048,
            serde_json::json!({"bos_token_id": 1, "eos_token_id": 2}),
        ),
    };
    let (d, ff, layers) = (64i64, 128i64, 4usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rnd = |shape: &[i64], s: f64| {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-s..s) as f32).collect();
        Tensor::from_slice(&v).view(shape)
    };
    let mut t: Vec<(String, Tensor)> = vec![
        ("model.embed_tokens.weight".into(), rnd(&[vocab, d], 0.5)),
        (
            "model.norm.weight".into(),
            Tensor::ones([d], (Kind::Float, Device::Cpu)),
        ),
    ];
    let b = (3.0 / d as f64).sqrt();
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, o, inp) in [
            ("self_attn.q_proj", 64, d),
            ("self_attn.k_proj", 32, d),
            ("self_attn.v_proj", 32, d),
            ("self_attn.o_proj", d, 64),
            ("mlp.gate_proj", ff, d),
            ("mlp.up_proj", ff, d),
            ("mlp.down_proj", d, ff),
        ] {
            t.push((format!("{p}.{n}.weight"), rnd(&[o, inp], b)));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.push((format!("{p}.{n}.weight"), rnd(&[d], 0.2) + 1.0));
        }
    }
    let refs: Vec<(&str, &Tensor)> = t.iter().map(|(n, x)| (n.as_str(), x)).collect();
    Tensor::write_safetensors(&refs, dir.join("model.safetensors")).unwrap();
    let mut cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "hidden_act": "silu"
    });
    for (k, v) in special.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    match tok {
        TinyTokenizer::Words => {
            let vocab_map: serde_json::Map<String, serde_json::Value> =
                (0..VOCAB).map(|i| (word(i), i.into())).collect();
            let tok = serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
                "post_processor": null, "decoder": null,
                "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "<unk>"}
            });
            std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        }
        TinyTokenizer::Smollm2(gguf) => {
            let g = qtale_model::gguf::GgufFile::open(gguf).unwrap();
            let tok = qtale_model::tokenizer::tokenizer_from_gguf(&g).unwrap();
            tok.save(dir.join("tokenizer.json"), false).unwrap();
        }
    }
}

/// `lines` JSONL lines of `{"text": ...}`: counting runs of words (predictable, so CE can fall).
pub fn training_jsonl(path: &Path, lines: usize) {
    let mut s = String::new();
    for i in 0..lines {
        let a = (i * 7919) % (VOCAB - 2);
        let words: Vec<String> = (0..40).map(|t| word(2 + (a + t) % (VOCAB - 2))).collect();
        s += &serde_json::json!({ "text": words.join(" ") }).to_string();
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}
