//! The decode-step ops and the int8 head kernels: each SIMD version against its scalar reference, and
//! both against an f64 evaluation of the definition, with explicit error bounds.
use half::f16;
use qtale_kernels::int4::{quantize_groups, Backend, Int4Matrix, QuantActs};
use qtale_kernels::int8::{Q8Acts, Q8Matrix, Q8_BLOCK};
use qtale_kernels::ops::{self, HeadView};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Scalar];
    if Backend::Avx2.is_available() {
        v.push(Backend::Avx2);
    } else {
        eprintln!("no AVX2+FMA+F16C: SIMD cases skipped");
    }
    v
}

fn randv(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0) * scale).collect()
}

/// f32 unit roundoff.
const U: f64 = f32::EPSILON as f64 / 2.0;

#[test]
fn rms_norm_matches_definition() {
    let mut rng = StdRng::seed_from_u64(1);
    for n in [576usize, 37, 8, 1] {
        let x = randv(&mut rng, n, 3.0);
        let w: Vec<f32> = (0..n).map(|_| 1.0 + rng.gen_range(-0.2..0.2)).collect();
        let eps = 1e-5f32;
        let ms: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for be in backends() {
            let mut out = vec![0f32; n];
            ops::rms_norm(&x, &w, eps, &mut out, be).unwrap();
            for i in 0..n {
                let want = x[i] as f64 * inv * w[i] as f64;
                // sum of n squares: relative error <= n u; the rest a few roundings
                let tol = (n as f64 + 8.0) * U * want.abs() + 1e-30;
                assert!(
                    (out[i] as f64 - want).abs() <= tol,
                    "{be:?} n={n} i={i}: {} vs {want}",
                    out[i]
                );
            }
        }
    }
    let mut out = vec![0f32; 3];
    assert!(ops::rms_norm(&[1.0; 3], &[1.0; 2], 1e-5, &mut out, Backend::Scalar).is_err());
}

#[test]
fn rope_is_half_split_rotation() {
    let mut rng = StdRng::seed_from_u64(2);
    let (heads, hd) = (3usize, 64usize);
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| (1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64)) as f32)
        .collect();
    for pos in [0usize, 1, 17, 511, 4000] {
        let mut cos = vec![0f32; hd / 2];
        let mut sin = vec![0f32; hd / 2];
        ops::rope_tables(pos, &inv_freq, &mut cos, &mut sin).unwrap();
        let x = randv(&mut rng, heads * hd, 2.0);
        let mut outs = Vec::new();
        for be in backends() {
            let mut y = x.clone();
            ops::rope(&mut y, hd, &cos, &sin, be).unwrap();
            for h in 0..heads {
                for i in 0..hd {
                    // HF: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), rotate_half(x) =
                    // cat(-x2, x1); the angle is the f32 product pos * inv_freq.
                    let a = (pos as f32 * inv_freq[i % (hd / 2)]) as f64;
                    let xi = x[h * hd + i] as f64;
                    let rot = if i < hd / 2 {
                        -(x[h * hd + i + hd / 2] as f64)
                    } else {
                        x[h * hd + i - hd / 2] as f64
                    };
                    let want = xi * a.cos() + rot * a.sin();
                    let tol = 8.0 * U * (xi.abs() + rot.abs()) + 1e-30;
                    assert!(
                        (y[h * hd + i] as f64 - want).abs() <= tol,
                        "{be:?} pos {pos} head {h} dim {i}: {} vs {want}",
                        y[h * hd + i]
                    );
                }
            }
            outs.push(y);
        }
        // same roundings in both versions: bit-identical
        assert!(outs.windows(2).all(|w| w[0] == w[1]), "pos {pos}");
    }
}

#[test]
fn swiglu_matches_definition() {
    let mut rng = StdRng::seed_from_u64(3);
    let n = 1536 + 5;
    let mut g = randv(&mut rng, n, 12.0);
    g[0] = -95.0; // exp(-g) overflows f32: silu -> -0
    g[1] = 95.0;
    let u = randv(&mut rng, n, 3.0);
    for be in backends() {
        let mut out = vec![0f32; n];
        ops::swiglu(&g, &u, &mut out, be).unwrap();
        for i in 0..n {
            let gd = g[i] as f64;
            let want = gd / (1.0 + (-gd).exp()) * u[i] as f64;
            let tol = 16.0 * U * want.abs() + 1e-37;
            assert!(
                (out[i] as f64 - want).abs() <= tol,
                "{be:?} i={i} g={}: {} vs {want}",
                g[i],
                out[i]
            );
        }
    }
}

