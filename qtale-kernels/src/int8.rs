//! Int8 weights with one f16 scale per block of 32 along each row: ggml's Q8_0 (`w = d * q`, `q` in
//! `-127..=127`), stored as two arrays (codes row-major, scales `[rows, cols / 32]`).
//!
//! SmolLM2's GGUF stores the tied embedding / LM head in Q8_0, so a [`Q8Matrix`] made from those blocks
//! (or from their dequantized values with [`Q8Matrix::quantize`], which reproduces them exactly: ggml's
//! rule maps `d * q` back to `(d, q)` when a block's largest `|q|` is 127, as ggml's quantizer makes it)
//! is the model's head without approximation, at 8.5 bits per weight instead of 32.
//!
//! Row kernels ([`Q8Matrix::gemv_rows`]) compute `y[r] = sum_c W[r, c] x[c]` either
//! * with f32 activations ([`Q8Acts::F32`]): exact up to f32 summation order (int8 -> f32 converts,
//!   f32 FMAs), or
//! * with int8 activations ([`Q8Acts::Int8`], quantized once per call with the same per-32 rule, the
//!   scale kept in f32): integer dot products per block (`maddubs` on `|w|` and `sign(x, w)`), one float
//!   FMA per block, as ggml's Q8_0 x Q8_0 dot; its only error is the rounding of the activations.
use half::f16;

use crate::int4::Backend;
use crate::{KernelError, Result};

/// Weights per block.
pub const Q8_BLOCK: usize = 32;

/// Bytes of one ggml `block_q8_0` (f16 scale, 32 codes).
pub const Q8_0_BLOCK_BYTES: usize = 2 + Q8_BLOCK;

/// A row-major int8 matrix `[rows, cols]` with one f16 scale per 32 weights of a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    qs: Vec<i8>,
    d: Vec<f16>,
}

/// ggml's Q8_0 rule for one block: `d = amax / 127`, `q = round(x / d)` (computed as `x * (1 / d)`).
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

impl Q8Matrix {
    fn check_shape(rows: usize, cols: usize) -> Result<()> {
        if cols == 0 || !cols.is_multiple_of(Q8_BLOCK) {
            return Err(KernelError::Shape(format!(
                "int8 matrix: cols = {cols} must be a positive multiple of {Q8_BLOCK}"
            )));
        }
        let _ = rows;
        Ok(())
    }

    /// Quantize a row-major f32 `[rows, cols]` with ggml's Q8_0 rule (scales rounded to f16 as ggml
    /// stores them). Non-finite weights are refused.
    pub fn quantize(rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        Self::check_shape(rows, cols)?;
        if w.len() != rows * cols {
            return Err(KernelError::Shape(format!(
                "int8 quantize: {} values for a [{rows}, {cols}] matrix",
                w.len()
            )));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(KernelError::Shape(format!(
                "int8 quantize: weight {i} (row {}, col {}) is not finite",
                i / cols,
                i % cols
            )));
        }
        let mut qs = vec![0i8; w.len()];
        let d = w
            .chunks_exact(Q8_BLOCK)
            .zip(qs.chunks_exact_mut(Q8_BLOCK))
            .map(|(x, q)| f16::from_f32(quantize_block(x, q)))
            .collect();
        Ok(Q8Matrix { rows, cols, qs, d })
    }

    /// From ggml `block_q8_0` bytes (little-endian f16 scale, then 32 signed codes; rows of `cols / 32`
    /// blocks), e.g. a GGUF tensor's data.
    pub fn from_ggml_q8_0(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        Self::check_shape(rows, cols)?;
        let nb = rows * cols / Q8_BLOCK;
        if bytes.len() != nb * Q8_0_BLOCK_BYTES {
            return Err(KernelError::Shape(format!(
                "Q8_0 data: {} bytes, a [{rows}, {cols}] matrix needs {}",
                bytes.len(),
                nb * Q8_0_BLOCK_BYTES
            )));
        }
        let mut qs = Vec::with_capacity(rows * cols);
        let mut d = Vec::with_capacity(nb);
        for b in bytes.chunks_exact(Q8_0_BLOCK_BYTES) {
            d.push(f16::from_le_bytes([b[0], b[1]]));
            qs.extend(b[2..].iter().map(|&v| v as i8));
        }
        Ok(Q8Matrix { rows, cols, qs, d })
    }

    /// The matrix as ggml `block_q8_0` bytes (inverse of [`Q8Matrix::from_ggml_q8_0`]).
    pub fn to_ggml_q8_0(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.d.len() * Q8_0_BLOCK_BYTES);
        for (d, q) in self.d.iter().zip(self.qs.chunks_exact(Q8_BLOCK)) {
            out.extend_from_slice(&d.to_le_bytes());
            out.extend(q.iter().map(|&v| v as u8));
        }
        out
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Codes `[rows, cols]`, row-major.
    pub fn codes(&self) -> &[i8] {
        &self.qs
    }
    /// Scales `[rows, cols / 32]`.
    pub fn scales(&self) -> &[f16] {
        &self.d
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * self.d.len()
    }

