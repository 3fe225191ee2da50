//! The HF GPTQ checkpoint layout, on CPU.
//!
//! Per linear `prefix` (e.g. `model.layers.0.self_attn.q_proj`):
//! * `prefix.qweight`: i32 `[in * bits / 32, out]`, codes packed along the input dimension (for each
//!   output column, the input codes as one little-endian bit stream, see [`qtale_kernels::pack`]);
//! * `prefix.qzeros`: i32 `[n_groups, out * bits / 32]`, zero points packed along the output dimension,
//!   stored minus one (the `checkpoint_format: "gptq"` convention; read back as `(stored + 1) & maxq`);
//! * `prefix.scales`: f16 `[n_groups, out]`;
//! * `prefix.g_idx`: i32 `[in]`, the group of each input column.
//!
//! `config.json` carries `quantization_config` (`quant_method: "gptq"`, bits, group_size (-1 = per
//! channel), desc_act, sym, ...).
use std::collections::HashMap;
use std::path::Path;

use half::f16;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use qtale_kernels::int4::Int4Matrix;
use qtale_kernels::pack::{check_bits, pack_u32, unpack_u32};

use crate::config::QuantConfig;
use crate::error::{QuantError, Result};
use crate::weight::QuantizedWeight;

/// One linear in GPTQ layout.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqPacked {
    pub bits: u32,
    pub group_size: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub sym: bool,
    /// `[in * bits / 32, out]`
    pub qweight: Vec<i32>,
    /// `[n_groups, out * bits / 32]`
    pub qzeros: Vec<i32>,
    /// `[n_groups, out]`
    pub scales: Vec<f16>,
    /// `[in]`
    pub g_idx: Vec<i32>,
}

fn to_vec<T: tch::kind::Element>(t: &Tensor) -> Vec<T>
where
    Vec<T>: TryFrom<Tensor, Error = tch::TchError>,
{
    Vec::<T>::try_from(t.to_device(tch::Device::Cpu).contiguous().view([-1])).expect("element kind")
}

impl GptqPacked {
    pub fn n_groups(&self) -> usize {
        self.in_features.div_ceil(self.group_size)
    }

    /// Pack a [`QuantizedWeight`]; needs `in` and `out` multiples of 32 (every packed row whole words).
    /// Scales are rounded to f16 as the format stores them.
    pub fn from_quantized(q: &QuantizedWeight) -> Result<Self> {
        check_bits(q.bits)?;
        q.validate()?;
        let (out, inf, ng) = (q.out_features(), q.in_features(), q.n_groups());
        if inf % 32 != 0 || out % 32 != 0 {
            return Err(QuantError::Shape(format!(
                "GPTQ packing needs in and out multiples of 32, got [{out}, {inf}]"
            )));
        }
        let bits = q.bits as usize;
        let codes: Vec<u8> = to_vec(&q.codes);
        let wpc = inf * bits / 32;
        let mut qweight = vec![0i32; wpc * out];
        for o in 0..out {
            let words = pack_u32(&codes[o * inf..(o + 1) * inf], q.bits)?;
            for (k, w) in words.into_iter().enumerate() {
                qweight[k * out + o] = w as i32;
            }
        }
        let maxq = (1u32 << q.bits) - 1;
        let zeros: Vec<f32> = to_vec(&q.zeros.transpose(0, 1));
        let wpz = out * bits / 32;
        let mut qzeros = vec![0i32; ng * wpz];
        for g in 0..ng {
            let z: Vec<u8> = zeros[g * out..(g + 1) * out]
                .iter()
                .map(|&z| ((z as u32).wrapping_sub(1) & maxq) as u8)
                .collect();
            for (k, w) in pack_u32(&z, q.bits)?.into_iter().enumerate() {
                qzeros[g * wpz + k] = w as i32;
            }
        }
        let scales: Vec<f32> = to_vec(&q.scales.transpose(0, 1));
        Ok(GptqPacked {
            bits: q.bits,
            group_size: q.group_size,
            in_features: inf,
            out_features: out,
            sym: q.sym,
            qweight,
            qzeros,
            scales: scales.into_iter().map(f16::from_f32).collect(),
            g_idx: to_vec::<i64>(&q.g_idx)
                .into_iter()
                .map(|x| x as i32)
                .collect(),
        })
    }

