//! Social IQa (lm-eval `social_iqa`): `Q: {context} {question}\nA:`, three answers, 1-based label.
use super::{check_gold, McDoc, TaskSpec};
use crate::data::Row;
use crate::error::Result;

pub static SOCIAL_IQA: TaskSpec = TaskSpec {
    name: "social_iqa",
    aliases: &["siqa"],
    label: "SIQA",
    acc_norm: false,
    full_count: 1954,
    split: "validation",
    file: "hf_datasets/social_i_qa/none/validation/data-00000-of-00001.arrow",
    note: None,
    build_doc,
};

fn build_doc(doc_id: usize, row: &Row) -> Result<McDoc> {
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
