//! HF quantized checkpoint layouts (GPTQ and AutoAWQ "gemm"), on CPU.
//!
//! [`GptqPacked`] is the one in-memory form of a packed linear; the AWQ layout is a conversion to and
//! from it ([`GptqPacked::to_awq`], [`GptqPacked::from_awq`]).
//!
//! GPTQ, per linear `prefix` (e.g. `model.layers.0.self_attn.q_proj`):
//! * `prefix.qweight`: i32 `[in * bits / 32, out]`, codes packed along the input dimension (for each
//!   output column, the input codes as one little-endian bit stream, see [`qtale_kernels::pack`]);
//! * `prefix.qzeros`: i32 `[n_groups, out * bits / 32]`, zero points packed along the output dimension,
//!   stored minus one (the `checkpoint_format: "gptq"` convention; read back as `(stored + 1) & maxq`).
//!   `checkpoint_format: "gptq_v2"` checkpoints store the zero points themselves; they are converted
//!   on load, so [`GptqPacked::qzeros`] always holds the `"gptq"` form;
//! * `prefix.scales`: f16 `[n_groups, out]`;
//! * `prefix.g_idx`: i32 `[in]`, the group of each input column (optional when `desc_act` is false:
//!   `i / group_size`, as transformers/optimum assume).
//!
//! `n_groups = ceil(in / group_size)`: a group size that does not divide `in` leaves a ragged last
//! group (AutoGPTQ sizes `scales`/`qzeros` the same way). AutoAWQ's layout needs `in % group_size
//! == 0`; a ragged group is refused there ([`QuantError::UnsupportedOption`] on `group_size`).
//!
//! AWQ (AutoAWQ `version: "gemm"`, 4-bit, `zero_point: true`):
//! * `prefix.qweight`: i32 `[in, out / 8]`, eight output columns per word in the order
//!   [`AWQ_ORDER`]: nibble `i` (bits `4i..4i+4`) of word `k` holds column `8k + AWQ_ORDER[i]`;
//! * `prefix.qzeros`: i32 `[n_groups, out / 8]`, the zero points packed the same way (no offset);
//! * `prefix.scales`: f16 `[n_groups, out]`; no `g_idx` (groups are in order).
//!
//! Both dequantize as `w[o, i] = scale[g, o] * (q[i, o] - zero[g, o])`. `config.json` carries
//! `quantization_config` ([`HfQuantizationConfig`]): `quant_method` `"gptq"` (bits, group_size with
//! -1 = per channel, desc_act, sym, checkpoint_format) or `"awq"` (bits, group_size, zero_point,
//! version).
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

    /// Pack a [`QuantizedWeight`]; needs `in * bits` and `out * bits` multiples of 32 (every packed
    /// row whole words). Scales are rounded to f16 as the format stores them.
    pub fn from_quantized(q: &QuantizedWeight) -> Result<Self> {
        check_bits(q.bits)?;
        q.validate()?;
        let codes: Vec<u8> = to_vec(&q.codes);
        let zeros: Vec<u8> = to_vec::<f32>(&q.zeros.transpose(0, 1))
            .into_iter()
            .map(|z| z as u8)
            .collect();
        let scales: Vec<f16> = to_vec::<f32>(&q.scales.transpose(0, 1))
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let g_idx = to_vec::<i64>(&q.g_idx)
            .into_iter()
            .map(|x| x as i32)
            .collect();
        Self::from_parts(q.bits, q.group_size, q.sym, &codes, &zeros, scales, g_idx)
    }

    /// Pack codes `[out, in]` (row-major), zero points `[n_groups, out]`, scales `[n_groups, out]` and
    /// `g_idx` `[in]`; `out` and `in` follow from the lengths. Needs `in * bits` and `out * bits`
    /// multiples of 32.
    pub fn from_parts(
        bits: u32,
        group_size: usize,
        sym: bool,
        codes: &[u8],
        zeros: &[u8],
        scales: Vec<f16>,
        g_idx: Vec<i32>,
    ) -> Result<Self> {
        check_bits(bits)?;
        let inf = g_idx.len();
        let out = codes.len().checked_div(inf).unwrap_or(0);
        let ng = if group_size == 0 {
            0
        } else {
            inf.div_ceil(group_size)
        };
        if group_size == 0
            || out * inf != codes.len()
            || zeros.len() != ng * out
            || scales.len() != ng * out
        {
            return Err(QuantError::Shape(format!(
                "packing: {} codes, {} zeros, {} scales, {inf} g_idx entries and group {group_size} \
                 do not describe one [out, in] weight",
                codes.len(),
                zeros.len(),
                scales.len()
            )));
        }
        let b = bits as usize;
        if !(inf * b).is_multiple_of(32) || !(out * b).is_multiple_of(32) {
            return Err(QuantError::Shape(format!(
                "packing at {bits} bits needs in * bits and out * bits multiples of 32, got [{out}, {inf}]"
            )));
        }
        if let Some((i, &g)) = g_idx
            .iter()
            .enumerate()
            .find(|(_, &g)| g < 0 || g as usize >= ng)
        {
            return Err(QuantError::Shape(format!(
                "g_idx[{i}] = {g} outside [0, {ng})"
            )));
        }
        let wpc = inf * b / 32;
        let mut qweight = vec![0i32; wpc * out];
        for o in 0..out {
            let words = pack_u32(&codes[o * inf..(o + 1) * inf], bits)?;
            for (k, w) in words.into_iter().enumerate() {
                qweight[k * out + o] = w as i32;
            }
        }
        let maxq = (1u32 << bits) - 1;
        if let Some((index, &code)) = zeros.iter().enumerate().find(|(_, &z)| z as u32 > maxq) {
            return Err(qtale_kernels::KernelError::CodeOutOfRange { index, code, bits }.into());
        }
        let stored: Vec<u8> = zeros
            .iter()
            .map(|&z| ((z as u32).wrapping_sub(1) & maxq) as u8)
            .collect();
        let qzeros = pack_rows(&stored, ng, out, bits)?;
        Ok(GptqPacked {
            bits,
            group_size,
            in_features: inf,
            out_features: out,
            sym,
            qweight,
            qzeros,
            scales,
            g_idx,
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
        let maxq = (1u32 << self.bits) - 1;
        unpack_rows(&self.qzeros, self.n_groups(), self.out_features, self.bits)
            .into_iter()
            .map(|s| ((s as u32 + 1) & maxq) as u8)
            .collect()
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

    /// The int4 CPU kernel's format, when this is 4-bit with in-order groups that are multiples of 32
    /// (a ragged last group included; [`Int4Matrix::new`] names the case it refuses).
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

    /// The AutoAWQ "gemm" layout of this linear: 4-bit with in-order groups (AWQ has no `g_idx`).
    pub fn to_awq(&self) -> Result<AwqTensors> {
        if self.bits != 4 {
            return Err(QuantError::UnsupportedBits(self.bits));
        }
        if !self.has_trivial_g_idx() {
            return Err(QuantError::UnsupportedOption {
                method: "awq".into(),
                field: "g_idx".into(),
                value: "act-order (reordered groups)".into(),
                supported: "groups in input order".into(),
            });
        }
        let (inf, out) = (self.in_features, self.out_features);
        awq_group_divides(inf, self.group_size)?;
        // codes [out, in] -> [in, out], then eight output columns per word in AWQ order
        let codes = self.codes();
        let mut t = vec![0u8; inf * out];
        for o in 0..out {
            for i in 0..inf {
                t[i * out + o] = codes[o * inf + i];
            }
        }
        Ok(AwqTensors {
            in_features: inf,
            out_features: out,
            group_size: self.group_size,
            qweight: awq_pack(&t, out)?,
            qzeros: awq_pack(&self.zeros(), out)?,
            scales: self.scales.clone(),
        })
    }

    /// The internal form of an AutoAWQ "gemm" linear (exact: same codes, zero points and f16 scales).
    pub fn from_awq(a: &AwqTensors) -> Result<Self> {
        let (inf, out) = (a.in_features, a.out_features);
        let g = a.group_size;
        awq_group_divides(inf, g)?;
        if !out.is_multiple_of(8) {
            return Err(QuantError::Shape(format!(
                "AWQ linear [{out}, {inf}] with group {g}: needs out % 8 == 0"
            )));
        }
        let ng = inf / g;
        let want = [
            ("qweight", a.qweight.len(), inf * out / 8),
            ("qzeros", a.qzeros.len(), ng * out / 8),
            ("scales", a.scales.len(), ng * out),
        ];
        for (name, found, expected) in want {
            if found != expected {
                return Err(QuantError::Shape(format!(
                    "AWQ {name}: {found} values, expected {expected} for [{out}, {inf}] group {g}"
                )));
            }
        }
        let t = awq_unpack(&a.qweight, out);
        let mut codes = vec![0u8; inf * out];
        for i in 0..inf {
            for o in 0..out {
                codes[o * inf + i] = t[i * out + o];
            }
        }
        let g_idx = (0..inf).map(|i| (i / g) as i32).collect();
        Self::from_parts(
            4,
            g,
            false,
            &codes,
            &awq_unpack(&a.qzeros, out),
            a.scales.clone(),
            g_idx,
        )
    }

    /// Bytes of the four tensors as stored.
    pub fn bytes(&self) -> usize {
        4 * (self.qweight.len() + self.qzeros.len() + self.g_idx.len()) + 2 * self.scales.len()
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.bytes() as f64 * 8.0 / (self.in_features * self.out_features) as f64
    }
}

/// AutoAWQ's `WQLinear_GEMM` requires `in_features % group_size == 0`: no ragged last group.
fn awq_group_divides(in_features: usize, group: usize) -> Result<()> {
    if group == 0 || !in_features.is_multiple_of(group) {
        return Err(QuantError::UnsupportedOption {
            method: "awq".into(),
            field: "group_size".into(),
            value: format!("{group} for in_features = {in_features} (a ragged last group)"),
            supported: "a group size dividing in_features (AutoAWQ gemm layout)".into(),
        });
    }
    Ok(())
}

/// One linear in the AutoAWQ "gemm" layout (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct AwqTensors {
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
    /// `[in, out / 8]`
    pub qweight: Vec<i32>,
    /// `[n_groups, out / 8]`
    pub qzeros: Vec<i32>,
    /// `[n_groups, out]`
    pub scales: Vec<f16>,
}

/// AutoAWQ's nibble order: nibble `i` of a word holds column `AWQ_ORDER[i]` of its eight.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Pack rows of `n` 4-bit values (`vals: [rows, n]`) eight per word in [`AWQ_ORDER`].
fn awq_pack(vals: &[u8], n: usize) -> Result<Vec<i32>> {
    debug_assert!(n.is_multiple_of(8) && vals.len().is_multiple_of(n));
    let mut out = Vec::with_capacity(vals.len() / 8);
    for (index, eight) in vals.chunks_exact(8).enumerate() {
        let mut w = 0u32;
        for (i, &col) in AWQ_ORDER.iter().enumerate() {
            let v = eight[col];
            if v > 15 {
                return Err(qtale_kernels::KernelError::CodeOutOfRange {
                    index: index * 8 + col,
                    code: v,
                    bits: 4,
                }
                .into());
            }
            w |= (v as u32) << (4 * i);
        }
        out.push(w as i32);
    }
    Ok(out)
}

/// Inverse of [`awq_pack`]: `[rows, n / 8]` words to `[rows, n]` values.
fn awq_unpack(words: &[i32], n: usize) -> Vec<u8> {
    debug_assert!(n.is_multiple_of(8) && (words.len() * 8).is_multiple_of(n));
    let mut out = vec![0u8; words.len() * 8];
    for (k, &w) in words.iter().enumerate() {
        for (i, &col) in AWQ_ORDER.iter().enumerate() {
            out[k * 8 + col] = ((w as u32 >> (4 * i)) & 15) as u8;
        }
    }
    out
}

/// Pack `rows` rows of `n` codes each (row-major) into `rows * n * bits / 32` words.
fn pack_rows(vals: &[u8], rows: usize, n: usize, bits: u32) -> Result<Vec<i32>> {
    let mut out = Vec::with_capacity(rows * n * bits as usize / 32);
    for r in 0..rows {
        out.extend(
            pack_u32(&vals[r * n..(r + 1) * n], bits)?
                .into_iter()
                .map(|w| w as i32),
        );
    }
    Ok(out)
}

/// Inverse of [`pack_rows`].
fn unpack_rows(words: &[i32], rows: usize, n: usize, bits: u32) -> Vec<u8> {
    let wpr = n * bits as usize / 32;
    let mut out = Vec::with_capacity(rows * n);
    for r in 0..rows {
        let w: Vec<u32> = words[r * wpr..(r + 1) * wpr]
            .iter()
            .map(|&w| w as u32)
            .collect();
        out.extend(unpack_u32(&w, bits, n).expect("whole words per row"));
    }
    out
}

/// `quantization_config` of an HF GPTQ `config.json` (AutoGPTQ / optimum / GPTQModel). Unknown fields
/// (tool settings such as `use_exllama` or `dataset`) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptqQuantizationConfig {
    pub quant_method: String,
    pub bits: u32,
    /// -1 = per channel.
    pub group_size: i64,
    /// Act-order: `g_idx` is required (groups may be permuted).
    #[serde(default)]
    pub desc_act: bool,
    /// Informational: the zero points are read from `qzeros` either way.
    #[serde(default = "yes")]
    pub sym: bool,
    #[serde(default)]
    pub static_groups: bool,
    #[serde(default)]
    pub damp_percent: Option<f64>,
    #[serde(default = "yes")]
    pub true_sequential: bool,
    /// `"gptq"` (zero points stored minus one; the default when absent) or `"gptq_v2"` (stored as
    /// they are). GPTQModel writes the same field as `format`.
    #[serde(default, alias = "format")]
    pub checkpoint_format: Option<String>,
    /// GPTQModel's quantized LM head (not supported: the LM head stays dense here).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lm_head: bool,
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
            true_sequential: cfg.true_sequential,
            checkpoint_format: Some("gptq".into()),
            lm_head: false,
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

    /// Whether `qzeros` holds the zero points themselves (`checkpoint_format: "gptq_v2"`).
    pub fn is_v2(&self) -> bool {
        self.checkpoint_format.as_deref() == Some("gptq_v2")
    }

    fn check(&self) -> Result<()> {
        if self.quant_method != "gptq" {
            return Err(QuantError::UnsupportedMethod(self.quant_method.clone()));
        }
        check_bits(self.bits).map_err(|_| QuantError::UnsupportedBits(self.bits))?;
        let unsupported = |field: &str, value: String, supported: &str| {
            Err(QuantError::UnsupportedOption {
                method: "gptq".into(),
                field: field.into(),
                value,
                supported: supported.into(),
            })
        };
        if let Some(f) = &self.checkpoint_format {
            if f != "gptq" && f != "gptq_v2" {
                return unsupported("checkpoint_format", f.clone(), "gptq, gptq_v2");
            }
        }
        if self.group_size == 0 || self.group_size < -1 {
            return unsupported(
                "group_size",
                self.group_size.to_string(),
                "a positive group size or -1",
            );
        }
        if self.lm_head {
            return unsupported("lm_head", "true".into(), "false (dense LM head)");
        }
        Ok(())
    }
}

