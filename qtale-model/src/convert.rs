//! GGUF -> HF directory converter: `model.safetensors` (HF names, HF Q/K row order, tied head omitted as
//! HF does), `config.json`, `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`, so
//! a GGUF checkpoint can be used as an HF checkpoint by this crate and by Python tools (transformers,
//! lm-evaluation-harness).
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::tokenizer_json_from_gguf;
use crate::weights::gguf_hf_tensors;

/// Storage dtype of the converted weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for SaveDtype {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(SaveDtype::F32),
            "f16" => Ok(SaveDtype::F16),
            "bf16" => Ok(SaveDtype::BF16),
            _ => Err(ModelError::Input(format!(
                "dtype {s}: expected f32, f16 or bf16"
            ))),
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

fn to_json_bytes(v: &impl serde::Serialize) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("serializable");
    b.push(b'\n');
    b
}

/// Convert a GGUF llama file into an HF directory `out` (created if needed; files written atomically).
/// Dequantized values are exact in f32 (Q4_1/Q8_0 values are f16 scale x small integer); f16/bf16 round.
pub fn gguf_to_hf_dir(gguf: &Path, out: &Path, dtype: SaveDtype) -> Result<LlamaConfig> {
    let g = GgufFile::open(gguf)?;
    let cfg = LlamaConfig::from_gguf(&g)?;
    let tokenizer = tokenizer_json_from_gguf(&g)?;
    let tensors = gguf_hf_tensors(&g, &cfg)?;
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;

    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|t| {
            let b: Vec<u8> = match dtype {
                SaveDtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                SaveDtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
                SaveDtype::BF16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            };
            (t.name, t.shape, b)
        })
        .collect();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::F16 => Dtype::F16,
        SaveDtype::BF16 => Dtype::BF16,
    };
    let mut views = Vec::with_capacity(bytes.len());
    for (name, shape, b) in &bytes {
        let view =
            TensorView::new(st_dtype, shape.clone(), b).map_err(|e| ModelError::Safetensors {
                path: out.join("model.safetensors"),
                msg: format!("{name}: {e:?}"),
            })?;
        views.push((name.clone(), view));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "converted_from".to_string(),
        gguf.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let st_path = out.join("model.safetensors");
    let data = safetensors::serialize(views, &Some(meta)).map_err(|e| ModelError::Safetensors {
        path: st_path.clone(),
        msg: format!("{e:?}"),
    })?;
    write_atomic(&st_path, &data)?;

    let mut hf = cfg.to_hf();
    hf.torch_dtype = Some(
        match dtype {
            SaveDtype::F32 => "float32",
            SaveDtype::F16 => "float16",
            SaveDtype::BF16 => "bfloat16",
        }
        .into(),
    );
    write_atomic(&out.join("config.json"), &to_json_bytes(&hf))?;
    write_atomic(&out.join("tokenizer.json"), &to_json_bytes(&tokenizer))?;

    // tokenizer_config.json: a plain fast tokenizer that adds no BOS (GGUF `add_bos_token`, default
    // false for gpt2-style vocabularies). Without it, transformers would pick LlamaTokenizerFast from
    // config.json and prepend BOS, changing every score.
    let tok = crate::tokenizer::tokenizer_from_gguf(&g)?;
    let name_of = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let tok_cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "bos_token": name_of(cfg.bos_token_id),
        "eos_token": name_of(cfg.eos_token_id),
        "unk_token": name_of(g.get("tokenizer.ggml.unknown_token_id").and_then(|v| v.as_u64()).map(|x| x as u32)),
        "pad_token": name_of(g.get("tokenizer.ggml.padding_token_id").and_then(|v| v.as_u64()).map(|x| x as u32)),
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    write_atomic(&out.join("tokenizer_config.json"), &to_json_bytes(&tok_cfg))?;
    let gen = serde_json::json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "do_sample": false,
    });
    write_atomic(&out.join("generation_config.json"), &to_json_bytes(&gen))?;
    Ok(cfg)
}
