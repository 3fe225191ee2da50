//! Routed decoder on tiny models: theta = 0 equals dense, inference (real skipping) equals training's
//! masked forward with the same decisions (both KV policies, batched with padding), decode with cache
//! equals full recompute, hand-computed ratios/FLOPs/KV bytes, router save/load, baselines, gradients,
//! theta calibration rules.
mod common;

use common::*;
use qtale_model::decoder::{ExecSummary, FlopModel};
use qtale_model::{KvCache, Llama};
use qtale_router::*;
use tch::{Device, Kind, Tensor};

const EQ_TOL: f64 = 1e-4;
const DENSE_TOL: f64 = 1e-5;

fn cfg(start: usize, reserved: usize, policy: KvPolicy) -> RoutingConfig {
    RoutingConfig {
        start_layer: start,
        reserved_tokens: reserved,
        kv_policy: policy,
        hidden: 16,
        ..RoutingConfig::default()
    }
}

/// Three rows: full length, left-padded, right-padded.
fn padded_batch(t: i64, seed: u64) -> (Tensor, Tensor) {
    let ids = random_ids(3, t, 96, seed);
    let mut m = vec![1i64; (3 * t) as usize];
    for j in 0..3 {
        m[(t + j) as usize] = 0; // row 1: 3 left pads
        m[(2 * t + t - 1 - j) as usize] = 0; // row 2: 3 right pads
    }
    (ids, Tensor::from_slice(&m).view([3, t]))
}

fn stats_opts() -> ForwardOptions<'static> {
    ForwardOptions {
        forced: None,
        stats: true,
        ..Default::default()
    }
}

