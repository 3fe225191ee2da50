//! Router kinds by name: the D-LLM router and the baselines of the ablations (static layer removal,
//! random, dense), each buildable from a config (`router = { kind = "...", options = {...} }`), saved
//! with a training run and loaded back by the experiment cells. The trainer and the cells only see a
//! [`TrainableRouter`].
//!
//! Adding a kind = one file with a type implementing [`TrainableRouter`] and a [`Factory`], plus one
//! registry line ([`builtin`] for the project's own, [`register`] at run time for a user's).
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{LazyLock, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::nn;

use qtale_model::Llama;

use crate::batch::CalibBatch;
use crate::config::RoutingConfig;
use crate::error::{Result, RouterError};
use crate::router::{DenseRouter, DllmRouter, RandomRouter, Router, StaticRouter};

/// A router the trainer can fine-tune (or simply carry, when it has no parameters) and save.
pub trait TrainableRouter: Router + Send {
    /// The trainable variables, in their own store (`None` for rule-based routers).
    fn var_store(&self) -> Option<&nn::VarStore> {
        None
    }
    /// Write what rebuilds the router into `dir` (its weights, or the rule's parameters).
    fn save(&self, dir: &Path) -> Result<()>;
}

/// Which router, and its options (each kind rejects options it does not know).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub options: Value,
}

impl Default for RouterSpec {
    fn default() -> Self {
        RouterSpec {
            kind: "dllm".into(),
            options: Value::Null,
        }
    }
}

/// What a kind's factory gets.
pub struct RouterBuild<'a> {
    pub model: &'a Llama,
    pub routing: &'a RoutingConfig,
    pub options: &'a Value,
    /// Initialisation seed (D-LLM router weights, the random router's default seed).
    pub seed: u64,
    /// Calibration batches (static layer removal ranks the layers on them); may be empty.
    pub calib: &'a [CalibBatch],
    /// A directory the router was saved to: load it instead of building a fresh one.
    pub saved: Option<&'a Path>,
}

/// Builds (or loads) a router of one kind.
pub type Factory = fn(&RouterBuild) -> Result<Box<dyn TrainableRouter>>;

