//! Sparse pruning as auxiliary compression: `magnitude` (score `|W_ij|`) and `wanda` (Sun et al.
//! 2023, "A Simple and Effective Pruning Approach for Large Language Models", eq. 1: score
//! `S_ij = |W_ij| * ||X_j||_2`, weights compared within each output row), optionally followed by a
//! quantizer.
//!
//! Patterns:
//! * unstructured (`sparsity = s`): the `floor(s * in)` lowest scores of each row are zeroed
//!   (`scope = "row"`, Wanda's comparison group and its default) or the `floor(s * out * in)` lowest of
//!   the whole weight (`scope = "layer"`, the classic magnitude rule and the default of `magnitude`);
//!   ties go to the lower index (a stable sort, as the reference's `torch.sort(stable=True)`);
//! * semi-structured `nm = "n:m"` (2:4): in every group of `m` consecutive input weights of a row the
//!   `n` highest scores are kept. The Wanda reference prunes the `n` lowest of `m` instead (its
//!   `prune_n`); the two agree for 2:4 and 4:8.
//!
//! `||X_j||_2` comes from the driver's Hessian diagonal `H_jj = 2/n sum_t x_tj^2`: the square root is
//! `||X_j||_2` times the same constant for every column, so the ranking is Wanda's (the reference's
//! `scaler_row` is `sum x_j^2` over the samples divided by their count: another constant).
//! Calibration is sequential (the reference re-runs each pruned block to produce the next one's
//! inputs); within a block all statistics come from one pass, as in the reference.
//!
//! With `then = "rtn" | "gptq" | ...` the pruned weights are quantized by that method and the mask is
//! re-applied to what it installs: pruned positions get the zero point of their group as code, which
//! dequantizes to exactly 0. RTN keeps zeros at zero anyway (its range always contains 0). GPTQ is
//! run on the pruned weight as is (prune, then quantize): its error feedback writes into the pruned
//! positions and re-masking discards that, so the pruned positions' part of the compensation is lost.
//! This is the simple honest composition, not SparseGPT's joint solve (which keeps them at 0 inside
//! the column loop).
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::config::QuantConfig;
use crate::error::{QuantError, Result};
use crate::method::{
    parse_options, quantizer, BlockAccess, Calibration, Compressed, InputStats, Needs, Quantizer,
};

/// What ranks the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Score {
    /// `|W_ij|`.
    Magnitude,
    /// `|W_ij| * ||X_j||_2` (Wanda).
    Wanda,
}

/// Which weights are compared with each other in unstructured pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each output row on its own (Wanda).
    Row,
    /// The whole weight (classic magnitude pruning).
    Layer,
}

/// The sparsity pattern.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// Zero the fraction `sparsity` of the scores in each `scope`.
    Unstructured { sparsity: f64, scope: Scope },
    /// Keep `n` of every `m` consecutive input weights of a row.
    NM { n: i64, m: i64 },
}

/// Options of `magnitude` and `wanda`: exactly one of `sparsity` and `nm`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PruneOptions {
    /// Fraction of weights to zero, in `[0, 1)`.
    pub sparsity: Option<f64>,
    /// Semi-structured pattern `"n:m"`, e.g. `"2:4"`.
    pub nm: Option<String>,
    /// `row` or `layer` (unstructured only); default `row` for wanda, `layer` for magnitude.
    pub scope: Option<Scope>,
    /// A registered quantizer to run on the pruned weights (the mask is kept); default: none.
    pub then: Option<String>,
}

/// Pruning, then optionally a quantizer.
pub struct Prune {
    score: Score,
    pattern: Pattern,
    then: Option<Arc<dyn Quantizer>>,
}

