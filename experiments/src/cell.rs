//! One experiment cell (model x training recipe x quantizer x bits x theta rule x tasks) as an
//! independent, resumable job, keyed by its configuration.
//!
//! QTALE's order of operations (method.md section 2.3): fine-tune LoRA + routers -> merge LoRA ->
//! weight-only PTQ of the block linears -> choose theta on calibration data -> evaluate. Each stage
//! writes its artefact under `cache/<stage>/<key>/` where `key` hashes everything the stage depends
//! on, so cells that share a stage (the dense-quant row and QTALE's theta reference, two theta rules
//! of one trained router) compute it once, an interrupted training run resumes from its checkpoint,
//! and independent processes (Slurm array tasks) can share a cache directory. A finished cell is
//! `out/cells/<key>.json`; rerunning skips it.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tch::{Device, Kind};

use qtale_eval::indicatif::ProgressStyle;
use qtale_eval::metrics::{Csqa7, MeanStderr, TaskMetrics};
use qtale_eval::provenance::{Numerics, Provenance};
use qtale_eval::report::model_hash;
use qtale_eval::run::{evaluate_tasks, TaskBars, TaskResult};
use qtale_eval::{load_task, EncodeConfig, LmScorer, TaskData, TaskId};
use qtale_model::ptq::{quantize_model, PtqOptions};
use qtale_model::quantized_io::{load_quantized, save_quantized};
use qtale_model::Decoder;
use qtale_model::{Llama, LoadedModel, ModelSource};
use qtale_quant::method::{Calibration, Quantizer};
use qtale_quant::QuantConfig;
use qtale_router::kinds::{self, RouterBuild, TrainableRouter};
use qtale_router::RoutedDecoder;
use qtale_router::{routed_nll, CalibBatch, RoutedLlama, ThetaReport, ThetaRule};
use qtale_train::lora::Lora;
use qtale_train::trainer::TrainConfig;

use crate::stage::{write_json_atomic, StageLock};
use crate::training::{run_training, DataSpec, TrainOutcome};

/// Fine-tuning of routers + LoRA: a preset of `qtale_train` with field overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// `dllm` or `qtale`.
    pub preset: String,
    /// Any fields of `TrainConfig` (e.g. `steps`, `loss.entropy.weight`, `loss.ratio.target`,
    /// `router.kind`, `routing.hidden`).
    #[serde(default)]
    pub config: serde_json::Map<String, Value>,
    #[serde(default)]
    pub data: DataSpec,
    /// A finished run of the `train` binary to use instead of training (e.g. one trained on a bigger
    /// machine). Its `done.json` must hold exactly this spec's resolved config and data, so the cell's
    /// identity (its key) is the same as if it had trained here; the path itself is not part of the key.
    /// A relative path is relative to `$QTALE_HOME` (e.g. `runs/qtale-300x8x256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
}

impl TrainSpec {
    /// The preset with the overrides merged in; unknown fields and bad values are errors.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let base = TrainConfig::preset(&self.preset)?;
        let mut v = serde_json::to_value(&base)?;
        merge_json(&mut v, &Value::Object(self.config.clone()));
        let cfg: TrainConfig = crate::from_value_keyed(v).context("train.config")?;
        cfg.validate()?;
        self.data.validate()?;
        Ok(cfg)
    }
}

/// Weight-only PTQ of the block linears.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSpec {
    /// A registered method: rtn, gptq, awq, ... (`qtale_quant::method::names`).
    pub method: String,
    /// The method's own options (e.g. AWQ's `eval_rows`); each method rejects keys it does not know.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub options: Value,
    pub bits: u32,
    /// Input columns per group; default: 128 where it divides every linear's input size, else 64,
    /// else 32 (method.md section 3).
    #[serde(default)]
    pub group_size: Option<usize>,
    /// Other `QuantConfig` fields (sym, act_order, static_groups, damp_percent, mse_clip, ...).
    #[serde(default)]
    pub config: serde_json::Map<String, Value>,
    /// Calibration windows (CoQA + SQuAD text) and their length.
    #[serde(default = "default_calib_sequences")]
    pub calib_sequences: usize,
    #[serde(default = "default_calib_len")]
    pub calib_len: usize,
}

fn default_calib_sequences() -> usize {
    128
}
fn default_calib_len() -> usize {
    512
}

impl QuantSpec {
    /// Check everything that does not depend on the model.
    pub fn validate(&self) -> Result<()> {
        self.config_for(self.group_size.unwrap_or(32)).map(|_| ())
    }

    pub fn resolve(&self, model: &Llama) -> Result<(Arc<dyn Quantizer>, QuantConfig)> {
        let c = &model.config;
        let group = match self.group_size {
            Some(g) => g,
            None => [128, 64, 32]
                .into_iter()
                .find(|g| {
                    c.hidden_size.is_multiple_of(*g) && c.intermediate_size.is_multiple_of(*g)
                })
                .unwrap_or(0),
        };
        self.config_for(group)
    }

    fn config_for(&self, group: usize) -> Result<(Arc<dyn Quantizer>, QuantConfig)> {
        let method = qtale_quant::quantizer(&self.method, &self.options)
            .with_context(|| format!("quant.method `{}`", self.method))?;
        let mut v = serde_json::to_value(QuantConfig::new(self.bits, group)?)?;
        merge_json(&mut v, &Value::Object(self.config.clone()));
        let qc: QuantConfig = crate::from_value_keyed(v).context("quant.config")?;
        qc.validate()?;
        ensure!(
            self.calib_sequences >= 1 && self.calib_len >= 16,
            "quant.calib_sequences must be >= 1 and quant.calib_len >= 16"
        );
        Ok((method, qc))
    }

