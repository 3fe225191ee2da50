//! WinoGrande (lm-eval `winogrande`): partial scoring, one context per option (the sentence up to the
//! blank, with the option filled in) and one shared continuation (the rest of the sentence).
use super::{McDoc, TaskSpec, TARGET_DELIMITER};
use crate::data::Row;
use crate::error::Result;

pub static WINOGRANDE: TaskSpec = TaskSpec {
    name: "winogrande",
    aliases: &[],
    label: "WinoG",
    acc_norm: false,
    full_count: 1267,
    split: "validation",
    file: "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
    note: None,
    build_doc,
};

fn build_doc(doc_id: usize, row: &Row) -> Result<McDoc> {
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
