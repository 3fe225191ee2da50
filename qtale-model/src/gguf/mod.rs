//! GGUF v2/v3: a bounds-checked reader, a writer, and the dequantizers (and reference quantizers) of the
//! tensor types QTALE-rs loads: F32, F16, BF16, Q8_0, Q4_0 and Q4_1.
//!
//! The reader never trusts a count from the file: every length is checked against the bytes that remain
//! before anything is allocated, dimension products are checked for overflow, and every tensor's byte range
//! is checked against the file at open time, so [`GgufFile::tensor_data`] can hand out slices without
//! further checks. A malformed file is a [`GgufError`] naming the file and the key or tensor at fault,
//! never a panic (the `fuzz/` target `gguf_reader` exercises this).
//!
//! File layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` key/value count,
//! the key/value pairs, the tensor infos (name, `u32` n_dims, `u64` dims with ne0 fastest, `u32` type,
//! `u64` offset), padding to `general.alignment` (default 32), then the tensor data. Tensor offsets are
//! relative to the start of the data and aligned.
//!
//! The container ([`reader`], [`writer`]) and the block codecs ([`codecs`]) are separate files, as
//! candle splits them: a new ggml type is a new codec entry, not a change to the reader.
mod codecs;
mod reader;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};

pub use codecs::{dequantize_into, dequantize_into_parallel, quantize};
pub use reader::GgufFile;
pub use writer::GgufWriter;

/// The alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Arrays nested deeper than this are rejected (guards the reader's recursion).
pub const MAX_ARRAY_DEPTH: u32 = 16;
/// ggml tensors have at most this many dimensions.
pub const MAX_DIMS: u32 = 4;

const MAGIC: [u8; 4] = *b"GGUF";

/// Tensor storage types this crate reads and writes.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    pub const ALL: [GgmlType; 6] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::BF16,
    ];

    /// The type for a ggml type id, `None` for ids this crate does not support (k-quants, IQ types, ...).
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(GgmlType::F32),
            1 => Some(GgmlType::F16),
            2 => Some(GgmlType::Q4_0),
            3 => Some(GgmlType::Q4_1),
            8 => Some(GgmlType::Q8_0),
            30 => Some(GgmlType::BF16),
            _ => None,
        }
    }

    /// The ggml type id written in files.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => Q4_0_BYTES,
            GgmlType::Q4_1 => Q4_1_BYTES,
            GgmlType::Q8_0 => Q8_0_BYTES,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Bytes taking `n_elements` elements, `None` when `n_elements` is not a whole number of blocks or
    /// the size overflows.
    pub fn bytes_for(self, n_elements: usize) -> Option<usize> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.block_bytes())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A ggml type id as a name, for error messages about types we do not support.
fn ggml_type_label(id: &u32) -> String {
    let name = match *id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16..=23 | 29 => "an IQ type",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        30 => "BF16",
        _ => "unknown",
    };
    format!("{id} ({name})")
}

/// Elements per block of the 4- and 8-bit formats.
const QK: usize = 32;
const Q4_0_BYTES: usize = 2 + QK / 2;
const Q4_1_BYTES: usize = 4 + QK / 2;
const Q8_0_BYTES: usize = 2 + QK;

/// A metadata value. Arrays hold elements of one type (possibly arrays themselves).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// A short name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        value_type_name(self.type_id())
    }

    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer or float type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
}

fn value_type_name(id: u32) -> &'static str {
    match id {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => "invalid",
    }
}

/// The smallest number of bytes a value of this type takes in a file (`None`: invalid type id).
fn min_value_bytes(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// As stored in the file: ne0 (the fastest-varying, contiguous dimension) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset relative to the start of the tensor data.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Row-major shape: the file's dims reversed (`[576, 1536]` in the file is `[1536, 576]`).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (validated not to overflow when the file was opened).
    pub fn n_elements(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }

    /// Number of bytes of the tensor's data.
    pub fn n_bytes(&self) -> usize {
        self.n_elements() / self.ggml_type.block_size() * self.ggml_type.block_bytes()
    }
}