    /// Codes `[out, in]` row-major.
    pub fn codes(&self) -> Vec<u8> {
        let (out, inf) = (self.out_features, self.in_features);
        let wpc = inf * self.bits as usize / 32;
        let mut codes = vec![0u8; out * inf];
        let mut col = vec![0u32; wpc];
        for o in 0..out {
            for (k, c) in col.iter_mut().enumerate() {
                *c = self.qweight[k * out + o] as u32;
            }
            let v = unpack_u32(&col, self.bits, inf).expect("checked shape");
            codes[o * inf..(o + 1) * inf].copy_from_slice(&v);
        }
        codes
    }

    /// Zero points `[n_groups, out]`.
    pub fn zeros(&self) -> Vec<u8> {
        let out = self.out_features;
        let wpz = out * self.bits as usize / 32;
        let maxq = (1u32 << self.bits) - 1;
        let mut z = Vec::with_capacity(self.n_groups() * out);
        for g in 0..self.n_groups() {
            let words: Vec<u32> = self.qzeros[g * wpz..(g + 1) * wpz]
                .iter()
                .map(|&w| w as u32)
                .collect();
            let v = unpack_u32(&words, self.bits, out).expect("checked shape");
            z.extend(v.into_iter().map(|s| ((s as u32 + 1) & maxq) as u8));
        }
        z
    }

    /// Back to the common artefact (f32 scales from the stored f16).
    pub fn to_quantized(&self) -> QuantizedWeight {
        let (out, inf, ng) = (
            self.out_features as i64,
            self.in_features as i64,
            self.n_groups() as i64,
        );
        let scales: Vec<f32> = self.scales.iter().map(|s| s.to_f32()).collect();
        let zeros: Vec<f32> = self.zeros().into_iter().map(f32::from).collect();
        QuantizedWeight {
            bits: self.bits,
            group_size: self.group_size,
            sym: self.sym,
            codes: Tensor::from_slice(&self.codes()).view([out, inf]),
            scales: Tensor::from_slice(&scales)
                .view([ng, out])
                .transpose(0, 1)
                .contiguous(),
            zeros: Tensor::from_slice(&zeros)
                .view([ng, out])
                .transpose(0, 1)
                .contiguous(),
            g_idx: Tensor::from_slice(&self.g_idx).to_kind(Kind::Int64),
        }
    }

    /// The dequantized weight `[out, in]`, f32 on CPU.
    pub fn dequantize(&self) -> Tensor {
        self.to_quantized().dequantize()
    }

    pub fn has_trivial_g_idx(&self) -> bool {
        self.g_idx
            .iter()
            .enumerate()
            .all(|(i, &g)| g as usize == i / self.group_size)
    }

    /// The int4 CPU kernel's format, when this is 4-bit with in-order groups that are multiples of 32.
    pub fn to_int4(&self) -> Option<Int4Matrix> {
        if self.bits != 4 || !self.has_trivial_g_idx() || !self.group_size.is_multiple_of(32) {
            return None;
        }
        let (out, ng) = (self.out_features, self.n_groups());
        let z = self.zeros();
        let mut scales = vec![0f32; out * ng];
        let mut zeros = vec![0u8; out * ng];
        for g in 0..ng {
            for o in 0..out {
                scales[o * ng + g] = self.scales[g * out + o].to_f32();
                zeros[o * ng + g] = z[g * out + o];
            }
        }
        Int4Matrix::new(
            out,
            self.in_features,
            self.group_size,
            &self.codes(),
            &scales,
            &zeros,
        )
        .ok()
    }

    /// Bytes of the four tensors as stored.
    pub fn bytes(&self) -> usize {
        4 * (self.qweight.len() + self.qzeros.len() + self.g_idx.len()) + 2 * self.scales.len()
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.bytes() as f64 * 8.0 / (self.in_features * self.out_features) as f64
    }
}

