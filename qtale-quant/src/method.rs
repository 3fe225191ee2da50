//! The quantizer seam: one small trait ([`Quantizer`]) that every weight-compression method implements,
//! the view of a decoder block it works on ([`BlockAccess`], implemented by the per-architecture driver
//! in `qtale-model`), and a registry by name.
//!
//! The split follows the GPTQ reference: the solver (one weight, given its statistics) lives in the
//! method's module, the driver (which layers, in which order, with which inputs) in the model crate, and
//! the packed runtime layer in [`crate::linear`]. Each can change without the others.
//!
//! Adding a method = one file with a type implementing [`Quantizer`] and one line registering it
//! (in [`builtin`] for the project's own, or [`register`] at run time for a user's).
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, RwLock};

use serde_json::Value;
use tch::Tensor;

use crate::config::QuantConfig;
use crate::error::{QuantError, Result};
use crate::gptq::{Gptq, GptqReport};
use crate::weight::QuantizedWeight;

/// How the driver feeds calibration data to a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calibration {
    /// No data (RTN, magnitude pruning): the driver only walks the weights.
    None,
    /// Blocks in order; each block's inputs come from the already compressed earlier blocks (GPTQ's
    /// sequential rule: later layers see the quantization error of earlier ones).
    Sequential,
    /// Blocks in order on full-precision activations (AWQ searches on unquantized activations).
    FullPrecision,
}

/// What a method needs to know about the inputs of a block's linears.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// GPTQ's Hessian `H = 2/n sum x x^T` per distinct input (also what MagR and Wanda read).
    pub hessian: bool,
    /// The mean absolute value of each input channel (AWQ's activation statistic).
    pub absmean: bool,
    /// Input rows kept verbatim per distinct input (AWQ's output losses and clip search), at most.
    pub rows: usize,
}

impl Needs {
    /// Both sets of needs (for methods that chain another).
    pub fn union(self, o: Needs) -> Needs {
        Needs {
            hessian: self.hessian || o.hessian,
            absmean: self.absmean || o.absmean,
            rows: self.rows.max(o.rows),
        }
    }
}

/// Statistics of one input of a block, as the driver collected them per [`Needs`].
#[derive(Debug, Default)]
pub struct InputStats {
    /// The Hessian accumulator (and GPTQ's solver over it).
    pub hessian: Option<Gptq>,
    /// `[in]` mean |x| per channel.
    pub absmean: Option<Tensor>,
    /// `[rows, in]` the first inputs seen.
    pub rows: Option<Tensor>,
}

impl InputStats {
    pub fn hessian(&mut self) -> Result<&mut Gptq> {
        self.hessian.as_mut().ok_or_else(|| {
            QuantError::Config("the driver collected no Hessian for this input".into())
        })
    }
    pub fn absmean(&self) -> Result<&Tensor> {
        self.absmean.as_ref().ok_or_else(|| {
            QuantError::Config("the driver collected no |x| means for this input".into())
        })
    }
    pub fn rows(&self) -> Result<&Tensor> {
        self.rows.as_ref().ok_or_else(|| {
            QuantError::Config("the driver kept no input rows for this input".into())
        })
    }
}

/// What a method leaves in place of a linear.
#[derive(Debug)]
pub enum Compressed {
    /// Packed integer codes (RTN, GPTQ, AWQ, and anything quantized).
    Quantized {
        weight: QuantizedWeight,
        gptq: Option<GptqReport>,
    },
    /// A dense weight (pruned, or scaled before a later step).
    Dense(Tensor),
}

/// A decoder block as a method sees it: its distinct inputs (each read by one or more linears), the
/// statistics collected on them, the linears' weights, and the output errors AWQ-style searches score.
pub trait BlockAccess {
    /// Index of the block in the model.
    fn layer(&self) -> usize;
    /// Number of distinct inputs (LLaMA: attention input, attention output, MLP input, MLP middle).
    fn n_inputs(&self) -> usize;
    /// The linears that read input `i`, in forward order.
    fn linears(&self, i: usize) -> Vec<&'static str>;
    /// The statistics of input `i`.
    fn stats(&mut self, i: usize) -> &mut InputStats;
    /// Collect input `i`'s statistics again, running the calibration data through the block as it
    /// is now (the linears compressed so far included): GPTQ's true-sequential order.
    fn recapture(&mut self, i: usize) -> Result<()>;
    /// The current (dense, f32) weight `[out, in]` of a linear.
    fn weight(&self, linear: &str) -> Result<Tensor>;
    /// Replace a linear by its compressed form.
    fn set(&mut self, linear: &str, c: Compressed) -> Result<()>;
    /// Whether the op that produces input `i` can absorb a per-channel scale.
    fn scalable(&self, i: usize) -> bool;
    /// Divide input `i` by the per-channel `s` at the op that produces it (AWQ folds its scales into
    /// the preceding norm or linear); errors when that op cannot absorb a scale.
    fn scale_input(&mut self, i: usize, s: &Tensor) -> Result<()>;
    /// Mean squared error, against the block's full-precision reference, of what consumes input `i`
    /// when its linears have the weights `candidates` (in [`BlockAccess::linears`] order).
    fn output_error(&mut self, i: usize, candidates: &[Tensor]) -> Result<f64>;
    /// Keep a method's search artefact (AWQ's scales and clips) in the run's summary.
    fn record(&mut self, artifact: Value);
}

