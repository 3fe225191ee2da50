//! int4 GEMV / small GEMM against tch f32 matmul and a memory-copy bandwidth probe, in one run.
//!
//! Weights are spread over enough distinct matrices to exceed twice the L3 cache (read from sysfs:
//! 260 MiB on the dev VM), so the GEMV numbers measure DRAM streaming. Prints bytes/s and the
//! fraction of the measured copy and read bandwidth; the headline GEMVs are also timed in rounds
//! paired with a read of 64 MiB, and the median of the per-round ratios is printed, because on a
//! shared VM the bandwidth drifts by +-30% between runs. bf16 matmul runs only on CUDA (skipped
//! without a GPU; CPU bf16 is unusably slow).
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use qtale_kernels::int4::{default_threads, Backend, Int4Matrix};
use rayon::prelude::*;

const MIB: usize = 1 << 20;

fn random_matrix(rows: usize, cols: usize, group: usize, seed: u64) -> Int4Matrix {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let ng = cols / group;
    let codes: Vec<u8> = (0..rows * cols).map(|_| (next() & 15) as u8).collect();
    let scales: Vec<f32> = (0..rows * ng)
        .map(|_| (next() % 1000) as f32 * 1e-5 + 1e-3)
        .collect();
    let zeros: Vec<u8> = (0..rows * ng).map(|_| (next() & 15) as u8).collect();
    Int4Matrix::new(rows, cols, group, &codes, &scales, &zeros).unwrap()
}

/// Copies needed so that `per` bytes each exceed `bytes` in total.
fn copies_over(per: usize, bytes: usize) -> usize {
    bytes.div_ceil(per).max(2)
}

/// Median seconds of `f` over `reps` runs after a warm-up.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut v)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Read-only bandwidth with `threads` threads over `buf`, median of 5.
fn read_bandwidth(buf: &[u8], threads: usize) -> f64 {
    let secs = median_secs(5, || read_once(buf, threads));
    buf.len() as f64 / secs
}

/// One pass reading `buf` in `threads` chunks on rayon's pool, the pool the int4 kernels run on (a
/// probe on threads of its own would compete with the pool's briefly spinning workers). AVX2 loads
/// into four accumulators when available, so the probe is limited by memory, not by its own loop.
fn read_once(buf: &[u8], threads: usize) {
    let chunk = buf.len().div_ceil(threads);
    buf.par_chunks(chunk).for_each(|c| {
        black_box(sum_bytes(c));
    });
}

fn sum_bytes(c: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected.
        return unsafe { sum_bytes_avx2(c) };
    }
    c.iter().fold(0u64, |a, &b| a.wrapping_add(b as u64))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_bytes_avx2(c: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut blocks = c.chunks_exact(128);
    for b in &mut blocks {
        for (k, a) in acc.iter_mut().enumerate() {
            let v = _mm256_loadu_si256(b.as_ptr().add(32 * k) as *const __m256i);
            *a = _mm256_add_epi64(*a, v);
        }
    }
    let v = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    let mut o = [0u64; 4];
    _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, v);
    let tail: u64 = blocks.remainder().iter().map(|&b| b as u64).sum();
    o.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

/// Last-level cache size from sysfs (`index3`), or 64 MiB when unknown.
fn l3_bytes() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size")
        .unwrap_or_default();
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1 << 10),
        Some('M') => (&t[..t.len() - 1], MIB),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .unwrap_or(64 * MIB)
        .max(MIB)
}

/// `rounds` rounds of (read 64 MiB of `buf` at a rotating offset, one `kernel` call): medians of the
/// kernel's and the read's bytes/s and of their per-round ratio.
fn paired_rounds(
    rounds: usize,
    kernel_bytes: usize,
    buf: &[u8],
    threads: usize,
    mut kernel: impl FnMut(),
) -> (f64, f64, f64) {
    let window = 64 * MIB;
    let windows = (buf.len() / window).max(1);
    kernel();
    let (mut kb, mut rb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let w = &buf[(i % windows) * window..((i % windows) + 1) * window];
        let t = Instant::now();
        read_once(w, threads);
        let r = w.len() as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        kernel();
        let k = kernel_bytes as f64 / t.elapsed().as_secs_f64();
        kb.push(k);
        rb.push(r);
        ratio.push(k / r);
    }
    (median(&mut kb), median(&mut rb), median(&mut ratio))
}

