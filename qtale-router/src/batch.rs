//! Batches of token ids for calibration (theta search, static-router similarity, analysis).
use tch::Tensor;

use crate::error::{Result, RouterError};

/// A batch of token ids with an optional attention mask (1 = token, 0 = padding), for calibration.
#[derive(Debug)]
pub struct CalibBatch {
    pub ids: Tensor,
    pub mask: Option<Tensor>,
}

impl CalibBatch {
    /// One unpadded row per sequence of equal length, or right-padded rows when lengths differ.
    pub fn from_sequences(seqs: &[Vec<i64>]) -> Result<Self> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if seqs.is_empty() || t == 0 {
            return Err(RouterError::Input("empty calibration batch".into()));
        }
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut mask = Vec::with_capacity(seqs.len() * t);
        for s in seqs {
            for i in 0..t {
                ids.push(s.get(i).copied().unwrap_or(0));
                mask.push(i64::from(i < s.len()));
            }
        }
        let b = seqs.len() as i64;
        let padded = seqs.iter().any(|s| s.len() != t);
        Ok(CalibBatch {
            ids: Tensor::from_slice(&ids).view([b, t as i64]),
            mask: padded.then(|| Tensor::from_slice(&mask).view([b, t as i64])),
        })
    }
}