    /// A short label, e.g. `gptq-w4g64`.
    pub fn label(&self) -> String {
        match self.group_size {
            Some(g) => format!("{}-w{}g{g}", self.method, self.bits),
            None => format!("{}-w{}", self.method, self.bits),
        }
    }
}

/// Calibration windows for theta (non-evaluation text: CoQA + SQuAD).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibSpec {
    pub sequences: usize,
    pub len: usize,
}

impl Default for CalibSpec {
    fn default() -> Self {
        CalibSpec {
            sequences: 8,
            len: 256,
        }
    }
}

/// What is scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSpec {
    /// Task list or group (csqa7, core8, all), as the `eval` binary's `--tasks`.
    pub tasks: String,
    /// First N docs of each task (None: all).
    pub limit: Option<usize>,
    pub batch_size: usize,
    /// Perplexity on LAMBADA passages (held out from calibration and training): windows x length;
    /// 0 windows skips it.
    pub ppl_windows: usize,
    pub ppl_len: usize,
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            tasks: "csqa7".into(),
            limit: None,
            batch_size: 16,
            ppl_windows: 4,
            ppl_len: 512,
        }
    }
}

/// One cell. `name` is a label; everything else defines the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    pub name: String,
    /// GGUF path, HF directory or hub id; `None`: the set-up's SmolLM2 GGUF.
    #[serde(default)]
    pub model: Option<String>,
    /// Routers + LoRA fine-tuning; `None`: the dense model.
    #[serde(default)]
    pub train: Option<TrainSpec>,
    #[serde(default)]
    pub quant: Option<QuantSpec>,
    /// Only for routed cells; default: fixed 0.5.
    #[serde(default)]
    pub theta: Option<ThetaRule>,
    #[serde(default)]
    pub calib: CalibSpec,
    #[serde(default)]
    pub eval: EvalSpec,
}

impl CellConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.train {
            t.resolve()
                .with_context(|| format!("cell `{}`: train", self.name))?;
        }
        if let Some(q) = &self.quant {
            q.validate()
                .with_context(|| format!("cell `{}`: quant", self.name))?;
        }
        if let Some(r) = &self.theta {
            ensure!(
                self.train.is_some(),
                "cell `{}`: a theta rule needs a routed model (a `train` section)",
                self.name
            );
            r.validate()
                .with_context(|| format!("cell `{}`: theta", self.name))?;
        }
        ensure!(
            self.calib.sequences >= 1 && self.calib.len >= 16,
            "cell `{}`: calib.sequences must be >= 1 and calib.len >= 16",
            self.name
        );
        ensure!(
            self.eval.batch_size >= 1,
            "cell `{}`: eval.batch_size must be >= 1",
            self.name
        );
        TaskId::parse_list(&self.eval.tasks)?;
        Ok(())
    }

    pub fn theta_rule(&self) -> Option<ThetaRule> {
        self.train
            .as_ref()
            .map(|_| self.theta.clone().unwrap_or_default())
    }
}

