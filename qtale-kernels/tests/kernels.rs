//! SIMD vs scalar reference, pack/unpack round trips, dequantization formula.
use qtale_kernels::int4::{Backend, Int4Matrix, QuantActs};
use qtale_kernels::pack::{pack_u32, packed_words, unpack_u32};
use qtale_kernels::KernelError;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random_matrix(rng: &mut StdRng, rows: usize, cols: usize, group: usize) -> Int4Matrix {
    let ng = cols.div_ceil(group);
    let codes: Vec<u8> = (0..rows * cols).map(|_| rng.gen_range(0..16)).collect();
    let scales: Vec<f32> = (0..rows * ng).map(|_| rng.gen_range(1e-3..0.1)).collect();
    let zeros: Vec<u8> = (0..rows * ng).map(|_| rng.gen_range(0..16)).collect();
    Int4Matrix::new(rows, cols, group, &codes, &scales, &zeros).unwrap()
}

fn nmse(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    num / den.max(1e-30)
}

/// The AVX2 kernel's only approximation is int8 rounding of the activations (one scale per group):
/// relative error per activation at most 1/254 of the group's max, so the output NMSE stays far below 1e-3.
const NMSE_BOUND: f64 = 1e-3;

fn check(w: &Int4Matrix, x: &[f32], m: usize, what: &str) {
    let mut want = vec![0f32; m * w.rows()];
    w.gemm_with(x, m, &mut want, Backend::Scalar, 1).unwrap();
    // the reference against a plain dense product of the dequantized weight
    let dq = w.dequantize();
    for t in 0..m {
        for r in 0..w.rows() {
            let d: f32 = (0..w.cols())
                .map(|c| dq[r * w.cols() + c] * x[t * w.cols() + c])
                .sum();
            let got = want[t * w.rows() + r];
            assert!(
                (d - got).abs() <= 1e-4 * (1.0 + d.abs()),
                "{what}: scalar {got} vs dense {d}"
            );
        }
    }
    if !Backend::Avx2.is_available() {
        eprintln!("no AVX2+FMA: SIMD comparison skipped");
        return;
    }
    for threads in [1, 2, 3] {
        let mut got = vec![0f32; m * w.rows()];
        w.gemm_with(x, m, &mut got, Backend::Avx2, threads).unwrap();
        let e = nmse(&got, &want);
        assert!(e < NMSE_BOUND, "{what} (threads {threads}): NMSE {e}");
    }
}

#[test]
fn simd_matches_scalar_on_random_inputs() {
    let mut rng = StdRng::seed_from_u64(1);
    for &(rows, cols, group, m) in &[
        (64, 256, 32, 1),
        (96, 512, 64, 3),
        (576, 576, 64, 1),
        (200, 1536, 128, 5),
        (1024, 1024, 128, 8),
        // odd blocks per group (unpaired path), and groups whose i16 partial sums are flushed
        // after four block pairs (256: once, 512: twice)
        (24, 576, 96, 2),
        (48, 1024, 256, 2),
        (40, 2048, 512, 3),
    ] {
        let w = random_matrix(&mut rng, rows, cols, group);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
        check(&w, &x, m, &format!("{rows}x{cols} g{group} m{m}"));
    }
}

/// Every token count of the small-batch path (one tile of up to 8 tokens per pass over the weights)
/// and beyond it (tiles of 8 plus a remainder), for several group sizes and thread counts; row counts
/// that do not split evenly into chunks.
#[test]
fn simd_matches_scalar_for_each_token_count() {
    let mut rng = StdRng::seed_from_u64(5);
    for &(rows, cols, group) in &[(136, 512, 32), (72, 640, 64), (520, 1024, 128)] {
        let w = random_matrix(&mut rng, rows, cols, group);
        for m in (1..=8).chain([9, 13, 17]) {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
            check(&w, &x, m, &format!("{rows}x{cols} g{group} m{m}"));
            // each token's result equals the same token computed alone (tiles do not mix tokens)
            if Backend::Avx2.is_available() {
                let mut all = vec![0f32; m * rows];
                w.gemm_with(&x, m, &mut all, Backend::Avx2, 2).unwrap();
                for t in [0, m - 1] {
                    let mut one = vec![0f32; rows];
                    w.gemm_with(&x[t * cols..(t + 1) * cols], 1, &mut one, Backend::Avx2, 1)
                        .unwrap();
                    assert_eq!(
                        &all[t * rows..(t + 1) * rows],
                        &one[..],
                        "{rows}x{cols} g{group} m{m} token {t}"
                    );
                }
            }
        }
    }
}

