//! Shared helpers of the experiment binaries: the training step ([`training`]), one experiment cell as
//! a resumable, config-keyed job ([`cell`]), grids of cells from config files with tables and CSVs
//! ([`grid`]), and plots ([`plot`]).
pub mod args;
pub mod cell;
pub mod grid;
pub mod plot;
pub mod signals;
pub mod stage;
pub mod training;

use anyhow::{Context, Result};
use qtale_model::load::{default_gguf_path, parse_device, parse_dtype};
use qtale_model::{load_model, LoadedModel, ModelSource};

/// A fixed English paragraph for the quickstart's perplexity. It is the paragraph of the parity fixture
/// `qtale-model/tests/fixtures/smollm2_logits.json` (HF transformers: perplexity 13.365 for
/// SmolLM2-135M-Instruct, no BOS), so the printed number can be checked against a reference.
pub const PARAGRAPH: &str = "The river runs through the middle of the town, and most of the old houses were built close to its banks. In the spring, when the snow melts in the mountains, the water rises quickly and sometimes floods the lower streets. For this reason, the town council decided many years ago to build a stone wall along the river. Today the wall is a popular place for people to walk in the evening, and children often sit on it to watch the boats go by. Visitors who come to the town in summer can rent a small boat and row up the river to the lake, where there is a quiet beach and a restaurant that serves fresh fish.";

/// Deserialize a JSON value, naming the dotted key of a wrong type or unknown field
/// (`serde_path_to_error`), e.g. "key `lora.rank`: invalid type: string \"x\", expected usize".
pub fn from_value_keyed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let key = e.path().to_string();
        anyhow::anyhow!("key `{key}`: {}", e.into_inner())
    })
}

/// Resolve `--model`: a GGUF path, HF directory or hub id; `None` = the set-up's SmolLM2 GGUF.
pub fn model_source(model: Option<&str>) -> Result<ModelSource> {
    Ok(match model {
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
    })
}

/// Resolve `--model` (see [`model_source`]), `--device` and `--dtype`, then load.
pub fn load_from_args(model: Option<&str>, device: &str, dtype: &str) -> Result<LoadedModel> {
    let src = model_source(model)?;
    let device = parse_device(device)?;
    let kind = parse_dtype(dtype, device)?;
    load_model(&src, device, kind).with_context(|| format!("loading {src}"))
}

#[cfg(test)]
mod tests {
    /// The paragraph must stay the fixture's, or the quickstart's number loses its reference.
    #[test]
    fn paragraph_is_the_fixture_paragraph() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../qtale-model/tests/fixtures/smollm2_logits.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(v["ppl"]["text"].as_str().unwrap(), super::PARAGRAPH);
    }
}