/// memcpy bandwidth: bytes read + bytes written per second, `threads` threads over 256 MiB.
fn copy_bandwidth(src: &[u8], dst: &mut [u8], threads: usize) -> f64 {
    let secs = median_secs(5, || {
        let chunk = src.len().div_ceil(threads);
        std::thread::scope(|s| {
            for (a, b) in src.chunks(chunk).zip(dst.chunks_mut(chunk)) {
                s.spawn(move || b.copy_from_slice(a));
            }
        });
        black_box(&dst);
    });
    (2 * src.len()) as f64 / secs
}

struct Line {
    name: String,
    bytes: usize,
    secs: f64,
}

/// A kernel timed in rounds paired with a memory read.
struct Paired {
    name: String,
    kernel_bw: f64,
    read_bw: f64,
    ratio: f64,
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    let threads = default_threads();
    let backend = Backend::detect();
    println!("int4 bench: backend {backend:?}, {threads} threads (QTALE_KERNEL_THREADS to change)");
    let mut lines: Vec<Line> = Vec::new();

    // Memory bandwidth.
    let src = vec![1u8; 256 * MIB];
    let mut dst = vec![0u8; 256 * MIB];
    let l3 = l3_bytes();
    let cold = (2 * l3).max(256 * MIB);
    println!(
        "L3 {} MiB: cold working sets of {} MiB",
        l3 / MIB,
        cold / MIB
    );
    let read_buf: Vec<u8> = (0..(cold.max(1024 * MIB))).map(|i| i as u8).collect();
    let mut paired: Vec<Paired> = Vec::new();
    {
        let mut g = c.benchmark_group("memcpy");
        g.throughput(Throughput::Bytes((2 * src.len()) as u64));
        g.bench_function("256MiB", |b| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
        g.finish();
    }
    let copy_bw = copy_bandwidth(&src, &mut dst, threads);
    let read_bw = read_bandwidth(&read_buf, threads);
    drop((src, dst));

    // int4 GEMV / GEMM on 4096 x 4096, many copies (beyond L3).
    for group in [128usize, 64] {
        let (rows, cols) = (4096, 4096);
        let per = random_matrix(rows, cols, group, 0).bytes();
        let n = copies_over(per, cold);
        let mats: Vec<Int4Matrix> = (0..n)
            .map(|i| random_matrix(rows, cols, group, i as u64))
            .collect();
        for m in [1usize, 4, 8] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let mut y = vec![0f32; m * rows];
            let mut k = 0;
            let name = format!("int4 {rows}x{cols} g{group} m{m}");
            let mut g = c.benchmark_group("int4_4096");
            g.throughput(Throughput::Bytes(per as u64));
            g.bench_function(
                BenchmarkId::new(format!("g{group}"), format!("m{m}")),
                |b| {
                    b.iter(|| {
                        mats[k % n]
                            .gemm_with(&x, m, &mut y, backend, threads)
                            .unwrap();
                        k += 1;
                    })
                },
            );
            g.finish();
            // one call on every copy first, so each is resident and was touched recently
            for w in &mats {
                w.gemm_with(&x, m, &mut y, backend, threads).unwrap();
            }
            let secs = median_secs(30, || {
                mats[k % n]
                    .gemm_with(&x, m, &mut y, backend, threads)
                    .unwrap();
                k += 1;
            });
            lines.push(Line {
                name: name.clone(),
                bytes: per,
                secs,
            });
            if m == 1 {
                let (kernel_bw, rbw, ratio) = paired_rounds(60, per, &read_buf, threads, || {
                    mats[k % n]
                        .gemm_with(&x, m, &mut y, backend, threads)
                        .unwrap();
                    k += 1;
                });
                paired.push(Paired {
                    name,
                    kernel_bw,
                    read_bw: rbw,
                    ratio,
                });
            }
        }
        if group == 128 {
            // scalar reference for scale
            let x = vec![0.5f32; cols];
            let mut y = vec![0f32; rows];
            let mut k = 0;
            let secs = median_secs(5, || {
                mats[k % n]
                    .gemm_with(&x, 1, &mut y, Backend::Scalar, threads)
                    .unwrap();
                k += 1;
            });
            lines.push(Line {
                name: format!("scalar ref {rows}x{cols} g{group} m1"),
                bytes: per,
                secs,
            });
        }
    }

