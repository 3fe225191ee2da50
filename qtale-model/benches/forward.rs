//! SmolLM2-135M forward on CPU (f32): prefill of 1 x 512 tokens and KV-cache decode tokens/s, plus the
//! libtorch f32 2048^3 matmul that bounds them, so results can be read as a fraction of the machine.
//! bf16 runs only on CUDA (this CPU has no fast bf16 path; measured by the bf16 probe, README).
//!
//! `cargo bench -p qtale-model --bench forward` (needs `scripts/setup.sh` for the model).
//! `QTALE_BENCH_THREADS=N` sets libtorch's intra-op threads (default: libtorch's choice); on a shared
//! machine 1 thread avoids the collapse of spin-waiting thread pools under contention.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qtale_model::load::default_gguf_path;
use qtale_model::{load_model, KvCache, ModelSource};
use tch::{Device, Kind, Tensor};

const PREFILL: i64 = 512;
const DECODE_CONTEXT: i64 = 128;
const DECODE_STEPS: usize = 16;

fn matmul(c: &mut Criterion) {
    // First group of the run: apply QTALE_BENCH_THREADS before anything is measured.
    if let Some(n) = std::env::var("QTALE_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        tch::set_num_threads(n);
    }
    let n = 2048;
    let a = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    let mut g = c.benchmark_group("libtorch");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    // Elements = FLOPs, so criterion's "elem/s" reads as FLOP/s.
    g.throughput(Throughput::Elements(2 * (n * n * n) as u64));
    g.bench_function("matmul_f32_2048", |bench| bench.iter(|| a.matmul(&b)));
    g.finish();
}

fn smollm2(c: &mut Criterion, device: Device, kind: Kind, label: &str) {
    let path = default_gguf_path();
    if !path.is_file() {
        eprintln!(
            "skipping SmolLM2 benches: {} missing (run scripts/setup.sh)",
            path.display()
        );
        return;
    }
    let lm = load_model(&ModelSource::Gguf(path), device, kind).expect("load SmolLM2");
    let model = lm.model;
    let _guard = tch::no_grad_guard();
    // Deterministic pseudo-text ids (not special tokens).
    let ids: Vec<i64> = (0..PREFILL).map(|i| 1000 + (i * 7919) % 40000).collect();

    let mut g = c.benchmark_group(format!("smollm2_{label}"));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(PREFILL as u64));
    let prompt = Tensor::from_slice(&ids).view([1, -1]);
    g.bench_function("prefill_1x512", |b| {
        b.iter(|| {
            let out = model.forward(&prompt, None).unwrap();
            if device.is_cuda() {
                tch::Cuda::synchronize(0);
            }
            out
        })
    });

    g.throughput(Throughput::Elements(DECODE_STEPS as u64));
    let ctx = Tensor::from_slice(&ids[..DECODE_CONTEXT as usize]).view([1, -1]);
    g.bench_function("decode_16_tokens_after_128", |b| {
        b.iter_batched(
            || {
                let mut cache = KvCache::new(model.layers.len());
                model.forward_cached(&ctx, None, &mut cache).unwrap();
                cache
            },
            |mut cache| {
                let mut tok = Tensor::from_slice(&[42i64]).view([1, 1]);
                for _ in 0..DECODE_STEPS {
                    let out = model.forward_cached(&tok, None, &mut cache).unwrap();
                    tok = out.logits.select(1, -1).argmax(-1, true);
                }
                if device.is_cuda() {
                    tch::Cuda::synchronize(0);
                }
                cache
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn forward(c: &mut Criterion) {
    smollm2(c, Device::Cpu, Kind::Float, "cpu_f32");
    if qtale_model::cuda::is_available() {
        smollm2(c, Device::Cuda(0), Kind::Float, "cuda_f32");
        smollm2(c, Device::Cuda(0), Kind::BFloat16, "cuda_bf16");
    } else {
        eprintln!("no CUDA device: the bf16 benches (CUDA only) are skipped");
    }
}

criterion_group!(benches, matmul, forward);
criterion_main!(benches);
