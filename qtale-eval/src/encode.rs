//! Turning `(context, continuation)` strings into token requests, as lm-eval's HF backend does.
use tokenizers::Tokenizer;

use crate::error::{EvalError, Result};
use crate::scorer::LlRequest;

/// Tokenization settings of a run (recorded in the results).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EncodeConfig {
    /// Prepend BOS to every context (lm-eval <= 0.4.9.1 adds none for causal LMs; default off).
    pub add_bos: bool,
    /// BOS id, if the model has one.
    pub bos_id: Option<i64>,
    /// Prefix token for an empty context: BOS, else EOS.
    pub prefix_id: i64,
}

impl EncodeConfig {
    /// lm-eval's HF-backend rule for a model: prefix token BOS, else EOS; BOS prepended only on request.
    pub fn for_model(cfg: &qtale_model::LlamaConfig, add_bos: bool) -> Result<Self> {
        let bos_id = cfg.bos_token_id.map(i64::from);
        let prefix_id = bos_id.or(cfg.eos_token_id.map(i64::from)).ok_or_else(|| {
            EvalError::Input(
                "the model has neither a BOS nor an EOS token id (needed as prefix token)".into(),
            )
        })?;
        if add_bos && bos_id.is_none() {
            return Err(EvalError::Input(
                "BOS requested but the model has no BOS token id".into(),
            ));
        }
        Ok(EncodeConfig {
            add_bos,
            bos_id,
            prefix_id,
        })
    }
}

pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<i64>> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| EvalError::Tokenizer(format!("encoding {text:?}: {e}")))?;
    Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
}

/// Split `s` into (text, trailing whitespace) (Python `str.rstrip()` semantics for Unicode spaces).
fn split_trailing_ws(s: &str) -> (&str, &str) {
    let t = s.trim_end();
    (t, &s[t.len()..])
}

/// lm-eval's pair encoding: move the context's trailing whitespace to the front of the continuation,
/// encode `context + continuation` whole and the context alone, and take the whole's tokens after the
/// context's as the continuation. An empty context becomes the prefix token.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
    cfg: &EncodeConfig,
) -> Result<LlRequest> {
    if context.is_empty() {
        return Ok(LlRequest {
            context: vec![cfg.prefix_id],
            continuation: encode(tok, continuation)?,
        });
    }
    let (ctx, ws) = split_trailing_ws(context);
    let cont = format!("{ws}{continuation}");
    let whole = encode(tok, &format!("{ctx}{cont}"))?;
    let mut ctx_ids = encode(tok, ctx)?;
    if ctx_ids.len() > whole.len() {
        return Err(EvalError::Tokenizer(format!(
            "context {ctx:?} encodes to more tokens than context + continuation"
        )));
    }
    let cont_ids = whole[ctx_ids.len()..].to_vec();
    if cfg.add_bos {
        if let Some(b) = cfg.bos_id {
            ctx_ids.insert(0, b);
        }
    }
    if ctx_ids.is_empty() {
        ctx_ids.push(cfg.prefix_id);
    }
    Ok(LlRequest {
        context: ctx_ids,
        continuation: cont_ids,
    })
}