/// `quantization_config` of an AutoAWQ checkpoint (as transformers' `AwqConfig` writes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AwqQuantizationConfig {
    pub quant_method: String,
    pub bits: u32,
    pub group_size: i64,
    #[serde(default = "yes")]
    pub zero_point: bool,
    /// Packing layout; only `"gemm"` is supported.
    #[serde(default = "gemm")]
    pub version: String,
    /// Modules left dense (their `.weight` is loaded as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_not_convert: Option<Vec<String>>,
}

fn gemm() -> String {
    "gemm".into()
}

impl AwqQuantizationConfig {
    /// The config of a checkpoint written by [`save_safetensors`] in the AWQ layout: 4-bit, grouped.
    pub fn from_quant_config(cfg: &QuantConfig) -> Result<Self> {
        if cfg.bits != 4 {
            return Err(QuantError::UnsupportedBits(cfg.bits));
        }
        if cfg.group_size == 0 {
            return Err(QuantError::UnsupportedOption {
                method: "awq".into(),
                field: "group_size".into(),
                value: "0 (per channel)".into(),
                supported: "a positive group size".into(),
            });
        }
        Ok(AwqQuantizationConfig {
            quant_method: "awq".into(),
            bits: 4,
            group_size: cfg.group_size as i64,
            zero_point: true,
            version: "gemm".into(),
            modules_to_not_convert: None,
        })
    }