    /// Row `r` dequantized into `out: [cols]` (`d * q`, in f32 exactly).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows || out.len() != self.cols {
            return Err(KernelError::Shape(format!(
                "dequantize_row: row {r} of {} into {} values (cols {})",
                self.rows,
                out.len(),
                self.cols
            )));
        }
        let nb = self.cols / Q8_BLOCK;
        let q = &self.qs[r * self.cols..(r + 1) * self.cols];
        for (b, (o, q)) in out
            .chunks_exact_mut(Q8_BLOCK)
            .zip(q.chunks_exact(Q8_BLOCK))
            .enumerate()
        {
            let d = self.d[r * nb + b].to_f32();
            for (o, &v) in o.iter_mut().zip(q) {
                *o = d * v as f32;
            }
        }
        Ok(())
    }

    /// The whole matrix dequantized, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, o).expect("in range");
        }
        out
    }

    /// Rows `r0..r1` of `y = W x` into `out[r - r0]`, with the activations `acts` (made for this
    /// matrix's `cols`).
    pub fn gemv_rows(
        &self,
        acts: &Q8Acts,
        r0: usize,
        r1: usize,
        out: &mut [f32],
        backend: Backend,
    ) -> Result<()> {
        if r0 > r1 || r1 > self.rows || out.len() != r1 - r0 {
            return Err(KernelError::Shape(format!(
                "int8 gemv: rows {r0}..{r1} of {} into {} outputs",
                self.rows,
                out.len()
            )));
        }
        if acts.cols() != self.cols {
            return Err(KernelError::Shape(format!(
                "int8 gemv: activations of {} values for {} columns",
                acts.cols(),
                self.cols
            )));
        }
        if !backend.is_available() {
            return Err(KernelError::Shape(format!(
                "backend {backend:?} is not supported by this CPU"
            )));
        }
        match (backend, acts) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the backend is available and the shapes were checked above.
            (Backend::Avx2, Q8Acts::F32(x)) => unsafe { avx2::rows_f32(self, x, r0, r1, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Backend::Avx2, Q8Acts::Int8 { q, d, .. }) => unsafe {
                avx2::rows_i8(self, q, d, r0, r1, out)
            },
            (_, Q8Acts::F32(x)) => self.rows_scalar_f32(x, r0, r1, out),
            (_, Q8Acts::Int8 { q, d, .. }) => self.rows_scalar_i8(q, d, r0, r1, out),
        }
        Ok(())
    }

    fn rows_scalar_f32(&self, x: &[f32], r0: usize, r1: usize, out: &mut [f32]) {
        let nb = self.cols / Q8_BLOCK;
        for (r, o) in (r0..r1).zip(out.iter_mut()) {
            let q = &self.qs[r * self.cols..(r + 1) * self.cols];
            let mut s = 0f32;
            for b in 0..nb {
                let d = self.d[r * nb + b].to_f32();
                let blk: f32 = q[b * Q8_BLOCK..(b + 1) * Q8_BLOCK]
                    .iter()
                    .zip(&x[b * Q8_BLOCK..])
                    .map(|(&w, &v)| w as f32 * v)
                    .sum();
                s += d * blk;
            }
            *o = s;
        }
    }

    fn rows_scalar_i8(&self, xq: &[i8], xd: &[f32], r0: usize, r1: usize, out: &mut [f32]) {
        let nb = self.cols / Q8_BLOCK;
        for (r, o) in (r0..r1).zip(out.iter_mut()) {
            let q = &self.qs[r * self.cols..(r + 1) * self.cols];
            let mut s = 0f32;
            for b in 0..nb {
                let dot: i32 = q[b * Q8_BLOCK..(b + 1) * Q8_BLOCK]
                    .iter()
                    .zip(&xq[b * Q8_BLOCK..])
                    .map(|(&w, &v)| w as i32 * v as i32)
                    .sum();
                s += self.d[r * nb + b].to_f32() * xd[b] * dot as f32;
            }
            *o = s;
        }
    }
}

/// Activations for [`Q8Matrix::gemv_rows`]: f32 as given, or int8 with one f32 scale per 32 values.
#[derive(Debug, Clone, PartialEq)]
pub enum Q8Acts {
    F32(Vec<f32>),
    Int8 { q: Vec<i8>, d: Vec<f32> },
}

