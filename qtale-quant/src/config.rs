//! The quantization configuration, validated once.
use serde::{Deserialize, Serialize};

use crate::error::{QuantError, Result};

/// How weights are quantized. `group_size = 0` means one group per output row (per-channel).
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

    /// The group size for a weight with `in_features` columns; errors if it does not divide them.
    pub fn group_for(&self, in_features: usize) -> Result<usize> {
        let g = if self.group_size == 0 {
            in_features
        } else {
            self.group_size
        };
        if g == 0 || !in_features.is_multiple_of(g) {
            return Err(QuantError::Shape(format!(
                "group size {g} does not divide in_features = {in_features}"
            )));
        }
        Ok(g)
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
        assert!(c.group_for(576).is_ok() && c.group_for(100).is_err());
        assert_eq!(QuantConfig::new(4, 0).unwrap().group_for(576).unwrap(), 576);
    }
}
