//! BoolQ in its two forms: `boolq` as lm-eval scores it (`super_glue/boolq`, the passage carries its
//! title: `{title} -- {passage}`), and `boolq_google` from the google/boolq copy, whose passages have
//! no title (every prompt differs from lm-eval's; kept for comparison with numbers computed that
//! way). Each refuses rows of the other form, so a result's task names the form used.
use serde_json::Value;

use super::{check_gold, McDoc, TaskSpec};
use crate::data::Row;
use crate::error::Result;

/// The data note of `boolq` results: which BoolQ form the prompts were built from.
pub const BOOLQ_SUPER_GLUE_NOTE: &str =
    "boolq: super_glue form (lm-eval's boolq), passage prefixed with its title: `{title} -- {passage}`";
/// The data note of `boolq_google` results.
pub const BOOLQ_GOOGLE_NOTE: &str =
    "boolq_google: google/boolq form, passage without its title (prompts differ from lm-eval's boolq)";

/// OLMES requests written from `super_glue`/`boolq` validation (its config.json says so), one doc per
/// `idx` in order: the docs and order lm-eval scores.
pub static BOOLQ: TaskSpec = TaskSpec {
    name: "boolq",
    aliases: &["boolq_super_glue"],
    label: "BoolQ",
    acc_norm: false,
    full_count: 3270,
    split: "validation",
    file: "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz",
    note: Some(BOOLQ_SUPER_GLUE_NOTE),
    build_doc: boolq,
};

pub static BOOLQ_GOOGLE: TaskSpec = TaskSpec {
    name: "boolq_google",
    aliases: &[],
    label: "BoolQ-g",
    acc_norm: false,
    full_count: 3270,
    split: "validation",
    file: "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
    note: Some(BOOLQ_GOOGLE_NOTE),
    build_doc: boolq_google,
};

fn boolq(doc_id: usize, row: &Row) -> Result<McDoc> {
    let (passage, question, label) = boolq_super_glue(row)?;
    Ok(boolq_doc(doc_id, &passage, &question, label))
}

fn boolq_google(doc_id: usize, row: &Row) -> Result<McDoc> {
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