    pub fn group_for(&self, in_features: usize) -> usize {
        if self.group_size <= 0 {
            in_features
        } else {
            self.group_size as usize
        }
    }

    fn check(&self) -> Result<()> {
        if self.quant_method != "awq" {
            return Err(QuantError::UnsupportedMethod(self.quant_method.clone()));
        }
        if self.bits != 4 {
            return Err(QuantError::UnsupportedBits(self.bits));
        }
        let unsupported = |field: &str, value: String, supported: &str| {
            Err(QuantError::UnsupportedOption {
                method: "awq".into(),
                field: field.into(),
                value,
                supported: supported.into(),
            })
        };
        if !self.version.eq_ignore_ascii_case("gemm") {
            return unsupported("version", self.version.clone(), "gemm");
        }
        if !self.zero_point {
            return unsupported("zero_point", "false".into(), "true");
        }
        if self.group_size == 0 || self.group_size < -1 {
            return unsupported(
                "group_size",
                self.group_size.to_string(),
                "a positive group size or -1",
            );
        }
        Ok(())
    }
}

/// Which checkpoint layout packed linears are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedLayout {
    Gptq,
    Awq,
}

/// An HF `quantization_config`, by `quant_method`.
#[derive(Debug, Clone, PartialEq)]
pub enum HfQuantizationConfig {
    Gptq(GptqQuantizationConfig),
    Awq(AwqQuantizationConfig),
}