#[test]
fn simd_matches_scalar_on_adversarial_inputs() {
    // group 512: all-15 codes times all-127 activations put the AVX2 kernel's i16 partial sums at
    // their bound (4 block pairs x 2 x 15 x 127 x 2 = 30480)
    for (cols, group) in [(512, 64), (1024, 512)] {
        adversarial(128, cols, group);
    }
}

fn adversarial(rows: usize, cols: usize, group: usize) {
    let mut rng = StdRng::seed_from_u64(2);
    // extreme codes and zero points: all 15 with zero 0, all 0 with zero 15
    let ng = cols / group;
    let scales = vec![0.05f32; rows * ng];
    let w15 = Int4Matrix::new(
        rows,
        cols,
        group,
        &vec![15; rows * cols],
        &scales,
        &vec![0; rows * ng],
    )
    .unwrap();
    let w0 = Int4Matrix::new(
        rows,
        cols,
        group,
        &vec![0; rows * cols],
        &scales,
        &vec![15; rows * ng],
    )
    .unwrap();
    let wr = random_matrix(&mut rng, rows, cols, group);
    let mut inputs: Vec<(String, Vec<f32>)> = Vec::new();
    // one huge outlier per group next to tiny values
    inputs.push((
        "outliers".into(),
        (0..cols)
            .map(|c| {
                if c % group == 7 {
                    1e4
                } else {
                    rng.gen_range(-1e-3..1e-3)
                }
            })
            .collect(),
    ));
    // constant and all-maximal activations (saturate the int8 range in every lane)
    inputs.push(("constant".into(), vec![3.0; cols]));
    inputs.push((
        "alternating".into(),
        (0..cols)
            .map(|c| if c % 2 == 0 { 100.0 } else { -100.0 })
            .collect(),
    ));
    // whole groups of zeros
    inputs.push((
        "zero groups".into(),
        (0..cols)
            .map(|c| {
                if (c / group).is_multiple_of(2) {
                    0.0
                } else {
                    rng.gen_range(-1.0..1.0)
                }
            })
            .collect(),
    ));
    for (name, x) in &inputs {
        for (wn, w) in [("codes 15", &w15), ("codes 0", &w0), ("random", &wr)] {
            check(w, x, 1, &format!("g{group} {name} / {wn}"));
        }
    }
    // all-zero input gives exactly zero
    let mut y = vec![1f32; rows];
    wr.gemm(&vec![0.0; cols], 1, &mut y).unwrap();
    assert!(y.iter().all(|v| *v == 0.0));
}

/// The AVX2 product is the exact product of the dequantized int8 activations with the dequantized
/// weights (up to f32 rounding): the zero-point term sees the same quantized activations as the
/// integer dot products. (With the exact f32 sum of the activations in the zero-point term it was
/// off by `s z sum(x' - x)` per group, which doubled the int8 error on real models.)
#[test]
fn simd_is_the_product_of_the_dequantized_activations() {
    if !Backend::Avx2.is_available() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(6);
    for &(rows, cols, group) in &[(64, 576, 32), (64, 576, 64), (48, 1024, 128), (24, 576, 96)] {
        let w = random_matrix(&mut rng, rows, cols, group);
        let dq = w.dequantize();
        let mut x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
        // an outlier in one group: its other activations round to a few codes
        x[3] = 300.0;
        let a = QuantActs::new(&x, 1, cols, group);
        let paired = group % 64 == 0;
        // the dequantized activation of column c (undo the per-64 permutation when paired)
        let xq = |c: usize| -> f64 {
            let k = c % 64;
            let j = if !paired {
                c
            } else {
                c - k
                    + match k {
                        0..=15 => k,
                        16..=31 => k + 16,
                        32..=47 => k - 16,
                        _ => k,
                    }
            };
            a.d[c / group] as f64 * a.q[j] as f64
        };
        let mut y = vec![0f32; rows];
        w.gemm_with(&x, 1, &mut y, Backend::Avx2, 1).unwrap();
        for (r, &got) in y.iter().enumerate() {
            let (mut want, mut mag) = (0f64, 0f64);
            for c in 0..cols {
                let p = dq[r * cols + c] as f64 * xq(c);
                want += p;
                mag += p.abs();
            }
            assert!(
                (got as f64 - want).abs() <= 1e-5 * mag,
                "{rows}x{cols} g{group} row {r}: {got} vs {want} (magnitude {mag})"
            );
        }
    }
}