/// Parse `"n:m"` with `1 <= n <= m`.
pub fn parse_nm(method: &str, s: &str) -> Result<(i64, i64)> {
    let bad = || {
        QuantError::Config(format!(
            "{method}: option `nm` = {s:?}: expected \"n:m\" with 1 <= n <= m, e.g. \"2:4\""
        ))
    };
    let (n, m) = s.split_once(':').ok_or_else(bad)?;
    let n: i64 = n.trim().parse().map_err(|_| bad())?;
    let m: i64 = m.trim().parse().map_err(|_| bad())?;
    if n < 1 || n > m {
        return Err(bad());
    }
    Ok((n, m))
}

impl Prune {
    /// Build from options; every bad value is an error naming its option.
    pub fn new(score: Score, options: &Value) -> Result<Prune> {
        let method = match score {
            Score::Magnitude => "magnitude",
            Score::Wanda => "wanda",
        };
        let o: PruneOptions = parse_options(method, options)?;
        let pattern = match (o.sparsity, &o.nm) {
            (Some(_), Some(_)) => {
                return Err(QuantError::Config(format!(
                    "{method}: options `sparsity` and `nm` exclude each other"
                )))
            }
            (None, None) => {
                return Err(QuantError::Config(format!(
                    "{method}: set option `sparsity` (e.g. 0.5) or `nm` (e.g. \"2:4\")"
                )))
            }
            (Some(s), None) => {
                if !(s.is_finite() && (0.0..1.0).contains(&s)) {
                    return Err(QuantError::Config(format!(
                        "{method}: option `sparsity` = {s} must be in [0, 1)"
                    )));
                }
                let scope = o.scope.unwrap_or(match score {
                    Score::Magnitude => Scope::Layer,
                    Score::Wanda => Scope::Row,
                });
                Pattern::Unstructured { sparsity: s, scope }
            }
            (None, Some(nm)) => {
                if o.scope.is_some() {
                    return Err(QuantError::Config(format!(
                        "{method}: option `scope` applies to `sparsity` only (`nm` is per row)"
                    )));
                }
                let (n, m) = parse_nm(method, nm)?;
                Pattern::NM { n, m }
            }
        };
        let then = match o.then.as_deref() {
            None => None,
            Some(t @ ("magnitude" | "wanda")) => {
                return Err(QuantError::Config(format!(
                    "{method}: option `then` = `{t}`: pruning twice is not a quantizer"
                )))
            }
            Some(t) => Some(
                quantizer(t, &Value::Null)
                    .map_err(|e| QuantError::Config(format!("{method}: option `then`: {e}")))?,
            ),
        };
        Ok(Prune {
            score,
            pattern,
            then,
        })
    }
}

/// Registry factory of `magnitude`.
pub fn magnitude_factory(options: &Value) -> Result<Box<dyn Quantizer>> {
    Ok(Box::new(Prune::new(Score::Magnitude, options)?))
}

/// Registry factory of `wanda`.
pub fn wanda_factory(options: &Value) -> Result<Box<dyn Quantizer>> {
    Ok(Box::new(Prune::new(Score::Wanda, options)?))
}

/// Wanda's score `|W_ij| * ||X_j||_2` from `w: [out, in]` and the Hessian diagonal `[in]`
/// (`sqrt(H_jj)` is `||X_j||_2` up to a constant common to all columns).
pub fn wanda_score(w: &Tensor, h_diag: &Tensor) -> Tensor {
    let norms = h_diag
        .to_device(w.device())
        .to_kind(Kind::Float)
        .clamp_min(0.0)
        .sqrt();
    w.abs().to_kind(Kind::Float) * norms.unsqueeze(0)
}