impl From<GptqQuantizationConfig> for HfQuantizationConfig {
    fn from(c: GptqQuantizationConfig) -> Self {
        HfQuantizationConfig::Gptq(c)
    }
}

impl From<AwqQuantizationConfig> for HfQuantizationConfig {
    fn from(c: AwqQuantizationConfig) -> Self {
        HfQuantizationConfig::Awq(c)
    }
}

impl HfQuantizationConfig {
    /// The config for writing `cfg`'s quantization in `layout` (AWQ: 4-bit with groups only).
    pub fn for_layout(layout: PackedLayout, cfg: &QuantConfig) -> Result<Self> {
        Ok(match layout {
            PackedLayout::Gptq => GptqQuantizationConfig::from_quant_config(cfg).into(),
            PackedLayout::Awq => AwqQuantizationConfig::from_quant_config(cfg)?.into(),
        })
    }

    /// Parse and check the `quantization_config` object (`path` names the file in errors).
    pub fn from_json(path: &Path, v: &serde_json::Value) -> Result<Self> {
        let method = v
            .get("quant_method")
            .and_then(|m| m.as_str())
            .ok_or_else(|| QuantError::Json {
                path: path.to_path_buf(),
                msg: "quantization_config: missing string field `quant_method`".into(),
            })?;
        let parse_err = |e: serde_json::Error| QuantError::Json {
            path: path.to_path_buf(),
            msg: format!("quantization_config: {e}"),
        };
        let qc = match method {
            "gptq" => {
                HfQuantizationConfig::Gptq(serde_json::from_value(v.clone()).map_err(parse_err)?)
            }
            "awq" => {
                HfQuantizationConfig::Awq(serde_json::from_value(v.clone()).map_err(parse_err)?)
            }
            other => return Err(QuantError::UnsupportedMethod(other.to_string())),
        };
        qc.check()?;
        Ok(qc)
    }