/// A weight-compression method.
pub trait Quantizer: Send + Sync {
    /// Registry name (`rtn`, `gptq`, `awq`, ...).
    fn name(&self) -> &str;
    /// How calibration data must flow through the model.
    fn calibration(&self) -> Calibration;
    /// What to collect on each input.
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// Compress the linears of one block.
    fn quantize_block(&self, block: &mut dyn BlockAccess, cfg: &QuantConfig) -> Result<()>;
}

/// Run `f` on every linear of a block with the statistics of its input, and install what it returns:
/// the loop of every method that compresses each linear on its own.
pub fn each_linear(
    block: &mut dyn BlockAccess,
    mut f: impl FnMut(&str, &Tensor, &mut InputStats) -> Result<Compressed>,
) -> Result<()> {
    for i in 0..block.n_inputs() {
        for name in block.linears(i) {
            let w = block.weight(name)?;
            let c = f(name, &w, block.stats(i))?;
            block.set(name, c)?;
        }
    }
    Ok(())
}

/// Builds a method from its options (the `options` table of a quant config; `{}` when absent).
pub type Factory = fn(&Value) -> Result<Box<dyn Quantizer>>;

/// The project's methods, one line each.
fn builtin() -> Vec<(&'static str, Factory)> {
    vec![
        ("rtn", crate::rtn::factory),
        ("gptq", crate::gptq::factory),
        ("awq", crate::awq::factory),
        ("magr", crate::magr::factory),
        ("magnitude", crate::prune::magnitude_factory),
        ("wanda", crate::prune::wanda_factory),
    ]
}

static REGISTRY: LazyLock<RwLock<BTreeMap<String, Factory>>> = LazyLock::new(|| {
    RwLock::new(
        builtin()
            .into_iter()
            .map(|(n, f)| (n.to_string(), f))
            .collect(),
    )
});

/// Register a method under `name` (an error if the name is taken).
pub fn register(name: &str, factory: Factory) -> Result<()> {
    let mut r = REGISTRY.write().expect("registry lock");
    if r.contains_key(name) {
        return Err(QuantError::Config(format!(
            "a quantizer named `{name}` is already registered"
        )));
    }
    r.insert(name.to_string(), factory);
    Ok(())
}

/// The registered method names.
pub fn names() -> Vec<String> {
    REGISTRY
        .read()
        .expect("registry lock")
        .keys()
        .cloned()
        .collect()
}

/// Whether a method of that name is registered.
pub fn is_registered(name: &str) -> bool {
    REGISTRY.read().expect("registry lock").contains_key(name)
}

/// Build the method `name` with `options`; unknown names and bad options are errors naming them.
pub fn quantizer(name: &str, options: &Value) -> Result<Arc<dyn Quantizer>> {
    let f = *REGISTRY
        .read()
        .expect("registry lock")
        .get(name)
        .ok_or_else(|| {
            QuantError::Config(format!(
                "unknown quantization method `{name}` (registered: {})",
                names().join(", ")
            ))
        })?;
    Ok(Arc::from(f(options)?))
}

/// Options of a method that takes none: `{}` or null; anything else names the unexpected keys.
pub fn no_options(method: &str, options: &Value) -> Result<()> {
    match options {
        Value::Null => Ok(()),
        Value::Object(o) if o.is_empty() => Ok(()),
        Value::Object(o) => Err(QuantError::Config(format!(
            "{method}: unknown option(s) {}",
            o.keys()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        other => Err(QuantError::Config(format!(
            "{method}: options must be a table, got {other}"
        ))),
    }
}

/// Parse a method's typed options (`deny_unknown_fields` structs name a wrong key).
pub fn parse_options<T: serde::de::DeserializeOwned + Default>(
    method: &str,
    options: &Value,
) -> Result<T> {
    if options.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(options.clone())
        .map_err(|e| QuantError::Config(format!("{method} options: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_and_errors() {
        for n in ["rtn", "gptq", "awq"] {
            assert!(is_registered(n), "{n}");
            assert_eq!(quantizer(n, &Value::Null).unwrap().name(), n);
        }
        let e = quantizer("nope", &Value::Null).err().unwrap().to_string();
        assert!(e.contains("`nope`") && e.contains("gptq"), "{e}");
        let e = quantizer("rtn", &serde_json::json!({"alpha": 1}))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`alpha`"), "{e}");
        assert!(register("rtn", crate::rtn::factory).is_err());
    }
}
