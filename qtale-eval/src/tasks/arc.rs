//! ARC-Easy and ARC-Challenge (lm-eval `arc_easy`, `arc_challenge`): `Question: {q}\nAnswer:`, from HF
//! raw fields or from OLMES docs (whose `query` already carries the frame).
use super::{check_gold, label_index, strip_question, McDoc, TaskSpec};
use crate::data::Row;
use crate::error::Result;

pub static ARC_EASY: TaskSpec = TaskSpec {
    name: "arc_easy",
    aliases: &["arc_e"],
    label: "ARC-e",
    acc_norm: true,
    full_count: 2376,
    split: "test",
    file: "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
    note: None,
    build_doc,
};

pub static ARC_CHALLENGE: TaskSpec = TaskSpec {
    name: "arc_challenge",
    aliases: &["arc_c"],
    label: "ARC-c",
    acc_norm: true,
    full_count: 1172,
    split: "test",
    file: "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
    note: None,
    build_doc,
};

fn build_doc(doc_id: usize, row: &Row) -> Result<McDoc> {
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