    /// The JSON object to store under `quantization_config`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            HfQuantizationConfig::Gptq(c) => serde_json::to_value(c),
            HfQuantizationConfig::Awq(c) => serde_json::to_value(c),
        }
        .expect("plain data serializes")
    }

    pub fn check(&self) -> Result<()> {
        match self {
            HfQuantizationConfig::Gptq(c) => c.check(),
            HfQuantizationConfig::Awq(c) => c.check(),
        }
    }

    pub fn layout(&self) -> PackedLayout {
        match self {
            HfQuantizationConfig::Gptq(_) => PackedLayout::Gptq,
            HfQuantizationConfig::Awq(_) => PackedLayout::Awq,
        }
    }

    pub fn bits(&self) -> u32 {
        match self {
            HfQuantizationConfig::Gptq(c) => c.bits,
            HfQuantizationConfig::Awq(c) => c.bits,
        }
    }

    /// Group size for a linear with `in_features` inputs.
    pub fn group_for(&self, in_features: usize) -> usize {
        match self {
            HfQuantizationConfig::Gptq(c) => c.group_for(in_features),
            HfQuantizationConfig::Awq(c) => c.group_for(in_features),
        }
    }

    /// Check the stored tensors of linear `prefix` (`[out_features, in_features]`) by name, dtype and
    /// shape, and convert them to the internal form. A missing `g_idx` is allowed when `desc_act` is
    /// false (groups in order), as in transformers/optimum.
    pub fn unpack(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        t: StoredLinear,
    ) -> Result<GptqPacked> {
        self.check()?;
        let b = self.bits() as usize;
        let g = self.group_for(in_features);
        if g == 0 {
            return Err(QuantError::Shape(format!("{prefix}: group size 0")));
        }
        // GPTQ: a ragged last group when g does not divide in_features (AWQ refuses it below).
        let ng = in_features.div_ceil(g);
        let name = |s: &str| format!("{prefix}.{s}");
        match self {
            HfQuantizationConfig::Gptq(c) => {
                if !(in_features * b).is_multiple_of(32) || !(out_features * b).is_multiple_of(32) {
                    return Err(QuantError::Shape(format!(
                        "{prefix}: [{out_features}, {in_features}] cannot be packed at {b} bits"
                    )));
                }
                let qweight = take_i32(
                    &name("qweight"),
                    t.qweight,
                    &[in_features * b / 32, out_features],
                )?;
                let mut qzeros = take_i32(&name("qzeros"), t.qzeros, &[ng, out_features * b / 32])?;
                let scales = take_f16(&name("scales"), t.scales, &[ng, out_features])?;
                let g_name = name("g_idx");
                let g_idx = match t.g_idx {
                    Some(x) => take_i32(&g_name, Some(x), &[in_features])?,
                    None if c.desc_act => {
                        return Err(QuantError::MissingTensor(format!(
                            "{g_name} (desc_act is true: act-order checkpoints need g_idx)"
                        )))
                    }
                    None => (0..in_features).map(|i| (i / g) as i32).collect(),
                };
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
                if c.is_v2() {
                    // stored as they are: convert to the "gptq" (minus one) form
                    let maxq = (1u32 << b) - 1;
                    let z: Vec<u8> = unpack_rows(&qzeros, ng, out_features, c.bits)
                        .into_iter()
                        .map(|z| ((z as u32).wrapping_sub(1) & maxq) as u8)
                        .collect();
                    qzeros = pack_rows(&z, ng, out_features, c.bits)?;
                }
                Ok(GptqPacked {
                    bits: c.bits,
                    group_size: g,
                    in_features,
                    out_features,
                    sym: c.sym,
                    qweight,
                    qzeros,
                    scales,
                    g_idx,
                })
            }
            HfQuantizationConfig::Awq(_) => {
                awq_group_divides(in_features, g).map_err(|e| match e {
                    QuantError::UnsupportedOption {
                        method,
                        field,
                        value,
                        supported,
                    } => QuantError::UnsupportedOption {
                        method,
                        field,
                        value: format!("{value} in {prefix}"),
                        supported,
                    },
                    other => other,
                })?;
                if !out_features.is_multiple_of(8) {
                    return Err(QuantError::Shape(format!(
                        "{prefix}: AWQ needs out_features % 8 == 0, got {out_features}"
                    )));
                }
                let a = AwqTensors {
                    in_features,
                    out_features,
                    group_size: g,
                    qweight: take_i32(
                        &name("qweight"),
                        t.qweight,
                        &[in_features, out_features / 8],
                    )?,
                    qzeros: take_i32(&name("qzeros"), t.qzeros, &[ng, out_features / 8])?,
                    scales: take_f16(&name("scales"), t.scales, &[ng, out_features])?,
                };
                GptqPacked::from_awq(&a)
            }
        }
    }
}

