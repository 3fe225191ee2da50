//! Quantized checkpoints, beside the other loaders: a delta over the base model
//! ([`save_quantized`] / [`load_quantized`], what the experiment cache stores) and standalone hub-style
//! HF directories in the GPTQ or AutoAWQ "gemm" layout ([`save_quantized_hf_dir`] /
//! [`load_quantized_hf_dir`]). Every missing, unexpected or mis-shaped tensor and every unsupported
//! `quantization_config` value is a named error.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use qtale_quant::packed::{
    read_quantization_config, save_safetensors, Checkpoint, GptqPacked, HfQuantizationConfig,
    PackedLayout, StoredLinear,
};
use qtale_quant::{QuantError, QuantLinear};

use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::load::{LoadedModel, ModelSource};
use crate::model::{DenseLinear, Linear, Llama, BLOCK_LINEARS};
use crate::ptq::{hf_prefix, install, slot, QuantizeSummary};
use crate::weights::{safetensors_files, TensorMap};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::io(path, source)
}

/// Write the quantized linears (GPTQ layout), the linears a method left dense but changed (pruned), and
/// the block norms (AWQ changes them) to
/// `dir/model.safetensors`, and `dir/config.json` with `quantization_config`: a delta over the base
/// model, read back by [`load_quantized`]. [`save_quantized_hf_dir`] writes a standalone directory.
pub fn save_quantized(model: &Llama, summary: &QuantizeSummary, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let packed: Vec<(String, &GptqPacked)> =
        summary.packed.iter().map(|(n, p)| (n.clone(), p)).collect();
    let mut dense: Vec<(String, Tensor)> = summary
        .dense
        .iter()
        .map(|(n, t)| (format!("{n}.weight"), t.shallow_clone()))
        .collect();
    for (i, l) in model.layers.iter().enumerate() {
        dense.push((
            format!("model.layers.{i}.input_layernorm.weight"),
            l.input_layernorm.weight.shallow_clone(),
        ));
        dense.push((
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            l.post_attention_layernorm.weight.shallow_clone(),
        ));
    }
    let dense: Vec<(String, &Tensor)> = dense.iter().map(|(n, t)| (n.clone(), t)).collect();
    save_safetensors(
        &dir.join("model.safetensors"),
        PackedLayout::Gptq,
        &packed,
        &dense,
    )?;
    let qc = HfQuantizationConfig::for_layout(PackedLayout::Gptq, &summary.config)?;
    let cfg = serde_json::json!({
        "model_type": "llama",
        "quantization_config": qc.to_json(),
        "qtale_quant_method": summary.method.as_str(),
    });
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).map_err(io_err(&p))?;
    Ok(())
}

/// Write a standalone, hub-style quantized HF directory: `config.json` (the model's config plus
/// `quantization_config` for `layout`) and `model.safetensors` holding the packed linears of
/// `summary` in `layout` (GPTQ or AutoAWQ "gemm"), every other tensor dense in f32 (embedding, norms,
/// LM head, biases, and block linears left unquantized). [`load_quantized_hf_dir`] reads it back.
pub fn save_quantized_hf_dir(
    model: &Llama,
    summary: &QuantizeSummary,
    dir: &Path,
    layout: PackedLayout,
) -> Result<()> {
    let qc = HfQuantizationConfig::for_layout(layout, &summary.config)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let by_prefix: std::collections::HashMap<&str, &GptqPacked> = summary
        .packed
        .iter()
        .map(|(n, p)| (n.as_str(), p))
        .collect();
    let mut packed: Vec<(String, &GptqPacked)> = Vec::new();
    let mut dense: Vec<(String, Tensor)> = vec![(
        "model.embed_tokens.weight".into(),
        model.embed_tokens.shallow_clone(),
    )];
    for (i, l) in model.layers.iter().enumerate() {
        dense.push((
            format!("model.layers.{i}.input_layernorm.weight"),
            l.input_layernorm.weight.shallow_clone(),
        ));
        dense.push((
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            l.post_attention_layernorm.weight.shallow_clone(),
        ));
        for name in BLOCK_LINEARS {
            let prefix = hf_prefix(i, name);
            let lin = match name {
                "q_proj" => &l.self_attn.q_proj,
                "k_proj" => &l.self_attn.k_proj,
                "v_proj" => &l.self_attn.v_proj,
                "o_proj" => &l.self_attn.o_proj,
                "gate_proj" => &l.mlp.gate_proj,
                "up_proj" => &l.mlp.up_proj,
                _ => &l.mlp.down_proj,
            };
            match by_prefix.get(prefix.as_str()) {
                Some(p) => packed.push((prefix.clone(), *p)),
                None => dense.push((format!("{prefix}.weight"), lin.weight())),
            }
            if let Some(b) = lin.bias() {
                dense.push((format!("{prefix}.bias"), b));
            }
        }
    }
    dense.push((
        "model.norm.weight".into(),
        model.norm.weight.shallow_clone(),
    ));
    if let Some(h) = &model.lm_head {
        dense.push(("lm_head.weight".into(), h.shallow_clone()));
    }
    let dense: Vec<(String, &Tensor)> = dense.iter().map(|(n, t)| (n.clone(), t)).collect();
    save_safetensors(&dir.join("model.safetensors"), layout, &packed, &dense)?;
    let mut cfg = serde_json::to_value(model.config.to_hf()).expect("config serializes");
    cfg["quantization_config"] = qc.to_json();
    cfg["qtale_quant_method"] = summary.method.as_str().into();
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).map_err(io_err(&p))?;
    Ok(())
}

