//! The training objective as a list of terms, `L = sum_k w_k(t) * L_k`: cross-entropy, D-LLM's ratio
//! loss, QTALE's entropy regularizer, optional distillation (method.md sections 1-2).
//!
//! A term is one small type ([`LossTerm`]): its weight at a step (schedules live in the term) and its
//! value on a training-mode forward. The config names terms in a table keyed by the term's name
//! (`loss = { ce = {}, ratio = { weight = 5, target = 0.5 }, entropy = { weight = 0.25 } }`), so a
//! sweep addresses `loss.entropy.weight`. Adding a term = one file with the type and its [`Factory`],
//! one registry line ([`builtin`], or [`register`] at run time), and its key in the config.
use std::collections::BTreeMap;
use std::sync::{LazyLock, RwLock};

use serde_json::Value;
use tch::Tensor;

use qtale_router::RoutedOutput;

use crate::data::Batch;
use crate::{config_err, Result};

pub mod ce;
pub mod entropy;
pub mod kd;
pub mod ratio;

/// What a term sees of one micro-batch.
pub struct LossInput<'a> {
    /// The training-mode routed forward (Gumbel gates, router logits, every position's logits).
    pub out: &'a RoutedOutput,
    pub batch: &'a Batch,
    /// The frozen dense model's logits on the same batch, when some term asks for them.
    pub dense_logits: Option<&'a Tensor>,
}

/// One term of the objective.
pub trait LossTerm: Send {
    /// The config key (and registry name).
    fn name(&self) -> &str;
    /// Its weight at `step` of a `total`-step run.
    fn weight(&self, step: usize, total: usize) -> f64;
    /// The unweighted value (a differentiable scalar).
    fn value(&self, x: &LossInput) -> Tensor;
    /// Whether [`LossInput::dense_logits`] must be computed.
    fn needs_dense(&self) -> bool {
        false
    }
}

/// Builds a term from its table in the config.
pub type Factory = fn(&Value) -> Result<Box<dyn LossTerm>>;

/// The project's terms, one line each.
fn builtin() -> Vec<(&'static str, Factory)> {
    vec![
        ("ce", ce::factory),
        ("ratio", ratio::factory),
        ("entropy", entropy::factory),
        ("kd", kd::factory),
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

/// Register a term (an error if the name is taken).
pub fn register(name: &str, factory: Factory) -> Result<()> {
    let mut r = REGISTRY.write().expect("registry lock");
    if r.contains_key(name) {
        return Err(config_err(
            &format!("loss.{name}"),
            "a loss term of that name is already registered",
        ));
    }
    r.insert(name.to_string(), factory);
    Ok(())
}

/// The registered term names.
pub fn names() -> Vec<String> {
    REGISTRY
        .read()
        .expect("registry lock")
        .keys()
        .cloned()
        .collect()
}

/// Parse a term's typed options; errors name `loss.<term>` and the key.
pub fn parse<T: serde::de::DeserializeOwned>(term: &str, v: &Value) -> Result<T> {
    let v = if v.is_null() {
        Value::Object(Default::default())
    } else {
        v.clone()
    };
    serde_json::from_value(v).map_err(|e| config_err(&format!("loss.{term}"), e.to_string()))
}

/// A non-negative finite weight, or an error naming the term.
pub fn check_weight(term: &str, w: f64) -> Result<()> {
    if w.is_finite() && w >= 0.0 {
        Ok(())
    } else {
        Err(config_err(
            &format!("loss.{term}.weight"),
            format!("{w} must be finite and >= 0"),
        ))
    }
}

/// The terms of a config's `loss` table, in name order.
pub struct Objective {
    pub terms: Vec<Box<dyn LossTerm>>,
}

/// The value of each term and the weighted total of one micro-batch.
pub struct LossValue {
    pub total: Tensor,
    /// `(name, unweighted value)` per term.
    pub parts: Vec<(String, Tensor)>,
}

impl Objective {
    /// Build every term of `table`; unknown names are errors listing the registered ones.
    pub fn new(table: &BTreeMap<String, Value>) -> Result<Self> {
        let reg = REGISTRY.read().expect("registry lock");
        let mut terms = Vec::new();
        for (name, v) in table {
            let f = reg.get(name).ok_or_else(|| {
                config_err(
                    &format!("loss.{name}"),
                    format!(
                        "unknown loss term (registered: {})",
                        reg.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
            terms.push(f(v)?);
        }
        if terms.is_empty() {
            return Err(config_err("loss", "the objective has no terms"));
        }
        Ok(Objective { terms })
    }

    pub fn needs_dense(&self) -> bool {
        self.terms.iter().any(|t| t.needs_dense())
    }

    /// `sum_k w_k(step) * L_k` and each `L_k`.
    pub fn evaluate(&self, x: &LossInput, step: usize, total: usize) -> LossValue {
        let mut sum: Option<Tensor> = None;
        let mut parts = Vec::with_capacity(self.terms.len());
        for t in &self.terms {
            let v = t.value(x);
            let w = t.weight(step, total);
            let term = &v * w;
            sum = Some(match sum {
                Some(s) => s + term,
                None => term,
            });
            parts.push((t.name().to_string(), v));
        }
        LossValue {
            total: sum.expect("at least one term"),
            parts,
        }
    }

    /// The weight of term `name` at `step` (0 when the objective has no such term).
    pub fn weight(&self, name: &str, step: usize, total: usize) -> f64 {
        self.terms
            .iter()
            .find(|t| t.name() == name)
            .map_or(0.0, |t| t.weight(step, total))
    }
}
