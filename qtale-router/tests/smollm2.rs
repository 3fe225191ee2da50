//! The routed decoder on the real default model, SmolLM2-135M (GGUF from `scripts/setup.sh`): theta = 0
//! equals dense in prefill and decode, inference equals training's masked forward (batched, padded,
//! both KV policies), theta bisection reaches a requested ratio within 0.01 with a fixed random
//! router, and the router analysis produces consistent data.
//!
//! Without the asset these tests fail with a hint (`QTALE_SKIP_ASSET_TESTS=1` skips them).
mod common;

use common::*;
use qtale_model::model::{DenseLinear, Linear};
use qtale_model::{load_model, KvCache, LoadedModel, ModelSource};
use qtale_router::*;
use tch::{Device, Kind, Tensor};

const TEXT: &str = "The history of the bicycle begins in the early nineteenth century, when inventors in \
Germany and France built wooden machines that riders pushed along with their feet. Pedals arrived \
decades later, and by the end of the century the safety bicycle, with two wheels of equal size and a \
chain drive, had become a common sight in cities across Europe and North America.";

/// Loaded per test (0.7 s): the model is not `Sync`, so it cannot be shared through a static.
fn smollm2() -> Option<LoadedModel> {
    let p = gguf()?;
    Some(load_model(&ModelSource::Gguf(p), Device::Cpu, Kind::Float).unwrap())
}

fn text_ids(lm: &LoadedModel) -> Vec<i64> {
    lm.tokenizer
        .encode(TEXT, false)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&x| x as i64)
        .collect()
}

fn router(lm: &LoadedModel, c: &RoutingConfig) -> DllmRouter {
    DllmRouter::new(
        c,
        lm.model.config.hidden_size,
        lm.model.layers.len(),
        Device::Cpu,
        1234,
    )
    .unwrap()
}

#[test]
fn smollm2_theta_zero_equals_dense_prefill_and_decode() {
    tch::set_num_threads(1);
    let Some(lm) = smollm2() else { return };
    let lm = &lm;
    let _g = tch::no_grad_guard();
    let c = RoutingConfig::default();
    let r = router(lm, &c);
    let routed = RoutedLlama::with_theta(&lm.model, &r, c, 0.0).unwrap();
    let ids = text_ids(lm);
    let t = Tensor::from_slice(&ids[..40]).view([1, -1]);
    let dense = lm.model.forward(&t, None).unwrap();
    let out = routed
        .forward(&t, None, Mode::Infer, &ForwardOptions::default())
        .unwrap();
    let d = max_abs_diff(&out.logits, &dense.logits);
    assert!(d < 1e-5, "prefill differs from dense by {d}");
    let (mut rc, mut dc) = (KvCache::new(30), KvCache::new(30));
    let p = Tensor::from_slice(&ids[..32]).view([1, -1]);
    routed
        .forward_cached(&p, None, &mut rc, Mode::Infer, &ForwardOptions::default())
        .unwrap();
    lm.model.forward_cached(&p, None, &mut dc).unwrap();
    for s in 32..36 {
        let x = Tensor::from_slice(&ids[s..s + 1]).view([1, 1]);
        let a = routed
            .forward_cached(&x, None, &mut rc, Mode::Infer, &ForwardOptions::default())
            .unwrap();
        let b = lm.model.forward_cached(&x, None, &mut dc).unwrap();
        let d = max_abs_diff(&a.logits, &b.logits);
        assert!(d < 1e-5, "decode step {s} differs from dense by {d}");
    }
}

/// Inference (gather/scatter) against training's masked forward with the same decisions, on two rows
/// (24 tokens, and 20 tokens left-padded by 4), at a theta that skips about half the routed layers.
/// Returns the max |logit difference| per KV policy.
fn infer_vs_train(lm: &LoadedModel) -> Vec<f64> {
    let _g = tch::no_grad_guard();
    let ids = text_ids(lm);
    let mut rows = ids[..24].to_vec();
    rows.extend(std::iter::repeat_n(0, 4));
    rows.extend_from_slice(&ids[30..50]);
    let t = Tensor::from_slice(&rows).view([2, 24]);
    let mut m = vec![1i64; 48];
    m[24..28].iter_mut().for_each(|x| *x = 0);
    let mask = Tensor::from_slice(&m).view([2, 24]);
    let mut diffs = Vec::new();
    for policy in [KvPolicy::Evict, KvPolicy::ComputeKv] {
        let c = RoutingConfig {
            kv_policy: policy,
            ..RoutingConfig::default()
        };
        let r = router(lm, &c);
        let routed = RoutedLlama::with_theta(&lm.model, &r, c, 0.87).unwrap();
        let inf = routed
            .forward(
                &t,
                Some(&mask),
                Mode::Infer,
                &ForwardOptions {
                    forced: None,
                    stats: true,
                    ..Default::default()
                },
            )
            .unwrap();
        let ratio = inf.stats.as_ref().unwrap().routed_ratio;
        assert!(
            (0.2..0.8).contains(&ratio),
            "{policy:?}: routed ratio {ratio} not mixed"
        );
        let tr = routed
            .forward(
                &t,
                Some(&mask),
                Mode::Train,
                &ForwardOptions {
                    forced: Some(&inf.exec),
                    stats: false,
                    ..Default::default()
                },
            )
            .unwrap();
        diffs.push(max_diff_valid(&inf.logits, &tr.logits, &mask.ne(0)));
    }
    diffs
}