/// Replace the block linears of `model` by those of a quantized checkpoint (GPTQ or AWQ layout)
/// written by [`save_quantized`] or [`save_quantized_hf_dir`] (or any single-file checkpoint with the
/// same tensor names); block norms present in it are loaded too. Returns how many linears were
/// replaced.
pub fn load_quantized(model: &mut Llama, dir: &Path, cache_dense: bool) -> Result<usize> {
    let model_kind = model.kind;
    let qc = read_quantization_config(&dir.join("config.json"))?;
    let ck = Checkpoint::open(&dir.join("model.safetensors"))?;
    let names: std::collections::HashSet<String> = ck.names().into_iter().collect();
    let mut n = 0;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for name in BLOCK_LINEARS {
            let prefix = hf_prefix(i, name);
            let (inf, outf, bias) = {
                let s = slot(layer, name)?;
                (
                    s.in_features() as usize,
                    s.out_features() as usize,
                    s.bias(),
                )
            };
            let dense_key = format!("{prefix}.weight");
            let lin: Box<dyn Linear> = if names.contains(&format!("{prefix}.qweight")) {
                let p = ck.packed(&prefix, inf, outf, &qc)?;
                Box::new(QuantLinear::new(p, cache_dense).with_bias(bias))
            } else if names.contains(&dense_key) {
                let w = ck.dense(&dense_key)?;
                if w.size() != [outf as i64, inf as i64] {
                    return Err(QuantError::TensorShape {
                        name: dense_key,
                        expected: vec![outf, inf],
                        found: w.size().iter().map(|&d| d as usize).collect(),
                    }
                    .into());
                }
                let dev = layer.input_layernorm.weight.device();
                Box::new(DenseLinear {
                    weight: w.to_device(dev).to_kind(model_kind),
                    bias,
                })
            } else {
                continue;
            };
            install(layer, name, lin)?;
            n += 1;
        }
        for (norm, w) in [
            ("input_layernorm", &mut layer.input_layernorm.weight),
            (
                "post_attention_layernorm",
                &mut layer.post_attention_layernorm.weight,
            ),
        ] {
            let key = format!("model.layers.{i}.{norm}.weight");
            if names.contains(&key) {
                let t = ck.dense(&key)?;
                if t.size() != w.size() {
                    return Err(QuantError::TensorShape {
                        name: key,
                        expected: w.size().iter().map(|&d| d as usize).collect(),
                        found: t.size().iter().map(|&d| d as usize).collect(),
                    }
                    .into());
                }
                *w = t.to_device(w.device()).to_kind(w.kind());
            }
        }
    }
    Ok(n)
}