/// Everything that can go wrong reading, validating, writing or (de)quantizing GGUF data. Every variant
/// names the file; those about a key or a tensor name it too.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3; version 1 files must be converted, big-endian files are not supported)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error(
        "{path}: file truncated: {what} at byte offset {offset} runs past the end of the file"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
    },
    #[error("{path}: metadata key `{key}` has invalid value type id {type_id}")]
    InvalidValueType {
        path: PathBuf,
        key: String,
        type_id: u32,
    },
    #[error("{path}: invalid UTF-8 in {what}")]
    InvalidUtf8 { path: PathBuf, what: String },
    #[error("{path}: tensor `{tensor}` has unsupported ggml type {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)", ggml_type_label(.type_id))]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },
    #[error("{path}: tensor `{tensor}` data ends at byte {end}, past the end of the file ({file_len} bytes)")]
    TensorOutOfBounds {
        path: PathBuf,
        tensor: String,
        end: u64,
        file_len: u64,
    },
    #[error("{path}: tensor `{tensor}` has offset {offset}, not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        path: PathBuf,
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("{path}: tensor `{tensor}`: bad dimensions: {msg}")]
    BadDims {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("{path}: tensor `{tensor}` appears more than once")]
    DuplicateTensor { path: PathBuf, tensor: String },
    #[error("{path}: metadata key `{key}` is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key `{key}` has the wrong type (expected {expected})")]
    WrongKeyType {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
    #[error("{path}: no tensor named `{tensor}`")]
    UnknownTensor { path: PathBuf, tensor: String },
    #[error("{path}: `general.alignment` = {value} is not a power of two")]
    BadAlignment { path: PathBuf, value: u64 },
    #[error("{path}: {what}")]
    TooLarge { path: PathBuf, what: String },
    /// A buffer handed to [`dequantize_into`] or [`quantize`] does not match the element count.
    #[error("{what}: {msg}")]
    BadLength { what: String, msg: String },
}

impl GgufError {
    /// Names the tensor (and file) in a [`GgufError::BadLength`] raised by the buffer-level functions.
    fn in_tensor(self, path: &Path, tensor: &str) -> Self {
        match self {
            GgufError::BadLength { msg, .. } => GgufError::BadDims {
                path: path.to_path_buf(),
                tensor: tensor.to_string(),
                msg,
            },
            other => other,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use half::f16;

    /// The SmolLM2 GGUF fetched by `scripts/setup.sh`, when present.
    pub(crate) fn smollm2_path() -> Option<PathBuf> {
        let home = std::env::var_os("QTALE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qtale")))?;
        let p = home.join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        p.is_file().then_some(p)
    }

    /// Deterministic pseudo-random values in [-scale, scale] (xorshift), no extra dependency.
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn every_value_type() -> Vec<(String, GgufValue)> {
        use GgufValue::*;
        vec![
            ("t.u8".into(), U8(200)),
            ("t.i8".into(), I8(-100)),
            ("t.u16".into(), U16(60000)),
            ("t.i16".into(), I16(-30000)),
            ("t.u32".into(), U32(4_000_000_000)),
            ("t.i32".into(), I32(-2_000_000_000)),
            ("t.f32".into(), F32(1.5e-5)),
            ("t.bool".into(), Bool(true)),
            ("t.string".into(), String("héllo ✓ 🦀".into())),
            ("t.u64".into(), U64(u64::MAX - 1)),
            ("t.i64".into(), I64(i64::MIN + 1)),
            ("t.f64".into(), F64(-1.0e300)),
            ("t.empty_array".into(), Array(vec![])),
            ("t.empty_string".into(), String(std::string::String::new())),
            (
                "t.string_array".into(),
                Array(vec![String("a b".into()), String("Ġc".into())]),
            ),
            ("t.f32_array".into(), Array(vec![F32(0.25), F32(-2.0)])),
            ("t.bool_array".into(), Array(vec![Bool(false), Bool(true)])),
            (
                "t.nested".into(),
                Array(vec![
                    Array(vec![I32(1), I32(-2)]),
                    Array(vec![I32(3)]),
                    Array(vec![]),
                ]),
            ),
            (
                "t.deeply_nested".into(),
                Array(vec![Array(vec![Array(vec![String("x".into())])])]),
            ),
        ]
    }