#[test]
fn attention_matches_definition() {
    let mut rng = StdRng::seed_from_u64(4);
    let (kvh, hd) = (3usize, 64usize);
    for len in [1usize, 7, 130, 600] {
        let keys = randv(&mut rng, len * kvh * hd, 1.5);
        let values = randv(&mut rng, len * kvh * hd, 1.0);
        let q = randv(&mut rng, hd, 1.5);
        let scale = 1.0 / (hd as f32).sqrt();
        for kv in 0..kvh {
            let view = HeadView {
                keys: &keys,
                values: &values,
                len,
                stride: kvh * hd,
                offset: kv * hd,
            };
            // f64 reference
            let s: Vec<f64> = (0..len)
                .map(|j| {
                    (0..hd)
                        .map(|c| q[c] as f64 * keys[j * kvh * hd + kv * hd + c] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for be in backends() {
                let mut scores = vec![0f32; len + 3];
                let mut out = vec![0f32; hd];
                ops::attend(&q, view, scale, &mut scores, &mut out, be).unwrap();
                for c in 0..hd {
                    let want: f64 = (0..len)
                        .map(|j| e[j] / z * values[j * kvh * hd + kv * hd + c] as f64)
                        .sum();
                    // Scores carry ~hd u relative error (|s| <= 9 here, so exp() of it ~9 hd u);
                    // the weighted sum of |v| <= 1 adds len u.
                    let tol = (10.0 * hd as f64 + len as f64 + 16.0) * U;
                    assert!(
                        (out[c] as f64 - want).abs() <= tol,
                        "{be:?} len {len} kv {kv} dim {c}: {} vs {want}",
                        out[c]
                    );
                }
            }
        }
    }
    let mut out = vec![0f32; 4];
    let mut sc = vec![0f32; 2];
    let bad = HeadView {
        keys: &[0.0; 8],
        values: &[0.0; 8],
        len: 3,
        stride: 4,
        offset: 0,
    };
    assert!(ops::attend(&[0.0; 4], bad, 1.0, &mut sc, &mut out, Backend::Scalar).is_err());
}

#[test]
fn attention_over_f16_cache_matches_definition() {
    let mut rng = StdRng::seed_from_u64(44);
    let (kvh, hd) = (2usize, 64usize);
    for len in [1usize, 9, 300] {
        let k32 = randv(&mut rng, len * kvh * hd, 1.5);
        let v32 = randv(&mut rng, len * kvh * hd, 1.0);
        let k16: Vec<f16> = k32.iter().map(|&x| f16::from_f32(x)).collect();
        let v16: Vec<f16> = v32.iter().map(|&x| f16::from_f32(x)).collect();
        let q = randv(&mut rng, hd, 1.5);
        let scale = 0.125f32;
        let kv = 1;
        // reference on the f16-rounded values, in f64
        let key = |j: usize, c: usize| k16[j * kvh * hd + kv * hd + c].to_f64();
        let val = |j: usize, c: usize| v16[j * kvh * hd + kv * hd + c].to_f64();
        let s: Vec<f64> = (0..len)
            .map(|j| (0..hd).map(|c| q[c] as f64 * key(j, c)).sum::<f64>() * scale as f64)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for be in backends() {
            let view = HeadView {
                keys: &k16[..],
                values: &v16[..],
                len,
                stride: kvh * hd,
                offset: kv * hd,
            };
            let mut scores = vec![0f32; len];
            let mut out = vec![0f32; hd];
            ops::attend(&q, view, scale, &mut scores, &mut out, be).unwrap();
            for (c, &o) in out.iter().enumerate() {
                let want: f64 = (0..len).map(|j| e[j] / z * val(j, c)).sum();
                let tol = (10.0 * hd as f64 + len as f64 + 16.0) * U;
                assert!(
                    (o as f64 - want).abs() <= tol,
                    "{be:?} len {len} dim {c}: {o} vs {want}"
                );
            }
        }
    }
}

#[test]
fn gemv_f32_matches_definition() {
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, cols) = (67usize, 581usize);
    let w = randv(&mut rng, rows * cols, 1.0);
    let x = randv(&mut rng, cols, 1.0);
    for be in backends() {
        for (r0, r1) in [(0, rows), (3, 9), (64, 67), (5, 5)] {
            let mut out = vec![0f32; r1 - r0];
            ops::gemv_f32_rows(&w, &x, r0, r1, &mut out, be).unwrap();
            for r in r0..r1 {
                let (want, mag) = (0..cols).fold((0f64, 0f64), |(s, m), c| {
                    let p = w[r * cols + c] as f64 * x[c] as f64;
                    (s + p, m + p.abs())
                });
                let tol = (cols as f64 + 2.0) * U * mag;
                assert!(
                    (out[r - r0] as f64 - want).abs() <= tol,
                    "{be:?} row {r}: {} vs {want}",
                    out[r - r0]
                );
            }
        }
    }
}

/// Random ggml-style Q8_0 blocks: each block's largest |code| is 127 (as ggml's quantizer makes it).
fn random_q8(rng: &mut StdRng, rows: usize, cols: usize) -> (Vec<f16>, Vec<i8>) {
    let nb = rows * cols / Q8_BLOCK;
    let d: Vec<f16> = (0..nb)
        .map(|_| f16::from_f32(rng.gen_range(1e-4..2e-2)))
        .collect();
    let mut q: Vec<i8> = (0..rows * cols)
        .map(|_| rng.gen_range(-127..=127))
        .collect();
    for b in 0..nb {
        let j = rng.gen_range(0..Q8_BLOCK);
        q[b * Q8_BLOCK + j] = if rng.gen() { 127 } else { -127 };
    }
    (d, q)
}

fn ggml_bytes(d: &[f16], q: &[i8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (d, q) in d.iter().zip(q.chunks_exact(Q8_BLOCK)) {
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(q.iter().map(|&v| v as u8));
    }
    out
}

#[test]
fn q8_requantizing_dequantized_blocks_is_exact() {
    let mut rng = StdRng::seed_from_u64(6);
    let (rows, cols) = (50usize, 576usize);
    let (d, q) = random_q8(&mut rng, rows, cols);
    let bytes = ggml_bytes(&d, &q);
    let m = Q8Matrix::from_ggml_q8_0(rows, cols, &bytes).unwrap();
    assert_eq!(m.to_ggml_q8_0(), bytes);
    let w = m.dequantize();
    for (i, v) in w.iter().enumerate() {
        assert_eq!(*v, d[i / Q8_BLOCK].to_f32() * q[i] as f32);
    }
    let again = Q8Matrix::quantize(rows, cols, &w).unwrap();
    assert_eq!(again, m, "d * q must re-quantize to (d, q)");
    // a block whose largest |q| is below 127 is not reproduced: the rule rescales it
    let mut q2 = q.clone();
    for v in &mut q2[..Q8_BLOCK] {
        *v /= 2;
    }
    let m2 = Q8Matrix::from_ggml_q8_0(rows, cols, &ggml_bytes(&d, &q2)).unwrap();
    assert_ne!(
        Q8Matrix::quantize(rows, cols, &m2.dequantize()).unwrap(),
        m2
    );
    assert!(Q8Matrix::from_ggml_q8_0(rows, cols, &bytes[1..]).is_err());
    assert!(Q8Matrix::quantize(1, 31, &[0.0; 31]).is_err());
    assert!(Q8Matrix::quantize(1, 32, &[f32::NAN; 32]).is_err());
}

#[test]
fn q8_gemv_matches_definition_and_int8_activation_bound() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, cols) = (97usize, 576usize);
    let (d, q) = random_q8(&mut rng, rows, cols);
    let m = Q8Matrix::from_ggml_q8_0(rows, cols, &ggml_bytes(&d, &q)).unwrap();
    let w = m.dequantize();
    let x = randv(&mut rng, cols, 2.0);
    let mut f32_acts = Q8Acts::new(cols, false).unwrap();
    f32_acts.set(&x).unwrap();
    let mut i8_acts = Q8Acts::new(cols, true).unwrap();
    i8_acts.set(&x).unwrap();
    let Q8Acts::Int8 { d: xd, .. } = &i8_acts else {
        unreachable!()
    };
    let mut by_backend = Vec::new();
    for be in backends() {
        let mut y = vec![0f32; rows];
        m.gemv_rows(&f32_acts, 0, rows, &mut y, be).unwrap();
        let mut y8 = vec![0f32; rows];
        m.gemv_rows(&i8_acts, 0, rows, &mut y8, be).unwrap();
        for r in 0..rows {
            let (want, mag, act_bound) = (0..cols).fold((0f64, 0f64, 0f64), |(s, mg, ab), c| {
                let wv = w[r * cols + c] as f64;
                (
                    s + wv * x[c] as f64,
                    mg + (wv * x[c] as f64).abs(),
                    // each int8 activation is off by at most half its block's step
                    ab + wv.abs() * xd[c / Q8_BLOCK] as f64 / 2.0,
                )
            });
            let tol = (cols as f64 + 8.0) * U * mag;
            assert!(
                (y[r] as f64 - want).abs() <= tol,
                "{be:?} f32 acts row {r}: {} vs {want}",
                y[r]
            );
            assert!(
                (y8[r] as f64 - want).abs() <= act_bound + tol,
                "{be:?} int8 acts row {r}: {} vs {want} (bound {act_bound})",
                y8[r]
            );
        }
        by_backend.push(y8);
    }
    // integer block sums are exact in both versions; only the float accumulation order differs
    if let [a, b] = &by_backend[..] {
        for r in 0..rows {
            assert!((a[r] - b[r]).abs() <= 1e-5 * (1.0 + a[r].abs()), "row {r}");
        }
    }
}

#[test]
fn int4_rows_into_matches_gemm_and_reuses_buffers() {
    let mut rng = StdRng::seed_from_u64(8);
    for group in [32usize, 64, 128] {
        let (rows, cols) = (96usize, 512usize);
        let ng = cols / group;
        let codes: Vec<u8> = (0..rows * cols).map(|_| rng.gen_range(0..16)).collect();
        let scales: Vec<f32> = (0..rows * ng).map(|_| rng.gen_range(1e-3..0.1)).collect();
        let zeros: Vec<u8> = (0..rows * ng).map(|_| rng.gen_range(0..16)).collect();
        let w = Int4Matrix::new(rows, cols, group, &codes, &scales, &zeros).unwrap();
        let mut acts = QuantActs::new(&[], 0, 1, 1);
        for _ in 0..2 {
            let x = randv(&mut rng, cols, 1.0);
            acts.quantize_into(&x, 1, cols, group);
            let fresh = QuantActs::new(&x, 1, cols, group);
            assert_eq!(
                (&acts.q, &acts.d, &acts.sum),
                (&fresh.q, &fresh.d, &fresh.sum)
            );
            for be in backends() {
                let mut full = vec![0f32; rows];
                w.gemm_with(&x, 1, &mut full, be, 1).unwrap();
                let mut part = vec![0f32; 40];
                w.rows_into(&x, &acts, 1, 50, 90, &mut part, be).unwrap();
                assert_eq!(&part[..], &full[50..90], "{be:?} group {group}");
            }
        }
        let mut out = vec![0f32; 10];
        let x = vec![0f32; cols];
        assert!(w
            .rows_into(&x, &acts, 1, 90, 100, &mut out, Backend::Scalar)
            .is_err());
    }
}

/// The activation quantizer: SIMD and scalar give identical bits (ties round away from zero, as
/// `f32::round`), and the codes satisfy the definition.
#[test]
fn activation_quantizer_simd_equals_scalar() {
    let mut rng = StdRng::seed_from_u64(9);
    for group in [32usize, 64, 128] {
        let n = 4 * group;
        let mut x = randv(&mut rng, n, 3.0);
        // group 1: amax 127 makes the scale exactly 1, so halves are exact ties
        for (j, v) in x[group..2 * group].iter_mut().enumerate() {
            *v = (j as f32 - (group / 2) as f32) + 0.5;
        }
        x[group] = 127.0;
        // group 2: a non-finite value zeroes the group; group 3: all zeros
        x[2 * group + 5] = f32::INFINITY;
        x[3 * group..].fill(0.0);
        let mut outs = Vec::new();
        for be in backends() {
            let mut q = vec![0i8; n];
            let mut d = vec![0f32; 4];
            let mut s = vec![0f32; 4];
            quantize_groups(&x, group, &mut q, &mut d, &mut s, be);
            outs.push((q, d, s));
        }
        if let [a, b] = &outs[..] {
            assert_eq!(a.0, b.0, "codes, group {group}");
            assert_eq!(a.1, b.1, "scales, group {group}");
            assert_eq!(
                a.2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "sums, group {group}"
            );
        }
        let (q, d, s) = &outs[0];
        assert_eq!(d[1], 1.0);
        assert_eq!((d[2], d[3]), (0.0, 0.0));
        // sums: of the dequantized codes (what the zero-point term must see); a non-finite group
        // carries its inf, a zero group sums to 0
        for g in 0..2 {
            let codes: i32 = q[g * group..(g + 1) * group]
                .iter()
                .map(|&c| c as i32)
                .sum();
            assert_eq!(
                s[g].to_bits(),
                (d[g] * codes as f32).to_bits(),
                "sum, g {g}"
            );
        }
        assert_eq!((s[2], s[3]), (f32::INFINITY, 0.0));
        assert!(q[2 * group..].iter().all(|&c| c == 0));
        let paired = group % 64 == 0;
        // undo the per-64 permutation
        let pos = |j: usize| -> usize {
            if !paired {
                return j;
            }
            let (run, k) = (j / 64 * 64, j % 64);
            run + match k {
                0..=15 => k,
                16..=31 => k + 16,
                32..=47 => k - 16,
                _ => k,
            }
        };
        for g in 0..2 {
            for j in 0..group {
                let v = x[g * group + j] / d[g];
                let want = v.round().clamp(-127.0, 127.0) as i8;
                assert_eq!(
                    q[g * group + pos(j)],
                    want,
                    "group {group}, g {g}, j {j}, v {v}"
                );
            }
        }
        // ties away from zero: 0.5 -> 1, -0.5 -> -1, 2.5 -> 3
        let h = group / 2;
        assert_eq!(q[group + pos(h)], 1);
        assert_eq!(q[group + pos(h - 1)], -1);
        assert_eq!(q[group + pos(h + 2)], 3);
    }
}