/// Deep-merge `over` into `base` (objects merge key by key; anything else replaces).
pub fn merge_json(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge_json(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// First 16 hex digits of the sha256 of a value's JSON.
pub fn key_of<T: Serialize>(v: &T) -> String {
    let s = serde_json::to_string(v).expect("serializable");
    let h = Sha256::digest(s.as_bytes());
    h.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Where a run keeps things and how it computes.
#[derive(Debug, Clone)]
pub struct Env {
    pub device: Device,
    /// Stage artefacts (trained routers, quantized weights), shared between cells and runs.
    pub cache: PathBuf,
    /// Results (`cells/<key>.json`, tables, plots).
    pub out: PathBuf,
    /// Recompute stages and cells even when cached.
    pub fresh: bool,
    /// Reuse finished cells computed under other numerics (marked stale in tables).
    pub reuse_stale: bool,
    /// Reference results (`results.json`) the run's table is compared with.
    pub reference: Option<PathBuf>,
    /// Task data root.
    pub data_root: PathBuf,
    pub quiet: bool,
}

impl Env {
    pub fn cell_path(&self, key: &str) -> PathBuf {
        self.out.join("cells").join(format!("{key}.json"))
    }
    /// The numerics of this run (cells compute in f32 on `device`).
    pub fn numerics(&self) -> Numerics {
        Numerics::current(self.device, Kind::Float)
    }
    pub fn provenance(&self) -> Provenance {
        Provenance::current(self.device, Kind::Float)
    }
}

/// Why a stored cell may not stand for this run: the numerics fields that differ (all of them when
/// it records none).
pub fn stale_reasons(stored: &CellResult, env: &Env) -> Vec<String> {
    match &stored.provenance {
        Some(p) => env.numerics().differences(&p.numerics),
        None => vec!["the cell records no provenance (computed before it was recorded)".into()],
    }
}

/// One task's numbers in a cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRow {
    pub task: String,
    pub n: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: Option<f64>,
    pub acc_norm_stderr: Option<f64>,
    /// lm-eval's headline metric of the task (acc_norm where reported, else acc).
    pub score: f64,
    pub score_stderr: f64,
    pub exec_ratio: Option<f64>,
    pub flops_rel_dense: f64,
    pub wall_s: f64,
    pub docs_per_s: f64,
    pub tokens_processed: usize,
    /// Per-doc correctness, for paired comparisons between cells scored on the same docs (absent in
    /// cells computed before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_doc: Option<PerDoc>,
}

/// Per-doc 0/1 scores of one task, as strings of `0`/`1` (one character per doc, in `doc_ids` order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerDoc {
    pub doc_ids: Vec<usize>,
    pub acc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<String>,
}

fn bits(v: impl Iterator<Item = f64>) -> String {
    v.map(|x| if x > 0.5 { '1' } else { '0' }).collect()
}

fn unbits(s: &str) -> Vec<f64> {
    s.bytes().map(|c| f64::from(c == b'1')).collect()
}

impl PerDoc {
    /// The headline metric's per-doc scores (acc_norm where the row reports it, else acc).
    pub fn headline(&self, uses_norm: bool) -> Vec<f64> {
        match (&self.acc_norm, uses_norm) {
            (Some(n), true) => unbits(n),
            _ => unbits(&self.acc),
        }
    }
}

impl TaskRow {
    /// Whether the headline score is acc_norm (the task's lm-eval headline, when reported).
    pub fn headline_is_norm(&self) -> bool {
        self.acc_norm.is_some()
            && TaskId::parse(&self.task)
                .is_ok_and(|t| t.headline_metric() == qtale_eval::tasks::Metric::AccNorm)
    }

    /// The row's metrics in the eval crate's form (for its CSQA-7 rule).
    fn metrics(&self) -> TaskMetrics {
        TaskMetrics {
            n: self.n,
            acc: MeanStderr {
                mean: self.acc,
                stderr: self.acc_stderr,
            },
            acc_norm: self.acc_norm.map(|mean| MeanStderr {
                mean,
                stderr: self.acc_norm_stderr.unwrap_or(f64::NAN),
            }),
        }
    }

    /// One row from consecutive chunks of the same task (each with per-doc scores): metrics recomputed
    /// from the concatenated docs (the same mean and standard error as one run over them), cost
    /// summed, execution ratio and FLOPs weighted by tokens.
    fn merge(parts: Vec<TaskRow>) -> Result<TaskRow> {
        let first = parts.first().context("no chunks to merge")?.clone();
        if parts.len() == 1 {
            return Ok(first);
        }
        let mut ids = Vec::new();
        let (mut acc, mut accn) = (String::new(), String::new());
        let (mut wall, mut tokens, mut er, mut fl) = (0.0, 0usize, 0.0, 0.0);
        for p in &parts {
            let d = p
                .per_doc
                .as_ref()
                .with_context(|| format!("{}: a chunk without per-doc scores", p.task))?;
            ids.extend_from_slice(&d.doc_ids);
            acc.push_str(&d.acc);
            if let Some(n) = &d.acc_norm {
                accn.push_str(n);
            }
            wall += p.wall_s;
            tokens += p.tokens_processed;
            er += p.exec_ratio.unwrap_or(1.0) * p.tokens_processed as f64;
            fl += p.flops_rel_dense * p.tokens_processed as f64;
        }
        let a = qtale_eval::metrics::mean_stderr(&unbits(&acc));
        let n = first
            .acc_norm
            .is_some()
            .then(|| qtale_eval::metrics::mean_stderr(&unbits(&accn)));
        let norm = first.headline_is_norm();
        let score = match (norm, n) {
            (true, Some(n)) => n,
            _ => a,
        };
        let t = tokens.max(1) as f64;
        Ok(TaskRow {
            task: first.task.clone(),
            n: ids.len(),
            acc: a.mean,
            acc_stderr: a.stderr,
            acc_norm: n.map(|x| x.mean),
            acc_norm_stderr: n.map(|x| x.stderr),
            score: score.mean,
            score_stderr: score.stderr,
            exec_ratio: first.exec_ratio.map(|_| er / t),
            flops_rel_dense: fl / t,
            wall_s: wall,
            docs_per_s: ids.len() as f64 / wall.max(1e-9),
            tokens_processed: tokens,
            per_doc: Some(PerDoc {
                doc_ids: ids,
                acc,
                acc_norm: first.acc_norm.map(|_| accn),
            }),
        })
    }

    fn from(r: &TaskResult) -> Self {
        let m = &r.metrics;
        let score = m.headline(r.task);
        TaskRow {
            task: r.task.name().to_string(),
            n: m.n,
            acc: m.acc.mean,
            acc_stderr: m.acc.stderr,
            acc_norm: m.acc_norm.map(|x| x.mean),
            acc_norm_stderr: m.acc_norm.map(|x| x.stderr),
            score: score.mean,
            score_stderr: score.stderr,
            exec_ratio: r.efficiency.exec_ratio,
            flops_rel_dense: r.efficiency.flops_rel_dense.unwrap_or(1.0),
            wall_s: r.efficiency.wall_s,
            docs_per_s: r.efficiency.docs_per_s,
            tokens_processed: r.efficiency.tokens_processed,
            per_doc: Some(PerDoc {
                doc_ids: r.docs.iter().map(|d| d.doc_id).collect(),
                acc: bits(r.docs.iter().map(|d| d.acc)),
                acc_norm: m.acc_norm.map(|_| bits(r.docs.iter().map(|d| d.acc_norm))),
            }),
        }
    }
}

/// Quantization stage outcome (`done.json` of its directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantOutcome {
    pub method: String,
    pub config: QuantConfig,
    pub bits_per_weight: f64,
    pub seconds: f64,
    pub calib_sequences: usize,
    pub calib_len: usize,
}

