//! Training checkpoints: one safetensors file holding every trainable tensor (LoRA, routers) and the
//! optimizer moments, with the step, config and data position as JSON metadata. Written to a temporary
//! file and renamed, so a crash mid-write leaves the previous checkpoint intact.
//!
//! RNG state is not stored: the loop reseeds torch from `(seed, step)` at every step, so a resumed run
//! draws the same dropout masks and Gumbel noise as an uninterrupted one.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::{Result, TrainError};

const META_KEY: &str = "qtale_checkpoint";

fn ck_err(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.into(),
        msg: msg.into(),
    }
}

/// Write `tensors` (moved to CPU; f32 and i64 kept, other float kinds stored as f32) and `meta`.
pub fn save_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: &serde_json::Value,
) -> Result<()> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let (dtype, t) = match t.kind() {
            Kind::Int64 => (Dtype::I64, t),
            _ => (Dtype::F32, t.to_kind(Kind::Float)),
        };
        let shape: Vec<usize> = t.size().iter().map(|&x| x as usize).collect();
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut bytes, t.numel());
        bufs.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ck_err(path, format!("{n}: {e:?}")))
        })
        .collect::<Result<_>>()?;
    let mut m = HashMap::new();
    m.insert(META_KEY.to_string(), meta.to_string());
    let data =
        safetensors::serialize(views, &Some(m)).map_err(|e| ck_err(path, format!("{e:?}")))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::Io {
            path: dir.into(),
            source: e,
        })?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, &data).map_err(|e| TrainError::Io {
        path: tmp.clone(),
        source: e,
    })?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::Io {
        path: path.into(),
        source: e,
    })
}

/// Read a checkpoint written by [`save_atomic`]: tensors on the CPU and the metadata.
pub fn load(path: &Path) -> Result<(BTreeMap<String, Tensor>, serde_json::Value)> {
    let data = std::fs::read(path).map_err(|e| TrainError::Io {
        path: path.into(),
        source: e,
    })?;
    let (_, header) = SafeTensors::read_metadata(&data)
        .map_err(|e| ck_err(path, format!("not a checkpoint: {e:?}")))?;
    let meta_text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| {
            ck_err(
                path,
                format!("no `{META_KEY}` metadata (not written by qtale-train)"),
            )
        })?;
    let meta =
        serde_json::from_str(meta_text).map_err(|e| ck_err(path, format!("metadata: {e}")))?;
    let st = SafeTensors::deserialize(&data).map_err(|e| ck_err(path, format!("{e:?}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::I64 => Kind::Int64,
            other => {
                return Err(ck_err(
                    path,
                    format!("`{name}` has unsupported dtype {other:?}"),
                ))
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&x| x as i64).collect();
        out.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
    }
    Ok((out, meta))
}

/// `path: a (labels.0) vs b (labels.1)` for every leaf where two JSON values differ (objects compared key
/// by key, so the message names e.g. `loss.entropy.weight`).
pub fn json_diffs(
    path: &str,
    saved: &serde_json::Value,
    now: &serde_json::Value,
    labels: (&str, &str),
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (saved, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                json_diffs(
                    &p,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    labels,
                    out,
                );
            }
        }
        _ if saved != now => out.push(format!(
            "{path}: {saved} ({}) vs {now} ({})",
            labels.0, labels.1
        )),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ck/step-10.safetensors");
        let a = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1]);
        let s = Tensor::from_slice(&[10i64]);
        let meta = serde_json::json!({"step": 10, "preset": "qtale"});
        save_atomic(
            &p,
            &[
                ("lora.a".into(), a.shallow_clone()),
                ("adam.step".into(), s),
            ],
            &meta,
        )
        .unwrap();
        assert!(!p.with_extension("partial").exists());
        let (t, m) = load(&p).unwrap();
        assert_eq!(m, meta);
        assert_eq!((&t["lora.a"] - &a).abs().max().double_value(&[]), 0.0);
        assert_eq!(t["adam.step"].int64_value(&[0]), 10);

        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("step-10.safetensors"), "{e}");
        let other = dir.path().join("plain.safetensors");
        Tensor::write_safetensors(&[("x", &a)], &other).unwrap();
        let e = load(&other).unwrap_err().to_string();
        assert!(e.contains("qtale_checkpoint"), "{e}");
    }
}