#[test]
fn config_defaults_serde_and_validation() {
    let c = RoutingConfig::default();
    assert_eq!(
        (
            c.start_layer,
            c.reserved_tokens,
            c.kv_policy,
            c.hidden,
            ForwardOptions::default().temperature
        ),
        (2, 2, KvPolicy::Evict, 512, 1.0)
    );
    let json = serde_json::to_string(&c).unwrap();
    assert!(json.contains("\"kv_policy\":\"evict\""), "{json}");
    assert_eq!(RoutingConfig::from_json(&json).unwrap(), c);
    let c2 = RoutingConfig::from_json(r#"{"kv_policy": "compute_kv", "start_layer": 3}"#).unwrap();
    assert_eq!((c2.kv_policy, c2.start_layer), (KvPolicy::ComputeKv, 3));
    for (json, field) in [
        // Inference settings are not part of the (training-time) routing config.
        (r#"{"theta": 0.5}"#, "theta"),
        (r#"{"hidden": 0}"#, "hidden"),
        (r#"{"router_norm_eps": -1}"#, "router_norm_eps"),
        (r#"{"thetaa": 0.5}"#, "thetaa"),
        (r#"{"kv_policy": "drop"}"#, "drop"),
    ] {
        let e = RoutingConfig::from_json(json).unwrap_err().to_string();
        assert!(e.contains(field), "{json}: {e}");
    }
    let e = RoutingConfig {
        start_layer: 7,
        ..RoutingConfig::default()
    }
    .validate_for(6)
    .unwrap_err()
    .to_string();
    assert!(e.contains("start_layer"), "{e}");
}

fn check_theta_zero_dense(model: &Llama, c: RoutingConfig) {
    let _g = tch::no_grad_guard();
    let router = DllmRouter::new(
        &c,
        model.config.hidden_size,
        model.layers.len(),
        Device::Cpu,
        3,
    )
    .unwrap();
    let routed = RoutedLlama::with_theta(model, &router, c, 0.0).unwrap();
    let (ids, mask) = padded_batch(10, 11);
    let dense = model.forward(&ids, Some(&mask)).unwrap();
    let out = routed
        .forward(&ids, Some(&mask), Mode::Infer, &stats_opts())
        .unwrap();
    let valid = mask.ne(0);
    let d = max_diff_valid(&out.logits, &dense.logits, &valid);
    assert!(d < DENSE_TOL, "theta=0 prefill differs from dense by {d}");
    let st = out.stats.unwrap();
    assert_eq!(st.ratio, 1.0);
    // Decode: prefill 6 tokens then 4 single steps, against the dense model's own cache.
    let mut rc = KvCache::new(model.layers.len());
    let mut dc = KvCache::new(model.layers.len());
    let p = 6;
    let (a, b) = (
        routed
            .forward_cached(
                &ids.narrow(1, 0, p),
                Some(&mask.narrow(1, 0, p)),
                &mut rc,
                Mode::Infer,
                &ForwardOptions::default(),
            )
            .unwrap(),
        model
            .forward_cached(&ids.narrow(1, 0, p), Some(&mask.narrow(1, 0, p)), &mut dc)
            .unwrap(),
    );
    let d = max_diff_valid(&a.logits, &b.logits, &mask.narrow(1, 0, p).ne(0));
    assert!(d < DENSE_TOL, "theta=0 prefill (cached) differs by {d}");
    for s in 0..4 {
        let step = ids.narrow(1, p + s, 1);
        let a = routed
            .forward_cached(
                &step,
                None,
                &mut rc,
                Mode::Infer,
                &ForwardOptions::default(),
            )
            .unwrap();
        let b = model.forward_cached(&step, None, &mut dc).unwrap();
        let d = max_abs_diff(&a.logits, &b.logits);
        assert!(d < DENSE_TOL, "theta=0 decode step {s} differs by {d}");
    }
}

#[test]
fn theta_zero_equals_dense_prefill_and_decode() {
    tch::set_num_threads(1);
    let model = tiny_model(6, 1);
    check_theta_zero_dense(&model, cfg(2, 2, KvPolicy::Evict));
    check_theta_zero_dense(&model, cfg(1, 0, KvPolicy::ComputeKv));
    // An HF fixture (2 layers, GQA, tied head): route both layers.
    let fx = fixture_model("gqa_tied");
    check_theta_zero_dense(&fx, cfg(0, 0, KvPolicy::Evict));
    let fx = fixture_model("mha_untied");
    check_theta_zero_dense(&fx, cfg(0, 1, KvPolicy::Evict));
}

fn check_infer_equals_train(policy: KvPolicy) {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let model = tiny_model(6, 2);
    let c = cfg(1, 2, policy);
    let router = mixed_router(&c, &model, 5);
    let routed = RoutedLlama::new(&model, &router, c).unwrap();
    let (ids, mask) = padded_batch(12, 7);
    let inf = routed
        .forward(&ids, Some(&mask), Mode::Infer, &stats_opts())
        .unwrap();
    let st = inf.stats.as_ref().unwrap();
    // Decisions are really mixed.
    let routed_ratio = st.routed_ratio;
    assert!(
        (0.2..0.8).contains(&routed_ratio),
        "routed ratio {routed_ratio} is not mixed"
    );
    let tr = routed
        .forward(
            &ids,
            Some(&mask),
            Mode::Train,
            &ForwardOptions {
                forced: Some(&inf.exec),
                stats: true,
                ..Default::default()
            },
        )
        .unwrap();
    let valid = mask.ne(0);
    assert!(inf.exec.equal(&tr.exec));
    let d = max_diff_valid(&inf.logits, &tr.logits, &valid);
    assert!(
        d < EQ_TOL,
        "{policy:?}: inference differs from training by {d}"
    );
    // The routers saw the same hidden states, so their own decisions agree too.
    let inf2 = routed
        .forward(&ids, Some(&mask), Mode::Infer, &ForwardOptions::default())
        .unwrap();
    assert!(inf2.exec.equal(&inf.exec));
    // Same statistics from both modes (visible keys come from the caches).
    let st2 = tr.stats.unwrap();
    assert_eq!(st.flops, st2.flops);
    assert_eq!(st.kv_bytes, st2.kv_bytes);
    assert!(st.flops_fraction() < 1.0);
}

#[test]
fn infer_equals_train_masked_evict() {
    check_infer_equals_train(KvPolicy::Evict);
}

#[test]
fn infer_equals_train_masked_compute_kv() {
    check_infer_equals_train(KvPolicy::ComputeKv);
}

fn check_decode_equals_recompute(policy: KvPolicy) {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let model = tiny_model(6, 3);
    let c = cfg(1, 2, policy);
    let router = mixed_router(&c, &model, 9);
    let routed = RoutedLlama::new(&model, &router, c).unwrap();
    let (p, steps) = (8i64, 6i64);
    let ids = random_ids(2, p + steps, 96, 13);
    let mut m = vec![1i64; (2 * (p + steps)) as usize];
    m[(p + steps) as usize] = 0; // row 1 left-padded by 2
    m[(p + steps + 1) as usize] = 0;
    let mask = Tensor::from_slice(&m).view([2, p + steps]);
    let full = routed
        .forward(&ids, Some(&mask), Mode::Infer, &ForwardOptions::default())
        .unwrap();
    let mut cache = KvCache::new(model.layers.len());
    let pre = routed
        .forward_cached(
            &ids.narrow(1, 0, p),
            Some(&mask.narrow(1, 0, p)),
            &mut cache,
            Mode::Infer,
            &ForwardOptions::default(),
        )
        .unwrap();
    let d = max_diff_valid(
        &pre.logits,
        &full.logits.narrow(1, 0, p),
        &mask.narrow(1, 0, p).ne(0),
    );
    assert!(
        d < EQ_TOL,
        "{policy:?} prefill differs from recompute by {d}"
    );
    assert!(pre.exec.equal(&full.exec.narrow(1, 0, p)));
    let mut skipped_somewhere = false;
    for s in 0..steps {
        let o = routed
            .forward_cached(
                &ids.narrow(1, p + s, 1),
                None,
                &mut cache,
                Mode::Infer,
                &ForwardOptions::default(),
            )
            .unwrap();
        let d = max_abs_diff(&o.logits, &full.logits.narrow(1, p + s, 1));
        assert!(d < EQ_TOL, "{policy:?} decode step {s} differs by {d}");
        let e = full.exec.narrow(1, p + s, 1);
        assert!(
            o.exec.equal(&e),
            "{policy:?} decode step {s}: decisions differ"
        );
        skipped_somewhere |= !bool::try_from(e.all()).unwrap();
    }
    assert!(skipped_somewhere, "decode never skipped: test is vacuous");
    // Per-layer caches hold different numbers of keys.
    let lens: Vec<i64> = cache
        .layers
        .iter()
        .map(|l| {
            l.valid
                .as_ref()
                .unwrap()
                .to_kind(Kind::Int64)
                .sum(Kind::Int64)
                .int64_value(&[])
        })
        .collect();
    if policy == KvPolicy::Evict {
        assert!(lens.iter().any(|&n| n < lens[0]), "{lens:?}");
    } else {
        assert!(lens.iter().all(|&n| n == lens[0]), "{lens:?}");
    }
}

#[test]
fn decode_with_cache_equals_recompute_evict() {
    check_decode_equals_recompute(KvPolicy::Evict);
}

#[test]
fn decode_with_cache_equals_recompute_compute_kv() {
    check_decode_equals_recompute(KvPolicy::ComputeKv);
}

/// 3 layers (layer 0 always runs), 1 reserved token, one row of 4 tokens, decisions forced:
/// layer 1 runs tokens {0, 1, 3}, layer 2 runs {0, 2}.
fn hand_case(policy: KvPolicy, router: &dyn Router) -> ExecStats {
    let _g = tch::no_grad_guard();
    let model = tiny_model(3, 4);
    let c = cfg(1, 1, policy);
    let routed = RoutedLlama::new(&model, router, c).unwrap();
    let ids = random_ids(1, 4, 96, 1);
    #[rustfmt::skip]
    let forced = Tensor::from_slice(&[
        true, true, true,
        true, true, false,
        true, false, true,
        true, true, false,
    ]).view([1, 4, 3]);
    let out = routed
        .forward(
            &ids,
            None,
            Mode::Infer,
            &ForwardOptions {
                forced: Some(&forced),
                stats: true,
                ..Default::default()
            },
        )
        .unwrap();
    out.stats.unwrap()
}

#[test]
fn ratio_flops_and_kv_bytes_hand_computed() {
    tch::set_num_threads(1);
    // d=32, H=4, KV=2, hd=8, I=64, V=96: q/k/v/o = 2*32*32 + 2*2*32*16 + 2*32*32 = 6144; MLP
    // 6*32*64 = 12288; attention 4*4*8 = 128 per visible key; LM head 2*32*96 = 6144; K/V only 2048.
    let fm = FlopModel::new(&tiny_config(3));
    assert_eq!(
        (
            fm.attn_proj,
            fm.mlp,
            fm.attn_per_key,
            fm.lm_head,
            fm.kv_proj
        ),
        (6144.0, 12288.0, 128.0, 6144.0, 2048.0)
    );
    let st = hand_case(KvPolicy::Evict, &DenseRouter);
    let b = 18432.0; // projections + MLP of one executed layer
                     // Visible keys (evict): layer 0: t+1; layer 1 holds {0,1,3}: token 0 sees 1, 1 sees 2, 3 sees 3;
                     // layer 2 holds {0,2}: token 0 sees 1, 2 sees 2.
    let want = [
        3.0 * b + 128.0 * (1.0 + 1.0 + 1.0) + 6144.0,
        2.0 * b + 128.0 * (2.0 + 2.0) + 6144.0,
        2.0 * b + 128.0 * (3.0 + 2.0) + 6144.0,
        2.0 * b + 128.0 * (4.0 + 3.0) + 6144.0,
    ];
    assert_eq!(want, [61824.0, 43520.0, 43648.0, 43904.0]);
    assert_eq!(st.flops[0], want.to_vec());
    let dense: Vec<f64> = (0..4)
        .map(|t| 3.0 * b + 384.0 * (t as f64 + 1.0) + 6144.0)
        .collect();
    assert_eq!(st.dense_flops[0], dense);
    assert_eq!(st.flops_total, want.iter().sum::<f64>());
    assert_eq!(st.dense_flops_total, 249600.0);
    // Ratios: token 0 is reserved (ratio 1, not counted); tokens 1..3 execute 2 of 3 layers.
    assert_eq!(st.token_ratio[0][0], Some(1.0));
    for t in 1..4 {
        assert!((st.token_ratio[0][t].unwrap() - 2.0 / 3.0).abs() < 1e-12);
    }
    assert_eq!(st.counted_tokens, 3);
    assert!((st.ratio - 2.0 / 3.0).abs() < 1e-12);
    let lr = [1.0, 2.0 / 3.0, 1.0 / 3.0];
    for (a, b) in st.layer_ratio.iter().zip(lr) {
        assert!((a - b).abs() < 1e-12, "{:?}", st.layer_ratio);
    }
    assert!((st.routed_ratio - 0.5).abs() < 1e-12);
    // K/V: 2 (k, v) * 2 heads * 8 * 4 bytes = 128 per key; keys held 4 + 3 + 2.
    assert_eq!(st.kv_bytes, 9.0 * 128.0);
    assert_eq!(st.dense_kv_bytes, 12.0 * 128.0);

    // compute_kv: skipped tokens pay the K/V projections (2048) and stay visible.
    let st = hand_case(KvPolicy::ComputeKv, &DenseRouter);
    let want = [
        61824.0,
        2.0 * b + 128.0 * (2.0 + 2.0) + 2048.0 + 6144.0,
        2.0 * b + 128.0 * (3.0 + 3.0) + 2048.0 + 6144.0,
        2.0 * b + 128.0 * (4.0 + 4.0) + 2048.0 + 6144.0,
    ];
    assert_eq!(st.flops[0], want.to_vec());
    assert_eq!(st.kv_bytes, 12.0 * 128.0);

    // The D-LLM router costs 2*d*h + 2*h*2 = 2*32*16 + 64 = 1088 per token per routed layer.
    let c = cfg(1, 1, KvPolicy::Evict);
    let r = DllmRouter::new(&c, 32, 3, Device::Cpu, 0).unwrap();
    assert_eq!(r.flops_per_token(1), 1088.0);
    let st2 = hand_case(KvPolicy::Evict, &r);
    assert_eq!(st2.flops_total - 192896.0, 4.0 * 2.0 * 1088.0);

    // Summaries add up.
    let mut s = st2.summary();
    s.merge(&st2.summary());
    assert_eq!((s.counted_tokens, s.forwards), (6, 2));
    assert!((s.ratio() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(s.flops, 2.0 * st2.flops_total);
    serde_json::to_string(&st2).unwrap();
}

#[test]
fn train_mode_gradients_reach_router_and_ratio_is_differentiable() {
    tch::set_num_threads(1);
    let model = tiny_model(4, 5);
    let c = cfg(1, 2, KvPolicy::Evict);
    let router = mixed_router(&c, &model, 3);
    let routed = RoutedLlama::new(&model, &router, c).unwrap();
    let (ids, mask) = padded_batch(10, 3);
    let out = routed
        .forward(&ids, Some(&mask), Mode::Train, &ForwardOptions::default())
        .unwrap();
    // Hard forward values.
    for g in out.gates.iter().flatten() {
        let g = g.detach();
        assert!(bool::try_from(g.eq(0.0).logical_or(&g.eq(1.0)).all()).unwrap());
    }
    let m = out.ratio_mask().to_kind(Kind::Float);
    let ratio_loss = ((out.token_ratio() - 0.5).abs() * &m).sum(Kind::Float) / m.sum(Kind::Float);
    let loss = out.logits.log_softmax(-1, Kind::Float).mean(Kind::Float) + ratio_loss;
    loss.backward();
    let mut nonzero = 0;
    for (name, v) in router.vs.variables() {
        let g = v.grad();
        assert!(g.defined(), "{name} has no grad");
        if g.abs().sum(Kind::Float).double_value(&[]) > 0.0 {
            nonzero += 1;
        }
    }
    assert!(
        nonzero >= router.vs.variables().len() / 2,
        "too few router grads"
    );
}

#[test]
fn router_save_load_roundtrip_and_errors() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let model = tiny_model(4, 6);
    let c = cfg(1, 2, KvPolicy::Evict);
    let router = mixed_router(&c, &model, 8);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.safetensors");
    router.save(&path).unwrap();
    let loaded = DllmRouter::load(&path, Device::Cpu).unwrap();
    assert_eq!(
        (loaded.hidden, loaded.start_layer, loaded.num_layers()),
        (16, 1, 4)
    );
    let x = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu));
    let pos = Tensor::arange(5, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .repeat([2, 1]);
    for l in 1..4 {
        assert_eq!(
            max_abs_diff(&router.logits(l, &x, &pos), &loaded.logits(l, &x, &pos)),
            0.0
        );
    }
    // Rewrite the file with a tensor missing / extra / of the wrong shape.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone();
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let write = |name: &str, ts: Vec<(String, safetensors::tensor::TensorView)>| {
        let p = dir.path().join(name);
        std::fs::write(&p, safetensors::serialize(ts, &meta).unwrap()).unwrap();
        p
    };
    let missing: Vec<_> = tensors
        .iter()
        .filter(|(n, _)| n != "layers.2.fc1.bias")
        .cloned()
        .collect();
    let e = DllmRouter::load(&write("missing.safetensors", missing), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing") && e.contains("layers.2.fc1.bias"),
        "{e}"
    );
    let mut extra = tensors.clone();
    extra.push(("layers.0.fc1.bias".into(), tensors[0].1.clone()));
    let e = DllmRouter::load(&write("extra.safetensors", extra), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unexpected") && e.contains("layers.0.fc1.bias"),
        "{e}"
    );
    let norm = tensors
        .iter()
        .find(|(n, _)| n == "layers.1.norm.weight")
        .unwrap()
        .1
        .clone();
    let shaped: Vec<_> = tensors
        .iter()
        .map(|(n, v)| {
            if n == "layers.1.fc2.bias" {
                (n.clone(), norm.clone())
            } else {
                (n.clone(), v.clone())
            }
        })
        .collect();
    let e = DllmRouter::load(&write("shape.safetensors", shaped), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layers.1.fc2.bias") && e.contains("shape"),
        "{e}"
    );
    let e = DllmRouter::load(&dir.path().join("nope.safetensors"), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
    std::fs::write(
        dir.path().join("junk.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let e = DllmRouter::load(&dir.path().join("junk.safetensors"), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.safetensors"), "{e}");
}

#[test]
fn baselines_random_and_static() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let model = tiny_model(6, 7);
    let c = cfg(2, 2, KvPolicy::Evict);
    // Random at p = 0.3: the routed-layer ratio over 3 x 40 tokens is near 0.3.
    let r = RandomRouter::new(0.3, 42);
    let routed = RoutedLlama::new(&model, r, c.clone()).unwrap();
    let ids = random_ids(3, 40, 96, 4);
    let st = routed
        .forward(&ids, None, Mode::Infer, &stats_opts())
        .unwrap()
        .stats
        .unwrap();
    assert!((st.routed_ratio - 0.3).abs() < 0.05, "{}", st.routed_ratio);
    // Static removal by similarity on calibration ids: 2 layers among 2..6, the most similar ones.
    let calib = [CalibBatch::from_sequences(&[(3..40).collect(), (10..30).collect()]).unwrap()];
    let (sr, sims) = StaticRouter::by_similarity(&model, &calib, 2, 2).unwrap();
    assert_eq!(sr.skipped.len(), 2);
    assert!(sr.skipped.iter().all(|&l| l >= 2));
    let min_skipped = sr
        .skipped
        .iter()
        .map(|&l| sims[l])
        .fold(f64::INFINITY, f64::min);
    for l in 2..6 {
        if !sr.skipped.contains(&l) {
            assert!(sims[l] <= min_skipped, "{sims:?} {:?}", sr.skipped);
        }
    }
    let routed = RoutedLlama::new(&model, &sr, c).unwrap();
    let out = routed
        .forward(&ids, None, Mode::Infer, &stats_opts())
        .unwrap();
    let st = out.stats.unwrap();
    for l in 0..6 {
        let want = if sr.skipped.contains(&l) { 0.0 } else { 1.0 };
        assert_eq!(st.layer_ratio[l], want, "layer {l}");
    }
    assert!((st.ratio - 4.0 / 6.0).abs() < 1e-12);
}

#[test]
fn theta_grid_rule_with_synthetic_score() {
    tch::set_num_threads(1);
    let model = tiny_model(6, 8);
    let c = cfg(1, 2, KvPolicy::Evict);
    let router = mixed_router(&c, &model, 10);
    let mut routed = RoutedLlama::new(&model, &router, c).unwrap();
    let calib = [CalibBatch::from_sequences(&[(3..35).collect(), (20..60).collect()]).unwrap()];
    // Synthetic score: "accuracy" falls linearly once the ratio drops below 0.75.
    let score_of = |r: f64| 0.9 - 0.5 * (0.75 - r).max(0.0);
    let grid = [0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95];
    let calib_ref = &calib;
    let rep = calibrate_grid(&mut routed, &calib, &grid, 0.9, 0.05, true, |rl| {
        let _g = tch::no_grad_guard();
        let mut s = ExecSummary::default();
        for b in calib_ref {
            let o = rl.forward(&b.ids, b.mask.as_ref(), Mode::Infer, &stats_opts())?;
            s.merge(&o.stats.unwrap().summary());
        }
        Ok(score_of(s.ratio()))
    })
    .unwrap();
    assert_eq!(rep.points.len(), grid.len());
    // The ratio falls as theta rises, from 1 at theta = 0.
    assert_eq!(rep.points[0].ratio, 1.0);
    let best = rep
        .points
        .iter()
        .filter(|p| p.ratio >= 0.65 - 1e-12)
        .min_by(|a, b| a.ratio.total_cmp(&b.ratio))
        .unwrap();
    let chosen = rep.chosen.clone().unwrap();
    assert_eq!(chosen.theta, best.theta);
    assert!(rep.converged && chosen.ratio < 1.0, "{rep:?}");
    assert_eq!(routed.theta, chosen.theta);
    // Nothing qualifies: no choice, theta unchanged.
    let before = routed.theta;
    let rep = calibrate_grid(&mut routed, &calib, &grid, 2.0, 0.01, true, |_| Ok(0.0)).unwrap();
    assert!(rep.chosen.is_none() && !rep.converged);
    assert_eq!(routed.theta, before);
    // Bisection on the tiny model too (coarse: few tokens).
    let rep = calibrate_ratio(
        &mut routed,
        &calib,
        0.7,
        BisectOptions {
            tol: 0.03,
            max_iter: 30,
        },
    )
    .unwrap();
    assert!(rep.converged, "{rep:?}");
}

#[test]
fn hard_gumbel_samples_at_softmax_rate() {
    // P(hard sample = execute) = softmax(logits)[1] whatever the temperature; forward value is 0/1.
    let _g = tch::no_grad_guard();
    let n = 40_000;
    let logits = Tensor::from_slice(&[0.0f32, 1.0])
        .view([1, 1, 2])
        .repeat([1, n, 1]);
    for tau in [0.5, 1.0, 2.0] {
        let (hard, st) = hard_gumbel(&logits, tau);
        let rate = hard
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let want = 1.0 / (1.0 + (-1.0f64).exp());
        assert!(
            (rate - want).abs() < 0.015,
            "tau {tau}: rate {rate} vs {want}"
        );
        assert_eq!(max_abs_diff(&st, &hard.to_kind(Kind::Float)), 0.0);
    }
}

#[test]
fn bad_inputs_give_errors() {
    let _g = tch::no_grad_guard();
    let model = tiny_model(3, 9);
    let c = cfg(1, 1, KvPolicy::Evict);
    let routed = RoutedLlama::new(&model, DenseRouter, c.clone()).unwrap();
    let ids = random_ids(2, 5, 96, 0);
    let bad = Tensor::ones([2, 5, 2], (Kind::Bool, Device::Cpu));
    let e = routed
        .forward(
            &ids,
            None,
            Mode::Infer,
            &ForwardOptions {
                forced: Some(&bad),
                stats: false,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("forced decisions"), "{e}");
    let e = routed
        .forward(
            &(ids.shallow_clone() + 100),
            None,
            Mode::Infer,
            &ForwardOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
    let e = routed
        .forward(
            &ids,
            Some(&Tensor::ones([2, 4], (Kind::Int64, Device::Cpu))),
            Mode::Infer,
            &ForwardOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention mask"), "{e}");
    let mut cache = KvCache::new(2);
    let e = routed
        .forward_cached(
            &ids,
            None,
            &mut cache,
            Mode::Infer,
            &ForwardOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("KV cache"), "{e}");
    let e = RoutedLlama::new(
        &model,
        DenseRouter,
        RoutingConfig {
            start_layer: 4,
            ..c
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("start_layer"), "{e}");
    // Right-padded calibration batches.
    let b = CalibBatch::from_sequences(&[vec![5, 6, 7], vec![8]]).unwrap();
    assert_eq!(b.ids.size(), [2, 3]);
    let m: Vec<i64> = Vec::try_from(b.mask.unwrap().reshape([-1])).unwrap();
    assert_eq!(m, [1, 1, 1, 1, 0, 0]);
    assert!(CalibBatch::from_sequences(&[]).is_err());
}

/// The head-less forward (what scoring and generation use) is the full forward without its head: same
/// hidden states, statistics and caches through a prefill and decode steps with real skipping, and the
/// head applied to its hidden states gives the full forward's logits.
#[test]
fn hidden_only_forward_equals_full_forward() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let model = tiny_model(6, 3);
    let c = cfg(1, 2, KvPolicy::Evict);
    let router = mixed_router(&c, &model, 9);
    let routed = RoutedLlama::new(&model, &router, c).unwrap();
    let (ids, mask) = padded_batch(10, 21);
    let (mut ca, mut cb) = (
        KvCache::new(model.layers.len()),
        KvCache::new(model.layers.len()),
    );
    let mut skipped = 0.0;
    for (start, len) in [(0i64, 7i64), (7, 1), (8, 1), (9, 1)] {
        let (x, m) = (ids.narrow(1, start, len), mask.narrow(1, start, len));
        let full = routed
            .forward_cached(&x, Some(&m), &mut ca, Mode::Infer, &stats_opts())
            .unwrap();
        let h = routed
            .forward_hidden_cached(&x, Some(&m), &mut cb, Mode::Infer, &stats_opts())
            .unwrap();
        assert_eq!(max_abs_diff(&full.hidden, &h.hidden), 0.0);
        assert_eq!(max_abs_diff(&model.lm_logits(&h.hidden), &full.logits), 0.0);
        assert!(full.exec.equal(&h.exec));
        let (sa, sb) = (full.stats.unwrap(), h.stats.unwrap());
        assert_eq!((sa.ratio, sa.kv_bytes), (sb.ratio, sb.kv_bytes));
        skipped += 1.0 - sa.ratio;
        for (la, lb) in ca.layers.iter().zip(&cb.layers) {
            assert_eq!(la.len(), lb.len());
        }
    }
    assert!(
        skipped > 0.0,
        "the router must skip something for this test to mean anything"
    );
}
