//! Real skipping on SmolLM2-135M (f32, CPU): prefill of 1 x 512 tokens and KV-cache decode (batch 1 and
//! 8, 16 steps after a 128-token context) at execution ratios 1.0, 0.75 and 0.5, forced by a fixed
//! (hash-based) router, each against the dense model in the same run.
//!
//! Besides criterion's own reports, a summary measures dense and routed interleaved (median of a few
//! repetitions) and prints `speedup` and `speedup / ideal`, with ideal = 1 / (executed FLOPs / dense
//! FLOPs) from the forward's own [`qtale_router::ExecStats`].
//!
//! `cargo bench -p qtale-router --bench routed` (needs `scripts/setup.sh` for the model).
//! `QTALE_BENCH_REPS` (default 5) sets the summary's repetitions, `QTALE_BENCH_THREADS` libtorch's
//! intra-op threads, and `QTALE_BENCH_SUMMARY_ONLY=1` skips the criterion groups (on a shared machine
//! the interleaved summary is the more robust comparison).
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qtale_model::decoder::ExecSummary;
use qtale_model::load::default_gguf_path;
use qtale_model::model::LayerCache;
use qtale_model::{load_model, KvCache, Llama, ModelSource};
use qtale_router::{ForwardOptions, Mode, RandomRouter, RoutedLlama, RoutingConfig};
use tch::{Kind, Tensor};

const PREFILL: i64 = 512;
const CONTEXT: i64 = 128;
const STEPS: i64 = 16;
const RATIOS: [f64; 3] = [1.0, 0.75, 0.5];

/// Routed-layer probability that gives overall ratio `r` with `start` always-run layers of `n`.
fn routed_p(r: f64, start: usize, n: usize) -> f64 {
    ((r * n as f64 - start as f64) / (n - start) as f64).clamp(0.0, 1.0)
}

fn ids(b: i64, t: i64, salt: i64) -> Tensor {
    let v: Vec<i64> = (0..b * t)
        .map(|i| 1000 + ((i + salt) * 7919) % 40000)
        .collect();
    Tensor::from_slice(&v).view([b, t])
}

fn clone_cache(c: &KvCache) -> KvCache {
    let sc = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
    KvCache {
        layers: c
            .layers
            .iter()
            .map(|l| LayerCache {
                k: sc(&l.k),
                v: sc(&l.v),
                pos: sc(&l.pos),
                valid: sc(&l.valid),
            })
            .collect(),
        next_pos: sc(&c.next_pos),
    }
}

type Routed<'a> = RoutedLlama<&'a Llama, RandomRouter>;

fn routed(model: &Llama, r: f64) -> Routed<'_> {
    let c = RoutingConfig::default();
    let p = routed_p(r, c.start_layer, model.layers.len());
    RoutedLlama::new(model, RandomRouter::new(p, 17), c).unwrap()
}