/// The keep mask (bool, `[out, in]`) of `score: [out, in]` under `pattern`.
pub fn keep_mask(score: &Tensor, pattern: Pattern) -> Result<Tensor> {
    let (o, i) = match score.size().as_slice() {
        [o, i] => (*o, *i),
        s => {
            return Err(QuantError::Shape(format!(
                "pruning scores must be [out, in], got {s:?}"
            )))
        }
    };
    let dev = score.device();
    let score = score.to_kind(Kind::Float);
    match pattern {
        Pattern::Unstructured { sparsity, scope } => {
            let flat = match scope {
                Scope::Row => score,
                Scope::Layer => score.reshape([1, o * i]),
            };
            let n = flat.size()[1];
            let k = (sparsity * n as f64).floor() as i64;
            let mut keep = Tensor::ones(flat.size(), (Kind::Bool, dev));
            if k > 0 {
                let (_, idx) = flat.sort_stable(true, -1, false);
                let pruned = idx.narrow(1, 0, k);
                let _ = keep.scatter_value_(1, &pruned, 0);
            }
            Ok(keep.reshape([o, i]))
        }
        Pattern::NM { n, m } => {
            if i % m != 0 {
                return Err(QuantError::Config(format!(
                    "option `nm` = \"{n}:{m}\": {i} input columns are not a multiple of {m}"
                )));
            }
            let groups = score.reshape([o, i / m, m]);
            let mut keep = Tensor::ones([o, i / m, m], (Kind::Bool, dev));
            if m > n {
                let (_, idx) = groups.sort_stable(true, -1, false);
                let _ = keep.scatter_value_(2, &idx.narrow(2, 0, m - n), 0);
            }
            Ok(keep.reshape([o, i]))
        }
    }
}

/// A block view that re-applies pruning masks to whatever the inner quantizer installs.
struct Masked<'a> {
    block: &'a mut dyn BlockAccess,
    masks: Vec<(&'static str, Tensor)>,
}

/// `c` with the positions where `keep` is false set to zero (dense) or to their group's zero point
/// (codes, so that they dequantize to exactly 0).
pub fn apply_mask(c: Compressed, keep: &Tensor) -> Result<Compressed> {
    match c {
        Compressed::Dense(w) => {
            let keep = keep.to_device(w.device());
            Ok(Compressed::Dense(w.where_scalarother(&keep, 0.0)))
        }
        Compressed::Quantized { mut weight, gptq } => {
            if weight.codes.size() != keep.size() {
                return Err(QuantError::Shape(format!(
                    "pruning mask {:?} does not match codes {:?}",
                    keep.size(),
                    weight.codes.size()
                )));
            }
            let keep = keep.to_device(weight.codes.device());
            let zero = weight
                .zeros
                .index_select(1, &weight.g_idx)
                .round()
                .to_kind(weight.codes.kind());
            weight.codes = weight.codes.where_self(&keep, &zero);
            Ok(Compressed::Quantized { weight, gptq })
        }
    }
}

impl BlockAccess for Masked<'_> {
    fn layer(&self) -> usize {
        self.block.layer()
    }
    fn n_inputs(&self) -> usize {
        self.block.n_inputs()
    }
    fn linears(&self, i: usize) -> Vec<&'static str> {
        self.block.linears(i)
    }
    fn stats(&mut self, i: usize) -> &mut InputStats {
        self.block.stats(i)
    }
    fn recapture(&mut self, i: usize) -> Result<()> {
        self.block.recapture(i)
    }
    fn weight(&self, linear: &str) -> Result<Tensor> {
        self.block.weight(linear)
    }
    fn set(&mut self, linear: &str, c: Compressed) -> Result<()> {
        let c = match self.masks.iter().find(|(n, _)| *n == linear) {
            Some((_, keep)) => apply_mask(c, keep)?,
            None => c,
        };
        self.block.set(linear, c)
    }
    fn scalable(&self, i: usize) -> bool {
        self.block.scalable(i)
    }
    fn scale_input(&mut self, i: usize, s: &Tensor) -> Result<()> {
        self.block.scale_input(i, s)
    }
    fn output_error(&mut self, i: usize, candidates: &[Tensor]) -> Result<f64> {
        self.block.output_error(i, candidates)
    }
    fn record(&mut self, artifact: Value) {
        self.block.record(artifact)
    }
}

