//! The artefact every quantization method produces.
use tch::{Kind, Tensor};

use crate::error::{QuantError, Result};

/// A quantized weight `[out, in]`: `w[o, i] = scales[o, g_idx[i]] * (codes[o, i] - zeros[o, g_idx[i]])`.
#[derive(Debug)]
pub struct QuantizedWeight {
    pub bits: u32,
    /// Columns per group (the effective size: `in` for per-channel).
    pub group_size: usize,
    pub sym: bool,
    /// `[out, in]`, `Kind::Uint8`, each `< 2^bits`.
    pub codes: Tensor,
    /// `[out, n_groups]`, f32.
    pub scales: Tensor,
    /// `[out, n_groups]`, f32 holding integer zero points in `0..2^bits`.
    pub zeros: Tensor,
    /// `[in]`, i64: the group of each input column (`i / group_size` unless act-order reordered them).
    pub g_idx: Tensor,
}

impl QuantizedWeight {
    pub fn out_features(&self) -> usize {
        self.codes.size()[0] as usize
    }
    pub fn in_features(&self) -> usize {
        self.codes.size()[1] as usize
    }
    pub fn n_groups(&self) -> usize {
        self.scales.size()[1] as usize
    }

    /// The reference dequantization (f32, on the codes' device).
    pub fn dequantize(&self) -> Tensor {
        let s = self.scales.index_select(1, &self.g_idx);
        let z = self.zeros.index_select(1, &self.g_idx);
        s * (self.codes.to_kind(Kind::Float) - z)
    }

    /// Whether `g_idx[i] == i / group_size` (no act-order permutation of groups).
    pub fn has_trivial_g_idx(&self) -> bool {
        let n = self.in_features() as i64;
        let want = Tensor::arange(n, (Kind::Int64, self.g_idx.device()))
            .divide_scalar_mode(self.group_size as i64, "floor");
        want.equal(&self.g_idx)
    }

    /// Checks the invariants (shapes, code ranges, `g_idx` range).
    pub fn validate(&self) -> Result<()> {
        let (o, i) = (self.out_features() as i64, self.in_features() as i64);
        let ng = self.n_groups() as i64;
        if self.scales.size() != [o, ng] || self.zeros.size() != [o, ng] || self.g_idx.size() != [i]
        {
            return Err(QuantError::Shape(format!(
                "codes {:?}, scales {:?}, zeros {:?}, g_idx {:?} are inconsistent",
                self.codes.size(),
                self.scales.size(),
                self.zeros.size(),
                self.g_idx.size()
            )));
        }
        let maxq = (1i64 << self.bits) - 1;
        if self.codes.numel() > 0 && self.codes.max().int64_value(&[]) > maxq {
            return Err(QuantError::Shape(format!(
                "codes exceed {maxq} for {} bits",
                self.bits
            )));
        }
        if i > 0 {
            let (lo, hi) = (
                self.g_idx.min().int64_value(&[]),
                self.g_idx.max().int64_value(&[]),
            );
            if lo < 0 || hi >= ng {
                return Err(QuantError::Shape(format!(
                    "g_idx range [{lo}, {hi}] outside [0, {ng})"
                )));
            }
        }
        Ok(())
    }
}
