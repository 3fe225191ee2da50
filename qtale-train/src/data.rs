//! Training data: documents tokenized and packed into fixed-length sequences (EOS between documents),
//! shuffled with a seed and split into train / held-out; or user JSONL, either `{"text": ...}` (packed
//! the same way) or instruction pairs whose prompt is masked out of the cross-entropy.
use std::io::BufRead;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use crate::{Result, TrainError};

/// One training sequence: token ids and, per position, whether its token is a CE target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<i64>,
    /// `loss[t]`: token `t` is predicted (from position `t - 1`) and counts in the loss.
    pub loss: Vec<bool>,
}

/// A batch on a device: `ids`, `attention_mask` (1 = token) and `loss_mask` (1 = CE target), all `[B, T]`.
pub struct Batch {
    pub ids: Tensor,
    pub attention_mask: Tensor,
    pub loss_mask: Tensor,
}

fn data_err(path: &Path, line: usize, msg: impl Into<String>) -> TrainError {
    TrainError::Config {
        field: format!("{}:{line}", path.display()),
        msg: msg.into(),
    }
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<i64> {
    match tok.encode(text, false) {
        Ok(e) => e.get_ids().iter().map(|&x| x as i64).collect(),
        // The tokenizers crate only fails on truncation/padding settings we never use.
        Err(_) => Vec::new(),
    }
}

/// Concatenate documents (each followed by `eos`) and cut into sequences of exactly `seq_len` tokens;
/// the remainder shorter than `seq_len` is dropped. Every token is a target.
pub fn pack(docs: impl IntoIterator<Item = Vec<i64>>, seq_len: usize, eos: i64) -> Vec<Example> {
    let mut out = Vec::new();
    let mut cur: Vec<i64> = Vec::with_capacity(seq_len);
    for doc in docs {
        for id in doc.into_iter().chain(std::iter::once(eos)) {
            cur.push(id);
            if cur.len() == seq_len {
                out.push(Example {
                    loss: vec![true; seq_len],
                    ids: std::mem::take(&mut cur),
                });
            }
        }
    }
    out
}

/// Tokenize and pack plain-text documents.
pub fn pack_texts<'a>(
    tok: &Tokenizer,
    texts: impl IntoIterator<Item = &'a str>,
    seq_len: usize,
    eos: i64,
) -> Vec<Example> {
    pack(texts.into_iter().map(|t| encode(tok, t)), seq_len, eos)
}

/// Shuffle with `seed` and hold out `holdout` of the examples (at least one when there are two or more).
pub fn shuffle_split(
    mut ex: Vec<Example>,
    holdout: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    ex.shuffle(&mut rng);
    let n_val = if ex.len() >= 2 {
        ((ex.len() as f64 * holdout).round() as usize).clamp(1, ex.len() - 1)
    } else {
        0
    };
    let train = ex.split_off(n_val);
    (train, ex)
}

/// Read user JSONL. Each line is `{"text": ...}` (packed to `seq_len`) or an instruction pair
/// `{"instruction"|"prompt": ..., "response"|"output": ...}` (one example per line, prompt masked out of
/// the loss, truncated to `seq_len`, right-padded with `pad`). Errors name the file, line and field.
pub fn read_jsonl(
    path: &Path,
    tok: &Tokenizer,
    seq_len: usize,
    eos: i64,
    pad: i64,
) -> Result<Vec<Example>> {
    let f = std::fs::File::open(path).map_err(|e| TrainError::Io {
        path: path.into(),
        source: e,
    })?;
    let mut texts = Vec::new();
    let mut pairs = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| TrainError::Io {
            path: path.into(),
            source: e,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| data_err(path, n, format!("invalid JSON: {e}")))?;
        let field = |names: &[&str]| -> Option<Result<String>> {
            names.iter().find_map(|k| v.get(*k)).map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    data_err(path, n, format!("field `{}` must be a string", names[0]))
                })
            })
        };
        if let Some(t) = field(&["text"]) {
            texts.push(t?);
        } else {
            let p = field(&["instruction", "prompt"]).ok_or_else(|| {
                data_err(
                    path,
                    n,
                    "needs `text`, or `instruction`/`prompt` with `response`/`output`",
                )
            })??;
            let r = field(&["response", "output"])
                .ok_or_else(|| data_err(path, n, "missing field `response`"))??;
            pairs.push((p, r));
        }
    }
    let mut out = pack_texts(tok, texts.iter().map(String::as_str), seq_len, eos);
    for (p, r) in pairs {
        let pi = encode(tok, &p);
        let mut ri = encode(tok, &r);
        ri.push(eos);
        let mut ids: Vec<i64> = pi.iter().chain(&ri).copied().take(seq_len).collect();
        let mut loss: Vec<bool> = (0..ids.len()).map(|t| t >= pi.len()).collect();
        ids.resize(seq_len, pad);
        loss.resize(seq_len, false);
        out.push(Example { ids, loss });
    }
    if out.is_empty() {
        return Err(data_err(
            path,
            0,
            format!("no example of {seq_len} tokens (file empty or texts too short)"),
        ));
    }
    Ok(out)
}