impl Quantizer for Prune {
    fn name(&self) -> &str {
        match self.score {
            Score::Magnitude => "magnitude",
            Score::Wanda => "wanda",
        }
    }
    /// Wanda: sequential (the reference); magnitude: none; the inner quantizer's flow when it has one.
    fn calibration(&self) -> Calibration {
        let own = match self.score {
            Score::Magnitude => Calibration::None,
            Score::Wanda => Calibration::Sequential,
        };
        match self.then.as_ref().map(|q| q.calibration()) {
            None | Some(Calibration::None) => own,
            Some(c) => c,
        }
    }
    fn needs(&self) -> Needs {
        let own = Needs {
            hessian: self.score == Score::Wanda,
            ..Needs::default()
        };
        match &self.then {
            Some(q) => own.union(q.needs()),
            None => own,
        }
    }
    fn quantize_block(&self, block: &mut dyn BlockAccess, cfg: &QuantConfig) -> Result<()> {
        let mut masks = Vec::new();
        for i in 0..block.n_inputs() {
            let h_diag = match self.score {
                Score::Magnitude => None,
                Score::Wanda => Some(block.stats(i).hessian()?.hessian().diagonal(0, 0, 1).copy()),
            };
            for name in block.linears(i) {
                let w = block.weight(name)?;
                let score = match &h_diag {
                    None => w.abs(),
                    Some(d) => wanda_score(&w, d),
                };
                let keep = keep_mask(&score, self.pattern)
                    .map_err(|e| QuantError::Config(format!("{}: {name}: {e}", self.name())))?;
                block.set(name, Compressed::Dense(w.where_scalarother(&keep, 0.0)))?;
                masks.push((name, keep));
            }
        }
        match &self.then {
            None => Ok(()),
            Some(q) => q.quantize_block(&mut Masked { block, masks }, cfg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_named() {
        let e = |s: Score, o: Value| Prune::new(s, &o).err().unwrap().to_string();
        use serde_json::json;
        assert!(e(Score::Wanda, json!({"sparsity": 1.0})).contains("`sparsity`"));
        assert!(e(Score::Wanda, json!({"sparsity": -0.1})).contains("`sparsity`"));
        assert!(e(Score::Wanda, json!({"nm": "4:2"})).contains("`nm`"));
        assert!(e(Score::Wanda, json!({"nm": "0:4"})).contains("`nm`"));
        assert!(e(Score::Wanda, json!({"nm": "two:4"})).contains("`nm`"));
        assert!(e(Score::Magnitude, json!({"sparsity": 0.5, "nm": "2:4"})).contains("`nm`"));
        assert!(e(Score::Magnitude, json!({})).contains("`sparsity`"));
        assert!(e(Score::Magnitude, json!({"nm": "2:4", "scope": "row"})).contains("`scope`"));
        let t = e(Score::Wanda, json!({"sparsity": 0.5, "then": "zip"}));
        assert!(t.contains("`then`") && t.contains("zip"), "{t}");
        assert!(e(Score::Wanda, json!({"sparsity": 0.5, "scope": "col"})).contains("col"));
        assert!(e(Score::Wanda, json!({"sparsity": 0.5, "sparse": 1})).contains("sparse"));
        let p = Prune::new(Score::Wanda, &json!({"nm": "2:4", "then": "gptq"})).unwrap();
        assert_eq!(p.pattern, Pattern::NM { n: 2, m: 4 });
        assert_eq!(p.calibration(), Calibration::Sequential);
        let p = Prune::new(Score::Magnitude, &json!({"sparsity": 0.5})).unwrap();
        assert_eq!(
            (p.calibration(), p.needs()),
            (Calibration::None, Needs::default())
        );
        // n:m needs whole groups
        let s = Tensor::ones([2, 6], (Kind::Float, tch::Device::Cpu));
        let e = keep_mask(&s, Pattern::NM { n: 2, m: 4 }).err().unwrap();
        assert!(e.to_string().contains("`nm`"), "{e}");
    }
}