/// Load a hub-style quantized HF directory in one call: `config.json` with `quantization_config`
/// (`quant_method` `"gptq"`, any `checkpoint_format`/`desc_act`/`sym` we support, or `"awq"` with
/// `version: "gemm"`), and `model.safetensors` (or shards with an index). Embedding, norms and LM head
/// load dense onto `device` in `kind`; each block linear becomes a [`QuantLinear`] built directly from
/// its `qweight`/`qzeros`/`scales`(/`g_idx`), with no dense copy, or a dense linear where the
/// checkpoint stores `prefix.weight` instead (modules left unquantized). Every missing, unexpected or
/// mis-shaped tensor and every unsupported config value is a named error. No tokenizer is needed (see
/// [`load_quantized_model`]).
pub fn load_quantized_hf_dir(
    dir: &Path,
    device: Device,
    kind: Kind,
    cache_dense: bool,
) -> Result<Llama> {
    let cfg_path = dir.join("config.json");
    let hf = HfConfig::from_file(&cfg_path)?;
    let qc_json =
        hf.quantization_config
            .as_ref()
            .ok_or_else(|| QuantError::MissingQuantConfig {
                path: cfg_path.clone(),
            })?;
    let qc = HfQuantizationConfig::from_json(&cfg_path, qc_json)?;
    let cfg = hf.resolve(&cfg_path)?;
    let map = TensorMap::from_safetensors(&safetensors_files(dir)?)?;
    Llama::from_tensors_with_linears(
        cfg,
        map,
        device,
        kind,
        |map: &mut TensorMap,
         prefix: &str,
         inf: i64,
         outf: i64,
         bias: bool|
         -> Result<Box<dyn Linear>> {
            let mut take = |s: &str| map.tensors.remove(&format!("{prefix}.{s}"));
            let bias = if bias {
                Some(
                    take("bias")
                        .ok_or_else(|| QuantError::MissingTensor(format!("{prefix}.bias")))?
                        .to_kind(kind)
                        .to_device(device),
                )
            } else {
                None
            };
            if let Some(w) = take("weight") {
                if w.size() != [outf, inf] {
                    return Err(QuantError::TensorShape {
                        name: format!("{prefix}.weight"),
                        expected: vec![outf as usize, inf as usize],
                        found: w.size().iter().map(|&d| d as usize).collect(),
                    }
                    .into());
                }
                return Ok(Box::new(DenseLinear {
                    weight: w.to_kind(kind).to_device(device),
                    bias,
                }));
            }
            let stored = StoredLinear {
                qweight: take("qweight"),
                qzeros: take("qzeros"),
                scales: take("scales"),
                g_idx: match qc.layout() {
                    PackedLayout::Gptq => take("g_idx"),
                    PackedLayout::Awq => None,
                },
            };
            if stored.qweight.is_none() {
                return Err(QuantError::MissingTensor(format!(
                    "{prefix}.qweight (nor a dense {prefix}.weight) in {}",
                    dir.display()
                ))
                .into());
            }
            let p = qc.unpack(prefix, inf as usize, outf as usize, stored)?;
            Ok(Box::new(QuantLinear::new(p, cache_dense).with_bias(bias)))
        },
    )
}

