//! The f32 operations of one LLaMA decoder step at batch 1 (HF `LlamaForCausalLM` semantics), each as a
//! scalar reference and an AVX2+FMA version chosen at run time ([`Backend`]):
//!
//! * [`rms_norm`]: `y = x * rsqrt(mean(x^2) + eps) * w`, in f32 as HF's `LlamaRMSNorm` computes it;
//! * [`rope_tables`] / [`rope`]: rotary embedding, half-split "rotate_half" convention of HF checkpoints
//!   (`x * cos + rotate_half(x) * sin`, angles `pos * inv_freq` in f32 as HF's `LlamaRotaryEmbedding`);
//! * [`attend`]: one query head over a key/value cache (scaled dot products, f32 softmax, weighted sum of
//!   values), the inner loop of grouped-query attention for one token;
//! * [`swiglu`]: `silu(gate) * up` (`silu(x) = x / (1 + exp(-x))`, as libtorch);
//! * [`gemv_f32_rows`]: rows of `y = W x` for a row-major f32 `W`;
//! * [`add_assign`], [`argmax`].
//!
//! The AVX2 `exp` ([`exp_avx2`]) reduces `x = n ln2 + r` with `|r| <= ln2 / 2` and evaluates a degree-6
//! polynomial (Cephes `expf` coefficients): relative error below 2e-7 (checked against `f32::exp` in the
//! tests), so softmax and SiLU stay within f32 rounding of the reference.
use crate::int4::Backend;
use crate::{KernelError, Result};

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(KernelError::Shape(format!(
            "{what}: {got} values, expected {want}"
        )))
    }
}

fn check_backend(b: Backend) -> Result<()> {
    if b.is_available() {
        Ok(())
    } else {
        Err(KernelError::Shape(format!(
            "backend {b:?} is not supported by this CPU"
        )))
    }
}

/// RMSNorm: `out = x * rsqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], backend: Backend) -> Result<()> {
    check_len("rms_norm weight", w.len(), x.len())?;
    check_len("rms_norm output", out.len(), x.len())?;
    check_backend(backend)?;
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the backend is available (checked above).
        Backend::Avx2 => unsafe { avx2::rms_norm(x, w, eps, out) },
        _ => rms_norm_scalar(x, w, eps, out),
    }
    Ok(())
}

fn rms_norm_scalar(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// `cos[i] = cos(pos * inv_freq[i])`, `sin[i] = sin(pos * inv_freq[i])` for `i < head_dim / 2`, the angle
/// rounded to f32 first (HF multiplies f32 positions by f32 `inv_freq`).
pub fn rope_tables(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) -> Result<()> {
    check_len("rope cos table", cos.len(), inv_freq.len())?;
    check_len("rope sin table", sin.len(), inv_freq.len())?;
    let p = pos as f32;
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let a = p * f;
        *c = a.cos();
        *s = a.sin();
    }
    Ok(())
}

/// Rotary embedding in place on `x = [heads, head_dim]` with the half-split convention: for `i < half`,
/// `x[i] <- x[i] cos[i] - x[i + half] sin[i]` and `x[i + half] <- x[i + half] cos[i] + x[i] sin[i]`.
pub fn rope(
    x: &mut [f32],
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    backend: Backend,
) -> Result<()> {
    let half = head_dim / 2;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !x.len().is_multiple_of(head_dim) {
        return Err(KernelError::Shape(format!(
            "rope: {} values are not whole heads of even head_dim {head_dim}",
            x.len()
        )));
    }
    check_len("rope cos table", cos.len(), half)?;
    check_len("rope sin table", sin.len(), half)?;
    check_backend(backend)?;
    for h in x.chunks_exact_mut(head_dim) {
        let (a, b) = h.split_at_mut(half);
        match backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the backend is available (checked above).
            Backend::Avx2 => unsafe { avx2::rope_half(a, b, cos, sin) },
            _ => rope_half_scalar(a, b, cos, sin),
        }
    }
    Ok(())
}

fn rope_half_scalar(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]) {
    for i in 0..a.len() {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// `out = silu(gate) * up` with `silu(g) = g / (1 + exp(-g))`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32], backend: Backend) -> Result<()> {
    check_len("swiglu up", up.len(), gate.len())?;
    check_len("swiglu output", out.len(), gate.len())?;
    check_backend(backend)?;
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the backend is available (checked above).
        Backend::Avx2 => unsafe { avx2::swiglu(gate, up, out) },
        _ => swiglu_scalar(gate, up, out),
    }
    Ok(())
}