impl Q8Acts {
    /// Buffers for `cols` activations (`int8`: quantized form), to be filled by [`Q8Acts::set`].
    pub fn new(cols: usize, int8: bool) -> Result<Self> {
        if !cols.is_multiple_of(Q8_BLOCK) {
            return Err(KernelError::Shape(format!(
                "int8 activations: {cols} values are not whole blocks of {Q8_BLOCK}"
            )));
        }
        Ok(if int8 {
            Q8Acts::Int8 {
                q: vec![0; cols],
                d: vec![0.0; cols / Q8_BLOCK],
            }
        } else {
            Q8Acts::F32(vec![0.0; cols])
        })
    }

    pub fn cols(&self) -> usize {
        match self {
            Q8Acts::F32(x) => x.len(),
            Q8Acts::Int8 { q, .. } => q.len(),
        }
    }

    /// Store `x` (quantizing it in the int8 form, scale kept in f32); no allocation.
    pub fn set(&mut self, x: &[f32]) -> Result<()> {
        if x.len() != self.cols() {
            return Err(KernelError::Shape(format!(
                "int8 activations: {} values into buffers for {}",
                x.len(),
                self.cols()
            )));
        }
        match self {
            Q8Acts::F32(v) => v.copy_from_slice(x),
            Q8Acts::Int8 { q, d } => {
                for ((x, q), d) in x
                    .chunks_exact(Q8_BLOCK)
                    .zip(q.chunks_exact_mut(Q8_BLOCK))
                    .zip(d.iter_mut())
                {
                    *d = quantize_block(x, q);
                }
            }
        }
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8Matrix, Q8_BLOCK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Prefetch distance in bytes ahead of the codes being read (cf. the int4 kernel).
    const PREFETCH_BYTES: usize = 2048;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_f32(w: &Q8Matrix, x: &[f32], r0: usize, r1: usize, out: &mut [f32]) {
        let cols = w.cols;
        let nb = cols / Q8_BLOCK;
        let xp = x.as_ptr();
        for r in r0..r1 {
            let q = w.qs.as_ptr().add(r * cols);
            let d = w.d.as_ptr().add(r * nb) as *const u16;
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                let qb = q.add(b * Q8_BLOCK);
                _mm_prefetch(qb.add(PREFETCH_BYTES), _MM_HINT_T0);
                let raw = _mm256_loadu_si256(qb as *const __m256i);
                let lo = _mm256_castsi256_si128(raw);
                let hi = _mm256_extracti128_si256(raw, 1);
                let xb = xp.add(b * Q8_BLOCK);
                let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
                let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
                let w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
                let w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
                let mut s = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
                s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb.add(8)), s);
                s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb.add(16)), s);
                s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb.add(24)), s);
                let db = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*d.add(b) as i32)));
                acc = _mm256_fmadd_ps(s, _mm256_set1_ps(db), acc);
            }
            out[r - r0] = hsum(acc);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_i8(
        w: &Q8Matrix,
        xq: &[i8],
        xd: &[f32],
        r0: usize,
        r1: usize,
        out: &mut [f32],
    ) {
        let cols = w.cols;
        let nb = cols / Q8_BLOCK;
        let ones = _mm256_set1_epi16(1);
        let xp = xq.as_ptr();
        for r in r0..r1 {
            let q = w.qs.as_ptr().add(r * cols);
            let d = w.d.as_ptr().add(r * nb) as *const u16;
            let mut acc = _mm256_setzero_ps();
            let mut b = 0;
            // Eight blocks' factors d_w * d_x per f16 -> f32 convert.
            while b < nb {
                let n8 = (nb - b).min(8);
                let mut f = [0f32; 8];
                if n8 == 8 {
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(d.add(b) as *const __m128i));
                    _mm256_storeu_ps(
                        f.as_mut_ptr(),
                        _mm256_mul_ps(dw, _mm256_loadu_ps(xd.as_ptr().add(b))),
                    );
                } else {
                    for k in 0..n8 {
                        let dw =
                            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*d.add(b + k) as i32)));
                        f[k] = dw * xd[b + k];
                    }
                }
                for (k, fk) in f.iter().enumerate().take(n8) {
                    let qb = q.add((b + k) * Q8_BLOCK);
                    _mm_prefetch(qb.add(PREFETCH_BYTES), _MM_HINT_T0);
                    let wv = _mm256_loadu_si256(qb as *const __m256i);
                    let xv = _mm256_loadu_si256(xp.add((b + k) * Q8_BLOCK) as *const __m256i);
                    // maddubs multiplies unsigned by signed: |w| times x carrying w's sign.
                    let p16 =
                        _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                    let p32 = _mm256_madd_epi16(p16, ones);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(*fk), acc);
                }
                b += n8;
            }
            out[r - r0] = hsum(acc);
        }
    }
}
