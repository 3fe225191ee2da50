//! Parity with HF transformers on tiny random LLaMA models (fixtures from `scripts/make_fixtures.py`):
//! MHA and GQA/MQA, tied and untied heads, llama3 and linear RoPE scaling, rope_theta != 10000, sharded
//! safetensors. Also batching with padding and KV-cache decode against full recompute.
use std::path::{Path, PathBuf};

use qtale_model::config::HfConfig;
use qtale_model::load::load_hf_weights;
use qtale_model::{KvCache, Llama};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Padded {
    input_ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
    logits: Vec<Vec<Vec<f64>>>,
}

#[derive(Deserialize)]
struct Greedy {
    prompt: Vec<i64>,
    new_tokens: Vec<i64>,
}

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Vec<i64>>,
    logits: Vec<Vec<Vec<f64>>>,
    last_hidden: Vec<Vec<Vec<f64>>>,
    padded: Padded,
    greedy: Greedy,
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

fn load(name: &str) -> (Llama, Expected) {
    let dir = fixture_dir(name);
    let cfg_path = dir.join("config.json");
    let cfg = HfConfig::from_file(&cfg_path)
        .unwrap()
        .resolve(&cfg_path)
        .unwrap();
    let model = load_hf_weights(&dir, cfg, Device::Cpu, Kind::Float).unwrap();
    let exp: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (model, exp)
}

fn to_tensor(v: &[Vec<f64>]) -> Tensor {
    let flat: Vec<f32> = v.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_slice(&flat).view([v.len() as i64, -1])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check_model(name: &str) {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let (model, exp) = load(name);
    for (i, prompt) in exp.prompts.iter().enumerate() {
        let ids = Tensor::from_slice(prompt).view([1, -1]);
        let out = model.forward(&ids, None).unwrap();
        let d = max_abs_diff(&out.logits.squeeze_dim(0), &to_tensor(&exp.logits[i]));
        assert!(d < TOL, "{name} prompt {i}: logits differ from HF by {d}");
        let d = max_abs_diff(&out.hidden.squeeze_dim(0), &to_tensor(&exp.last_hidden[i]));
        assert!(
            d < TOL,
            "{name} prompt {i}: final hidden differs from HF by {d}"
        );
    }

    // HF's batched forward with right padding: compare the real positions.
    let p = &exp.padded;
    let ids = Tensor::from_slice2(&p.input_ids);
    let mask = Tensor::from_slice2(&p.attention_mask);
    let out = model.forward(&ids, Some(&mask)).unwrap();
    for (b, row) in p.attention_mask.iter().enumerate() {
        let n = row.iter().filter(|&&m| m == 1).count();
        let got = out.logits.get(b as i64).narrow(0, 0, n as i64);
        let want = to_tensor(&p.logits[b][..n]);
        let d = max_abs_diff(&got, &want);
        assert!(
            d < TOL,
            "{name} padded row {b}: logits differ from HF by {d}"
        );
    }

    let got = model
        .generate_greedy(&exp.greedy.prompt, exp.greedy.new_tokens.len(), None)
        .unwrap();
    assert_eq!(
        got, exp.greedy.new_tokens,
        "{name}: greedy generation differs from HF generate"
    );
}

#[test]
fn mha_untied_matches_hf() {
    check_model("mha_untied");
}

#[test]
fn gqa_tied_matches_hf() {
    check_model("gqa_tied");
}

#[test]
fn mqa_llama3_rope_matches_hf() {
    check_model("gqa_llama3");
}

#[test]
fn linear_rope_matches_hf() {
    check_model("linear_rope");
}

#[test]
fn sharded_checkpoint_matches_hf() {
    let dir = fixture_dir("sharded");
    assert!(
        !dir.join("model.safetensors").exists(),
        "the sharded fixture must not have a single file"
    );
    assert!(dir.join("model.safetensors.index.json").exists());
    check_model("sharded");
}

/// Left and right padding in one batch give the same logits as each sequence alone.
#[test]
fn batched_with_padding_equals_unbatched() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let (model, exp) = load("gqa_tied");
    let a = &exp.prompts[2]; // 12 tokens
    let b = &exp.prompts[1]; // 5 tokens
    let alone = |p: &Vec<i64>| {
        model
            .forward(&Tensor::from_slice(p).view([1, -1]), None)
            .unwrap()
            .logits
            .squeeze_dim(0)
    };
    let (la, lb) = (alone(a), alone(b));
    let pad = a.len() - b.len();
    // Row 0: `a`; row 1: `b` right-padded; row 2: `b` left-padded.
    let mut right = b.clone();
    right.extend(std::iter::repeat_n(7, pad));
    let mut left = vec![3; pad];
    left.extend(b.iter());
    let ids = Tensor::from_slice2(&[a.clone(), right, left]);
    let ones = vec![1i64; a.len()];
    let mut mr = vec![1i64; b.len()];
    mr.extend(std::iter::repeat_n(0, pad));
    let mut ml = vec![0i64; pad];
    ml.extend(std::iter::repeat_n(1, b.len()));
    let mask = Tensor::from_slice2(&[ones, mr, ml]);
    let out = model.forward(&ids, Some(&mask)).unwrap().logits;
    let n = b.len() as i64;
    assert!(max_abs_diff(&out.get(0), &la) < 1e-5);
    assert!(max_abs_diff(&out.get(1).narrow(0, 0, n), &lb) < 1e-5);
    assert!(max_abs_diff(&out.get(2).narrow(0, pad as i64, n), &lb) < 1e-5);
}

