//! Routed decode on the native CPU decoder against the tch routed model in inference mode: the same
//! per-token, per-layer decisions and the same logits, token by token from an empty cache and after a
//! tch prefill hand-over; the D-LLM router's native gate against its tch logits; baselines; refusals.
mod common;

use common::*;
use qtale_model::native::{KvDtype, NativeDecoder, NativeOptions};
use qtale_model::{KvCache, Llama};
use qtale_quant::kernels::int4::Backend;
use qtale_router::*;
use tch::{Kind, Tensor};

const TOL: f32 = 2e-4;

fn cfg(start: usize, reserved: usize) -> RoutingConfig {
    RoutingConfig {
        start_layer: start,
        reserved_tokens: reserved,
        hidden: 16,
        ..RoutingConfig::default()
    }
}

fn native(model: &Llama, threads: usize) -> NativeDecoder {
    NativeDecoder::from_llama(
        model,
        &NativeOptions {
            threads,
            backend: Backend::Scalar,
            kv_block: 4,
            kv_dtype: KvDtype::F32,
            ..Default::default()
        },
    )
    .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// tch routed decode one token at a time: per token the logits and the execute bits per layer.
fn tch_stepwise<R: Router>(
    routed: &RoutedLlama<&Llama, R>,
    ids: &[i64],
) -> Vec<(Vec<f32>, Vec<bool>)> {
    let _g = tch::no_grad_guard();
    let mut cache = KvCache::new(routed.llama().layers.len());
    ids.iter()
        .map(|&t| {
            let out = routed
                .forward_cached(
                    &Tensor::from_slice(&[t]).view([1, 1]),
                    None,
                    &mut cache,
                    Mode::Infer,
                    &ForwardOptions::default(),
                )
                .unwrap();
            let logits = Vec::<f32>::try_from(out.logits.view([-1])).unwrap();
            let exec = Vec::<bool>::try_from(out.exec.view([-1])).unwrap();
            (logits, exec)
        })
        .collect()
}

fn check_stepwise<R: Router>(routed: &RoutedLlama<&Llama, R>, threads: usize, seed: u64) -> f64 {
    let ids: Vec<i64> = Vec::try_from(random_ids(1, 24, 96, seed).view([-1])).unwrap();
    let want = tch_stepwise(routed, &ids);
    let dec = native(routed.llama(), threads);
    let mut nr = NativeRouted::from_routed(&dec, routed).unwrap();
    let mut st = dec.new_state(2).unwrap();
    let mut skipped = 0;
    for (i, (&t, (logits, exec))) in ids.iter().zip(&want).enumerate() {
        nr.forward_token(t, &mut st).unwrap();
        assert_eq!(nr.last_decisions(), &exec[..], "token {i}: decisions");
        skipped += exec.iter().filter(|e| !**e).count();
        let d = max_diff(st.logits(), logits);
        assert!(d < TOL, "token {i}: logits differ by {d}");
    }
    assert!(
        skipped > 0,
        "the router skipped nothing: the test would not test skipping"
    );
    nr.counts.ratio().unwrap()
}

#[test]
fn dllm_native_matches_tch_stepwise() {
    let model = tiny_model(6, 3);
    let c = cfg(1, 2);
    let router = mixed_router(&c, &model, 11);
    for threads in [1, 3] {
        let routed = RoutedLlama::with_theta(&model, &router, c.clone(), 0.5).unwrap();
        let ratio = check_stepwise(&routed, threads, 5);
        assert!(ratio > 0.0 && ratio < 1.0, "ratio {ratio}");
    }
}

#[test]
fn baselines_native_match_tch() {
    let model = tiny_model(6, 4);
    let c = cfg(1, 1);
    let st = StaticRouter::new(vec![2, 4]);
    let routed = RoutedLlama::with_theta(&model, &st, c.clone(), 0.5).unwrap();
    let ratio = check_stepwise(&routed, 2, 6);
    assert!((ratio - 4.0 / 6.0).abs() < 1e-12, "static ratio {ratio}");
    let rnd = RandomRouter::new(0.5, 9);
    let routed = RoutedLlama::with_theta(&model, &rnd, c.clone(), 0.5).unwrap();
    check_stepwise(&routed, 2, 7);
    // theta 0 executes everything, even where a rule router says skip (as in the tch path)
    let routed = RoutedLlama::with_theta(&model, &st, c, 0.0).unwrap();
    let dec = native(&model, 1);
    let mut nr = NativeRouted::from_routed(&dec, &routed).unwrap();
    let mut s = dec.new_state(4).unwrap();
    for t in [5, 6, 7] {
        nr.forward_token(t, &mut s).unwrap();
        assert!(nr.last_decisions().iter().all(|&e| e));
    }
}

/// A tch routed prefill handed over to the native routed decode gives the logits of the tch routed
/// model run over the whole sequence at once.
#[test]
fn prefill_handover_matches_full_routed_forward() {
    let model = tiny_model(6, 5);
    let c = cfg(1, 2);
    let router = mixed_router(&c, &model, 12);
    let routed = RoutedLlama::with_theta(&model, &router, c, 0.5).unwrap();
    let ids: Vec<i64> = Vec::try_from(random_ids(1, 20, 96, 8).view([-1])).unwrap();
    let full = {
        let _g = tch::no_grad_guard();
        let out = routed
            .forward(
                &Tensor::from_slice(&ids).view([1, -1]),
                None,
                Mode::Infer,
                &ForwardOptions::default(),
            )
            .unwrap();
        out.logits.squeeze_dim(0).to_kind(Kind::Float)
    };
    let dec = native(&model, 2);
    let mut nr = NativeRouted::from_routed(&dec, &routed).unwrap();
    let mut st = dec.new_state(4).unwrap();
    let k = 12;
    let next = nr.prefill_tch(&routed, &ids[..k], &mut st).unwrap();
    let want_next = full.get(k as i64 - 1).argmax(0, false).int64_value(&[]);
    assert_eq!(next, want_next);
    for (i, &t) in ids.iter().enumerate().skip(k) {
        nr.forward_token(t, &mut st).unwrap();
        let want = Vec::<f32>::try_from(full.get(i as i64)).unwrap();
        let d = max_diff(st.logits(), &want);
        assert!(d < TOL, "position {i}: logits differ by {d}");
    }
}

/// The D-LLM router's native gate is `softmax(logits)[1]` of its tch form.
#[test]
fn dllm_gate_equals_tch_softmax() {
    let model = tiny_model(4, 6);
    let c = cfg(1, 0);
    let router = mixed_router(&c, &model, 13);
    let gate = router.native_gate().unwrap().unwrap();
    let x = random_ids(1, 32, 96, 1).to_kind(Kind::Float) / 50.0 - 1.0; // [1, 32] as d = 32
    let xs = Vec::<f32>::try_from(x.view([-1])).unwrap();
    for l in 1..4 {
        let p = router
            .logits(
                l,
                &x.view([1, 1, 32]),
                &Tensor::zeros([1, 1], (Kind::Int64, tch::Device::Cpu)),
            )
            .softmax(-1, Kind::Float)
            .view([-1])
            .double_value(&[1]);
        let q = gate.p_exec_alone(l, &xs, 0) as f64;
        assert!((p - q).abs() < 1e-6, "layer {l}: tch {p} vs native {q}");
    }
}

#[test]
fn compute_kv_and_bad_theta_are_refused() {
    let model = tiny_model(4, 7);
    let dec = native(&model, 1);
    let mut c = cfg(1, 0);
    c.kv_policy = KvPolicy::ComputeKv;
    let e = NativeRouted::new(&dec, &DenseRouter, &c, 0.5)
        .err()
        .unwrap();
    assert!(e.to_string().contains("kv_policy"), "{e}");
    let e = NativeRouted::new(&dec, &DenseRouter, &cfg(1, 0), 1.5)
        .err()
        .unwrap();
    assert!(e.to_string().contains("theta"), "{e}");
}