/// Decode `STEPS` tokens from a copy of `ctx`; with `stats`, the summed summary.
fn decode(
    model: &Llama,
    rl: Option<&Routed>,
    ctx: &KvCache,
    b: i64,
    stats: bool,
) -> Option<ExecSummary> {
    let mut cache = clone_cache(ctx);
    let mut sum = ExecSummary::default();
    for s in 0..STEPS {
        let x = ids(b, 1, 5000 + s);
        match rl {
            None => {
                model.forward_cached(&x, None, &mut cache).unwrap();
            }
            Some(rl) => {
                let o = rl
                    .forward_cached(
                        &x,
                        None,
                        &mut cache,
                        Mode::Infer,
                        &ForwardOptions {
                            stats,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                if let Some(st) = o.stats {
                    sum.merge(&st.summary());
                }
            }
        }
    }
    stats.then_some(sum)
}

fn context(model: &Llama, rl: Option<&Routed>, b: i64) -> KvCache {
    let mut cache = KvCache::new(model.layers.len());
    let x = ids(b, CONTEXT, 0);
    match rl {
        None => {
            model.forward_cached(&x, None, &mut cache).unwrap();
        }
        Some(rl) => {
            rl.forward_cached(
                &x,
                None,
                &mut cache,
                Mode::Infer,
                &ForwardOptions::default(),
            )
            .unwrap();
        }
    }
    cache
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(c: &mut Criterion) {
    let path = default_gguf_path();
    if !path.is_file() {
        eprintln!(
            "skipping: {} missing (run scripts/setup.sh)",
            path.display()
        );
        return;
    }
    let lm = load_model(&ModelSource::Gguf(path), tch::Device::Cpu, Kind::Float).unwrap();
    let model = &lm.model;
    let _g = tch::no_grad_guard();
    let reps: usize = std::env::var("QTALE_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    if let Some(n) = std::env::var("QTALE_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        tch::set_num_threads(n);
    }
    let prompt = ids(1, PREFILL, 0);
    if std::env::var("QTALE_BENCH_SUMMARY_ONLY").is_ok_and(|v| v == "1") {
        summary(model, &prompt, reps);
        return;
    }

    // Criterion: prefill.
    let mut g = c.benchmark_group("routed_prefill_1x512");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(PREFILL as u64));
    g.bench_function("dense", |b| {
        b.iter(|| model.forward(&prompt, None).unwrap())
    });
    for r in RATIOS {
        let rl = routed(model, r);
        g.bench_function(format!("ratio_{r}"), |b| {
            b.iter(|| {
                rl.forward(&prompt, None, Mode::Infer, &ForwardOptions::default())
                    .unwrap()
            })
        });
    }
    g.finish();
    // Criterion: decode.
    for bsz in [1i64, 8] {
        let mut g = c.benchmark_group(format!("routed_decode_b{bsz}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        g.throughput(Throughput::Elements((STEPS * bsz) as u64));
        let ctx = context(model, None, bsz);
        g.bench_function("dense", |b| {
            b.iter(|| decode(model, None, &ctx, bsz, false))
        });
        for r in RATIOS {
            let rl = routed(model, r);
            let ctx = context(model, Some(&rl), bsz);
            g.bench_function(format!("ratio_{r}"), |b| {
                b.iter(|| decode(model, Some(&rl), &ctx, bsz, false))
            });
        }
        g.finish();
    }
    summary(model, &prompt, reps);
}

/// Interleaved medians of dense and routed, speedup and speedup / ideal.
fn summary(model: &Llama, prompt: &Tensor, reps: usize) {
    println!("\nsummary (median of {reps}, interleaved; ideal = dense FLOPs / executed FLOPs)");
    println!(
        "{:<18} {:>6} {:>9} {:>10} {:>10} {:>8} {:>7} {:>8}",
        "case", "ratio", "flops", "dense tok/s", "tok/s", "speedup", "ideal", "sp/ideal"
    );
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    for r in RATIOS {
        let rl = routed(model, r);
        let st = rl
            .forward(
                prompt,
                None,
                Mode::Infer,
                &ForwardOptions {
                    forced: None,
                    stats: true,
                    ..Default::default()
                },
            )
            .unwrap()
            .stats
            .unwrap();
        let (mut td, mut tr) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            td.push(time(&mut || {
                model.forward(prompt, None).unwrap();
            }));
            tr.push(time(&mut || {
                rl.forward(prompt, None, Mode::Infer, &ForwardOptions::default())
                    .unwrap();
            }));
        }
        report(
            "prefill 1x512",
            st.ratio,
            st.flops_fraction(),
            PREFILL as f64,
            median(td),
            median(tr),
        );
    }
    for bsz in [1i64, 8] {
        let dctx = context(model, None, bsz);
        for r in RATIOS {
            let rl = routed(model, r);
            let rctx = context(model, Some(&rl), bsz);
            let sum = decode(model, Some(&rl), &rctx, bsz, true).unwrap();
            let (mut td, mut tr) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                td.push(time(&mut || {
                    decode(model, None, &dctx, bsz, false);
                }));
                tr.push(time(&mut || {
                    decode(model, Some(&rl), &rctx, bsz, false);
                }));
            }
            report(
                &format!("decode b{bsz} x{STEPS}"),
                sum.ratio(),
                sum.flops_fraction(),
                (STEPS * bsz) as f64,
                median(td),
                median(tr),
            );
        }
    }
}

fn report(case: &str, ratio: f64, frac: f64, tokens: f64, td: f64, tr: f64) {
    let speedup = td / tr;
    let ideal = 1.0 / frac;
    println!(
        "{case:<18} {ratio:>6.3} {frac:>9.3} {:>10.1} {:>10.1} {speedup:>8.3} {ideal:>7.3} {:>8.3}",
        tokens / td,
        tokens / tr,
        speedup / ideal
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