/// Prefill then token-by-token decode with the KV cache equals one full forward, also batched with
/// left padding.
#[test]
fn kv_cache_decode_equals_full_recompute() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let (model, exp) = load("gqa_llama3");
    let seq = &exp.prompts[2];
    let full = model
        .forward(&Tensor::from_slice(seq).view([1, -1]), None)
        .unwrap()
        .logits
        .squeeze_dim(0);
    let mut cache = KvCache::new(model.layers.len());
    let prefill = 5;
    let out = model
        .forward_cached(
            &Tensor::from_slice(&seq[..prefill]).view([1, -1]),
            None,
            &mut cache,
        )
        .unwrap();
    assert!(
        max_abs_diff(
            &out.logits.squeeze_dim(0),
            &full.narrow(0, 0, prefill as i64)
        ) < 1e-5
    );
    for (t, &tok) in seq.iter().enumerate().skip(prefill) {
        let out = model
            .forward_cached(&Tensor::from_slice(&[tok]).view([1, 1]), None, &mut cache)
            .unwrap();
        let d = max_abs_diff(
            &out.logits.squeeze_dim(0).squeeze_dim(0),
            &full.get(t as i64),
        );
        assert!(d < 1e-5, "decode step {t}: {d}");
    }
    assert_eq!(cache.layers[0].len(), seq.len() as i64);

    // Batched decode: row 1 is a shorter prompt, left-padded.
    let short = &exp.prompts[1];
    let pad = prefill - short.len().min(prefill);
    let short_prefill: Vec<i64> = short.iter().take(prefill - pad).cloned().collect();
    let mut row1 = vec![0i64; pad];
    row1.extend(&short_prefill);
    let mut m1 = vec![0i64; pad];
    m1.extend(std::iter::repeat_n(1, short_prefill.len()));
    let ids = Tensor::from_slice2(&[seq[..prefill].to_vec(), row1]);
    let mask = Tensor::from_slice2(&[vec![1i64; prefill], m1]);
    let mut cache = KvCache::new(model.layers.len());
    model.forward_cached(&ids, Some(&mask), &mut cache).unwrap();
    // Feed row 0's next real token and a fixed continuation for row 1.
    let cont = 11i64;
    let step = model
        .forward_cached(
            &Tensor::from_slice2(&[vec![seq[prefill]], vec![cont]]),
            None,
            &mut cache,
        )
        .unwrap()
        .logits;
    assert!(max_abs_diff(&step.get(0).squeeze_dim(0), &full.get(prefill as i64)) < 1e-5);
    let mut alone = short_prefill.clone();
    alone.push(cont);
    let ref1 = model
        .forward(&Tensor::from_slice(&alone).view([1, -1]), None)
        .unwrap()
        .logits
        .squeeze_dim(0);
    assert!(
        max_abs_diff(
            &step.get(1).squeeze_dim(0),
            &ref1.get(alone.len() as i64 - 1)
        ) < 1e-5
    );
}
