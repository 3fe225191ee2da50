//! Group-wise asymmetric int4 weights and their matrix-vector kernels.
//!
//! Format ([`Int4Matrix`]): `W[r, c] = scale[r, g] * (q[r, c] - zero[r, g])` with `g = c / group`,
//! `q, zero` in `0..16`. Codes are stored row-major in blocks of 32 weights: 16 bytes per block, the low
//! nibble of byte `j` is weight `j` of the block and the high nibble weight `j + 16` (as ggml's Q4 blocks).
//! Scales are f32, zero points one byte each, both `[rows, ceil(cols / group)]`: when `group` does not
//! divide `cols` the last group is ragged (`cols % group` columns, e.g. 576 = 4 x 128 + 64, as GPTQ
//! checkpoints of 576-wide layers at group 128 have); it must still be whole blocks of 32.
//!
//! Kernels compute `y[t, r] = sum_c x[t, c] W[r, c]` for `m` tokens:
//! * [`Backend::Scalar`]: the f32 reference (dequantize each weight, f32 dot products);
//! * [`Backend::Avx2`] (chosen at run time when the CPU has AVX2 and FMA): each token's activations are
//!   quantized once per call to int8 with one scale per weight group (symmetric, round to nearest), the
//!   inner loop multiplies unsigned nibbles by signed int8 with `vpmaddubsw`/`vpmaddwd` into i32, and
//!   each group costs one float FMA; the zero-point term uses the sum of the group's quantized
//!   activations (see [`QuantActs`]), so the product is that of the dequantized activations with the
//!   weights: its only error against the reference is the int8 rounding of the activations (all
//!   integer sums are exact). When the group spans an even number of blocks (group 64, 128, ...) the
//!   activations are stored permuted per pair of blocks (see [`QuantActs`]) so that one 32-byte load
//!   and one shift unpack 64 weights, with no per-block broadcast or variable shift.
//!
//! Both run multithreaded over chunks of output rows on rayon's persistent pool
//! ([`Int4Matrix::gemm_with`]; about four chunks per thread, so work stealing evens out a core that
//! another process slows down). The AVX2 kernel multiplies each unpacked weight block with up to
//! [`MAX_TILE`] tokens while it is in registers, so an 8-token GEMM streams the weights once, as a
//! GEMV does.
use rayon::prelude::*;

use crate::{KernelError, Result};

/// Weights per packed block (16 bytes).
pub const BLOCK: usize = 32;

/// Tokens the AVX2 kernel multiplies with each unpacked weight block in one pass over the weights.
pub const MAX_TILE: usize = 8;

/// Which kernel computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// f32 reference.
    Scalar,
    /// AVX2 + FMA (+ F16C, which every AVX2 processor has), int8 activations in the int4 kernel.
    Avx2,
}

impl Backend {
    /// The fastest backend this CPU supports (run-time detection).
    pub fn detect() -> Backend {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Backend::Avx2;
            }
        }
        Backend::Scalar
    }

    pub fn is_available(self) -> bool {
        match self {
            Backend::Scalar => true,
            Backend::Avx2 => Backend::detect() == Backend::Avx2,
        }
    }
}

/// A packed int4 matrix `[rows, cols]` with group-wise scales and zero points.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Matrix {
    rows: usize,
    cols: usize,
    group: usize,
    qs: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<u8>,
}

