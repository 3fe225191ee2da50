//! PIQA (lm-eval `piqa`): `Question: {goal}\nAnswer:`, choices `sol1`, `sol2`.
use super::{check_gold, McDoc, TaskSpec};
use crate::data::Row;
use crate::error::Result;

pub static PIQA: TaskSpec = TaskSpec {
    name: "piqa",
    aliases: &[],
    label: "PIQA",
    acc_norm: true,
    full_count: 1838,
    split: "validation",
    file: "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
    note: None,
    build_doc,
};

fn build_doc(doc_id: usize, row: &Row) -> Result<McDoc> {
    let choices = vec![row.str("sol1")?.to_string(), row.str("sol2")?.to_string()];
    let gold = check_gold(row, "label", row.int("label")?, 2)?;
    Ok(McDoc::shared(
        doc_id,
        format!("Question: {}\nAnswer:", row.str("goal")?),
        choices,
        gold,
    ))
}