    // SmolLM2-135M decode: the 7 linears of all 30 blocks, one token (~53 MB of weights: beyond a
    // desktop L3, within the dev VM's 260 MiB one).
    for group in [64usize, 128] {
        let shapes = [
            (576, 576),
            (192, 576),
            (192, 576),
            (576, 576),
            (1536, 576),
            (1536, 576),
            (576, 1536),
        ];
        let mats: Vec<Int4Matrix> = (0..30)
            .flat_map(|l| {
                shapes
                    .iter()
                    .enumerate()
                    .map(move |(j, &(r, cc))| (l, j, r, cc))
            })
            .filter(|&(_, _, _, cc)| cc % group == 0)
            .map(|(l, j, r, cc)| random_matrix(r, cc, group, (l * 7 + j) as u64))
            .collect();
        let bytes: usize = mats.iter().map(Int4Matrix::bytes).sum();
        let xs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0.25; m.cols()]).collect();
        let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![0.0; m.rows()]).collect();
        let mut run = || {
            for ((m, x), y) in mats.iter().zip(&xs).zip(ys.iter_mut()) {
                m.gemm_with(x, 1, y, backend, threads).unwrap();
            }
        };
        let mut g = c.benchmark_group("smollm2_decode_linears");
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(format!("g{group}"), |b| b.iter(&mut run));
        g.finish();
        let secs = median_secs(10, &mut run);
        lines.push(Line {
            name: format!("SmolLM2 30x7 linears g{group} m1 ({} matrices)", mats.len()),
            bytes,
            secs,
        });
    }

    // tch f32 for comparison (dense weights: 4 bytes per weight), several copies beyond L3.
    {
        use tch::{Kind, Tensor};
        // libtorch's pool starts here, after the int4 runs, so its threads never share the cores
        // with rayon's.
        tch::set_num_threads(threads as i32);
        let n = copies_over(64 * MIB, cold);
        let ws: Vec<Tensor> = (0..n)
            .map(|_| Tensor::randn([4096, 4096], (Kind::Float, tch::Device::Cpu)))
            .collect();
        for m in [1i64, 8] {
            let x = Tensor::randn([m, 4096], (Kind::Float, tch::Device::Cpu));
            let mut k = 0;
            let mut g = c.benchmark_group("tch_f32_4096");
            g.throughput(Throughput::Bytes(64 * MIB as u64));
            g.bench_function(format!("m{m}"), |b| {
                b.iter(|| {
                    let _ = black_box(x.matmul(&ws[k % n].tr()));
                    k += 1;
                })
            });
            g.finish();
            let secs = median_secs(20, || {
                let _ = black_box(x.matmul(&ws[k % n].tr()));
                k += 1;
            });
            lines.push(Line {
                name: format!("tch f32 4096x4096 m{m}"),
                bytes: 64 * MIB,
                secs,
            });
        }
        if tch::Cuda::is_available() {
            let dev = tch::Device::Cuda(0);
            let w = Tensor::randn([4096, 4096], (Kind::BFloat16, dev));
            let x = Tensor::randn([1, 4096], (Kind::BFloat16, dev));
            let secs = median_secs(50, || {
                let _ = black_box(x.matmul(&w.tr()));
                tch::Cuda::synchronize(0);
            });
            lines.push(Line {
                name: "tch bf16 CUDA 4096x4096 m1".into(),
                bytes: 32 * MIB,
                secs,
            });
        } else {
            println!("no CUDA: bf16 matmul skipped (CPU bf16 is not a usable path)");
        }
    }
    c.final_summary();

    println!();
    println!(
        "memory: copy {:.1} GB/s (read + write), read-only {:.1} GB/s ({threads} threads)",
        copy_bw / 1e9,
        read_bw / 1e9
    );
    println!(
        "{:<48} {:>10} {:>10} {:>9} {:>9}",
        "kernel", "us", "GB/s", "of copy", "of read"
    );
    for l in &lines {
        let bw = l.bytes as f64 / l.secs;
        println!(
            "{:<48} {:>10.1} {:>10.2} {:>8.0}% {:>8.0}%",
            l.name,
            l.secs * 1e6,
            bw / 1e9,
            100.0 * bw / copy_bw,
            100.0 * bw / read_bw
        );
    }
    println!("(GB/s = weight bytes streamed per second: packed nibbles + f32 scales + u8 zeros; f32 for tch)");
    println!();
    println!("paired rounds (each: read 64 MiB, then one cold call; medians):");
    println!(
        "{:<48} {:>10} {:>10} {:>9}",
        "kernel", "GB/s", "read GB/s", "of read"
    );
    for p in &paired {
        println!(
            "{:<48} {:>10.2} {:>10.2} {:>8.0}%",
            p.name,
            p.kernel_bw / 1e9,
            p.read_bw / 1e9,
            100.0 * p.ratio
        );
    }
}