/// A finished cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellResult {
    pub key: String,
    pub name: String,
    pub config: CellConfig,
    pub model_source: String,
    pub model_hash: Option<String>,
    pub train: Option<TrainOutcome>,
    pub quant: Option<QuantOutcome>,
    pub theta: Option<ThetaReport>,
    /// Calibration-window mean NLL of the routed model at the chosen theta and of its dense reference.
    pub calib_nll: Option<f64>,
    pub calib_nll_reference: Option<f64>,
    pub tasks: Vec<TaskRow>,
    /// CSQA-7 average of the headline metrics and its standard error (`sqrt(sum se^2) / 7`).
    pub csqa7: Option<f64>,
    pub csqa7_stderr: Option<f64>,
    pub ppl: Option<f64>,
    /// Execution ratio and FLOPs vs dense over all scored tokens (token-weighted over tasks).
    pub exec_ratio: Option<f64>,
    pub flops_rel_dense: f64,
    /// Weights as stored (packed linears + dense rest + routers).
    pub weight_bytes: usize,
    /// What computed the cell (revision, versions, device, dtype, threads, host, Slurm ids).
    #[serde(default)]
    pub provenance: Option<Provenance>,
    /// Set when the cell was reused under `--reuse-stale` although its numerics differ from the
    /// run's: the differing fields. Tables mark such cells.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale: Vec<String>,
    pub wall_s: f64,
}

impl CellResult {
    pub fn task(&self, name: &str) -> Option<&TaskRow> {
        self.tasks.iter().find(|t| t.task == name)
    }
    pub fn theta(&self) -> Option<f64> {
        self.theta
            .as_ref()
            .and_then(|t| t.chosen.as_ref())
            .map(|p| p.theta)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))
}

/// The model a cell starts from, and its identity for the stage keys.
struct Base {
    src: ModelSource,
    hash: Option<String>,
}

/// Model hashes by source, so listing a grid hashes each model file once.
static HASHES: Mutex<Option<HashMap<String, Option<String>>>> = Mutex::new(None);

impl Base {
    fn new(model: Option<&str>) -> Result<Self> {
        let src = crate::model_source(model)?;
        let mut g = HASHES.lock().expect("hash memo");
        let memo = g.get_or_insert_with(HashMap::new);
        let hash = memo
            .entry(src.to_string())
            .or_insert_with(|| model_hash(&src))
            .clone();
        Ok(Base { src, hash })
    }
    fn id(&self) -> Value {
        serde_json::json!({"source": self.src.to_string(), "sha256": self.hash})
    }
    fn load(&self, device: Device) -> Result<LoadedModel> {
        qtale_model::load_model(&self.src, device, Kind::Float)
            .with_context(|| format!("loading {}", self.src))
    }
}

/// The training stage's key: base model, resolved config, data, and the numerics it runs under.
fn train_key(base: &Base, spec: &TrainSpec, env: &Env) -> Result<String> {
    Ok(key_of(&serde_json::json!({
        "stage": "train", "model": base.id(), "config": spec.resolve()?, "data": spec.data,
        "numerics": env.numerics(),
    })))
}

/// The quantization stage's key: its parent (base model and training), the spec as written (the
/// model decides the rest), and the numerics.
fn quant_key(parent: &Value, spec: &QuantSpec, env: &Env) -> String {
    key_of(
        &serde_json::json!({"stage": "quant", "parent": parent, "spec": spec,
        "numerics": env.numerics()}),
    )
}

/// The stages a cell needs, as `(stage, directory)`, for `--list` and Slurm bookkeeping.
pub fn stage_dirs(cell: &CellConfig, env: &Env) -> Result<Vec<(&'static str, PathBuf)>> {
    let base = Base::new(cell.model.as_deref())?;
    let mut out = Vec::new();
    if let Some(spec) = &cell.train {
        if let Some(from) = &spec.from {
            out.push(("train", qtale_model::load::qtale_home().join(from)));
        } else {
            out.push((
                "train",
                env.cache.join("train").join(train_key(&base, spec, env)?),
            ));
        }
    }
    if let Some(q) = &cell.quant {
        let parent = quant_parent(&base, cell, env)?;
        out.push((
            "quant",
            env.cache.join("quant").join(quant_key(&parent, q, env)),
        ));
    }
    Ok(out)
}

fn quant_parent(base: &Base, cell: &CellConfig, env: &Env) -> Result<Value> {
    Ok(serde_json::json!({"model": base.id(),
        "train": cell.train.as_ref().map(|s| train_key(base, s, env)).transpose()?}))
}

/// Record what produced a stage next to its artefacts.
fn write_stage_provenance(dir: &Path, env: &Env) -> Result<()> {
    write_json_atomic(&dir.join("provenance.json"), &env.provenance())
}