/// Stack examples into a batch; a pad position is one that is neither a target nor before a target
/// (only instruction pairs pad, always at the end).
pub fn collate(ex: &[&Example], device: Device) -> Batch {
    let rows: Vec<Vec<i64>> = ex.iter().map(|e| e.ids.clone()).collect();
    let loss: Vec<Vec<i64>> = ex
        .iter()
        .map(|e| e.loss.iter().map(|&b| b as i64).collect())
        .collect();
    let attn: Vec<Vec<i64>> = ex
        .iter()
        .map(|e| {
            let last = e
                .loss
                .iter()
                .rposition(|&b| b)
                .map_or(e.ids.len(), |p| p + 1);
            (0..e.ids.len()).map(|t| (t < last) as i64).collect()
        })
        .collect();
    Batch {
        ids: Tensor::from_slice2(&rows).to_device(device),
        attention_mask: Tensor::from_slice2(&attn).to_device(device),
        loss_mask: Tensor::from_slice2(&loss)
            .to_kind(Kind::Float)
            .to_device(device),
    }
}

/// Mean next-token cross-entropy over target positions: logits `[B, T, V]` predict `ids[:, 1:]` where
/// `loss_mask[:, 1:]` is set.
pub fn masked_ce(logits: &Tensor, batch: &Batch) -> Tensor {
    let t = logits.size()[1];
    let logp = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
    let target = batch.ids.narrow(1, 1, t - 1).unsqueeze(-1);
    let nll = -logp.gather(-1, &target, false).squeeze_dim(-1);
    let m = batch.loss_mask.narrow(1, 1, t - 1);
    (nll * &m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_cuts_exact_lengths_with_eos_between_documents() {
        let ex = pack(vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]], 4, 0);
        let ids: Vec<Vec<i64>> = ex.iter().map(|e| e.ids.clone()).collect();
        assert_eq!(
            ids,
            vec![vec![1, 2, 3, 0], vec![4, 5, 0, 6], vec![7, 8, 9, 0]]
        );
        let (train, val) = shuffle_split(ex.clone(), 0.34, 7);
        assert_eq!((train.len(), val.len()), (2, 1));
        let (train2, _) = shuffle_split(ex, 0.34, 7);
        assert_eq!(train, train2, "same seed, same order");
    }

    /// A word-level tokenizer: "a b c" -> [1, 2, 3].
    fn words() -> Tokenizer {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"<unk>":0,"a":1,"b":2,"c":3,"d":4},"unk_token":"<unk>"}}"#;
        json.parse().unwrap()
    }

    #[test]
    fn jsonl_text_and_instruction_pairs_with_masked_prompts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"a b c\"}\n\n{\"instruction\": \"a b\", \"response\": \"c\"}\n",
        )
        .unwrap();
        let ex = read_jsonl(&p, &words(), 4, 9, 8).unwrap();
        // The text packs into one sequence [a b c EOS]; the pair is [a b | c EOS], prompt masked.
        assert_eq!(ex[0].ids, vec![1, 2, 3, 9]);
        assert_eq!(ex[1].ids, vec![1, 2, 3, 9]);
        assert_eq!(ex[1].loss, vec![false, false, true, true]);
        let ex = read_jsonl(&p, &words(), 6, 9, 8).unwrap();
        assert_eq!(
            ex.len(),
            1,
            "the text is shorter than 6 tokens: only the pair remains"
        );
        assert_eq!(ex[0].ids, vec![1, 2, 3, 9, 8, 8]);
        let b = collate(&[&ex[0]], Device::Cpu);
        assert_eq!(
            Vec::<i64>::try_from(b.attention_mask.view([-1])).unwrap(),
            vec![1, 1, 1, 1, 0, 0]
        );

        std::fs::write(&p, "{\"text\": \"a\"}\n{\"prompt\": \"a\"}\n").unwrap();
        let e = read_jsonl(&p, &words(), 4, 9, 8).unwrap_err().to_string();
        assert!(e.contains("data.jsonl:2") && e.contains("response"), "{e}");
        std::fs::write(&p, "{\"text\": 5}\n").unwrap();
        let e = read_jsonl(&p, &words(), 4, 9, 8).unwrap_err().to_string();
        assert!(e.contains("data.jsonl:1") && e.contains("text"), "{e}");
        std::fs::write(&p, "not json\n").unwrap();
        assert!(read_jsonl(&p, &words(), 4, 9, 8)
            .unwrap_err()
            .to_string()
            .contains("invalid JSON"));
    }

    #[test]
    fn masked_ce_counts_only_targets() {
        let e1 = Example {
            ids: vec![1, 2, 3],
            loss: vec![false, false, true],
        };
        let e2 = Example {
            ids: vec![0, 1, 2],
            loss: vec![true, true, true],
        };
        let b = collate(&[&e1, &e2], Device::Cpu);
        // Uniform logits over 4 classes: every counted position costs ln 4.
        let logits = Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu));
        let ce = masked_ce(&logits, &b).double_value(&[]);
        assert!((ce - 4f64.ln()).abs() < 1e-6);
        // Make row 0's masked position (target 2 at t=1) certain: no change, since it is not a target.
        let _ = logits.get(0).get(0).get(2).fill_(50.0);
        assert!((masked_ce(&logits, &b).double_value(&[]) - 4f64.ln()).abs() < 1e-6);
        // Make a counted target certain: the mean drops.
        let _ = logits.get(0).get(1).get(3).fill_(50.0);
        assert!(masked_ce(&logits, &b).double_value(&[]) < 4f64.ln() - 0.1);
    }
}