    #[test]
    fn gguf_round_trip_metadata_and_tensors() {
        let mut w = GgufWriter::new();
        for (k, v) in every_value_type() {
            w.add_metadata(k, v);
        }
        let mut expected = Vec::new();
        for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
            let shape = [3usize, 64];
            let vals = values(3 * 64, i as u64 + 1, 2.0);
            let data = quantize(ty, &vals).unwrap();
            w.add_tensor(format!("tensor.{}", ty.name()), ty, &shape, data.clone());
            expected.push((ty, data));
        }
        // An odd-sized tensor forces padding between tensors.
        w.add_tensor(
            "odd",
            GgmlType::F32,
            &[3],
            quantize(GgmlType::F32, &[1.0, 2.0, 3.0]).unwrap(),
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("round_trip.gguf");
        w.write(&path).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.metadata, every_value_type());
        assert_eq!(g.tensors.len(), GgmlType::ALL.len() + 1);
        assert_eq!(g.data_offset() % 32, 0);
        for (ty, data) in &expected {
            let t = g.tensor(&format!("tensor.{}", ty.name())).unwrap();
            assert_eq!(t.ggml_type, *ty);
            assert_eq!(t.dims, vec![64, 3]);
            assert_eq!(t.shape(), vec![3, 64]);
            assert_eq!(t.offset % 32, 0);
            assert_eq!(g.tensor_data(t), &data[..]);
        }
        let (v, shape) = g.dequantize("odd").unwrap();
        assert_eq!((v, shape), (vec![1.0, 2.0, 3.0], vec![3]));
        // Same bytes through from_bytes.
        let g2 = GgufFile::from_bytes(w.to_bytes(), "mem.gguf").unwrap();
        assert_eq!(g2.metadata, g.metadata);
        // Typed getters.
        assert_eq!(g.get_u64("t.u32").unwrap(), 4_000_000_000);
        assert_eq!(g.get_u64("t.u8").unwrap(), 200);
        assert!(matches!(
            g.get_u64("t.i8"),
            Err(GgufError::WrongKeyType { .. })
        ));
        assert_eq!(g.get_f64("t.i16").unwrap(), -30000.0);
        assert_eq!(g.get_str("t.string").unwrap(), "héllo ✓ 🦀");
        assert!(matches!(
            g.get_str("nope"),
            Err(GgufError::MissingKey { .. })
        ));
        assert_eq!(g.get("t.bool").and_then(GgufValue::as_bool), Some(true));
        assert_eq!(
            g.get("t.f32_array")
                .and_then(GgufValue::as_array)
                .map(<[_]>::len),
            Some(2)
        );
    }

    #[test]
    fn gguf_custom_alignment_is_honoured() {
        let mut w = GgufWriter::new();
        w.add_metadata(ALIGNMENT_KEY, GgufValue::U32(64));
        w.add_tensor(
            "a",
            GgmlType::F32,
            &[5],
            quantize(GgmlType::F32, &[1.0; 5]).unwrap(),
        );
        w.add_tensor(
            "b",
            GgmlType::F16,
            &[7],
            quantize(GgmlType::F16, &[2.0; 7]).unwrap(),
        );
        let g = GgufFile::from_bytes(w.to_bytes(), "align64.gguf").unwrap();
        assert_eq!(g.alignment(), 64);
        assert_eq!(g.data_offset() % 64, 0);
        assert_eq!(g.tensor("b").unwrap().offset, 64);
        assert_eq!(g.dequantize("b").unwrap().0, vec![2.0; 7]);
    }

    #[test]
    fn gguf_shape_is_reversed_dims() {
        let t = GgufTensorInfo {
            name: "w".into(),
            dims: vec![576, 1536],
            ggml_type: GgmlType::Q4_1,
            offset: 0,
        };
        assert_eq!(t.shape(), vec![1536, 576]);
        assert_eq!(t.n_elements(), 576 * 1536);
        assert_eq!(t.n_bytes(), 576 * 1536 / 32 * 20);
        let t3 = GgufTensorInfo {
            dims: vec![2, 3, 4],
            ggml_type: GgmlType::F16,
            ..t
        };
        assert_eq!(t3.shape(), vec![4, 3, 2]);
        assert_eq!(t3.n_bytes(), 48);
    }

    #[test]
    fn gguf_type_ids_and_sizes() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        assert_eq!(GgmlType::from_id(12), None);
        let sizes: Vec<_> = GgmlType::ALL
            .iter()
            .map(|t| (t.block_size(), t.block_bytes()))
            .collect();
        assert_eq!(
            sizes,
            vec![(1, 4), (1, 2), (32, 18), (32, 20), (32, 34), (1, 2)]
        );
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn round_trip(ty: GgmlType, vals: &[f32]) -> Vec<f32> {
        let bytes = quantize(ty, vals).unwrap();
        assert_eq!(bytes.len(), ty.bytes_for(vals.len()).unwrap());
        let mut out = vec![f32::NAN; vals.len()];
        dequantize_into(ty, &bytes, &mut out).unwrap();
        let mut par = vec![f32::NAN; vals.len()];
        dequantize_into_parallel(ty, &bytes, &mut par).unwrap();
        assert_eq!(out, par);
        out
    }

    #[test]
    fn gguf_float_types_round_trip() {
        let vals = values(4096, 7, 3.0);
        assert_eq!(round_trip(GgmlType::F32, &vals), vals);
        for (ty, rel) in [(GgmlType::F16, 1.0 / 2048.0), (GgmlType::BF16, 1.0 / 256.0)] {
            let out = round_trip(ty, &vals);
            for (x, y) in vals.iter().zip(&out) {
                assert!((x - y).abs() <= x.abs() * rel + 1e-7, "{ty}: {x} -> {y}");
            }
        }
    }

    /// Per-block error bounds of the 4/8-bit types, on blocks of different scales and offsets.
    #[test]
    fn gguf_quantized_types_error_bounds() {
        let mut vals = Vec::new();
        for (i, (scale, shift)) in [
            (1.0f32, 0.0f32),
            (0.01, 0.0),
            (100.0, 0.0),
            (1.0, 5.0),
            (0.5, -3.0),
        ]
        .into_iter()
        .enumerate()
        {
            vals.extend(
                values(32 * 64, i as u64 + 11, scale)
                    .into_iter()
                    .map(|v| v + shift),
            );
        }
        vals.extend([0.0f32; 32]); // an all-zero block must decode to zeros
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let out = round_trip(ty, &vals);
            for (blk, (x, y)) in vals.chunks(32).zip(out.chunks(32)).enumerate() {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let (min, max) = x
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                // The f16 rounding of the scale (and min) adds up to 2^-11 relative.
                let f16_slack = 2.0 * amax / 2048.0;
                let bound = match ty {
                    GgmlType::Q8_0 => amax / 127.0 * 0.5 + f16_slack,
                    // the positive extreme of a negative-max block clamps: up to one step
                    GgmlType::Q4_0 => amax / 8.0 + f16_slack,
                    _ => (max - min) / 15.0 * 0.5 + f16_slack,
                } + 1e-6;
                let err = max_err(x, y);
                assert!(err <= bound, "{ty} block {blk}: err {err} > bound {bound}");
            }
            assert!(out[out.len() - 32..].iter().all(|&v| v == 0.0), "{ty}");
        }
        // Q8_0 and Q4_1 are much tighter than Q4_0 on average.
        let mse = |ty| {
            let out = round_trip(ty, &vals[..32 * 64]);
            vals.iter()
                .zip(&out)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                / out.len() as f32
        };
        assert!(mse(GgmlType::Q8_0) < mse(GgmlType::Q4_1));
        assert!(mse(GgmlType::Q4_1) < mse(GgmlType::Q4_0));
    }

    #[test]
    fn gguf_decode_hand_built_blocks() {
        let h = |v: f32| f16::from_f32(v).to_le_bytes();
        // Q8_0: d = 0.5, q = -16..15
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = [0f32; 32];
        dequantize_into(GgmlType::Q8_0, &b, &mut out).unwrap();
        let want: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
        assert_eq!(out.to_vec(), want);

        // Q4_0: d = 2, qs[j] = (j) | (15 - j) << 4 -> w[j] = 2 (j - 8), w[j+16] = 2 (7 - j)
        let mut b = h(2.0).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        dequantize_into(GgmlType::Q4_0, &b, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], 2.0 * (7.0 - j as f32));
        }

        // Q4_1: d = 0.25, m = -1, qs[j] = (j) | (j / 2) << 4 -> w[j] = 0.25 j - 1, w[j+16] = 0.25 (j/2) - 1
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | ((j / 2) << 4)));
        dequantize_into(GgmlType::Q4_1, &b, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 0.25 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.25 * (j / 2) as f32 - 1.0);
        }

        // F16 / BF16 / F32 scalars with exact representations.
        let mut o3 = [0f32; 3];
        let b: Vec<u8> = [1.0f32, -0.5, 65504.0].iter().flat_map(|&v| h(v)).collect();
        dequantize_into(GgmlType::F16, &b, &mut o3).unwrap();
        assert_eq!(o3, [1.0, -0.5, 65504.0]);
        let b = [0x80, 0x3f, 0x00, 0xc0, 0x80, 0xbf]; // bf16 1.0, -2.0, -1.0
        dequantize_into(GgmlType::BF16, &b, &mut o3).unwrap();
        assert_eq!(o3, [1.0, -2.0, -1.0]);

        // Q4_0 reference rounding: largest magnitude -8 -> d = 1, so values map to q = x + 8 exactly.
        let vals: Vec<f32> = (0..32).map(|i| (i % 16) as f32 - 8.0).collect();
        let q = quantize(GgmlType::Q4_0, &vals).unwrap();
        assert_eq!(f16::from_le_bytes([q[0], q[1]]).to_f32(), 1.0);
        assert_eq!(q[2], 0x00);
        assert_eq!(q[3], 0x11);
        dequantize_into(GgmlType::Q4_0, &q, &mut out).unwrap();
        assert_eq!(out.to_vec(), vals);
    }

    #[test]
    fn gguf_buffer_length_errors() {
        let mut out = [0f32; 32];
        assert!(matches!(
            dequantize_into(GgmlType::Q8_0, &[0u8; 33], &mut out),
            Err(GgufError::BadLength { .. })
        ));
        assert!(matches!(
            dequantize_into(GgmlType::Q4_1, &[0u8; 20], &mut out[..31]),
            Err(GgufError::BadLength { .. })
        ));
        assert!(matches!(
            quantize(GgmlType::Q4_0, &[0.0; 31]),
            Err(GgufError::BadLength { .. })
        ));
    }

    #[test]
    fn gguf_real_smollm2_file() {
        let Some(path) = smollm2_path() else {
            println!("SmolLM2 GGUF absent (run scripts/setup.sh); skipping");
            return;
        };
        let g = GgufFile::open(&path).unwrap();
        println!("{g:?}");
        println!("tensors: {}", g.tensors.len());
        for (k, v) in &g.metadata {
            let shown = match v {
                GgufValue::Array(a) => format!(
                    "[{} x {}]",
                    a.len(),
                    a.first().map_or("?", |x| x.type_name())
                ),
                other => format!("{other:?}"),
            };
            println!("  {k} = {shown}");
        }
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u64("llama.block_count").unwrap(), 30);
        assert_eq!(g.get_u64("llama.embedding_length").unwrap(), 576);
        assert_eq!(g.get_u64("llama.feed_forward_length").unwrap(), 1536);
        assert_eq!(g.get_u64("llama.attention.head_count").unwrap(), 9);
        assert_eq!(g.get_u64("llama.attention.head_count_kv").unwrap(), 3);
        assert_eq!(g.tensors.len(), 272);
        let emb = g.tensor("token_embd.weight").unwrap();
        assert_eq!(
            (emb.ggml_type, emb.shape()),
            (GgmlType::Q8_0, vec![49152, 576])
        );
        let q = g.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!((q.ggml_type, q.shape()), (GgmlType::Q4_1, vec![576, 576]));
        let up = g.tensor("blk.29.ffn_up.weight").unwrap();
        assert_eq!(
            (up.ggml_type, up.shape()),
            (GgmlType::Q4_1, vec![1536, 576])
        );
        let norm = g.tensor("output_norm.weight").unwrap();
        assert_eq!((norm.ggml_type, norm.shape()), (GgmlType::F32, vec![576]));
        println!(
            "output.weight present: {}",
            g.tensor("output.weight").is_some()
        );

        let t0 = std::time::Instant::now();
        let mut total = 0usize;
        let mut sum = 0f64;
        for t in &g.tensors {
            let (v, shape) = g.dequantize(&t.name).unwrap();
            assert_eq!(v.len(), shape.iter().product::<usize>());
            total += v.len();
            sum += v[..v.len().min(4096)]
                .iter()
                .map(|&x| f64::from(x.abs()))
                .sum::<f64>();
        }
        println!(
            "dequantized {total} values in {:.3} s",
            t0.elapsed().as_secs_f64()
        );
        assert!(sum.is_finite() && sum > 0.0);
        let (norm, _) = g.dequantize("output_norm.weight").unwrap();
        assert!(norm.iter().all(|v| v.is_finite()));
    }
}