/// Run (or reuse, or resume) the training stage.
fn stage_train(base: &Base, spec: &TrainSpec, env: &Env) -> Result<(PathBuf, TrainOutcome)> {
    if let Some(run) = &spec.from {
        return finished_run(base, run, spec);
    }
    let dir = env.cache.join("train").join(train_key(base, spec, env)?);
    let done = dir.join("done.json");
    // One process trains; others sharing the cache wait here, then read its result.
    let _lock = StageLock::acquire(&dir, env.quiet)?;
    if done.is_file() && !env.fresh {
        return Ok((dir.clone(), read_json(&done)?));
    }
    if env.fresh && dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let mut lm = base.load(env.device)?;
    let mut out = run_training(
        &mut lm.model,
        &lm.tokenizer,
        spec.resolve()?,
        &spec.data,
        &dir,
        env.quiet,
    )?;
    out.model = Some(base.id());
    write_stage_provenance(&dir, env)?;
    write_json_atomic(&done, &out)?;
    Ok((dir, out))
}

/// A finished `train` run standing in for the training stage: it must be the same training (resolved
/// config and data equal field by field) and hold the adapter and router files.
fn finished_run(base: &Base, run: &Path, spec: &TrainSpec) -> Result<(PathBuf, TrainOutcome)> {
    let run = &qtale_model::load::qtale_home().join(run);
    let done: TrainOutcome = read_json(&run.join("done.json")).with_context(|| {
        format!(
            "train.from = {}: not a finished training run",
            run.display()
        )
    })?;
    let want = serde_json::json!({"config": spec.resolve()?, "data": spec.data});
    let have = serde_json::json!({"config": done.config, "data": done.data});
    let mut diffs = Vec::new();
    qtale_train::checkpoint::json_diffs("", &want, &have, ("spec", "run"), &mut diffs);
    ensure!(
        diffs.is_empty(),
        "train.from = {}: the run was trained with a different config: {}",
        run.display(),
        diffs.join(", ")
    );
    // The file hash decides (the same file may sit at another path); sources are named in the error.
    match &done.model {
        Some(m) => ensure!(
            m.get("sha256") == base.id().get("sha256"),
            "train.from = {}: the run was trained on {m}, this cell's model is {}",
            run.display(),
            base.id()
        ),
        None => eprintln!(
            "warning: train.from = {}: the run does not record its base model; assuming {}",
            run.display(),
            base.src
        ),
    }
    for f in ["lora.safetensors", "router.safetensors"] {
        ensure!(
            run.join(f).is_file(),
            "train.from = {}: {f} is missing",
            run.display()
        );
    }
    Ok((run.to_path_buf(), done))
}

/// The dense model of a cell: the base, with the trained LoRA merged when `train` is given.
fn merged_model(
    base: &Base,
    train: Option<(&Path, &TrainConfig)>,
    env: &Env,
) -> Result<LoadedModel> {
    let mut lm = base.load(env.device)?;
    if let Some((dir, cfg)) = train {
        let mut lora = Lora::attach(&mut lm.model, cfg.lora.clone(), 0)?;
        lora.load(&dir.join("lora.safetensors"))?;
        lora.merge(&mut lm.model);
    }
    Ok(lm)
}

/// Quantize `lm` in place (or load the cached result keyed by `parent` + spec).
fn stage_quant(
    lm: &mut LoadedModel,
    parent: &Value,
    spec: &QuantSpec,
    env: &Env,
) -> Result<QuantOutcome> {
    let (method, qc) = spec.resolve(&lm.model)?;
    let dir = env.cache.join("quant").join(quant_key(parent, spec, env));
    let done = dir.join("done.json");
    let _lock = StageLock::acquire(&dir, env.quiet)?;
    if done.is_file() && !env.fresh {
        load_quantized(&mut lm.model, &dir, true)
            .with_context(|| format!("loading quantized weights from {}", dir.display()))?;
        return read_json(&done);
    }
    let calib = if method.calibration() == Calibration::None {
        Vec::new()
    } else {
        let c = qtale_model::corpus::calibration_windows(
            &lm.tokenizer,
            spec.calib_sequences,
            spec.calib_len,
        )?;
        ensure!(
            !c.is_empty(),
            "no calibration text (run `bash scripts/setup.sh`)"
        );
        c
    };
    if !env.quiet {
        let on = if calib.is_empty() {
            String::new()
        } else {
            format!(
                " on {} x {} calibration tokens",
                calib.len(),
                spec.calib_len
            )
        };
        println!(
            "quantize: {} {}-bit group {}{on}",
            method.name(),
            qc.bits,
            qc.group_size
        );
    }
    let opts = PtqOptions {
        cache_dense: true,
        ..Default::default()
    };
    let summary = quantize_model(&mut lm.model, &calib, &*method, &qc, &opts)?;
    save_quantized(&lm.model, &summary, &dir)?;
    write_stage_provenance(&dir, env)?;
    let out = QuantOutcome {
        method: method.name().to_string(),
        config: qc,
        bits_per_weight: summary.bits_per_weight(),
        seconds: summary.seconds,
        calib_sequences: spec.calib_sequences,
        calib_len: spec.calib_len,
    };
    write_json_atomic(&done, &out)?;
    Ok(out)
}

/// A cell's model after stages 1-3: fine-tuned (routers + LoRA), merged, quantized.
pub struct Built {
    base: Base,
    pub lm: LoadedModel,
    /// The training run's directory and outcome (routed cells).
    pub trained: Option<(PathBuf, TrainOutcome)>,
    pub quant: Option<QuantOutcome>,
}

