//! The main job. For now (foundation issue): load SmolLM2 (or `--model`), print its perplexity on a fixed
//! English paragraph and a short greedy generation, with load and run times.
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "Load a LLaMA-family model, print perplexity on a fixed paragraph and a greedy generation"
)]
struct Args {
    /// GGUF file, HF directory, or hub repo id (owner/name[@rev]); default: SmolLM2-135M-Instruct from the set-up.
    #[arg(long)]
    model: Option<String>,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or bf16 (CUDA only)
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Prompt for the greedy generation.
    #[arg(long, default_value = "The capital of France is")]
    prompt: String,
    /// Number of tokens to generate (1..=512).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u16).range(1..=512))]
    max_new_tokens: u16,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let t0 = Instant::now();
    let lm = experiments::load_from_args(args.model.as_deref(), &args.device, &args.dtype)?;
    let cfg = &lm.model.config;
    println!(
        "model: {} ({} layers, hidden {}, heads {}/{} kv, {:.1}M parameters, {:.1} MB weights as {:?}) loaded in {:.2}s",
        lm.source,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.num_parameters() as f64 / 1e6,
        lm.model.weight_bytes() as f64 / 1e6,
        lm.model.kind,
        t0.elapsed().as_secs_f64()
    );

    let enc = lm
        .tokenizer
        .encode(experiments::PARAGRAPH, false)
        .map_err(anyhow::Error::msg)?;
    let ids: Vec<i64> = enc.get_ids().iter().map(|&x| x as i64).collect();
    let t1 = Instant::now();
    let nll = lm.model.sequence_nll(&ids).context("perplexity forward")?;
    println!(
        "perplexity on the fixed paragraph ({} tokens, no BOS): {:.3}  [{:.2}s]",
        ids.len(),
        nll.exp(),
        t1.elapsed().as_secs_f64()
    );

    let prompt = lm
        .tokenizer
        .encode(args.prompt.as_str(), false)
        .map_err(anyhow::Error::msg)?;
    let prompt_ids: Vec<i64> = prompt.get_ids().iter().map(|&x| x as i64).collect();
    let t2 = Instant::now();
    let eos = cfg.eos_token_id.map(|x| x as i64);
    let out = lm
        .model
        .generate_greedy(&prompt_ids, args.max_new_tokens as usize, eos)?;
    let secs = t2.elapsed().as_secs_f64();
    let text = lm
        .tokenizer
        .decode(&out.iter().map(|&x| x as u32).collect::<Vec<_>>(), true)
        .map_err(anyhow::Error::msg)?;
    println!("greedy: {}{}", args.prompt, text);
    println!(
        "  ({} new tokens in {:.2}s, {:.1} tokens/s)",
        out.len(),
        secs,
        out.len() as f64 / secs
    );
    Ok(())
}