/// `quantization_config` of an HF GPTQ `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptqQuantizationConfig {
    pub quant_method: String,
    pub bits: u32,
    /// -1 = per channel.
    pub group_size: i64,
    #[serde(default)]
    pub desc_act: bool,
    #[serde(default = "yes")]
    pub sym: bool,
    #[serde(default)]
    pub static_groups: bool,
    #[serde(default)]
    pub damp_percent: Option<f64>,
    #[serde(default = "yes")]
    pub true_sequential: bool,
    #[serde(default)]
    pub checkpoint_format: Option<String>,
}

fn yes() -> bool {
    true
}

impl GptqQuantizationConfig {
    pub fn from_quant_config(cfg: &QuantConfig) -> Self {
        GptqQuantizationConfig {
            quant_method: "gptq".into(),
            bits: cfg.bits,
            group_size: if cfg.group_size == 0 {
                -1
            } else {
                cfg.group_size as i64
            },
            desc_act: cfg.act_order,
            sym: cfg.sym,
            static_groups: cfg.static_groups,
            damp_percent: Some(cfg.damp_percent),
            true_sequential: true,
            checkpoint_format: Some("gptq".into()),
        }
    }

    /// Group size for a linear with `in_features` inputs.
    pub fn group_for(&self, in_features: usize) -> usize {
        if self.group_size <= 0 {
            in_features
        } else {
            self.group_size as usize
        }
    }

    fn check(&self) -> Result<()> {
        if self.quant_method != "gptq" {
            return Err(QuantError::UnsupportedMethod(self.quant_method.clone()));
        }
        check_bits(self.bits).map_err(|_| QuantError::UnsupportedBits(self.bits))?;
        if let Some(f) = &self.checkpoint_format {
            if f != "gptq" {
                return Err(QuantError::UnsupportedMethod(format!(
                    "gptq checkpoint_format {f}"
                )));
            }
        }
        Ok(())
    }
}