/// The project's kinds, one line each.
fn builtin() -> Vec<(&'static str, Factory)> {
    vec![
        ("dllm", dllm),
        ("static", static_removal),
        ("random", random),
        ("dense", dense),
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

/// Register a router kind (an error if the name is taken).
pub fn register(kind: &str, factory: Factory) -> Result<()> {
    let mut r = REGISTRY.write().expect("registry lock");
    if r.contains_key(kind) {
        return Err(RouterError::config(
            "router.kind",
            format!("`{kind}` is already registered"),
        ));
    }
    r.insert(kind.to_string(), factory);
    Ok(())
}

/// The registered kinds.
pub fn kinds() -> Vec<String> {
    REGISTRY
        .read()
        .expect("registry lock")
        .keys()
        .cloned()
        .collect()
}

/// Build (or load, when `b.saved` is set) a router of `kind`.
pub fn build(kind: &str, b: &RouterBuild) -> Result<Box<dyn TrainableRouter>> {
    let f = *REGISTRY
        .read()
        .expect("registry lock")
        .get(kind)
        .ok_or_else(|| {
            RouterError::config(
                "router.kind",
                format!("unknown `{kind}` (registered: {})", kinds().join(", ")),
            )
        })?;
    f(b)
}

/// Parse a kind's typed options (`deny_unknown_fields` structs name a wrong key).
pub fn parse_options<T: serde::de::DeserializeOwned + Default>(
    kind: &str,
    options: &Value,
) -> Result<T> {
    if options.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(options.clone())
        .map_err(|e| RouterError::config(&format!("router.options ({kind})"), e.to_string()))
}

fn no_options(kind: &str, options: &Value) -> Result<()> {
    match options {
        Value::Null => Ok(()),
        Value::Object(o) if o.is_empty() => Ok(()),
        _ => Err(RouterError::config(
            &format!("router.options ({kind})"),
            format!("`{kind}` takes no options, got {options}"),
        )),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RouterError + '_ {
    move |source| RouterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// File name of the D-LLM router's weights in a run directory.
pub const DLLM_FILE: &str = "router.safetensors";
/// File name of a rule-based router's parameters in a run directory.
pub const RULE_FILE: &str = "router.json";

impl TrainableRouter for DllmRouter {
    fn var_store(&self) -> Option<&nn::VarStore> {
        Some(&self.vs)
    }
    fn save(&self, dir: &Path) -> Result<()> {
        DllmRouter::save(self, &dir.join(DLLM_FILE))
    }
}

fn dllm(b: &RouterBuild) -> Result<Box<dyn TrainableRouter>> {
    no_options("dllm", b.options)?;
    let device = b.model.device;
    let r = match b.saved {
        Some(dir) => DllmRouter::load(&dir.join(DLLM_FILE), device)?,
        None => DllmRouter::new(
            b.routing,
            b.model.config.hidden_size,
            b.model.layers.len(),
            device,
            b.seed,
        )?,
    };
    Ok(Box::new(r))
}

/// Options of `static`: the layers every token skips, given (`skip`) or the `n_skip` layers whose
/// input and output are most similar on the calibration batches ([`StaticRouter::by_similarity`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticOptions {
    pub skip: Option<Vec<usize>>,
    pub n_skip: Option<usize>,
}

impl TrainableRouter for StaticRouter {
    fn save(&self, dir: &Path) -> Result<()> {
        let p = dir.join(RULE_FILE);
        let v = serde_json::json!({"kind": "static", "skip": self.skipped});
        std::fs::write(&p, v.to_string()).map_err(io(&p))
    }
}

fn static_removal(b: &RouterBuild) -> Result<Box<dyn TrainableRouter>> {
    let o: StaticOptions = parse_options("static", b.options)?;
    let n = b.model.layers.len();
    if let Some(dir) = b.saved {
        let p = dir.join(RULE_FILE);
        let text = std::fs::read_to_string(&p).map_err(io(&p))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| RouterError::Metadata {
            path: p.clone(),
            key: "skip".into(),
            msg: e.to_string(),
        })?;
        let skip: Vec<usize> =
            serde_json::from_value(v["skip"].clone()).map_err(|e| RouterError::Metadata {
                path: p.clone(),
                key: "skip".into(),
                msg: e.to_string(),
            })?;
        return Ok(Box::new(StaticRouter::new(skip)));
    }
    let skip = match (o.skip, o.n_skip) {
        (Some(s), None) => {
            if let Some(bad) = s.iter().find(|&&l| l < b.routing.start_layer || l >= n) {
                return Err(RouterError::config(
                    "router.options.skip",
                    format!(
                        "layer {bad} is not routable (layers {}..{n})",
                        b.routing.start_layer
                    ),
                ));
            }
            s
        }
        (None, Some(k)) => {
            if b.calib.is_empty() {
                return Err(RouterError::config(
                    "router.options.n_skip",
                    "ranking layers by similarity needs calibration batches",
                ));
            }
            StaticRouter::by_similarity(b.model, b.calib, k, b.routing.start_layer)?
                .0
                .skipped
        }
        _ => {
            return Err(RouterError::config(
                "router.options",
                "static takes exactly one of `skip` (a list of layers) or `n_skip`",
            ))
        }
    };
    Ok(Box::new(StaticRouter::new(skip)))
}

/// Options of `random`: execute with probability `p` (hash of seed, layer, row, position).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RandomOptions {
    pub p: f64,
    pub seed: Option<u64>,
}

impl Default for RandomOptions {
    fn default() -> Self {
        RandomOptions { p: 0.5, seed: None }
    }
}

impl TrainableRouter for RandomRouter {
    fn save(&self, dir: &Path) -> Result<()> {
        let p = dir.join(RULE_FILE);
        let v = serde_json::json!({"kind": "random", "p": self.p, "seed": self.seed});
        std::fs::write(&p, v.to_string()).map_err(io(&p))
    }
}

fn random(b: &RouterBuild) -> Result<Box<dyn TrainableRouter>> {
    let o: RandomOptions = parse_options("random", b.options)?;
    if !(0.0..=1.0).contains(&o.p) {
        return Err(RouterError::config(
            "router.options.p",
            format!("{} must be in [0, 1]", o.p),
        ));
    }
    Ok(Box::new(RandomRouter::new(o.p, o.seed.unwrap_or(b.seed))))
}

impl TrainableRouter for DenseRouter {
    fn save(&self, dir: &Path) -> Result<()> {
        let p = dir.join(RULE_FILE);
        std::fs::write(&p, r#"{"kind": "dense"}"#).map_err(io(&p))
    }
}

fn dense(b: &RouterBuild) -> Result<Box<dyn TrainableRouter>> {
    no_options("dense", b.options)?;
    Ok(Box::new(DenseRouter))
}
