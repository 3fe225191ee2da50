//! Block codecs of the ggml types this crate reads and writes (F32, F16, BF16, Q8_0, Q4_0, Q4_1): a
//! scalar dequantizer (and its parallel driver) and ggml's reference quantizers.
use std::sync::OnceLock;

use half::{bf16, f16};

use super::*;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn check_lengths(ty: GgmlType, n_bytes: usize, n_values: usize) -> Result<usize, GgufError> {
    let bad = |msg: String| GgufError::BadLength {
        what: format!("{ty} buffer"),
        msg,
    };
    if !n_values.is_multiple_of(ty.block_size()) {
        return Err(bad(format!(
            "{n_values} values is not a multiple of the block size {}",
            ty.block_size()
        )));
    }
    let n_blocks = n_values / ty.block_size();
    if n_blocks.checked_mul(ty.block_bytes()) != Some(n_bytes) {
        return Err(bad(format!(
            "{n_bytes} bytes do not hold {n_values} values ({} bytes per {} values)",
            ty.block_bytes(),
            ty.block_size()
        )));
    }
    Ok(n_blocks)
}

/// Decodes `bytes` of type `ty` into `out` (single-threaded scalar reference). `out.len()` must be a
/// whole number of blocks and `bytes` exactly that many blocks.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    check_lengths(ty, bytes.len(), out.len())?;
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            // Convert through a small aligned buffer so `half` can use its vectorised slice conversion.
            use half::slice::HalfFloatSliceExt;
            const CHUNK: usize = 256;
            let mut tmp = [f16::ZERO; CHUNK];
            for (o, b) in out.chunks_mut(CHUNK).zip(bytes.chunks(2 * CHUNK)) {
                let t = &mut tmp[..o.len()];
                for (h, p) in t.iter_mut().zip(b.chunks_exact(2)) {
                    *h = f16::from_le_bytes([p[0], p[1]]);
                }
                t.convert_to_f32_slice(o);
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q8_0_BYTES)) {
                let d = f16_at(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q4_0_BYTES)) {
                let d = f16_at(b, 0);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..]) {
                    *l = d * ((q & 0x0f) as i32 - 8) as f32;
                    *h = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q4_1_BYTES)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..]) {
                    *l = d * (q & 0x0f) as f32 + m;
                    *h = d * (q >> 4) as f32 + m;
                }
            }
        }
    }
    Ok(())
}

fn worker_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(16)
    })
}

/// [`dequantize_into`] split over the available cores (in whole blocks) for large tensors.
pub fn dequantize_into_parallel(
    ty: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), GgufError> {
    let n_blocks = check_lengths(ty, bytes.len(), out.len())?;
    let threads = worker_threads();
    const MIN_VALUES_PER_THREAD: usize = 1 << 18;
    if threads <= 1 || out.len() < 2 * MIN_VALUES_PER_THREAD {
        return dequantize_into(ty, bytes, out);
    }
    let threads = threads.min(out.len() / MIN_VALUES_PER_THREAD);
    let blocks_per = n_blocks.div_ceil(threads);
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    std::thread::scope(|s| {
        let handles: Vec<_> = out
            .chunks_mut(blocks_per * bs)
            .zip(bytes.chunks(blocks_per * bb))
            .map(|(o, b)| s.spawn(move || dequantize_into(ty, b, o)))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

// ------------------------------------------------------------------------------------------------------
// Reference quantizers (ggml's reference rounding)

/// Encodes `values` as `ty`. `values.len()` must be a multiple of the block size. The 4/8-bit
/// quantizers follow ggml's reference rounding: Q8_0 `d = amax / 127`, `q = round(x / d)`; Q4_0
/// `d = x_amax / -8` (the value of largest magnitude, signed), `q = min(15, trunc(x / d + 8.5))`; Q4_1
/// `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - min) / d + 0.5))`.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, GgufError> {
    if !values.len().is_multiple_of(ty.block_size()) {
        return Err(GgufError::BadLength {
            what: format!("{ty} quantization"),
            msg: format!(
                "{} values is not a multiple of the block size {}",
                values.len(),
                ty.block_size()
            ),
        });
    }
    let mut out = Vec::with_capacity(values.len() / ty.block_size() * ty.block_bytes());
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for blk in values.chunks_exact(QK) {
                let amax = blk.iter().fold(0f32, |a, &x| a.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|&x| ((x * id).round() as i8) as u8));
            }
        }
        GgmlType::Q4_0 => {
            for blk in values.chunks_exact(QK) {
                let (mut amax, mut max) = (0f32, 0f32);
                for &x in blk {
                    if x.abs() > amax {
                        amax = x.abs();
                        max = x;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |x: f32| ((x * id + 8.5) as u8).min(15);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let (lo, hi) = blk.split_at(QK / 2);
                out.extend(lo.iter().zip(hi).map(|(&l, &h)| q(l) | (q(h) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for blk in values.chunks_exact(QK) {
                let (min, max) = blk
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                        (lo.min(x), hi.max(x))
                    });
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |x: f32| (((x - min) * id + 0.5) as u8).min(15);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let (lo, hi) = blk.split_at(QK / 2);
                out.extend(lo.iter().zip(hi).map(|(&l, &h)| q(l) | (q(h) << 4)));
            }
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------------------
// Writer
