//! Tensors by HF name, from safetensors (single file or sharded), from GGUF (renamed to HF names, Q/K
//! RoPE permutation undone), or from an hf-hub cache. Every load is checked against the names and shapes
//! the config implies: all missing, unexpected and mis-shaped tensors are reported by name.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// The tensors a LLaMA checkpoint must hold for `cfg`, with their shapes, in HF names.
pub fn expected_tensors(cfg: &LlamaConfig) -> Vec<(String, Vec<i64>)> {
    let d = cfg.hidden_size as i64;
    let q = (cfg.num_attention_heads * cfg.head_dim) as i64;
    let kv = (cfg.num_key_value_heads * cfg.head_dim) as i64;
    let ff = cfg.intermediate_size as i64;
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size as i64, d],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
        if cfg.attention_bias {
            v.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            v.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            v.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            v.push((format!("{p}.self_attn.o_proj.bias"), vec![d]));
        }
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![ff, d]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![ff, d]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![d, ff]));
        if cfg.mlp_bias {
            v.push((format!("{p}.mlp.gate_proj.bias"), vec![ff]));
            v.push((format!("{p}.mlp.up_proj.bias"), vec![ff]));
            v.push((format!("{p}.mlp.down_proj.bias"), vec![d]));
        }
    }
    v.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size as i64, d]));
    }
    v
}

/// Names a checkpoint may carry that the forward derives itself; they are dropped, by rule, not by
/// accident: old LLaMA checkpoints store `rotary_emb.inv_freq` (recomputed from the config), and some
/// tied checkpoints store `lm_head.weight` as a copy of the embedding (HF ignores it when tied).
fn ignorable(name: &str, cfg: &LlamaConfig) -> bool {
    name.ends_with(".rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// CPU tensors by HF name, with the name of the source they came from (for error messages).
#[derive(Debug)]
pub struct TensorMap {
    pub source_name: String,
    pub tensors: BTreeMap<String, Tensor>,
}

impl TensorMap {
    /// Check names and shapes against `cfg`: every missing, unexpected or mis-shaped tensor is reported.
    pub fn check(&self, cfg: &LlamaConfig) -> Result<()> {
        let expected = expected_tensors(cfg);
        let want: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let missing: Vec<String> = expected
            .iter()
            .filter(|(n, _)| !self.tensors.contains_key(n))
            .map(|(n, _)| n.clone())
            .collect();
        if !missing.is_empty() {
            return Err(ModelError::MissingTensors {
                source_name: self.source_name.clone(),
                names: missing,
            });
        }
        let unexpected: Vec<String> = self
            .tensors
            .keys()
            .filter(|n| !want.contains(n.as_str()) && !ignorable(n, cfg))
            .cloned()
            .collect();
        if !unexpected.is_empty() {
            return Err(ModelError::UnexpectedTensors {
                source_name: self.source_name.clone(),
                names: unexpected,
            });
        }
        for (name, shape) in &expected {
            let got = self.tensors[name].size();
            if &got != shape {
                return Err(ModelError::ShapeMismatch {
                    source_name: self.source_name.clone(),
                    name: name.clone(),
                    expected: shape.clone(),
                    got,
                });
            }
        }
        Ok(())
    }

    /// Remove and return a tensor (after [`TensorMap::check`] it is known to exist).
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensors {
                source_name: self.source_name.clone(),
                names: vec![name.to_string()],
            })
    }

    /// Load one or more safetensors files (all their tensors, as f32 or their float dtype).
    pub fn from_safetensors(paths: &[PathBuf]) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for path in paths {
            for (name, t) in read_safetensors(path)? {
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        msg: format!("tensor `{name}` also appears in an earlier shard"),
                    });
                }
            }
        }
        let source_name = match paths {
            [one] => one.display().to_string(),
            _ => format!(
                "{} shards in {}",
                paths.len(),
                paths[0].parent().unwrap_or(Path::new("")).display()
            ),
        };
        Ok(TensorMap {
            source_name,
            tensors,
        })
    }

    /// All weights of a GGUF llama file, dequantized to f32, renamed to HF names, Q/K un-permuted.
    pub fn from_gguf(g: &GgufFile, cfg: &LlamaConfig) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for t in gguf_hf_tensors(g, cfg)? {
            let shape: Vec<i64> = t.shape.iter().map(|&x| x as i64).collect();
            tensors.insert(t.name, Tensor::from_slice(&t.data).view(shape.as_slice()));
        }
        Ok(TensorMap {
            source_name: g.path.display().to_string(),
            tensors,
        })
    }
}

/// Read every tensor of one safetensors file onto the CPU.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is read-only and dropped before returning; tensors are copied out of it.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg: format!("{e:?}"),
    })?;
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            Dtype::I8 => Kind::Int8,
            Dtype::U8 => Kind::Uint8,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    source_name: path.display().to_string(),
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&x| x as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        out.push((name, t));
    }
    Ok(out)
}

/// The safetensors files of an HF directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists (each must exist).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelError::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor model.safetensors.index.json exists",
            ),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::config(&index, "weight_map", format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::config(&index, "weight_map", "missing or not an object"))?;
    let mut files = BTreeSet::new();
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| {
            ModelError::config(&index, format!("weight_map.{name}"), "not a file name")
        })?;
        files.insert(f.to_string());
    }
    files
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::io(
                    &p,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in the index is missing",
                    ),
                ))
            }
        })
        .collect()
}

/// One dequantized GGUF tensor under its HF name.
pub struct HfTensor {
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// GGUF llama tensor name -> HF name (`None` for names that are not part of a llama decoder).
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (idx, rest) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{idx}.{hf}.{suffix}"))
}

