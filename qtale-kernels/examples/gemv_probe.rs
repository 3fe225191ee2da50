//! Time one batch-1 GEMV per weight format on SmolLM2's shapes (and 4096x4096), hot (one matrix, stays
//! in cache) and cold (enough distinct copies to exceed `--cold-mb`), on the calling thread or split over
//! a [`Pool`] team, to compare with ggml's own mat-vec (`../shared/peers/ggml_gemv.c`) in the same run.
//!
//! `cargo run --release -p qtale-kernels --example gemv_probe -- [--threads 1,2] [--reps 200] [--cold-mb 256]`
use std::hint::black_box;
use std::time::Instant;

use qtale_kernels::int4::{Backend, Int4Matrix, QuantActs};
use qtale_kernels::int8::{Q8Acts, Q8Matrix};
use qtale_kernels::ops;
use qtale_kernels::pool::{Pool, SharedSlice};

fn lcg(seed: u64) -> impl FnMut() -> u32 {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    }
}

enum W {
    Int4(Int4Matrix),
    Q8(Q8Matrix),
    F32(Vec<f32>, usize),
}

impl W {
    fn bytes(&self) -> usize {
        match self {
            W::Int4(m) => m.bytes(),
            W::Q8(m) => m.bytes(),
            W::F32(w, _) => 4 * w.len(),
        }
    }
    fn rows(&self) -> usize {
        match self {
            W::Int4(m) => m.rows(),
            W::Q8(m) => m.rows(),
            W::F32(_, r) => *r,
        }
    }
}

fn make(kind: &str, rows: usize, cols: usize, seed: u64) -> W {
    let mut r = lcg(seed);
    match kind {
        "f32" => W::F32(
            (0..rows * cols)
                .map(|_| (r() % 2000) as f32 * 1e-3 - 1.0)
                .collect(),
            rows,
        ),
        "q8" | "q8i8" => {
            let w: Vec<f32> = (0..rows * cols)
                .map(|_| (r() % 2000) as f32 * 1e-3 - 1.0)
                .collect();
            W::Q8(Q8Matrix::quantize(rows, cols, &w).unwrap())
        }
        k => {
            let group: usize = k.trim_start_matches("int4g").parse().expect("int4g<group>");
            let ng = cols / group;
            let codes: Vec<u8> = (0..rows * cols).map(|_| (r() & 15) as u8).collect();
            let scales: Vec<f32> = (0..rows * ng)
                .map(|_| (r() % 1000) as f32 * 1e-5 + 1e-3)
                .collect();
            let zeros: Vec<u8> = (0..rows * ng).map(|_| (r() & 15) as u8).collect();
            W::Int4(Int4Matrix::new(rows, cols, group, &codes, &scales, &zeros).unwrap())
        }
    }
}

fn main() {
    let mut threads = vec![1usize, 2];
    let mut reps = 200usize;
    let mut cold_mb = 256usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().expect("flag value");
        match a.as_str() {
            "--threads" => threads = v.split(',').map(|s| s.parse().unwrap()).collect(),
            "--reps" => reps = v.parse().unwrap(),
            "--cold-mb" => cold_mb = v.parse().unwrap(),
            _ => panic!("unknown flag {a}"),
        }
    }
    let be = Backend::detect();
    println!(
        "gemv_probe: backend {be:?}; load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let shapes = [
        (960usize, 576usize),
        (576, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
        (4096, 4096),
    ];
    for &t in &threads {
        let pool = Pool::new(t);
        for kind in ["int4g32", "int4g64", "q8", "q8i8", "f32"] {
            for &(rows, cols) in &shapes {
                if kind.starts_with("int4") && (rows == 49152) {
                    continue;
                }
                if kind == "f32" && rows == 4096 {
                    continue;
                }
                let per = make(kind, rows, cols, 0).bytes();
                let n = (cold_mb << 20).div_ceil(per).clamp(2, 512);
                let mats: Vec<W> = (0..n).map(|i| make(kind, rows, cols, i as u64)).collect();
                let x: Vec<f32> = (0..cols)
                    .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                    .collect();
                let group = match &mats[0] {
                    W::Int4(m) => m.group(),
                    _ => 32,
                };
                let mut acts = QuantActs::new(&[], 0, 1, 1);
                let mut q8 = Q8Acts::new(cols, kind == "q8i8").unwrap();
                let mut y = vec![0f32; rows];
                let chunk = 64usize;
                let mut run = |w: &W, y: &mut [f32]| {
                    match w {
                        W::Int4(_) => acts.quantize_into(&x, 1, cols, group),
                        W::Q8(..) => q8.set(&x).unwrap(),
                        W::F32(..) => {}
                    }
                    let ys = SharedSlice::new(y);
                    let (acts, q8, x) = (&acts, &q8, &x);
                    pool.run(|ctx| {
                        for c in ctx.chunks(w.rows().div_ceil(chunk)) {
                            let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(w.rows()));
                            // SAFETY: chunks are disjoint.
                            let out = unsafe { ys.range_mut(r0, r1) };
                            match w {
                                W::Int4(m) => m.rows_into(x, acts, 1, r0, r1, out, be).unwrap(),
                                W::Q8(m) => m.gemv_rows(q8, r0, r1, out, be).unwrap(),
                                W::F32(wv, _) => {
                                    ops::gemv_f32_rows(wv, x, r0, r1, out, be).unwrap()
                                }
                            }
                        }
                    });
                };
                for w in &mats {
                    run(w, &mut y);
                }
                let mut hot = Vec::with_capacity(reps);
                for _ in 0..reps {
                    let t0 = Instant::now();
                    run(&mats[0], &mut y);
                    hot.push(t0.elapsed().as_secs_f64());
                }
                let mut cold = Vec::with_capacity(reps);
                for i in 0..reps {
                    let t0 = Instant::now();
                    run(&mats[(i + 1) % n], &mut y);
                    cold.push(t0.elapsed().as_secs_f64());
                }
                black_box(&y);
                hot.sort_by(f64::total_cmp);
                cold.sort_by(f64::total_cmp);
                let (h, c) = (hot[reps / 2], cold[reps / 2]);
                println!(
                    "t{t} {kind:<8} {rows:>5}x{cols:<5} {:>7.3} MB  hot {:>8.1} us ({:>5.1} GB/s)  cold {:>8.1} us ({:>5.1} GB/s)  [{n} copies]",
                    per as f64 / 1e6,
                    h * 1e6,
                    per as f64 / h / 1e9,
                    c * 1e6,
                    per as f64 / c / 1e9,
                );
            }
        }
    }
}