/// [`load_quantized_hf_dir`] plus the directory's `tokenizer.json`.
pub fn load_quantized_model(
    dir: &Path,
    device: Device,
    kind: Kind,
    cache_dense: bool,
) -> Result<LoadedModel> {
    let model = load_quantized_hf_dir(dir, device, kind, cache_dense)?;
    let tokenizer = crate::tokenizer::load_tokenizer(&dir.join("tokenizer.json"))?;
    Ok(LoadedModel {
        model,
        tokenizer,
        source: ModelSource::HfDir(dir.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{load_model, LoadedModel};
    use crate::ptq::{quantize_model, PtqOptions};
    use qtale_quant::{quantizer, QuantConfig};

    fn smollm2() -> Option<LoadedModel> {
        let p = crate::load::test_asset_gguf()?;
        Some(load_model(&ModelSource::Gguf(p), Device::Cpu, Kind::Float).unwrap())
    }

    fn tiny(name: &str) -> Llama {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny")
            .join(name);
        let p = dir.join("config.json");
        let cfg = HfConfig::from_file(&p).unwrap().resolve(&p).unwrap();
        crate::load::load_hf_weights(&dir, cfg, Device::Cpu, Kind::Float).unwrap()
    }

    fn tiny_calib() -> Vec<Vec<i64>> {
        (0..4)
            .map(|s| {
                (0..16)
                    .map(|i| ((i * 7 + s * 13 + 3) % 96) as i64)
                    .collect()
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn quantize_hf_dir_save_load_matches_in_memory_model_on_tiny_fixtures() {
        tch::set_num_threads(1);
        let _g = tch::no_grad_guard();
        let calib = tiny_calib();
        for (fixture, method, layout) in [
            ("mha_untied", "gptq", PackedLayout::Gptq),
            ("gqa_tied", "rtn", PackedLayout::Gptq),
            ("gqa_llama3", "gptq", PackedLayout::Awq),
            ("mha_untied", "awq", PackedLayout::Awq),
        ] {
            let what = format!("{fixture} {method} -> {layout:?}");
            let mut model = tiny(fixture);
            let q = quantizer(
                method,
                &serde_json::json!(if method == "awq" {
                    serde_json::json!({"eval_rows": 64, "clip_rows": 32})
                } else {
                    serde_json::json!({})
                }),
            )
            .unwrap();
            let o = PtqOptions {
                batch: 2,
                ..Default::default()
            };
            let s = quantize_model(
                &mut model,
                &calib,
                &*q,
                &QuantConfig::new(4, 32).unwrap(),
                &o,
            )
            .unwrap();
            assert_eq!(s.packed.len(), 7 * model.layers.len(), "{what}");
            let dir = tempfile::tempdir().unwrap();
            save_quantized_hf_dir(&model, &s, dir.path(), layout).unwrap();
            let back = load_quantized_hf_dir(dir.path(), Device::Cpu, Kind::Float, false).unwrap();
            // the loaded linears are packed, not dense copies
            assert_eq!(back.weight_bytes(), model.weight_bytes(), "{what}");
            for l in &back.layers {
                assert!(l.mlp.down_proj.weight_bytes() < 4 * 32 * 64 / 4, "{what}");
            }
            // 6 tokens run through the int4 kernel, 12 through dequantize + matmul
            for len in [6usize, 12] {
                let ids = Tensor::from_slice(&calib[1][..len]).view([1, -1]);
                let a = model.forward(&ids, None).unwrap().logits;
                let b = back.forward(&ids, None).unwrap().logits;
                let d = max_diff(&a, &b);
                assert!(d <= 1e-5, "{what}, {len} tokens: logits differ by {d}");
            }
        }
    }

    /// Rewrite `dir/model.safetensors` through `edit` (a list of named tensors in, one out).
    fn edit_checkpoint(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
        let st = dir.join("model.safetensors");
        let mut ts = Tensor::read_safetensors(&st).unwrap();
        edit(&mut ts);
        Tensor::write_safetensors(&ts, &st).unwrap();
    }

    fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let p = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    }

    #[test]
    fn quantize_hf_dir_malformed_checkpoints_give_named_errors() {
        tch::set_num_threads(1);
        let mut model = tiny("mha_untied");
        let rtn = quantizer("rtn", &serde_json::Value::Null).unwrap();
        let cfg = QuantConfig::new(4, 32).unwrap();
        let s = quantize_model(&mut model, &[], &*rtn, &cfg, &PtqOptions::default()).unwrap();
        let write = |layout| {
            let dir = tempfile::tempdir().unwrap();
            save_quantized_hf_dir(&model, &s, dir.path(), layout).unwrap();
            dir
        };
        let load = |dir: &tempfile::TempDir| {
            load_quantized_hf_dir(dir.path(), Device::Cpu, Kind::Float, false).map(|_| ())
        };
        let q = "model.layers.1.self_attn.q_proj";
        for layout in [PackedLayout::Gptq, PackedLayout::Awq] {
            let dir = write(layout);
            load(&dir).unwrap();
            // missing qzeros
            edit_checkpoint(dir.path(), |ts| {
                ts.retain(|(n, _)| n != &format!("{q}.qzeros"))
            });
            let e = load(&dir).unwrap_err();
            assert!(
                matches!(&e, ModelError::Quant(QuantError::MissingTensor(n)) if n.contains("qzeros")),
                "{layout:?}: {e}"
            );
            // wrong shape of scales
            let dir = write(layout);
            edit_checkpoint(dir.path(), |ts| {
                for (n, t) in ts.iter_mut() {
                    if n == &format!("{q}.scales") {
                        *t = t.narrow(1, 0, 16).contiguous();
                    }
                }
            });
            let e = load(&dir).unwrap_err();
            assert!(
                matches!(&e, ModelError::Quant(QuantError::TensorShape { name, .. }) if name == &format!("{q}.scales")),
                "{layout:?}: {e}"
            );
            // bits 5
            let dir = write(layout);
            edit_config(dir.path(), |v| v["quantization_config"]["bits"] = 5.into());
            let e = load(&dir).unwrap_err();
            assert!(
                matches!(&e, ModelError::Quant(QuantError::UnsupportedBits(5))),
                "{layout:?}: {e}"
            );
        }
        // GPTQ: g_idx may be absent only without desc_act
        let dir = write(PackedLayout::Gptq);
        edit_checkpoint(dir.path(), |ts| ts.retain(|(n, _)| !n.ends_with(".g_idx")));
        load(&dir).unwrap();
        edit_config(dir.path(), |v| {
            v["quantization_config"]["desc_act"] = true.into()
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(&e, ModelError::Quant(QuantError::MissingTensor(n)) if n.contains("g_idx") && n.contains("desc_act")),
            "{e}"
        );
        // GPTQ checkpoint_format and AWQ version we do not implement
        let dir = write(PackedLayout::Gptq);
        edit_config(dir.path(), |v| {
            v["quantization_config"]["checkpoint_format"] = "marlin".into()
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(&e, ModelError::Quant(QuantError::UnsupportedOption { field, .. }) if field == "checkpoint_format"),
            "{e}"
        );
        let dir = write(PackedLayout::Awq);
        edit_config(dir.path(), |v| {
            v["quantization_config"]["version"] = "gemv".into()
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(&e, ModelError::Quant(QuantError::UnsupportedOption { field, .. }) if field == "version"),
            "{e}"
        );
        // no quantization_config at all, and a leftover tensor
        let dir = write(PackedLayout::Gptq);
        edit_config(dir.path(), |v| {
            v.as_object_mut().unwrap().remove("quantization_config");
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(&e, ModelError::Quant(QuantError::MissingQuantConfig { .. })),
            "{e}"
        );
        let dir = write(PackedLayout::Awq);
        edit_checkpoint(dir.path(), |ts| {
            ts.push((
                format!("{q}.g_idx"),
                Tensor::zeros([32], (Kind::Int, Device::Cpu)),
            ))
        });
        let e = load(&dir).unwrap_err();
        assert!(
            matches!(&e, ModelError::UnexpectedTensors { names, .. } if names == &[format!("{q}.g_idx")]),
            "{e}"
        );
    }

    #[test]
    fn quantize_save_load_gives_identical_logits_and_int4_kernel_path_matches() {
        let Some(lm) = smollm2() else { return };
        let calib = crate::corpus::calibration_windows(&lm.tokenizer, 4, 64).unwrap();
        let mut model = load_model(&lm.source, Device::Cpu, Kind::Float)
            .unwrap()
            .model;
        let gptq = quantizer("gptq", &serde_json::Value::Null).unwrap();
        let o = PtqOptions {
            max_layers: Some(2),
            batch: 4,
            ..Default::default()
        };
        let s = quantize_model(
            &mut model,
            &calib,
            &*gptq,
            &QuantConfig::new(4, 64).unwrap(),
            &o,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_quantized(&model, &s, dir.path()).unwrap();
        let mut back = load_model(&lm.source, Device::Cpu, Kind::Float)
            .unwrap()
            .model;
        assert_eq!(load_quantized(&mut back, dir.path(), false).unwrap(), 14);
        let ids = Tensor::from_slice(&calib[0][..24]).view([1, -1]);
        let a = model.forward(&ids, None).unwrap().logits;
        let b = back.forward(&ids, None).unwrap().logits;
        assert!(a.equal(&b), "save -> load changed the logits");
        // decode through the int4 kernel (1 token) vs the dequantized path: same up to int8 activations
        let ql = QuantLinear::new(s.packed[0].1.clone(), false);
        assert!(ql.has_kernel());
        let mse = |a: &Tensor, b: &Tensor| (a - b).square().mean(Kind::Float).double_value(&[]);
        tch::manual_seed(7);
        let x = Tensor::randn([1, 1, 576], (Kind::Float, Device::Cpu));
        let y_kernel = ql.forward(&x);
        let y_dense = x.linear::<Tensor>(&ql.weight(), None);
        // The kernel rounds the activations to int8 with step amax / 127, so each output can differ from
        // the dequantized product by at most step / 2 * sum_j |W_ij| (plus f32 rounding).
        let step = x.abs().max().double_value(&[]) / 127.0;
        let bound =
            ql.weight().abs().sum_dim_intlist(1, false, Kind::Float) * (0.5 * step * 1.001) + 1e-5;
        let err = (&y_kernel - &y_dense).abs().view([-1]);
        let over = err.gt_tensor(&bound).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(
            over, 0,
            "kernel vs dequantized path beyond the int8 rounding bound"
        );
        // On average the rounding errors are uniform (variance step^2 / 12 each): the expected squared
        // error of output i is step^2 / 12 * sum_j W_ij^2.
        let expect = step * step / 12.0 * ql.weight().square().sum(Kind::Float).double_value(&[])
            / y_dense.numel() as f64;
        let got = mse(&y_kernel, &y_dense);
        assert!(
            got < 3.0 * expect,
            "kernel vs dequantized MSE {got}, int8 rounding predicts {expect}"
        );
        // malformed checkpoint: a config with unsupported bits is a named error
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"quantization_config": {"quant_method": "gptq", "bits": 5, "group_size": 64}}"#,
        )
        .unwrap();
        assert!(matches!(
            load_quantized(&mut back, dir.path(), false),
            Err(ModelError::Quant(QuantError::UnsupportedBits(5)))
        ));
    }
}
