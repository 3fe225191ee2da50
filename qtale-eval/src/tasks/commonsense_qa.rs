//! CommonsenseQA (lm-eval `commonsense_qa`): the question with its five lettered options in the
//! context, the letters as choices.
use super::{McDoc, TaskSpec};
use crate::data::Row;
use crate::error::Result;

pub static COMMONSENSE_QA: TaskSpec = TaskSpec {
    name: "commonsense_qa",
    aliases: &["csqa"],
    label: "CSQA",
    acc_norm: false,
    full_count: 1221,
    split: "validation",
    file: "hf_datasets/tau/commonsense_qa/none/validation/data-00000-of-00001.arrow",
    note: None,
    build_doc,
};

fn build_doc(doc_id: usize, row: &Row) -> Result<McDoc> {
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