/// Read and check `quantization_config` from a `config.json`.
pub fn read_quantization_config(config_json: &Path) -> Result<GptqQuantizationConfig> {
    let text = std::fs::read_to_string(config_json).map_err(|source| QuantError::Io {
        path: config_json.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| QuantError::Json {
        path: config_json.to_path_buf(),
        msg: e.to_string(),
    })?;
    let qc = v
        .get("quantization_config")
        .ok_or_else(|| QuantError::MissingQuantConfig {
            path: config_json.to_path_buf(),
        })?;
    let qc: GptqQuantizationConfig =
        serde_json::from_value(qc.clone()).map_err(|e| QuantError::Json {
            path: config_json.to_path_buf(),
            msg: format!("quantization_config: {e}"),
        })?;
    qc.check()?;
    Ok(qc)
}

/// Write packed linears and dense f32 tensors into one safetensors file.
pub fn save_safetensors(
    path: &Path,
    packed: &[(String, &GptqPacked)],
    dense: &[(String, &Tensor)],
) -> Result<()> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    fn bytes_i32(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    for (prefix, p) in packed {
        let (inf, out, ng, b) = (p.in_features, p.out_features, p.n_groups(), p.bits as usize);
        bufs.push((
            format!("{prefix}.qweight"),
            Dtype::I32,
            vec![inf * b / 32, out],
            bytes_i32(&p.qweight),
        ));
        bufs.push((
            format!("{prefix}.qzeros"),
            Dtype::I32,
            vec![ng, out * b / 32],
            bytes_i32(&p.qzeros),
        ));
        bufs.push((
            format!("{prefix}.scales"),
            Dtype::F16,
            vec![ng, out],
            p.scales.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
        bufs.push((
            format!("{prefix}.g_idx"),
            Dtype::I32,
            vec![inf],
            bytes_i32(&p.g_idx),
        ));
    }
    for (name, t) in dense {
        let v: Vec<f32> = to_vec(&t.to_kind(Kind::Float));
        let shape = t.size().iter().map(|&d| d as usize).collect();
        bufs.push((
            name.clone(),
            Dtype::F32,
            shape,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views = bufs
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| QuantError::Safetensors {
                    path: path.to_path_buf(),
                    msg: format!("{n}: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, &None, path).map_err(|e| QuantError::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// The tensors of a safetensors file, read into memory.
pub struct Checkpoint {
    path: std::path::PathBuf,
    bytes: Vec<u8>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| QuantError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        SafeTensors::deserialize(&bytes).map_err(|e| QuantError::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            bytes,
        })
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("checked in open")
    }

    pub fn names(&self) -> Vec<String> {
        self.st().names().into_iter().cloned().collect()
    }

    fn raw(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<Vec<u8>> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| {
            QuantError::MissingTensor(format!("{name} (in {})", self.path.display()))
        })?;
        if t.dtype() != dtype {
            return Err(QuantError::TensorDtype {
                name: name.into(),
                expected: format!("{dtype:?}"),
                found: format!("{:?}", t.dtype()),
            });
        }
        if t.shape() != shape {
            return Err(QuantError::TensorShape {
                name: name.into(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t.data().to_vec())
    }

    /// A dense tensor (F32, F16 or BF16) as f32, any shape.
    pub fn dense(&self, name: &str) -> Result<Tensor> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| {
            QuantError::MissingTensor(format!("{name} (in {})", self.path.display()))
        })?;
        let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        let d = t.data();
        let v: Vec<f32> = match t.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(QuantError::TensorDtype {
                    name: name.into(),
                    expected: "F32, F16 or BF16".into(),
                    found: format!("{other:?}"),
                })
            }
        };
        Ok(Tensor::from_slice(&v).view(shape.as_slice()))
    }

    /// Read and check one packed linear against its expected `(in, out)` and the config.
    pub fn packed(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        qc: &GptqQuantizationConfig,
    ) -> Result<GptqPacked> {
        qc.check()?;
        let b = qc.bits as usize;
        let g = qc.group_for(in_features);
        let ng = in_features.div_ceil(g);
        if !(in_features * b).is_multiple_of(32) || !(out_features * b).is_multiple_of(32) {
            return Err(QuantError::Shape(format!(
                "{prefix}: [{out_features}, {in_features}] cannot be packed at {b} bits"
            )));
        }
        let i32s = |v: Vec<u8>| -> Vec<i32> {
            v.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let qweight = i32s(self.raw(
            &format!("{prefix}.qweight"),
            Dtype::I32,
            &[in_features * b / 32, out_features],
        )?);
        let qzeros = i32s(self.raw(
            &format!("{prefix}.qzeros"),
            Dtype::I32,
            &[ng, out_features * b / 32],
        )?);
        let scales: Vec<f16> = self
            .raw(&format!("{prefix}.scales"), Dtype::F16, &[ng, out_features])?
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect();
        let g_name = format!("{prefix}.g_idx");
        let g_idx = i32s(self.raw(&g_name, Dtype::I32, &[in_features])?);
        if let Some((i, &bad)) = g_idx
            .iter()
            .enumerate()
            .find(|(_, &x)| x < 0 || x as usize >= ng)
        {
            return Err(QuantError::BadTensor {
                name: g_name,
                msg: format!("g_idx[{i}] = {bad} outside [0, {ng})"),
            });
        }
        Ok(GptqPacked {
            bits: qc.bits,
            group_size: g,
            in_features,
            out_features,
            sym: qc.sym,
            qweight,
            qzeros,
            scales,
            g_idx,
        })
    }
}

/// Names of the four tensors of a packed linear.
pub fn packed_tensor_names(prefix: &str) -> [String; 4] {
    ["qweight", "qzeros", "scales", "g_idx"].map(|s| format!("{prefix}.{s}"))
}

/// Count the tensors of each packed linear in a checkpoint (for "unexpected tensor" reports).
pub fn packed_prefixes(names: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for n in names {
        if let Some(p) = n.strip_suffix(".qweight") {
            *m.entry(p.to_string()).or_insert(0) += 1;
        }
    }
    m
}
