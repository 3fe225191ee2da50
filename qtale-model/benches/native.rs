//! The native batch-1 decoder on SmolLM2-135M (f32 and RTN int4 weights): one decode step at depth
//! 512, and 128 greedy tokens after a 512-token prompt (the prompt prefilled once by tch, the cache
//! rolled back to it before each sample).
//!
//! `cargo bench -p qtale-model --bench native` (needs `scripts/setup.sh` for the model).
//! `QTALE_BENCH_THREADS=1,2` sets the thread counts (default: 1 and the available parallelism);
//! `QTALE_BENCH_VARIANTS=f32,int4g64` the weight formats (default f32, int4g32, int4g64).
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qtale_model::load::default_gguf_path;
use qtale_model::native::{NativeDecoder, NativeOptions};
use qtale_model::ptq::{quantize_model, PtqOptions};
use qtale_model::{load_model, ModelSource};
use qtale_quant::rtn::Rtn;
use qtale_quant::QuantConfig;
use tch::{Device, Kind};

const PROMPT: usize = 512;
const DECODE: usize = 128;

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(String::from)
        .collect()
}

fn native(c: &mut Criterion) {
    let path = default_gguf_path();
    if !path.is_file() {
        eprintln!(
            "skipping native decoder benches: {} missing (run scripts/setup.sh)",
            path.display()
        );
        return;
    }
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<usize> = list("QTALE_BENCH_THREADS", &format!("1,{all}"))
        .iter()
        .map(|s| {
            s.parse()
                .expect("QTALE_BENCH_THREADS: a list of thread counts")
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let prompt: Vec<i64> = (0..PROMPT as i64)
        .map(|i| 1000 + (i * 7919) % 40000)
        .collect();
    let _g = tch::no_grad_guard();
    for variant in list("QTALE_BENCH_VARIANTS", "f32,int4g32,int4g64") {
        let mut model = load_model(&ModelSource::Gguf(path.clone()), Device::Cpu, Kind::Float)
            .expect("load SmolLM2")
            .model;
        if let Some(g) = variant.strip_prefix("int4g") {
            let cfg = QuantConfig::new(4, g.parse().expect("int4g<group>")).unwrap();
            quantize_model(&mut model, &[], &Rtn, &cfg, &PtqOptions::default()).unwrap();
        }
        for &t in &threads {
            tch::set_num_threads(t as i32);
            let dec = NativeDecoder::from_llama(
                &model,
                &NativeOptions {
                    threads: t,
                    ..Default::default()
                },
            )
            .unwrap();
            let mut st = dec.new_state(PROMPT + DECODE + 1).unwrap();
            let first = dec.prefill_tch(&model, &prompt, &mut st).unwrap();
            let mut g = c.benchmark_group(format!("native_{variant}_t{t}"));
            g.sample_size(10)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(5));
            g.throughput(Throughput::Elements(1));
            g.bench_function("decode_step_d512", |b| {
                b.iter(|| {
                    dec.forward_token(first, &mut st).unwrap();
                    st.truncate(PROMPT).unwrap();
                })
            });
            g.throughput(Throughput::Elements(DECODE as u64));
            g.bench_function("decode_128_after_512", |b| {
                b.iter(|| {
                    let mut next = first;
                    for _ in 0..DECODE {
                        next = dec.forward_token(next, &mut st).unwrap() as i64;
                    }
                    st.truncate(PROMPT).unwrap();
                })
            });
            g.finish();
        }
    }
}

criterion_group!(benches, native);
criterion_main!(benches);
