//! HellaSwag (lm-eval `hellaswag`): `{activity_label}: {ctx_a} {Ctx_b}` and the endings, both through
//! lm-eval's `preprocess`.
use super::{check_gold, McDoc, TaskSpec};
use crate::data::Row;
use crate::error::Result;

pub static HELLASWAG: TaskSpec = TaskSpec {
    name: "hellaswag",
    aliases: &[],
    label: "HellaS",
    acc_norm: true,
    full_count: 10042,
    split: "validation",
    file: "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
    note: None,
    build_doc,
};

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

fn build_doc(doc_id: usize, row: &Row) -> Result<McDoc> {
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