#[test]
fn int4_codes_round_trip_and_dequantize_formula() {
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, cols, group) = (8, 128, 64);
    let codes: Vec<u8> = (0..rows * cols).map(|_| rng.gen_range(0..16)).collect();
    let scales: Vec<f32> = (0..rows * 2).map(|_| rng.gen_range(0.01..1.0)).collect();
    let zeros: Vec<u8> = (0..rows * 2).map(|_| rng.gen_range(0..16)).collect();
    let w = Int4Matrix::new(rows, cols, group, &codes, &scales, &zeros).unwrap();
    assert_eq!(w.codes(), codes);
    let dq = w.dequantize();
    for r in 0..rows {
        for c in 0..cols {
            let g = r * 2 + c / group;
            assert_eq!(
                dq[r * cols + c],
                scales[g] * (codes[r * cols + c] as f32 - zeros[g] as f32)
            );
        }
    }
    assert_eq!(w.bytes(), rows * cols / 2 + rows * 2 * 5);
}

#[test]
fn pack_unpack_round_trip_exact() {
    let mut rng = StdRng::seed_from_u64(4);
    for bits in [2u32, 3, 4, 8] {
        for n in [0usize, 1, 31, 32, 33, 96, 1000] {
            let codes: Vec<u8> = (0..n)
                .map(|_| rng.gen_range(0..(1u32 << bits)) as u8)
                .collect();
            let w = pack_u32(&codes, bits).unwrap();
            assert_eq!(w.len(), packed_words(n, bits));
            assert_eq!(unpack_u32(&w, bits, n).unwrap(), codes, "bits {bits} n {n}");
        }
    }
    assert_eq!(pack_u32(&[1], 5), Err(KernelError::UnsupportedBits(5)));
    assert!(matches!(
        pack_u32(&[4], 2),
        Err(KernelError::CodeOutOfRange {
            index: 0,
            code: 4,
            bits: 2
        })
    ));
    assert!(Int4Matrix::new(1, 48, 48, &[0; 48], &[1.0], &[0]).is_err());
    assert!(matches!(
        Int4Matrix::new(1, 32, 32, &[16; 32], &[1.0], &[0]),
        Err(KernelError::CodeOutOfRange { .. })
    ));
}

/// A ragged last group (`cols % group` columns, a multiple of 32): GPTQ checkpoints of SmolLM2's
/// 576-wide layers at group 128 (4 x 128 + 64). Every way the AVX2 kernel meets one: block pairs
/// only (64), a single block (32), pairs plus a single block (96, and a group wider than the matrix),
/// and unpaired groups (96 with a tail of 64); each token count of a tile.
#[test]
fn ragged_last_group_matches_scalar_and_formula() {
    let mut rng = StdRng::seed_from_u64(8);
    for &(rows, cols, group, m) in &[
        (576, 576, 128, 1),
        (40, 160, 128, 3),
        (24, 224, 128, 2),
        (16, 544, 96, 2),
        (8, 96, 128, 4),
        (72, 1600, 256, 9),
    ] {
        let w = random_matrix(&mut rng, rows, cols, group);
        assert_eq!(w.n_groups(), cols.div_ceil(group));
        let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
        check(&w, &x, m, &format!("ragged {rows}x{cols} g{group} m{m}"));
    }
    let w = random_matrix(&mut rng, 24, 576, 128);
    for m in 1..=8 {
        let x: Vec<f32> = (0..m * 576).map(|_| rng.gen_range(-2.0..2.0)).collect();
        check(&w, &x, m, &format!("ragged 24x576 g128 m{m}"));
    }
    // the formula with the ragged group's own scale and zero point
    let dq = w.dequantize();
    let codes = w.codes();
    for r in 0..24 {
        for c in [0, 511, 512, 575] {
            let g = r * 5 + c / 128;
            let want = w.scales()[g] * (codes[r * 576 + c] as f32 - w.zeros()[g] as f32);
            assert_eq!(dq[r * 576 + c], want, "w[{r}, {c}]");
        }
    }
    // a ragged group that is not whole blocks of 32 is refused by name
    for (cols, group, last) in [(100usize, 64usize, 36usize), (48, 32, 16)] {
        let ng = cols.div_ceil(group);
        assert_eq!(
            Int4Matrix::new(1, cols, group, &vec![0; cols], &vec![1.0; ng], &vec![0; ng]),
            Err(KernelError::RaggedGroup { cols, group, last })
        );
    }
}