/// Undo the permutation llama.cpp's converter applies to Q/K rows (interleaved-pair RoPE) so the rows
/// are in HF's half-split order. Rows are viewed as `[heads, head_dim/2, 2, in]` and the two middle axes
/// swapped: the inverse of the converter's `[heads, 2, head_dim/2, in]` swap.
pub fn unpermute_qk(data: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) -> HF row (h, j, i)
                let src = h * hd + i * 2 + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Every tensor of a GGUF llama file, dequantized, under HF names, with Q/K in HF row order. Names that
/// do not map to the llama decoder are reported as unexpected (never dropped silently).
pub fn gguf_hf_tensors(g: &GgufFile, cfg: &LlamaConfig) -> Result<Vec<HfTensor>> {
    let mut out = Vec::with_capacity(g.tensors.len());
    let mut unknown = Vec::new();
    for info in &g.tensors {
        let Some(name) = gguf_to_hf_name(&info.name) else {
            // llama.cpp stores precomputed rope frequencies for some models; we recompute them.
            if info.name != "rope_freqs.weight" {
                unknown.push(info.name.clone());
            }
            continue;
        };
        let (mut data, shape) = g.dequantize(&info.name)?;
        let heads = if name.ends_with("self_attn.q_proj.weight") {
            Some(cfg.num_attention_heads)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        if let Some(h) = heads {
            if shape.len() != 2 || shape[0] % (2 * h) != 0 {
                return Err(ModelError::ShapeMismatch {
                    source_name: g.path.display().to_string(),
                    name: info.name.clone(),
                    expected: vec![(h * cfg.head_dim) as i64, cfg.hidden_size as i64],
                    got: shape.iter().map(|&x| x as i64).collect(),
                });
            }
            data = unpermute_qk(&data, h, shape[0], shape[1]);
        }
        out.push(HfTensor { name, shape, data });
    }
    if !unknown.is_empty() {
        return Err(ModelError::UnexpectedTensors {
            source_name: g.path.display().to_string(),
            names: unknown,
        });
    }
    Ok(out)
}

/// Resolve an HF repo id to its snapshot directory in an hf-hub cache.
///
/// The cache is `$HF_HUB_CACHE` if set, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (the
/// `hf-hub` crate's `Cache`). `revision` may be a branch/tag (read through `refs/<revision>`) or a commit
/// hash (its snapshot directory directly). Resolution never touches the network (the machines this
/// project runs on reach no hub): a file missing from the cache is an error naming it, and saying
/// whether `HF_HUB_OFFLINE` was set. Fill the cache with `huggingface-cli download REPO`.
pub fn resolve_hub_repo(repo_id: &str, revision: Option<&str>, files: &[&str]) -> Result<PathBuf> {
    resolve_hub_repo_in(&hub_cache(), repo_id, revision, files)
}

/// The hub cache of the environment (`HF_HUB_CACHE`, else hf-hub's rule: `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`).
pub fn hub_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => hf_hub::Cache::new(PathBuf::from(p)),
        None => hf_hub::Cache::from_env(),
    }
}

/// [`resolve_hub_repo`] against an explicit cache (tests point this at a directory laid out like the hub's).
pub fn resolve_hub_repo_in(
    cache: &hf_hub::Cache,
    repo_id: &str,
    revision: Option<&str>,
    files: &[&str],
) -> Result<PathBuf> {
    resolve_hub_snapshot_in(cache, hf_hub::RepoType::Model, repo_id, revision, files)
}

/// The snapshot directory of a model or dataset repo in the hub cache (`refs/<rev>` or a commit
/// hash), checking that `files` are in it. Cache-only: nothing is downloaded.
pub fn resolve_hub_snapshot_in(
    cache: &hf_hub::Cache,
    repo_type: hf_hub::RepoType,
    repo_id: &str,
    revision: Option<&str>,
    files: &[&str],
) -> Result<PathBuf> {
    use hf_hub::Repo;
    let rev = revision.unwrap_or("main");
    let repo_dir = cache
        .path()
        .join(Repo::new(repo_id.to_string(), repo_type).folder_name());
    let is_commit = rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit());
    let snapshot = if is_commit && repo_dir.join("snapshots").join(rev).is_dir() {
        repo_dir.join("snapshots").join(rev)
    } else {
        let ref_path = repo_dir.join("refs").join(rev);
        let commit = std::fs::read_to_string(&ref_path).map_err(|e| {
            ModelError::Hub(format!(
                "{repo_id}@{rev} is not in the cache at {} ({}: {e}); download it first, e.g. \
                 `huggingface-cli download {repo_id}`",
                cache.path().display(),
                ref_path.display()
            ))
        })?;
        repo_dir.join("snapshots").join(commit.trim())
    };
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    let mut missing = Vec::new();
    for f in files {
        if !snapshot.join(f).exists() {
            missing.push(f.to_string());
        }
    }
    if !missing.is_empty() {
        let why = if offline {
            "HF_HUB_OFFLINE is set"
        } else {
            "this build resolves from the local cache only"
        };
        return Err(ModelError::Hub(format!(
            "{repo_id}@{rev}: snapshot {} lacks {} ({why})",
            snapshot.display(),
            missing.join(", ")
        )));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            gguf_to_hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            gguf_to_hf_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            gguf_to_hf_name("output_norm.weight").unwrap(),
            "model.norm.weight"
        );
        assert_eq!(gguf_to_hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(gguf_to_hf_name("blk.0.attn_qkv.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // The converter's permutation: HF rows viewed [heads, 2, hd/2] -> swap -> [heads, hd/2, 2].
        let (heads, hd, cols) = (3, 8, 2);
        let rows = heads * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + j * (hd / 2) + i;
                    let dst = h * hd + i * 2 + j;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_qk(&gguf, heads, rows, cols), hf);
    }
}