impl Built {
    /// The trained router (of the run's kind, loaded from its directory) and its routing config.
    pub fn router(
        &self,
    ) -> Result<Option<(Box<dyn TrainableRouter>, qtale_router::RoutingConfig)>> {
        match &self.trained {
            Some((dir, out)) => {
                let c = &out.config;
                let r = kinds::build(
                    &c.router.kind,
                    &RouterBuild {
                        model: &self.lm.model,
                        routing: &c.routing,
                        options: &c.router.options,
                        seed: c.seed,
                        calib: &[],
                        saved: Some(dir),
                    },
                )
                .with_context(|| format!("loading the router of {}", dir.display()))?;
                Ok(Some((r, c.routing.clone())))
            }
            None => Ok(None),
        }
    }
}

/// A cell's routed model at its chosen theta, with the calibration batches theta was chosen on.
pub struct Routed<'a> {
    pub model: RoutedLlama<&'a Llama, Box<dyn TrainableRouter>>,
    pub theta: ThetaOutcome,
    pub batches: Vec<CalibBatch>,
}

impl Built {
    /// Stage 4 for routed cells: load the router and choose theta by the cell's rule on calibration
    /// text; `None` for dense cells.
    pub fn routed(&self, cell: &CellConfig, env: &Env) -> Result<Option<Routed<'_>>> {
        let (Some((router, routing)), Some(rule)) = (self.router()?, cell.theta_rule()) else {
            return Ok(None);
        };
        let mut model = RoutedLlama::new(&self.lm.model, router, routing)?;
        let windows = qtale_model::corpus::calibration_windows(
            &self.lm.tokenizer,
            cell.calib.sequences,
            cell.calib.len,
        )?;
        let batches = calib_batches(&windows)?;
        let theta = measure_theta(&mut model, &rule, cell, env, &windows, &batches)?;
        Ok(Some(Routed {
            model,
            theta,
            batches,
        }))
    }
}

/// Stages 1-3 of a cell (each cached): fine-tune, merge LoRA, quantize.
pub fn build_model(cell: &CellConfig, env: &Env) -> Result<Built> {
    cell.validate()?;
    let base = Base::new(cell.model.as_deref())?;
    let trained = match &cell.train {
        Some(spec) => Some(stage_train(&base, spec, env)?),
        None => None,
    };
    let mut lm = merged_model(
        &base,
        trained.as_ref().map(|(d, o)| (d.as_path(), &o.config)),
        env,
    )?;
    let parent = quant_parent(&base, cell, env)?;
    let quant = match &cell.quant {
        Some(q) => Some(stage_quant(&mut lm, &parent, q, env)?),
        None => None,
    };
    Ok(Built {
        base,
        lm,
        trained,
        quant,
    })
}

/// Mean next-token NLL over equal-length windows for any decoder ([`qtale_model::decoder::mean_nll`]).
pub fn mean_nll(dec: &dyn Decoder, windows: &[Vec<i64>]) -> Result<f64> {
    Ok(qtale_model::decoder::mean_nll(dec, windows)?)
}

/// How training runs and cells identify a base model: its source and file hash.
pub fn model_identity(model: Option<&str>) -> Result<Value> {
    Ok(Base::new(model)?.id())
}

/// The key of a cell: everything but its name, with the model identified by its file hash.
pub fn key_for(cell: &CellConfig) -> Result<String> {
    let base = Base::new(cell.model.as_deref())?;
    let mut v = serde_json::to_value(cell)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("name");
        o.insert("model".into(), base.id());
        // `train.from` names where a training came from, not what it was.
        if let Some(t) = o.get_mut("train").and_then(Value::as_object_mut) {
            t.remove("from");
        }
    }
    Ok(key_of(&v))
}