/// The stored tensors of one packed linear as read from a checkpoint (CPU tensors in their stored
/// dtype; `None` where absent).
#[derive(Debug, Default)]
pub struct StoredLinear {
    pub qweight: Option<Tensor>,
    pub qzeros: Option<Tensor>,
    pub scales: Option<Tensor>,
    pub g_idx: Option<Tensor>,
}

fn check_stored(name: &str, t: &Tensor, shape: &[usize], kinds: &[Kind]) -> Result<()> {
    if !kinds.contains(&t.kind()) {
        return Err(QuantError::TensorDtype {
            name: name.into(),
            expected: kinds
                .iter()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(" or "),
            found: format!("{:?}", t.kind()),
        });
    }
    let found: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    if found != shape {
        return Err(QuantError::TensorShape {
            name: name.into(),
            expected: shape.to_vec(),
            found,
        });
    }
    Ok(())
}

/// An i32 tensor (i64 accepted for `g_idx`-like indices) of exactly `shape`.
fn take_i32(name: &str, t: Option<Tensor>, shape: &[usize]) -> Result<Vec<i32>> {
    let t = t.ok_or_else(|| QuantError::MissingTensor(name.to_string()))?;
    check_stored(name, &t, shape, &[Kind::Int, Kind::Int64])?;
    if t.kind() == Kind::Int64 {
        let v: Vec<i64> = to_vec(&t);
        return v
            .into_iter()
            .map(|x| {
                i32::try_from(x).map_err(|_| QuantError::BadTensor {
                    name: name.into(),
                    msg: format!("value {x} does not fit in i32"),
                })
            })
            .collect();
    }
    Ok(to_vec(&t))
}

