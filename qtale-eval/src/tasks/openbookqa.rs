//! OpenBookQA (lm-eval `openbookqa`): the bare question stem as context, from HF raw fields or OLMES
//! docs.
use super::{check_gold, label_index, strip_question, McDoc, TaskSpec};
use crate::data::Row;
use crate::error::Result;

pub static OPENBOOKQA: TaskSpec = TaskSpec {
    name: "openbookqa",
    aliases: &["obqa"],
    label: "OBQA",
    acc_norm: true,
    full_count: 500,
    split: "test",
    file: "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz",
    note: None,
    build_doc,
};

fn build_doc(doc_id: usize, row: &Row) -> Result<McDoc> {
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