/// Run a cell (or return its stored result).
pub fn run_cell(cell: &CellConfig, env: &Env) -> Result<CellResult> {
    cell.validate()?;
    let t0 = Instant::now();
    let key = key_for(cell)?;
    let path = env.cell_path(&key);
    // One process computes a cell; another one running the same cell waits and reuses it.
    let _lock = StageLock::acquire(&path, env.quiet)?;
    if path.is_file() && !env.fresh {
        // The key excludes the name: a cell finished under another experiment's label is reused
        // under this one's.
        let mut r: CellResult = read_json(&path)?;
        r.name = cell.name.clone();
        r.config.name = cell.name.clone();
        let stale = stale_reasons(&r, env);
        if stale.is_empty() {
            return Ok(r);
        }
        if env.reuse_stale {
            eprintln!(
                "cell `{}`: reusing a result computed under other numerics (--reuse-stale): {}",
                cell.name,
                stale.join("; ")
            );
            r.stale = stale;
            return Ok(r);
        }
        if !env.quiet {
            println!(
                "cell `{}`: stored result computed under other numerics ({}): recomputing",
                cell.name,
                stale.join("; ")
            );
        }
    }
    if !env.quiet {
        println!("== cell `{}` ({key})", cell.name);
    }
    let built = build_model(cell, env)?;
    // 4. Theta.
    let (mut theta, mut calib_nll, mut calib_ref) = (None, None, None);
    let routed = match built.routed(cell, env)? {
        Some(r) => {
            calib_nll = Some(r.theta.calib_nll);
            calib_ref = r.theta.reference_nll;
            theta = Some(r.theta.report);
            Some(RoutedDecoder::new(r.model))
        }
        None => None,
    };
    let lm = &built.lm;
    let dec: &dyn Decoder = match &routed {
        Some(r) => r,
        None => &lm.model,
    };
    // 5. Evaluate.
    let partial = partial_dir(env, &key);
    let (tasks, csqa7, ppl) = evaluate(dec, &lm.model.config, &lm.tokenizer, cell, env, &partial)?;
    let weight_bytes = dec.weight_bytes();
    let tok_sum: usize = tasks
        .iter()
        .map(|t| t.tokens_processed)
        .sum::<usize>()
        .max(1);
    let wavg = |f: &dyn Fn(&TaskRow) -> f64| {
        tasks
            .iter()
            .map(|t| f(t) * t.tokens_processed as f64)
            .sum::<f64>()
            / tok_sum as f64
    };
    let exec_ratio = routed
        .is_some()
        .then(|| wavg(&|t: &TaskRow| t.exec_ratio.unwrap_or(1.0)));
    let flops = wavg(&|t: &TaskRow| t.flops_rel_dense);
    let res = CellResult {
        key: key.clone(),
        name: cell.name.clone(),
        config: cell.clone(),
        model_source: built.base.src.to_string(),
        model_hash: built.base.hash.clone(),
        train: built.trained.clone().map(|(_, o)| o),
        quant: built.quant.clone(),
        theta,
        calib_nll,
        calib_nll_reference: calib_ref,
        tasks,
        csqa7: csqa7.map(|c| c.mean),
        csqa7_stderr: csqa7.map(|c| c.stderr),
        ppl,
        exec_ratio,
        flops_rel_dense: flops,
        weight_bytes,
        provenance: Some(env.provenance()),
        stale: Vec::new(),
        wall_s: t0.elapsed().as_secs_f64(),
    };
    write_json_atomic(&path, &res)?;
    // The cell holds every chunk's per-doc scores now.
    let _ = std::fs::remove_dir_all(&partial);
    Ok(res)
}

/// Calibration windows in batches of 4 rows.
pub fn calib_batches(windows: &[Vec<i64>]) -> Result<Vec<CalibBatch>> {
    ensure!(
        !windows.is_empty(),
        "no calibration text for theta (run `bash scripts/setup.sh`)"
    );
    Ok(windows
        .chunks(4)
        .map(CalibBatch::from_sequences)
        .collect::<std::result::Result<_, _>>()?)
}

/// What the theta step decided.
pub struct ThetaOutcome {
    pub report: ThetaReport,
    /// Calibration NLL of the routed model at the chosen theta.
    pub calib_nll: f64,
    /// The dense reference's (rule (b) only).
    pub reference_nll: Option<f64>,
}

/// Choose theta by `rule` on the calibration windows and leave `r` at it (the rule's own logic is
/// `qtale_router::ThetaRule::apply`); rule (b)'s reference is the dense model with the cell's
/// quantization, on the same windows.
pub fn measure_theta(
    r: &mut RoutedLlama<&Llama, Box<dyn TrainableRouter>>,
    rule: &ThetaRule,
    cell: &CellConfig,
    env: &Env,
    windows: &[Vec<i64>],
    batches: &[CalibBatch],
) -> Result<ThetaOutcome> {
    let reference_nll = if rule.needs_reference() {
        let base = Base::new(cell.model.as_deref())?;
        let mut dense = base.load(env.device)?;
        if let Some(q) = &cell.quant {
            let p = serde_json::json!({"model": base.id(), "train": Value::Null});
            stage_quant(&mut dense, &p, q, env)?;
        }
        Some(mean_nll(&dense.model, windows)?)
    } else {
        None
    };
    let report = rule.apply(r, batches, windows, reference_nll)?;
    let calib_nll = routed_nll(r, windows)?;
    if !env.quiet {
        let c = report.chosen.as_ref();
        println!(
            "theta: {:.3} -> calibration ratio {:.3}, FLOPs {:.3} of dense, NLL {:.4}{}{}",
            r.theta,
            c.map_or(f64::NAN, |p| p.ratio),
            c.map_or(f64::NAN, |p| p.flops_fraction),
            calib_nll,
            reference_nll.map_or(String::new(), |x| format!(" (dense reference {x:.4})")),
            if report.converged {
                ""
            } else {
                " -- the rule's target was NOT met on the calibration data"
            }
        );
    }
    Ok(ThetaOutcome {
        report,
        calib_nll,
        reference_nll,
    })
}

/// Docs per resumable chunk of a task's evaluation: a finished chunk is kept in the cell's partial
/// directory, so an interrupted cell (a killed Slurm task, a pre-empted job) resumes at the chunk.
pub const EVAL_CHUNK_DOCS: usize = 1000;

/// A finished chunk of a task, with the numerics that computed it (reused only when they match).
#[derive(Serialize, Deserialize)]
struct EvalChunk {
    numerics: Numerics,
    row: TaskRow,
}

fn read_chunk(path: &Path, env: &Env) -> Result<Option<TaskRow>> {
    if !path.is_file() || env.fresh {
        return Ok(None);
    }
    let c: EvalChunk = match read_json(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "ignoring unreadable partial result {}: {e:#}",
                path.display()
            );
            return Ok(None);
        }
    };
    Ok((c.numerics == env.numerics()).then_some(c.row))
}

/// The cell's partial directory (finished evaluation chunks), next to its result file.
pub fn partial_dir(env: &Env, key: &str) -> PathBuf {
    env.cell_path(key).with_extension("partial")
}