fn swiglu_scalar(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `y += x`.
pub fn add_assign(y: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("add_assign", x.len(), y.len())?;
    for (a, b) in y.iter_mut().zip(x) {
        *a += b;
    }
    Ok(())
}

/// Index of the largest value (the first one on ties; NaN never wins), `None` for an empty slice.
pub fn argmax(x: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map(|(i, _)| i)
}

/// An element type of a K/V cache: f32, or f16 (half the bytes to stream per step; what llama.cpp
/// stores by default), converted to f32 on load.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// Eight values from `p` as f32 lanes.
    ///
    /// # Safety
    /// AVX2 + F16C available, `p` valid for eight reads.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for half::f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// Where one head's keys and values sit in a cache: key `j` is `keys[j * stride + offset ..][..head_dim]`
/// (and the same for values), for `j < len`. A token-major cache `[S, kv_heads, head_dim]` has
/// `stride = kv_heads * head_dim` and `offset = kv_head * head_dim`.
#[derive(Debug, Clone, Copy)]
pub struct HeadView<'a, T = f32> {
    pub keys: &'a [T],
    pub values: &'a [T],
    pub len: usize,
    pub stride: usize,
    pub offset: usize,
}

impl<T> HeadView<'_, T> {
    fn check(&self, head_dim: usize) -> Result<()> {
        if self.len == 0 {
            return Err(KernelError::Shape("attention over an empty cache".into()));
        }
        if self.offset + head_dim > self.stride {
            return Err(KernelError::Shape(format!(
                "attention: head offset {} + head_dim {head_dim} exceeds the cache stride {}",
                self.offset, self.stride
            )));
        }
        let need = (self.len - 1) * self.stride + self.offset + head_dim;
        if self.keys.len() < need || self.values.len() < need {
            return Err(KernelError::Shape(format!(
                "attention: caches of {}/{} values hold fewer than {} keys (need {need})",
                self.keys.len(),
                self.values.len(),
                self.len
            )));
        }
        Ok(())
    }
}

/// One query head `q: [head_dim]` over the keys and values of `kv`: `out = softmax(K q * scale) V`, the
/// softmax in f32 (max subtracted), products accumulated in f32 whatever the cache's element type.
/// `scores` is scratch of at least `kv.len` floats.
pub fn attend<T: KvElem>(
    q: &[f32],
    kv: HeadView<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
    backend: Backend,
) -> Result<()> {
    let hd = q.len();
    kv.check(hd)?;
    check_len("attention output", out.len(), hd)?;
    if scores.len() < kv.len {
        return Err(KernelError::Shape(format!(
            "attention scratch: {} floats for {} keys",
            scores.len(),
            kv.len
        )));
    }
    check_backend(backend)?;
    let scores = &mut scores[..kv.len];
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the backend is available and the shapes were checked above.
        Backend::Avx2 => unsafe { avx2::attend(q, &kv, scale, scores, out) },
        _ => attend_scalar(q, &kv, scale, scores, out),
    }
    Ok(())
}

fn attend_scalar<T: KvElem>(
    q: &[f32],
    kv: &HeadView<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    for (j, s) in scores.iter_mut().enumerate() {
        let k = &kv.keys[j * kv.stride + kv.offset..][..hd];
        *s = q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale;
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    let inv = 1.0 / total;
    out.fill(0.0);
    for (j, s) in scores.iter().enumerate() {
        let v = &kv.values[j * kv.stride + kv.offset..][..hd];
        let p = s * inv;
        for (o, x) in out.iter_mut().zip(v) {
            *o += p * x.to_f32();
        }
    }
}

/// Rows `r0..r1` of `y = W x` for a row-major `W: [rows, cols]` (`cols = x.len()`), into
/// `out[r - r0]`.
pub fn gemv_f32_rows(
    w: &[f32],
    x: &[f32],
    r0: usize,
    r1: usize,
    out: &mut [f32],
    backend: Backend,
) -> Result<()> {
    let cols = x.len();
    if r0 > r1 || w.len() < r1 * cols {
        return Err(KernelError::Shape(format!(
            "gemv_f32: rows {r0}..{r1} of {cols} columns exceed a weight of {} values",
            w.len()
        )));
    }
    check_len("gemv_f32 output", out.len(), r1 - r0)?;
    check_backend(backend)?;
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the backend is available and the shapes were checked above.
        Backend::Avx2 => unsafe { avx2::gemv_f32_rows(w, x, r0, r1, out) },
        _ => {
            for (o, row) in out
                .iter_mut()
                .zip(w[r0 * cols..r1 * cols].chunks_exact(cols))
            {
                *o = row.iter().zip(x).map(|(a, b)| a * b).sum();
            }
        }
    }
    Ok(())
}