/// Scales as f16 (the format's dtype; f32 and bf16 scales are rounded to f16).
fn take_f16(name: &str, t: Option<Tensor>, shape: &[usize]) -> Result<Vec<f16>> {
    let t = t.ok_or_else(|| QuantError::MissingTensor(name.to_string()))?;
    check_stored(name, &t, shape, &[Kind::Half, Kind::Float, Kind::BFloat16])?;
    let v: Vec<f32> = to_vec(&t.to_kind(Kind::Float));
    Ok(v.into_iter().map(f16::from_f32).collect())
}

/// Read and check `quantization_config` from a `config.json`.
pub fn read_quantization_config(config_json: &Path) -> Result<HfQuantizationConfig> {
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
    HfQuantizationConfig::from_json(config_json, qc)
}

/// Write packed linears (in `layout`) and dense f32 tensors into one safetensors file.
pub fn save_safetensors(
    path: &Path,
    layout: PackedLayout,
    packed: &[(String, &GptqPacked)],
    dense: &[(String, &Tensor)],
) -> Result<()> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    fn bytes_i32(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn bytes_f16(v: &[f16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    for (prefix, p) in packed {
        let (inf, out, ng, b) = (p.in_features, p.out_features, p.n_groups(), p.bits as usize);
        match layout {
            PackedLayout::Gptq => {
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
                    bytes_f16(&p.scales),
                ));
                bufs.push((
                    format!("{prefix}.g_idx"),
                    Dtype::I32,
                    vec![inf],
                    bytes_i32(&p.g_idx),
                ));
            }
            PackedLayout::Awq => {
                let a = p.to_awq()?;
                bufs.push((
                    format!("{prefix}.qweight"),
                    Dtype::I32,
                    vec![inf, out / 8],
                    bytes_i32(&a.qweight),
                ));
                bufs.push((
                    format!("{prefix}.qzeros"),
                    Dtype::I32,
                    vec![ng, out / 8],
                    bytes_i32(&a.qzeros),
                ));
                bufs.push((
                    format!("{prefix}.scales"),
                    Dtype::F16,
                    vec![ng, out],
                    bytes_f16(&a.scales),
                ));
            }
        }
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

    /// A tensor in its stored dtype (F32, F16, BF16, I32, I64), or `None` when absent.
    pub fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let st = self.st();
        let Ok(t) = st.tensor(name) else {
            return Ok(None);
        };
        let kind = match t.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::I32 => Kind::Int,
            Dtype::I64 => Kind::Int64,
            other => {
                return Err(QuantError::TensorDtype {
                    name: name.into(),
                    expected: "F32, F16, BF16, I32 or I64".into(),
                    found: format!("{other:?}"),
                })
            }
        };
        let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        Ok(Some(Tensor::f_from_data_size(t.data(), &shape, kind)?))
    }

    /// A dense tensor (F32, F16 or BF16) as f32, any shape.
    pub fn dense(&self, name: &str) -> Result<Tensor> {
        let t = self.tensor(name)?.ok_or_else(|| {
            QuantError::MissingTensor(format!("{name} (in {})", self.path.display()))
        })?;
        if !matches!(t.kind(), Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(QuantError::TensorDtype {
                name: name.into(),
                expected: "F32, F16 or BF16".into(),
                found: format!("{:?}", t.kind()),
            });
        }
        Ok(t.to_kind(Kind::Float))
    }

    /// Read and check one packed linear against its expected `(in, out)` and the config.
    pub fn packed(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        qc: &HfQuantizationConfig,
    ) -> Result<GptqPacked> {
        let get = |s: &str| self.tensor(&format!("{prefix}.{s}"));
        let stored = StoredLinear {
            qweight: get("qweight")?,
            qzeros: get("qzeros")?,
            scales: get("scales")?,
            g_idx: match qc.layout() {
                PackedLayout::Gptq => get("g_idx")?,
                PackedLayout::Awq => None,
            },
        };
        qc.unpack(prefix, in_features, out_features, stored)
            .map_err(|e| match e {
                QuantError::MissingTensor(n) => {
                    QuantError::MissingTensor(format!("{n} (in {})", self.path.display()))
                }
                other => other,
            })
    }
}

/// Names of the four tensors of a packed GPTQ linear.
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
