//! Convert a GGUF llama checkpoint into an HF directory (safetensors + config.json + tokenizer.json).
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use qtale_model::convert::{gguf_to_hf_dir, SaveDtype};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Convert a GGUF llama checkpoint into an HF directory usable by transformers and qtale"
)]
struct Args {
    /// Input .gguf file (default: SmolLM2-135M-Instruct from the set-up). `--gguf` is an alias.
    #[arg(long, alias = "gguf")]
    model: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Storage dtype of the weights: f32 (exact for Q4/Q8 sources), f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: SaveDtype,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let gguf = args
        .model
        .unwrap_or_else(qtale_model::load::default_gguf_path);
    if !gguf.is_file() {
        bail!("--model {}: no such GGUF file", gguf.display());
    }
    let cfg = gguf_to_hf_dir(&gguf, &args.out, args.dtype)?;
    println!(
        "wrote {} ({} layers, vocab {}, tied head: {})",
        args.out.display(),
        cfg.num_hidden_layers,
        cfg.vocab_size,
        cfg.tie_word_embeddings
    );
    Ok(())
}