impl Int4Matrix {
    /// Pack codes `[rows, cols]` (row-major, each `< 16`), scales and zero points
    /// `[rows, ceil(cols / group)]`. `group` must be a positive multiple of 32, and so must the ragged
    /// last group when `group` does not divide `cols` ([`KernelError::RaggedGroup`] otherwise).
    pub fn new(
        rows: usize,
        cols: usize,
        group: usize,
        codes: &[u8],
        scales: &[f32],
        zeros: &[u8],
    ) -> Result<Self> {
        if group == 0 || !group.is_multiple_of(BLOCK) {
            return Err(KernelError::Shape(format!(
                "int4 group size {group} must be a positive multiple of {BLOCK}"
            )));
        }
        if !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::RaggedGroup {
                cols,
                group,
                last: cols % group,
            });
        }
        let ng = cols.div_ceil(group);
        if codes.len() != rows * cols {
            return Err(KernelError::Shape(format!(
                "codes: {} values for a [{rows}, {cols}] matrix",
                codes.len()
            )));
        }
        if scales.len() != rows * ng || zeros.len() != rows * ng {
            return Err(KernelError::Shape(format!(
                "scales/zeros: {}/{} values, expected [{rows}, {ng}] = {}",
                scales.len(),
                zeros.len(),
                rows * ng
            )));
        }
        for (index, &code) in codes.iter().chain(zeros.iter()).enumerate() {
            if code > 15 {
                return Err(KernelError::CodeOutOfRange {
                    index,
                    code,
                    bits: 4,
                });
            }
        }
        let mut qs = vec![0u8; rows * cols / 2];
        for (blk, (src, dst)) in codes
            .chunks_exact(BLOCK)
            .zip(qs.chunks_exact_mut(BLOCK / 2))
            .enumerate()
        {
            let _ = blk;
            for j in 0..BLOCK / 2 {
                dst[j] = src[j] | (src[j + BLOCK / 2] << 4);
            }
        }
        Ok(Int4Matrix {
            rows,
            cols,
            group,
            qs,
            scales: scales.to_vec(),
            zeros: zeros.to_vec(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn group(&self) -> usize {
        self.group
    }
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    pub fn zeros(&self) -> &[u8] {
        &self.zeros
    }
    /// The packed nibbles (`rows * cols / 2` bytes).
    pub fn packed(&self) -> &[u8] {
        &self.qs
    }

    /// Bytes held (codes, scales, zero points).
    pub fn bytes(&self) -> usize {
        self.qs.len() + self.scales.len() * 4 + self.zeros.len()
    }

    /// Storage in bits per weight.
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes() as f64 * 8.0 / (self.rows * self.cols) as f64
    }

    /// The codes `[rows, cols]`, row-major.
    pub fn codes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.rows * self.cols];
        for (src, dst) in self
            .qs
            .chunks_exact(BLOCK / 2)
            .zip(out.chunks_exact_mut(BLOCK))
        {
            for j in 0..BLOCK / 2 {
                dst[j] = src[j] & 0x0F;
                dst[j + BLOCK / 2] = src[j] >> 4;
            }
        }
        out
    }

    /// Groups per row, `ceil(cols / group)`.
    pub fn n_groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// The dequantized weight `[rows, cols]`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let ng = self.n_groups();
        let mut w = self.codes().into_iter().map(f32::from).collect::<Vec<_>>();
        for r in 0..self.rows {
            for c in 0..self.cols {
                let g = r * ng + c / self.group;
                let i = r * self.cols + c;
                w[i] = self.scales[g] * (w[i] - self.zeros[g] as f32);
            }
        }
        w
    }

    /// `y = x W^T` for `x: [m, cols]` (row-major), `y: [m, rows]`, with the detected backend and all
    /// available threads.
    pub fn gemm(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        self.gemm_with(x, m, y, Backend::detect(), default_threads())
    }

    /// `y = x W^T` with an explicit backend and thread count: `threads = 1` runs on the calling
    /// thread; more splits the output rows into about `4 * threads` chunks that run on rayon's global
    /// pool (sized by `RAYON_NUM_THREADS` or the cores). Small products use fewer chunks.
    pub fn gemm_with(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        backend: Backend,
        threads: usize,
    ) -> Result<()> {
        if x.len() != m * self.cols || y.len() != m * self.rows {
            return Err(KernelError::Shape(format!(
                "gemm: x has {} values, y {}; expected [{m}, {}] and [{m}, {}]",
                x.len(),
                y.len(),
                self.cols,
                self.rows
            )));
        }
        if !backend.is_available() {
            return Err(KernelError::Shape(format!(
                "backend {backend:?} is not supported by this CPU"
            )));
        }
        if m == 0 || self.rows == 0 {
            return Ok(());
        }
        let acts = match backend {
            Backend::Avx2 => Some(QuantActs::new(x, m, self.cols, self.group)),
            Backend::Scalar => None,
        };
        let chunks = self.row_chunks(m, threads);
        let run = |r0: usize, r1: usize, out: &mut [f32]| match (&acts, backend) {
            #[cfg(target_arch = "x86_64")]
            (Some(a), Backend::Avx2) => {
                // SAFETY: Avx2 is only reachable when `is_available` saw AVX2 and FMA.
                unsafe { avx2::rows(self, a, m, r0, r1, out) }
            }
            _ => self.rows_scalar(x, m, r0, r1, out),
        };
        if chunks.len() == 1 {
            // `[m, rows]` is the kernels' layout for the whole row range.
            run(0, self.rows, y);
            return Ok(());
        }
        if m == 1 {
            // One token: each chunk writes its own contiguous slice of `y`.
            let mut outs: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(chunks.len());
            let mut rest = &mut y[..];
            for &(r0, r1) in &chunks {
                let (head, tail) = rest.split_at_mut(r1 - r0);
                outs.push((r0, r1, head));
                rest = tail;
            }
            outs.into_par_iter()
                .for_each(|(r0, r1, out)| run(r0, r1, out));
        } else {
            // Several tokens: per-chunk outputs `[m, rows of chunk]`, copied into `y: [m, rows]`.
            let mut parts: Vec<(usize, usize, Vec<f32>)> = chunks
                .iter()
                .map(|&(r0, r1)| (r0, r1, vec![0f32; m * (r1 - r0)]))
                .collect();
            parts
                .par_iter_mut()
                .for_each(|(r0, r1, out)| run(*r0, *r1, out));
            for (r0, r1, p) in &parts {
                let n = r1 - r0;
                for t in 0..m {
                    y[t * self.rows + r0..t * self.rows + r1]
                        .copy_from_slice(&p[t * n..(t + 1) * n]);
                }
            }
        }
        Ok(())
    }

    /// Rows `r0..r1` of `y = x W^T` for `m` tokens on the calling thread, into
    /// `out[t * (r1 - r0) + (r - r0)]`: the building block for callers that split the rows over their
    /// own threads (the native decoder's pool). `acts` must be `x` quantized for this matrix
    /// ([`QuantActs::quantize_into`] with its `cols` and `group`); the scalar backend reads `x` only.
    #[allow(clippy::too_many_arguments)]
    pub fn rows_into(
        &self,
        x: &[f32],
        acts: &QuantActs,
        m: usize,
        r0: usize,
        r1: usize,
        out: &mut [f32],
        backend: Backend,
    ) -> Result<()> {
        let ng = self.n_groups();
        if r0 > r1 || r1 > self.rows || out.len() != m * (r1 - r0) {
            return Err(KernelError::Shape(format!(
                "int4 rows {r0}..{r1} of {} for {m} tokens into {} outputs",
                self.rows,
                out.len()
            )));
        }
        if x.len() != m * self.cols {
            return Err(KernelError::Shape(format!(
                "int4 rows: x has {} values, expected [{m}, {}]",
                x.len(),
                self.cols
            )));
        }
        if !backend.is_available() {
            return Err(KernelError::Shape(format!(
                "backend {backend:?} is not supported by this CPU"
            )));
        }
        match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => {
                if acts.q.len() != m * self.cols
                    || acts.d.len() != m * ng
                    || acts.paired != self.group.is_multiple_of(2 * BLOCK)
                {
                    return Err(KernelError::Shape(format!(
                        "int4 rows: activations quantized for another shape ({} values, {} groups)",
                        acts.q.len(),
                        acts.d.len()
                    )));
                }
                // SAFETY: AVX2 checked above, shapes checked above.
                unsafe { avx2::rows(self, acts, m, r0, r1, out) }
            }
            _ => self.rows_scalar(x, m, r0, r1, out),
        }
        Ok(())
    }

    /// Output-row ranges for one product: about four per thread (so that work stealing evens out a
    /// core that another process slows down), none below about 256K multiply-adds (a task costs a few
    /// microseconds), each a multiple of 8 rows except the last.
    fn row_chunks(&self, m: usize, threads: usize) -> Vec<(usize, usize)> {
        let work = self.rows * self.cols * m;
        let threads = threads.max(1);
        let n = if threads == 1 {
            1
        } else {
            (4 * threads)
                .min((work >> 18).max(1))
                .min(self.rows.div_ceil(8))
        };
        let size = self.rows.div_ceil(n).next_multiple_of(8).min(self.rows);
        (0..self.rows)
            .step_by(size.max(1))
            .map(|r0| (r0, (r0 + size).min(self.rows)))
            .collect()
    }

    /// Rows `r0..r1` for all `m` tokens into `out[t * (r1 - r0) + (r - r0)]`.
    fn rows_scalar(&self, x: &[f32], m: usize, r0: usize, r1: usize, out: &mut [f32]) {
        let ng = self.n_groups();
        let mut wrow = vec![0f32; self.cols];
        for r in r0..r1 {
            let q = &self.qs[r * self.cols / 2..(r + 1) * self.cols / 2];
            for (b, src) in q.chunks_exact(BLOCK / 2).enumerate() {
                for j in 0..BLOCK / 2 {
                    wrow[b * BLOCK + j] = (src[j] & 0x0F) as f32;
                    wrow[b * BLOCK + j + BLOCK / 2] = (src[j] >> 4) as f32;
                }
            }
            for g in 0..ng {
                let (s, z) = (self.scales[r * ng + g], self.zeros[r * ng + g] as f32);
                for w in &mut wrow[g * self.group..((g + 1) * self.group).min(self.cols)] {
                    *w = s * (*w - z);
                }
            }
            for t in 0..m {
                let xt = &x[t * self.cols..(t + 1) * self.cols];
                out[t * (r1 - r0) + (r - r0)] = wrow.iter().zip(xt).map(|(a, b)| a * b).sum();
            }
        }
    }
}