fn evaluate(
    dec: &dyn Decoder,
    dec_config: &qtale_model::LlamaConfig,
    tok: &tokenizers::Tokenizer,
    cell: &CellConfig,
    env: &Env,
    partial: &Path,
) -> Result<(Vec<TaskRow>, Option<Csqa7>, Option<f64>)> {
    let tasks = TaskId::parse_list(&cell.eval.tasks)?;
    let enc = EncodeConfig::for_model(dec_config, false)?;
    let mut bars = TaskBars::new(
        ProgressStyle::with_template(
            "{prefix:>14} {bar:30} {pos}/{len} requests, {elapsed} < {eta}",
        )?,
        env.quiet,
        false,
    );
    let mut scorer = LmScorer::new(dec, cell.eval.batch_size);
    let mut rows = Vec::new();
    for task in tasks {
        let data = load_task(task, &env.data_root, None, cell.eval.limit)?;
        let mut parts = Vec::new();
        for (i, chunk) in data.docs.chunks(EVAL_CHUNK_DOCS).enumerate() {
            let path = partial.join(format!("{}.{i}.json", task.name()));
            if let Some(row) = read_chunk(&path, env)? {
                if !env.quiet {
                    println!("{:>14} chunk {i}: reused {}", task.name(), path.display());
                }
                parts.push(row);
                continue;
            }
            let sub = TaskData {
                task: data.task,
                source: data.source.clone(),
                available: data.available,
                docs: chunk.to_vec(),
            };
            let (res, _) = evaluate_tasks(
                &mut scorer,
                tok,
                &enc,
                std::slice::from_ref(&sub),
                dec.weight_bytes(),
                &mut bars,
            )?;
            let row = TaskRow::from(&res[0]);
            std::fs::create_dir_all(partial)
                .with_context(|| format!("creating {}", partial.display()))?;
            write_json_atomic(
                &path,
                &EvalChunk {
                    numerics: env.numerics(),
                    row: row.clone(),
                },
            )?;
            parts.push(row);
        }
        rows.push(TaskRow::merge(parts)?);
    }
    let metrics: Vec<(TaskId, TaskMetrics)> = rows
        .iter()
        .filter_map(|r| Some((TaskId::parse(&r.task).ok()?, r.metrics())))
        .collect();
    let pairs: Vec<(TaskId, &TaskMetrics)> = metrics.iter().map(|(t, m)| (*t, m)).collect();
    let csqa7 = qtale_eval::metrics::csqa7(&pairs);
    let ppl = if cell.eval.ppl_windows > 0 {
        let w =
            qtale_model::corpus::heldout_windows(tok, cell.eval.ppl_windows, cell.eval.ppl_len)?;
        if w.is_empty() {
            bail!("no held-out text for perplexity (run `bash scripts/setup.sh`)");
        }
        let p = mean_nll(dec, &w)?.exp();
        dec.take_exec_stats();
        Some(p)
    } else {
        None
    };
    Ok((rows, csqa7, ppl))
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    fn row(acc: &str, accn: &str, tokens: usize, ratio: f64, wall: f64) -> TaskRow {
        let a = qtale_eval::metrics::mean_stderr(&unbits(acc));
        let n = qtale_eval::metrics::mean_stderr(&unbits(accn));
        TaskRow {
            task: "hellaswag".into(),
            n: acc.len(),
            acc: a.mean,
            acc_stderr: a.stderr,
            acc_norm: Some(n.mean),
            acc_norm_stderr: Some(n.stderr),
            score: n.mean,
            score_stderr: n.stderr,
            exec_ratio: Some(ratio),
            flops_rel_dense: ratio,
            wall_s: wall,
            docs_per_s: acc.len() as f64 / wall,
            tokens_processed: tokens,
            per_doc: Some(PerDoc {
                doc_ids: (0..acc.len()).collect(),
                acc: acc.into(),
                acc_norm: Some(accn.into()),
            }),
        }
    }

    /// Chunks merge into the row one run over all docs would give: metrics from the concatenated
    /// per-doc scores, cost summed, ratios weighted by tokens.
    #[test]
    fn chunks_merge_like_one_run() {
        let a = row("1101", "1111", 100, 0.5, 2.0);
        let b = row("001", "011", 300, 0.7, 1.0);
        let m = TaskRow::merge(vec![a, b]).unwrap();
        let whole = row("1101001", "1111011", 400, 0.65, 3.0);
        assert_eq!(m.n, 7);
        assert_eq!(m.per_doc.as_ref().unwrap().acc, "1101001");
        assert!(
            (m.acc - whole.acc).abs() < 1e-12 && (m.acc_stderr - whole.acc_stderr).abs() < 1e-12
        );
        assert!(
            (m.score - whole.score).abs() < 1e-12,
            "headline is acc_norm for hellaswag"
        );
        assert!((m.score_stderr - whole.score_stderr).abs() < 1e-12);
        assert!((m.exec_ratio.unwrap() - 0.65).abs() < 1e-12);
        assert!((m.wall_s - 3.0).abs() < 1e-12 && m.tokens_processed == 400);
        // a chunk without per-doc scores cannot be merged
        let mut c = row("1", "1", 1, 1.0, 1.0);
        c.per_doc = None;
        assert!(TaskRow::merge(vec![row("1", "1", 1, 1.0, 1.0), c]).is_err());
    }
}
