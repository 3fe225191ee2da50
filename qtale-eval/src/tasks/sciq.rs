//! SciQ (lm-eval `sciq`): `{support}\nQuestion: {question}\nAnswer:`, three distractors then the
//! correct answer (gold 3).
use super::{McDoc, TaskSpec};
use crate::data::Row;
use crate::error::Result;

/// lm-eval scores SciQ's test split; the local data carries validation only (1000 docs).
pub static SCIQ: TaskSpec = TaskSpec {
    name: "sciq",
    aliases: &[],
    label: "SciQ",
    acc_norm: true,
    full_count: 1000,
    split: "validation",
    file: "hf_datasets/sciq/none/validation/data-00000-of-00001.arrow",
    note: None,
    build_doc,
};

fn build_doc(doc_id: usize, row: &Row) -> Result<McDoc> {
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
