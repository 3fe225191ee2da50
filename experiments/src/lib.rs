//! Shared helpers of the experiment binaries.
use anyhow::{Context, Result};
use qtale_model::load::{default_gguf_path, parse_device, parse_dtype};
use qtale_model::{load_model, LoadedModel, ModelSource};

/// A fixed English paragraph (written for this project) used for the quickstart's perplexity.
pub const PARAGRAPH: &str = "The old lighthouse stood at the end of the harbour for more than a hundred years. \
Every evening the keeper climbed the narrow stairs, cleaned the glass and lit the lamp, so that the fishing boats \
could find their way home through the fog. When the town grew and the harbour was rebuilt, an automatic light \
replaced him, but people still walked out along the pier on summer nights to watch the beam turn slowly over the \
dark water.";

/// Resolve `--model` (empty = the default SmolLM2 GGUF from the set-up), `--device` and `--dtype`, then load.
pub fn load_from_args(model: Option<&str>, device: &str, dtype: &str) -> Result<LoadedModel> {
    let src = match model {
        Some(m) => ModelSource::parse(m)?,
        None => {
            let p = default_gguf_path();
            anyhow::ensure!(
                p.is_file(),
                "default model {} not found: run `bash scripts/setup.sh` first (or pass --model)",
                p.display()
            );
            ModelSource::Gguf(p)
        }
    };
    let device = parse_device(device)?;
    let kind = parse_dtype(dtype, device)?;
    load_model(&src, device, kind).with_context(|| format!("loading {src}"))
}
