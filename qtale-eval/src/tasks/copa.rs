//! COPA (lm-eval `copa`): `{premise without its last character} because|therefore`, choices with their
//! first character lower-cased.
use super::{check_gold, McDoc, TaskSpec};
use crate::data::Row;
use crate::error::Result;

pub static COPA: TaskSpec = TaskSpec {
    name: "copa",
    aliases: &[],
    label: "COPA",
    acc_norm: false,
    full_count: 100,
    split: "validation",
    file: "hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow",
    note: None,
    build_doc,
};

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

fn build_doc(doc_id: usize, row: &Row) -> Result<McDoc> {
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