/// Threads the kernels use by default: `QTALE_KERNEL_THREADS`, else the available parallelism.
pub fn default_threads() -> usize {
    std::env::var("QTALE_KERNEL_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Activations quantized to int8, one scale per (token, weight group), plus the group sums of the
/// dequantized activations, `d * sum(q)`.
///
/// The sums feed the weights' zero-point term, `sum_c x[c] s (q[c] - z) = s sum_c x[c] q[c] - s z
/// sum_c x[c]`. Both terms must see the same (quantized) activations: then the kernel computes the
/// exact product of the dequantized activations with the dequantized weights, whose error against
/// f32 activations is `sum_c (x'[c] - x[c]) W[r, c]`. The exact f32 sum of `x` in the second term
/// instead leaves `s sum_c (x'[c] - x[c]) q[c]`, the rounding errors weighted by the uncentered codes
/// (0..15) rather than by the weights: on SmolLM2-135M (int4 g64) that made the logits' error against
/// f32 activations 2-6x larger, and its size swung by 2x with the f32 summation order of the sums.
///
/// With `paired` (groups of an even number of blocks) each run of 64 activations `x[0..64]` (blocks
/// `b`, `b + 1`) is stored as `x[0..16], x[32..48], x[16..32], x[48..64]`: the order of the low
/// nibbles and then the high nibbles of the two blocks' 32 packed bytes loaded as one vector. A ragged
/// last group of an odd number of blocks keeps its final block in plain order (the kernel unpacks it
/// on its own).
#[derive(Debug)]
pub struct QuantActs {
    /// `[m, cols]`, permuted per 64 when `paired`
    pub q: Vec<i8>,
    /// `[m, ceil(cols / group)]`
    pub d: Vec<f32>,
    /// `[m, ceil(cols / group)]`
    pub sum: Vec<f32>,
    pub paired: bool,
}

impl QuantActs {
    pub fn new(x: &[f32], m: usize, cols: usize, group: usize) -> Self {
        let mut a = QuantActs {
            q: Vec::new(),
            d: Vec::new(),
            sum: Vec::new(),
            paired: false,
        };
        a.quantize_into(x, m, cols, group);
        a
    }

    /// Quantize `x: [m, cols]` for weights of group size `group` into these buffers: the same values
    /// as [`QuantActs::new`], without allocating when the buffers already have the size (the decode
    /// loop reuses one per activation vector).
    pub fn quantize_into(&mut self, x: &[f32], m: usize, cols: usize, group: usize) {
        let ng = cols.div_ceil(group);
        let full = cols / group;
        self.paired = group.is_multiple_of(2 * BLOCK);
        self.q.resize(m * cols, 0);
        self.d.resize(m * ng, 0.0);
        self.sum.resize(m * ng, 0.0);
        let backend = Backend::detect();
        if full == ng {
            quantize_groups(
                &x[..m * cols],
                group,
                &mut self.q,
                &mut self.d,
                &mut self.sum,
                backend,
            );
            return;
        }
        // A ragged last group: the whole groups of each row, then its tail (kept in plain order past
        // its last whole pair of blocks, as the kernel reads it).
        let cut = full * group;
        for t in 0..m {
            let (xr, qr) = (
                &x[t * cols..(t + 1) * cols],
                &mut self.q[t * cols..(t + 1) * cols],
            );
            let (dr, sr) = (
                &mut self.d[t * ng..(t + 1) * ng],
                &mut self.sum[t * ng..(t + 1) * ng],
            );
            quantize_groups(
                &xr[..cut],
                group,
                &mut qr[..cut],
                &mut dr[..full],
                &mut sr[..full],
                backend,
            );
            quantize_groups_scalar(
                &xr[cut..],
                cols - cut,
                self.paired,
                &mut qr[cut..],
                &mut dr[full..],
                &mut sr[full..],
            );
        }
    }
}

/// Quantize whole groups of activations (`x.len()` a multiple of `group`, a multiple of 32) into
/// `q` (same length, in [`QuantActs`]' order: permuted per 64 when `group` is a multiple of 64),
/// `d` and `sum` (one per group): the work of [`QuantActs::quantize_into`], on any run of groups, so
/// that threads can each fill their part of one activation vector.
///
/// Per group: `amax = max |x|`, `d = amax / 127`, `q = round(x / d)` (as `x * (1 / d)`, ties away from
/// zero), `sum = d * (sum of the codes)` (the sum of the dequantized activations, see [`QuantActs`]);
/// a group with a non-finite value or all zeros gets `d = 0`, `q = 0` and `sum` = the f32 sum of `x`
/// (0, or inf / NaN, which the product then carries). Both backends give identical bits.
pub fn quantize_groups(
    x: &[f32],
    group: usize,
    q: &mut [i8],
    d: &mut [f32],
    sum: &mut [f32],
    backend: Backend,
) {
    if x.is_empty() {
        return;
    }
    assert!(group.is_multiple_of(BLOCK) && x.len().is_multiple_of(group));
    let ng = x.len() / group;
    assert!(q.len() == x.len() && d.len() == ng && sum.len() == ng);
    let paired = group.is_multiple_of(2 * BLOCK);
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 if backend.is_available() => {
            // SAFETY: AVX2 checked; lengths checked above.
            unsafe { avx2::quantize_groups(x, group, paired, q, d, sum) }
        }
        _ => quantize_groups_scalar(x, group, paired, q, d, sum),
    }
}

fn quantize_groups_scalar(
    x: &[f32],
    group: usize,
    paired: bool,
    q: &mut [i8],
    d: &mut [f32],
    sum: &mut [f32],
) {
    // Round half away from zero, as `f32::round`.
    let quant = |v: f32, inv: f32| (v * inv).round().clamp(-127.0, 127.0) as i8;
    for (i, (xs, qs)) in x
        .chunks_exact(group)
        .zip(q.chunks_exact_mut(group))
        .enumerate()
    {
        let finite = xs.iter().all(|v| v.is_finite());
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        if !(finite && amax > 0.0) {
            d[i] = 0.0;
            // 0 for a zero group; inf or NaN (whatever the order) for a non-finite one
            sum[i] = xs.iter().sum();
            qs.fill(0);
            continue;
        }
        let scale = amax / 127.0;
        let inv = 1.0 / scale;
        // Paired: each whole run of 64 permuted; a final odd block (ragged tail) stays in order.
        let done = if paired {
            for (xp, qp) in xs
                .chunks_exact(2 * BLOCK)
                .zip(qs.chunks_exact_mut(2 * BLOCK))
            {
                for j in 0..16 {
                    qp[j] = quant(xp[j], inv);
                    qp[16 + j] = quant(xp[32 + j], inv);
                    qp[32 + j] = quant(xp[16 + j], inv);
                    qp[48 + j] = quant(xp[48 + j], inv);
                }
            }
            xs.len() / (2 * BLOCK) * (2 * BLOCK)
        } else {
            0
        };
        for (o, v) in qs[done..].iter_mut().zip(&xs[done..]) {
            *o = quant(*v, inv);
        }
        d[i] = scale;
        sum[i] = scale * qs.iter().map(|&c| c as i32).sum::<i32>() as f32;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Int4Matrix, QuantActs, BLOCK, MAX_TILE};
    use std::arch::x86_64::*;

    /// Round half away from zero (as `f32::round`) in 8 lanes: nearest-even, except at exact ties.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn round_away(v: __m256) -> __m256 {
        let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        let frac = _mm256_sub_ps(v, t);
        let sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0));
        let abs_frac = _mm256_andnot_ps(_mm256_set1_ps(-0.0), frac);
        let tie = _mm256_cmp_ps(abs_frac, _mm256_set1_ps(0.5), _CMP_EQ_OQ);
        let away = _mm256_add_ps(t, _mm256_or_ps(_mm256_set1_ps(1.0), sign));
        let even = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_blendv_ps(even, away, tie)
    }

    /// 32 values to 32 i8 codes in order (`x * inv`, rounded, clamped to +-127).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quant32(x: *const f32, inv: __m256) -> __m256i {
        let lim = _mm256_set1_ps(127.0);
        let nlim = _mm256_set1_ps(-127.0);
        let mut r = [_mm256_setzero_si256(); 4];
        for (k, rk) in r.iter_mut().enumerate() {
            let v = round_away(_mm256_mul_ps(_mm256_loadu_ps(x.add(8 * k)), inv));
            *rk = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, nlim), lim));
        }
        // packs work per 128-bit lane: fix the dword order afterwards
        let ab = _mm256_packs_epi32(r[0], r[1]);
        let cd = _mm256_packs_epi32(r[2], r[3]);
        let abcd = _mm256_packs_epi16(ab, cd);
        _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// 32 i8 codes summed into 8 i32 lanes (4 codes each).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn code_sums(v: __m256i) -> __m256i {
        // u8 ones times the signed codes: pairs in i16, then quads in i32 (no saturation)
        let pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), v);
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_groups(
        x: &[f32],
        group: usize,
        paired: bool,
        q: &mut [i8],
        d: &mut [f32],
        sum: &mut [f32],
    ) {
        let absmask = _mm256_set1_ps(-0.0);
        for (i, (xs, qs)) in x
            .chunks_exact(group)
            .zip(q.chunks_exact_mut(group))
            .enumerate()
        {
            let xp = xs.as_ptr();
            let mut mx = _mm256_setzero_ps();
            // x * 0 is 0 for finite x, NaN for inf / NaN
            let mut bad = _mm256_setzero_ps();
            let mut c = 0;
            while c < group {
                let v = _mm256_loadu_ps(xp.add(c));
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(absmask, v));
                bad = _mm256_or_ps(
                    bad,
                    _mm256_cmp_ps(
                        _mm256_mul_ps(v, _mm256_setzero_ps()),
                        _mm256_setzero_ps(),
                        _CMP_NEQ_UQ,
                    ),
                );
                c += 8;
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
            if _mm256_movemask_ps(bad) != 0 || amax <= 0.0 {
                d[i] = 0.0;
                // as the scalar version: 0, or inf / NaN
                sum[i] = xs.iter().sum();
                qs.fill(0);
                continue;
            }
            let scale = amax / 127.0;
            let inv = _mm256_set1_ps(1.0 / scale);
            let qp = qs.as_mut_ptr() as *mut __m256i;
            // the integer sum of the codes, in i32 lanes
            let mut qsum = _mm256_setzero_si256();
            if paired {
                for p in 0..group / 64 {
                    let a = quant32(xp.add(64 * p), inv);
                    let b = quant32(xp.add(64 * p + 32), inv);
                    qsum = _mm256_add_epi32(qsum, code_sums(a));
                    qsum = _mm256_add_epi32(qsum, code_sums(b));
                    _mm256_storeu_si256(qp.add(2 * p), _mm256_permute2x128_si256(a, b, 0x20));
                    _mm256_storeu_si256(qp.add(2 * p + 1), _mm256_permute2x128_si256(a, b, 0x31));
                }
            } else {
                for p in 0..group / 32 {
                    let a = quant32(xp.add(32 * p), inv);
                    qsum = _mm256_add_epi32(qsum, code_sums(a));
                    _mm256_storeu_si256(qp.add(p), a);
                }
            }
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(qsum),
                _mm256_extracti128_si256(qsum, 1),
            );
            let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
            d[i] = scale;
            sum[i] = scale * _mm_cvtsi128_si32(s) as f32;
        }
    }

    /// How far ahead of the block being multiplied the packed weights are prefetched. The hardware
    /// prefetcher alone left the cold 4096 x 4096 GEMV at ~11 GB/s on the 2-core dev VM; 2-8 KiB
    /// ahead gave ~17 GB/s in interleaved A/B runs (below 1 KiB: no gain).
    const PREFETCH_BYTES: usize = 4096;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One token's per-row group factors: `f[g] = scale[g] * d[g]` (weight scale times activation
    /// scale) and the zero-point term `sum_g scale[g] * zero[g] * xsum[g]`, eight groups per vector.
    /// The same operations in the same order for every token, whatever tile it is in, so a token's
    /// output does not depend on the batch it came with.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group_factors(
        scales: *const f32,
        zeros: *const u8,
        d: *const f32,
        xsum: *const f32,
        ng: usize,
        f: *mut f32,
    ) -> f32 {
        let mut zacc = _mm256_setzero_ps();
        let mut g = 0;
        while g + 8 <= ng {
            let s = _mm256_loadu_ps(scales.add(g));
            let z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                zeros.add(g) as *const __m128i
            )));
            _mm256_storeu_ps(f.add(g), _mm256_mul_ps(s, _mm256_loadu_ps(d.add(g))));
            zacc = _mm256_fmadd_ps(_mm256_mul_ps(s, z), _mm256_loadu_ps(xsum.add(g)), zacc);
            g += 8;
        }
        let mut zterm = hsum(zacc);
        while g < ng {
            let s = *scales.add(g);
            *f.add(g) = s * *d.add(g);
            zterm += s * *zeros.add(g) as f32 * *xsum.add(g);
            g += 1;
        }
        zterm
    }

    /// Rows `r0..r1` for tokens `t0..t0 + NT` into `out[t * (r1 - r0) + (r - r0)]`. Each weight
    /// block is loaded and unpacked once and multiplied with all `NT` tokens while it is in registers,
    /// so an `NT`-token tile streams the weights once, as a GEMV does. Per group and token the float
    /// work is one convert and one FMA with a precomputed factor (`group_factors`); `f` is scratch of
    /// `NT * groups` floats. `PAIRED`: the activations are in [`QuantActs`]' paired order and each
    /// 32-byte load unpacks two blocks (groups of an even number of blocks); `PAIRS`, when not 0, is
    /// the number of block pairs per group known at compile time (1 for group 64, 2 for 128), which
    /// lets the compiler unroll the group: the loop overhead was a third of a GEMV's instructions.
    #[allow(clippy::needless_range_loop)] // indexes several NT-arrays in step
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const NT: usize, const PAIRED: bool, const PAIRS: usize>(
        w: &Int4Matrix,
        a: &QuantActs,
        t0: usize,
        r0: usize,
        r1: usize,
        out: &mut [f32],
        f: &mut [f32],
    ) {
        let cols = w.cols;
        let ng = w.n_groups();
        // Whole groups; a ragged last group (`cols % group` columns) is handled after them.
        let full = cols / w.group;
        let gbytes = w.group / 2;
        let len = r1 - r0;
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
        let qp = w.qs.as_ptr();
        let xq = a.q.as_ptr().add(t0 * cols);
        let d = a.d.as_ptr().add(t0 * ng);
        let sum = a.sum.as_ptr().add(t0 * ng);
        let fp = f.as_mut_ptr();
        // Block pairs and 64-byte lines per group (compile-time constants when `PAIRS` is set).
        let pairs = if PAIRS > 0 { PAIRS } else { gbytes / BLOCK };
        let lines = if PAIRS > 0 {
            (PAIRS * BLOCK).div_ceil(64)
        } else {
            gbytes.div_ceil(64)
        };
        for r in r0..r1 {
            let row = qp.add(r * cols / 2);
            let scales = w.scales.as_ptr().add(r * ng);
            let zeros = w.zeros.as_ptr().add(r * ng);
            let mut zterm = [0f32; NT];
            for t in 0..NT {
                zterm[t] = group_factors(
                    scales,
                    zeros,
                    d.add(t * ng),
                    sum.add(t * ng),
                    ng,
                    fp.add(t * ng),
                );
            }
            let mut tot = [_mm256_setzero_ps(); NT];
            // `wp`: the group's packed bytes; `c`: its first column.
            let (mut wp, mut c) = (row, 0usize);
            for g in 0..full {
                for l in 0..lines {
                    _mm_prefetch(wp.add(64 * l + PREFETCH_BYTES) as *const i8, _MM_HINT_T0);
                }
                let mut acc = [_mm256_setzero_si256(); NT];
                if PAIRED {
                    // Two blocks per 32-byte load: low nibbles then high nibbles, activations
                    // permuted to match. Each i16 lane sums 4 products of at most 15 * 127.
                    for k in 0..pairs {
                        let raw = _mm256_loadu_si256(wp.add(k * BLOCK) as *const __m256i);
                        let lo = _mm256_and_si256(raw, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                        for t in 0..NT {
                            let x = xq.add(t * cols + c + k * 2 * BLOCK);
                            let xl = _mm256_loadu_si256(x as *const __m256i);
                            let xh = _mm256_loadu_si256(x.add(BLOCK) as *const __m256i);
                            let s16 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, xl),
                                _mm256_maddubs_epi16(hi, xh),
                            );
                            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s16, ones));
                        }
                    }
                    wp = wp.add(gbytes);
                    c += w.group;
                } else {
                    let end = wp.add(gbytes);
                    while wp < end {
                        let raw =
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(wp as *const __m128i));
                        let nib = _mm256_and_si256(_mm256_srlv_epi32(raw, shift), mask);
                        for t in 0..NT {
                            let xv = _mm256_loadu_si256(xq.add(t * cols + c) as *const __m256i);
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(nib, xv), ones);
                            acc[t] = _mm256_add_epi32(acc[t], p);
                        }
                        wp = wp.add(BLOCK / 2);
                        c += BLOCK;
                    }
                }
                for t in 0..NT {
                    let fv = _mm256_broadcast_ss(&*fp.add(t * ng + g));
                    tot[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), fv, tot[t]);
                }
            }
            if full < ng {
                // The ragged last group: its block pairs as above (when paired), then any
                // remaining single blocks unpacked on their own (activations in plain order).
                let width = cols - c;
                let mut acc = [_mm256_setzero_si256(); NT];
                let np = if PAIRED { width / (2 * BLOCK) } else { 0 };
                for k in 0..np {
                    let raw = _mm256_loadu_si256(wp.add(k * BLOCK) as *const __m256i);
                    let lo = _mm256_and_si256(raw, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                    for t in 0..NT {
                        let x = xq.add(t * cols + c + k * 2 * BLOCK);
                        let xl = _mm256_loadu_si256(x as *const __m256i);
                        let xh = _mm256_loadu_si256(x.add(BLOCK) as *const __m256i);
                        let s16 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, xl),
                            _mm256_maddubs_epi16(hi, xh),
                        );
                        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s16, ones));
                    }
                }
                wp = wp.add(np * BLOCK);
                c += np * 2 * BLOCK;
                while c < cols {
                    let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(wp as *const __m128i));
                    let nib = _mm256_and_si256(_mm256_srlv_epi32(raw, shift), mask);
                    for t in 0..NT {
                        let xv = _mm256_loadu_si256(xq.add(t * cols + c) as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(nib, xv), ones);
                        acc[t] = _mm256_add_epi32(acc[t], p);
                    }
                    wp = wp.add(BLOCK / 2);
                    c += BLOCK;
                }
                for t in 0..NT {
                    let fv = _mm256_broadcast_ss(&*fp.add(t * ng + full));
                    tot[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), fv, tot[t]);
                }
            }
            for t in 0..NT {
                *out.get_unchecked_mut(t * len + r - r0) = hsum(tot[t]) - zterm[t];
            }
        }
    }

    /// Rows `r0..r1` for all `m` tokens into `out[t * (r1 - r0) + (r - r0)]`, in tiles of up to
    /// [`MAX_TILE`] tokens (one pass over the weights per tile).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `a` must come from the same `cols`/`group` as `w`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows(
        w: &Int4Matrix,
        a: &QuantActs,
        m: usize,
        r0: usize,
        r1: usize,
        out: &mut [f32],
    ) {
        let len = r1 - r0;
        let ng = w.n_groups();
        assert!(r1 <= w.rows && out.len() == len * m);
        assert!(a.q.len() == m * w.cols && a.d.len() == m * ng);
        assert!(a.paired == w.group.is_multiple_of(2 * BLOCK));
        SCRATCH.with(|cell| {
            let mut f = cell.borrow_mut();
            if f.len() < MAX_TILE * ng {
                f.resize(MAX_TILE * ng, 0.0);
            }
            rows_with(w, a, m, r0, r1, out, &mut f[..MAX_TILE * ng]);
        });
    }

    thread_local! {
        /// Per-thread scratch for the group factors (kept between calls: no allocation per product).
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_with(
        w: &Int4Matrix,
        a: &QuantActs,
        m: usize,
        r0: usize,
        r1: usize,
        out: &mut [f32],
        f: &mut [f32],
    ) {
        let len = r1 - r0;
        let pairs = if a.paired { w.group / (2 * BLOCK) } else { 0 };
        let mut t0 = 0;
        while t0 < m {
            let nt = (m - t0).min(MAX_TILE);
            let o = &mut out[t0 * len..(t0 + nt) * len];
            macro_rules! run {
                ($($n:literal)*) => {
                    match (nt, a.paired, pairs) {
                        $(($n, true, 1) => tile::<$n, true, 1>(w, a, t0, r0, r1, o, f),
                          ($n, true, 2) => tile::<$n, true, 2>(w, a, t0, r0, r1, o, f),
                          ($n, true, _) => tile::<$n, true, 0>(w, a, t0, r0, r1, o, f),
                          ($n, false, _) => tile::<$n, false, 0>(w, a, t0, r0, r1, o, f),)*
                        _ => unreachable!("tiles hold 1..=MAX_TILE tokens"),
                    }
                };
            }
            run!(1 2 3 4 5 6 7 8);
            t0 += nt;
        }
    }
}