/// The same model computing in f64 (the loader offers f32/bf16/f16 only; SmolLM2 has no biases).
fn to_f64(mut lm: LoadedModel) -> LoadedModel {
    let m = &mut lm.model;
    let dl = |l: &dyn Linear| -> Box<dyn Linear> {
        Box::new(DenseLinear {
            weight: l.weight().to_kind(Kind::Double),
            bias: None,
        })
    };
    m.embed_tokens = m.embed_tokens.to_kind(Kind::Double);
    m.lm_head = m.lm_head.as_ref().map(|w| w.to_kind(Kind::Double));
    m.norm.weight = m.norm.weight.to_kind(Kind::Double);
    for l in m.layers.iter_mut() {
        l.input_layernorm.weight = l.input_layernorm.weight.to_kind(Kind::Double);
        l.post_attention_layernorm.weight = l.post_attention_layernorm.weight.to_kind(Kind::Double);
        let a = &mut l.self_attn;
        a.q_proj = dl(a.q_proj.as_ref());
        a.k_proj = dl(a.k_proj.as_ref());
        a.v_proj = dl(a.v_proj.as_ref());
        a.o_proj = dl(a.o_proj.as_ref());
        let f = &mut l.mlp;
        f.gate_proj = dl(f.gate_proj.as_ref());
        f.up_proj = dl(f.up_proj.as_ref());
        f.down_proj = dl(f.down_proj.as_ref());
    }
    m.kind = Kind::Double;
    lm
}

/// In f32 the two paths differ only by summation order (packed `[B, T', d]` vs full `[B, T, d]`
/// matmuls): about 1e-4 on SmolLM2 logits of magnitude ~20, the same size as HF's own f32-vs-f64 gap
/// (9e-5, see qtale-model's fixture). The f64 run shows the paths are otherwise identical.
#[test]
fn smollm2_infer_equals_train_batched_padded() {
    tch::set_num_threads(1);
    let Some(lm) = smollm2() else { return };
    for (policy, d) in ["evict", "compute_kv"].iter().zip(infer_vs_train(&lm)) {
        eprintln!("f32 {policy}: max |logit diff| {d:.2e}");
        assert!(
            d < 3e-4,
            "f32 {policy}: inference differs from training by {d}"
        );
    }
    let lm64 = to_f64(lm);
    for (policy, d) in ["evict", "compute_kv"].iter().zip(infer_vs_train(&lm64)) {
        eprintln!("f64 {policy}: max |logit diff| {d:.2e}");
        assert!(
            d < 1e-9,
            "f64 {policy}: inference differs from training by {d}"
        );
    }
}

#[test]
fn smollm2_theta_bisection_reaches_target_ratio() {
    tch::set_num_threads(1);
    let Some(lm) = smollm2() else { return };
    let lm = &lm;
    let c = RoutingConfig::default();
    let r = router(lm, &c);
    let mut routed = RoutedLlama::new(&lm.model, &r, c).unwrap();
    let ids = text_ids(lm);
    let calib = [CalibBatch::from_sequences(&[ids[..40].to_vec(), ids[20..60].to_vec()]).unwrap()];
    for target in [0.75, 0.5] {
        let rep = calibrate_ratio(&mut routed, &calib, target, BisectOptions::default()).unwrap();
        let ch = rep.chosen.clone().unwrap();
        eprintln!(
            "target {target}: theta {:.4} ratio {:.4} flops {:.3} after {} evaluations",
            ch.theta,
            ch.ratio,
            ch.flops_fraction,
            rep.points.len()
        );
        assert!((ch.ratio - target).abs() <= 0.01, "{rep:?}");
        assert!(rep.converged);
        assert_eq!(routed.theta, ch.theta);
        assert!(ch.flops_fraction < 1.0 && ch.flops_fraction > 0.0);
    }
}

#[test]
fn smollm2_router_analysis() {
    tch::set_num_threads(1);
    let Some(lm) = smollm2() else { return };
    let lm = &lm;
    let c = RoutingConfig::default();
    let r = router(lm, &c);
    let routed = RoutedLlama::new(&lm.model, &r, c).unwrap();
    let ids = text_ids(lm);
    let calib = [CalibBatch::from_sequences(&[ids[..40].to_vec()]).unwrap()];
    let a = analyze(
        &routed,
        &calib,
        &AnalysisOptions {
            samples: 64,
            ..AnalysisOptions::default()
        },
    )
    .unwrap();
    assert_eq!(a.layers.len(), 28);
    for l in &a.layers {
        assert_eq!(l.tokens, 38);
        assert_eq!(l.counts.iter().sum::<u64>(), 38);
        assert_eq!(l.edges.len(), l.counts.len() + 1);
        assert!((0.0..=0.5).contains(&l.expected_flip_rate));
        assert!(
            (l.flip_rate - l.expected_flip_rate).abs() < 0.05,
            "layer {}: sampled {} vs expected {}",
            l.layer,
            l.flip_rate,
            l.expected_flip_rate
        );
        // The D-LLM init biases towards execution.
        assert!(l.mean_gap > 0.0);
    }
    serde_json::to_string(&a).unwrap();
}