/// `exp` of 8 lanes (see the module doc for its error). Inputs below -87.3 give 0 (also what the
/// reference's result rounds to for the softmax and SiLU inputs that reach it), above 88.7 give +inf.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    avx2::exp(x)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{HeadView, KvElem};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `exp(x) = 2^n exp(r)`, `n = round(x log2 e)`, `r = x - n ln2` (ln2 in two parts, Cody-Waite), and
    /// `exp(r) = 1 + r + r^2 P(r)` with Cephes' `expf` polynomial.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp(x: __m256) -> __m256 {
        let hi = _mm256_set1_ps(88.722_84);
        let lo = _mm256_set1_ps(-87.336_55);
        let under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
        let over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
        let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let n = _mm256_round_ps(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // 2^n: n in [-126, 128]; split as 2^(n/2) * 2^(n - n/2) so n = 128 and n = -126 stay normal.
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32(ni, 1);
        let n2 = _mm256_sub_epi32(ni, n1);
        let bias = _mm256_set1_epi32(127);
        let p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
        let p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
        let y = _mm256_mul_ps(_mm256_mul_ps(e, p1), p2);
        let y = _mm256_andnot_ps(under, y);
        _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let n = x.len();
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            acc = _mm256_fmadd_ps(v, v, acc);
            i += 8;
        }
        let mut ss = hsum(acc);
        for &v in &x[i..] {
            ss += v * v;
        }
        let inv = 1.0 / (ss / n as f32 + eps).sqrt();
        let iv = _mm256_set1_ps(inv);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), iv);
            let v = _mm256_mul_ps(v, _mm256_loadu_ps(w.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
            i += 8;
        }
        for j in i..n {
            out[j] = x[j] * inv * w[j];
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rope_half(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]) {
        let n = a.len();
        let mut i = 0;
        while i + 8 <= n {
            let x1 = _mm256_loadu_ps(a.as_ptr().add(i));
            let x2 = _mm256_loadu_ps(b.as_ptr().add(i));
            let c = _mm256_loadu_ps(cos.as_ptr().add(i));
            let s = _mm256_loadu_ps(sin.as_ptr().add(i));
            // Same roundings as the reference: products first, then one add/sub.
            let y1 = _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s));
            let y2 = _mm256_add_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s));
            _mm256_storeu_ps(a.as_mut_ptr().add(i), y1);
            _mm256_storeu_ps(b.as_mut_ptr().add(i), y2);
            i += 8;
        }
        super::rope_half_scalar(&mut a[i..], &mut b[i..], &cos[i..], &sin[i..]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = gate.len();
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            let y = _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
            i += 8;
        }
        super::swiglu_scalar(&gate[i..], &up[i..], &mut out[i..]);
    }

    /// Dot product of `n` values of `a` (f32) and `b` (any cache element).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot<T: KvElem>(a: *const f32, b: *const T, n: usize) -> f32 {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), T::load8(b.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 8)), T::load8(b.add(i + 8)), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), T::load8(b.add(i)), acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += *a.add(i) * (*b.add(i)).to_f32();
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend<T: KvElem>(
        q: &[f32],
        kv: &HeadView<'_, T>,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = q.len();
        let kp = kv.keys.as_ptr().add(kv.offset);
        let vp = kv.values.as_ptr().add(kv.offset);
        let n = kv.len;
        let mut smax = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot(q.as_ptr(), kp.add(j * kv.stride), hd) * scale;
            smax = smax.max(*s);
        }
        let mvec = _mm256_set1_ps(smax);
        let mut tot = _mm256_setzero_ps();
        let sp = scores.as_mut_ptr();
        let mut j = 0;
        while j + 8 <= n {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(sp.add(j)), mvec));
            _mm256_storeu_ps(sp.add(j), e);
            tot = _mm256_add_ps(tot, e);
            j += 8;
        }
        let mut total = hsum(tot);
        while j < n {
            let e = (*sp.add(j) - smax).exp();
            *sp.add(j) = e;
            total += e;
            j += 1;
        }
        let inv = 1.0 / total;
        out.fill(0.0);
        let op = out.as_mut_ptr();
        if hd.is_multiple_of(8) && hd <= 256 {
            // Accumulate the weighted values in registers, 8 lanes per vector.
            let nv = hd / 8;
            let mut acc = [_mm256_setzero_ps(); 32];
            for j in 0..n {
                let p = _mm256_set1_ps(*sp.add(j) * inv);
                let v = vp.add(j * kv.stride);
                for (c, a) in acc.iter_mut().enumerate().take(nv) {
                    *a = _mm256_fmadd_ps(p, T::load8(v.add(8 * c)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate().take(nv) {
                _mm256_storeu_ps(op.add(8 * c), *a);
            }
        } else {
            for j in 0..n {
                let p = *sp.add(j) * inv;
                let v = vp.add(j * kv.stride);
                for c in 0..hd {
                    *op.add(c) += p * (*v.add(c)).to_f32();
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_f32_rows(
        w: &[f32],
        x: &[f32],
        r0: usize,
        r1: usize,
        out: &mut [f32],
    ) {
        let cols = x.len();
        let wp = w.as_ptr();
        let mut r = r0;
        // Four rows at a time share each load of x.
        while r + 4 <= r1 {
            let rows = [
                wp.add(r * cols),
                wp.add((r + 1) * cols),
                wp.add((r + 2) * cols),
                wp.add((r + 3) * cols),
            ];
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 8 <= cols {
                let xv = _mm256_loadu_ps(x.as_ptr().add(c));
                for k in 0..4 {
                    acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[k].add(c)), xv, acc[k]);
                }
                c += 8;
            }
            for k in 0..4 {
                let mut s = hsum(acc[k]);
                for (j, xj) in x.iter().enumerate().skip(c) {
                    s += *rows[k].add(j) * xj;
                }
                out[r - r0 + k] = s;
            }
            r += 4;
        }
        while r < r1 {
            out[r - r0] = dot(wp.add(r * cols), x.as_ptr(), cols);
            r += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0]), Some(1));
        assert_eq!(argmax(&[]), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_avx2_relative_error() {
        use std::arch::x86_64::*;
        if !Backend::Avx2.is_available() {
            eprintln!("no AVX2+FMA: skipped");
            return;
        }
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs = [
                x,
                x + 0.0137,
                x + 0.31,
                x + 0.5,
                x + 0.77,
                x + 0.9,
                x + 0.123,
                x + 0.6,
            ];
            let mut ys = [0f32; 8];
            // SAFETY: AVX2+FMA checked above.
            unsafe { _mm256_storeu_ps(ys.as_mut_ptr(), exp_avx2(_mm256_loadu_ps(xs.as_ptr()))) };
            for (a, y) in xs.iter().zip(ys) {
                let want = (*a as f64).exp();
                worst = worst.max(((y as f64 - want) / want).abs());
            }
            x += 0.97;
        }
        assert!(worst < 2e-7, "exp relative error {worst}");
        let mut ys = [0f32; 8];
        let xs = [-100.0, -87.5, 89.0, 0.0, 1.0, -1.0, f32::NEG_INFINITY, 88.5];
        // SAFETY: AVX2+FMA checked above.
        unsafe { _mm256_storeu_ps(ys.as_mut_ptr(), exp_avx2(_mm256_loadu_ps(xs.as_ptr()))) };
        assert_eq!(ys[0], 0.0);
        assert_eq!(ys[2], f32::INFINITY);
        assert_eq!(ys[3], 1.0);
        assert_eq!(ys[6], 0.0);
        assert!((ys[7] as f64 / 88.5f64.exp() - 1.0).abs() < 2e-7);
    }
}
