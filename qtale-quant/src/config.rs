//! The quantization configuration, validated once.
use serde::{Deserialize, Serialize};

use crate::error::{QuantError, Result};

/// How weights are quantized. `group_size = 0` means one group per output row (per-channel).
///
/// A group size that does not divide a weight's input width leaves a ragged last group of
/// `in % group_size` columns (SmolLM2's 576-wide inputs at group 128: 4 x 128 + 64), as the GPTQ
/// reference (IST-DASLab/gptq) and the HF GPTQ layout do: `n_groups = ceil(in / group_size)`, and
/// `g_idx`, `scales` and `qzeros` have that many groups. The int4 CPU kernel takes a ragged last
/// group when it is a multiple of 32 columns (otherwise the layer runs dequantized).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantConfig {
    /// 2, 3, 4 or 8.
    pub bits: u32,
    /// Input columns per scale/zero group; 0 = whole row.
    pub group_size: usize,
    /// Symmetric (zero point fixed at the middle code) instead of asymmetric min-max.
    pub sym: bool,
    /// GPTQ: quantize columns in decreasing order of the Hessian diagonal (`g_idx` records groups).
    pub act_order: bool,
    /// GPTQ with act-order: compute every group's scale/zero on the original weight, in column order.
    pub static_groups: bool,
    /// GPTQ: damping as a fraction of the mean Hessian diagonal (retried at 10x on Cholesky failure).
    pub damp_percent: f64,
    /// GPTQ: columns per lazy-update block.
    pub block_size: usize,
    /// GPTQ (model driver): quantize a block's linears in the order the reference's
    /// `--true-sequential` does, `[q, k, v]`, `[o]`, `[gate, up]`, `[down]`, re-running the block
    /// between stages so that each stage's Hessian comes from inputs produced by the already
    /// quantized earlier stages; `false`: every Hessian from the full-precision block.
    pub true_sequential: bool,
    /// RTN: search a per-group clip ratio on a grid minimizing the weight error (GPTQ's `mse` option).
    pub mse_clip: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            bits: 4,
            group_size: 128,
            sym: false,
            act_order: false,
            static_groups: false,
            damp_percent: 0.01,
            block_size: 128,
            true_sequential: true,
            mse_clip: false,
        }
    }
}

impl QuantConfig {
    pub fn new(bits: u32, group_size: usize) -> Result<Self> {
        let c = QuantConfig {
            bits,
            group_size,
            ..Default::default()
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if ![2, 3, 4, 8].contains(&self.bits) {
            return Err(QuantError::UnsupportedBits(self.bits));
        }
        if !(self.damp_percent > 0.0 && self.damp_percent < 1.0) {
            return Err(QuantError::Config(format!(
                "damp_percent {} must be in (0, 1)",
                self.damp_percent
            )));
        }
        if self.block_size == 0 {
            return Err(QuantError::Config("block_size must be positive".into()));
        }
        if self.static_groups && self.group_size == 0 {
            return Err(QuantError::Config(
                "static_groups needs a group size (group_size > 0)".into(),
            ));
        }
        Ok(())
    }

    /// Largest code, `2^bits - 1`.
    pub fn maxq(&self) -> f64 {
        ((1u32 << self.bits) - 1) as f64
    }

    /// The group size for a weight with `in_features` columns (`in_features` itself per channel); the
    /// last group is ragged when it does not divide them (a group wider than the weight is one
    /// ragged group: the whole row).
    pub fn group_for(&self, in_features: usize) -> Result<usize> {
        if in_features == 0 {
            return Err(QuantError::Shape("a weight with 0 input columns".into()));
        }
        Ok(if self.group_size == 0 {
            in_features
        } else {
            self.group_size
        })
    }

    /// Groups of a weight with `in_features` columns: `ceil(in / group)`.
    pub fn n_groups(&self, in_features: usize) -> Result<usize> {
        Ok(in_features.div_ceil(self.group_for(in_features)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_and_serde() {
        assert!(QuantConfig::new(4, 128).is_ok());
        assert!(matches!(
            QuantConfig::new(5, 128),
            Err(QuantError::UnsupportedBits(5))
        ));
        let bad = QuantConfig {
            damp_percent: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let c: QuantConfig =
            serde_json::from_str(r#"{"bits": 3, "group_size": 64, "act_order": true}"#).unwrap();
        assert_eq!(
            (c.bits, c.group_size, c.act_order, c.block_size),
            (3, 64, true, 128)
        );
        assert!(serde_json::from_str::<QuantConfig>(r#"{"bitz": 3}"#).is_err());
        assert_eq!(c.group_for(576).unwrap(), 64);
        assert_eq!(QuantConfig::new(4, 0).unwrap().group_for(576).unwrap(), 576);
        // ragged last group: 576 = 4 x 128 + 64, 100 = 1 x 64 + 36
        let g128 = QuantConfig::new(4, 128).unwrap();
        assert_eq!(
            (g128.group_for(576).unwrap(), g128.n_groups(576).unwrap()),
            (128, 5)
        );
        assert_eq!(c.n_groups(100).unwrap(), 2);
        // a group wider than the weight: one ragged group, the whole row
        assert_eq!(
            (g128.group_for(96).unwrap(), g128.n_groups(96).unwrap()),
            (128, 1)
        );
        assert!(c.group_for(0).is_err());
    }
}
