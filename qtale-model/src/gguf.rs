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
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::{bf16, f16};

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

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An opened, fully validated GGUF file. Tensor data stays in the memory map (or the owned buffer) until
/// dequantized.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// Key/value pairs in file order.
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensorInfo>,
    storage: Storage,
    data_offset: usize,
    alignment: usize,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.file_len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let storage = if len == 0 {
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only. As with any memory map, the file must not be truncated or
            // modified by another process while it is open; model files are treated as immutable.
            Storage::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Self::parse(storage, path.to_path_buf())
    }

    /// Parses and validates an in-memory file; `label` stands in for the path in error messages.
    pub fn from_bytes(bytes: Vec<u8>, label: impl Into<PathBuf>) -> Result<Self, GgufError> {
        Self::parse(Storage::Owned(bytes), label.into())
    }

    fn parse(storage: Storage, path: PathBuf) -> Result<Self, GgufError> {
        let header = parse_header(storage.bytes(), &path)?;
        let tensor_index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            storage,
            data_offset: header.data_offset,
            alignment: header.alignment,
            tensor_index,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    pub fn file_len(&self) -> usize {
        self.bytes().len()
    }

    /// Absolute byte offset where the tensor data starts.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// The first value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::WrongKeyType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
        }
    }

    /// A non-negative integer of any integer type.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer"))
    }

    /// Any numeric value.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.require(key)?
            .as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.require(key)?
            .as_str()
            .ok_or_else(|| self.wrong_type(key, "a string"))
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor of this file (ranges are validated at open). An info that does not
    /// belong to this file and lies outside it yields an empty slice.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> &[u8] {
        let start = (info.offset as usize).saturating_add(self.data_offset);
        let end = start.saturating_add(info.n_bytes());
        self.bytes().get(start..end).unwrap_or(&[])
    }

    /// Dequantizes a tensor to f32: the values in row-major order and the row-major shape.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), GgufError> {
        let info = self.tensor(name).ok_or_else(|| GgufError::UnknownTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let mut out = vec![0f32; info.n_elements()];
        dequantize_into_parallel(info.ggml_type, self.tensor_data(info), &mut out)
            .map_err(|e| e.in_tensor(&self.path, name))?;
        Ok((out, info.shape()))
    }
}

struct Header {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensorInfo>,
    data_offset: usize,
    alignment: usize,
}

/// A bounds-checked little-endian reader over the file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: String) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what,
            offset: self.pos as u64,
        }
    }

    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what()));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_bytes` each can fit: `TooLarge` when they could not fit
    /// in a file of this size at all, `Truncated` when they run past the end of this one.
    fn check_count(
        &self,
        count: u64,
        min_bytes: u64,
        what: impl Fn() -> String,
    ) -> Result<usize, GgufError> {
        let file_len = self.buf.len() as u64;
        match count.checked_mul(min_bytes) {
            Some(need) if need <= file_len => {
                if need > self.remaining() as u64 {
                    Err(self.truncated(what()))
                } else {
                    // need <= file_len, which fits in usize, and min_bytes >= 1.
                    Ok(count as usize)
                }
            }
            _ => Err(GgufError::TooLarge {
                path: self.path.to_path_buf(),
                what: format!(
                    "{}: count {count} (at least {min_bytes} bytes each) cannot fit in a {file_len}-byte file",
                    what()
                ),
            }),
        }
    }

    /// A length-prefixed byte string.
    fn raw_string(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let len = self.u64(|| format!("length of {}", what()))?;
        let len = self.check_count(len, 1, what)?;
        self.take(len, what)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let raw = self.raw_string(what)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                path: self.path.to_path_buf(),
                what: format!("{} (\"{}\")", what(), String::from_utf8_lossy(raw)),
            }),
        }
    }

    fn value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<GgufValue, GgufError> {
        let what = || format!("value of key `{key}`");
        Ok(match type_id {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => GgufValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::TooLarge {
                        path: self.path.to_path_buf(),
                        what: format!("key `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    });
                }
                let elem_type = self.u32(|| format!("array element type of key `{key}`"))?;
                let min =
                    min_value_bytes(elem_type).ok_or_else(|| GgufError::InvalidValueType {
                        path: self.path.to_path_buf(),
                        key: key.to_string(),
                        type_id: elem_type,
                    })?;
                let count = self.u64(|| format!("array length of key `{key}`"))?;
                let count = self.check_count(count, min, || {
                    format!(
                        "array of key `{key}` ({count} elements of type {})",
                        value_type_name(elem_type)
                    )
                })?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            _ => {
                return Err(GgufError::InvalidValueType {
                    path: self.path.to_path_buf(),
                    key: key.to_string(),
                    type_id,
                })
            }
        })
    }
}

fn parse_header(buf: &[u8], path: &Path) -> Result<Header, GgufError> {
    let mut r = Reader { buf, pos: 0, path };
    let magic: [u8; 4] = r.array(|| "magic".into())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            path: path.to_path_buf(),
            found: magic,
        });
    }
    let version = r.u32(|| "version".into())?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let n_tensors = r.u64(|| "tensor count".into())?;
    let n_kv = r.u64(|| "metadata count".into())?;
    // A key/value pair takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor info at least
    // 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset).
    let n_kv = r.check_count(n_kv, 13, || "metadata key/value pairs".into())?;
    let n_tensors_usize = r.check_count(n_tensors, 32, || "tensor infos".into())?;

    let mut metadata = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key #{i}"))?;
        let type_id = r.u32(|| format!("value type of key `{key}`"))?;
        let value = r.value(type_id, &key, 0)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => {
            let value = v.as_u64().ok_or_else(|| GgufError::WrongKeyType {
                path: path.to_path_buf(),
                key: ALIGNMENT_KEY.to_string(),
                expected: "a non-negative integer",
            })?;
            if !value.is_power_of_two() || value > (1 << 30) {
                return Err(GgufError::BadAlignment {
                    path: path.to_path_buf(),
                    value,
                });
            }
            value as usize
        }
    };

    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(n_tensors_usize);
    let mut seen: HashMap<String, ()> = HashMap::with_capacity(n_tensors_usize);
    for i in 0..n_tensors_usize {
        let name = r.string(&|| format!("name of tensor #{i}"))?;
        let bad_dims = |msg: String| GgufError::BadDims {
            path: path.to_path_buf(),
            tensor: name.clone(),
            msg,
        };
        let n_dims = r.u32(|| format!("n_dims of tensor `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(bad_dims(format!(
                "n_dims = {n_dims}, expected 1..={MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(|| format!("dimension {d} of tensor `{name}`"))?);
        }
        let type_id = r.u32(|| format!("type of tensor `{name}`"))?;
        let offset = r.u64(|| format!("offset of tensor `{name}`"))?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                type_id,
            })?;
        if dims.contains(&0) {
            return Err(bad_dims(format!("dims {dims:?} contain a zero")));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= isize::MAX as u64)
            .ok_or_else(|| bad_dims(format!("dims {dims:?}: element count overflows")))?;
        if !dims[0].is_multiple_of(ggml_type.block_size() as u64) {
            return Err(bad_dims(format!(
                "ne0 = {} is not a multiple of the {} block size {}",
                dims[0],
                ggml_type,
                ggml_type.block_size()
            )));
        }
        if ggml_type.bytes_for(n_elements as usize).is_none() {
            return Err(bad_dims(format!("dims {dims:?}: byte size overflows")));
        }
        if !offset.is_multiple_of(alignment as u64) {
            return Err(GgufError::MisalignedTensor {
                path: path.to_path_buf(),
                tensor: name,
                offset,
                alignment: alignment as u64,
            });
        }
        if seen.insert(name.clone(), ()).is_some() {
            return Err(GgufError::DuplicateTensor {
                path: path.to_path_buf(),
                tensor: name,
            });
        }
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    // The data starts at the next multiple of the alignment. A file without tensors may end early.
    let data_offset = r.pos.div_ceil(alignment).saturating_mul(alignment);
    let file_len = buf.len() as u64;
    for t in &tensors {
        let end = (data_offset as u64)
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes() as u64));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                })
            }
        }
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        data_offset,
        alignment,
    })
}

// ------------------------------------------------------------------------------------------------------
// Dequantization

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn check_lengths(ty: GgmlType, n_bytes: usize, n_values: usize) -> Result<usize, GgufError> {
    let bad = |msg: String| GgufError::BadLength {
        what: format!("{ty} buffer"),
        msg,
    };
    if !n_values.is_multiple_of(ty.block_size()) {
        return Err(bad(format!(
            "{n_values} values is not a multiple of the block size {}",
            ty.block_size()
        )));
    }
    let n_blocks = n_values / ty.block_size();
    if n_blocks.checked_mul(ty.block_bytes()) != Some(n_bytes) {
        return Err(bad(format!(
            "{n_bytes} bytes do not hold {n_values} values ({} bytes per {} values)",
            ty.block_bytes(),
            ty.block_size()
        )));
    }
    Ok(n_blocks)
}

/// Decodes `bytes` of type `ty` into `out` (single-threaded scalar reference). `out.len()` must be a
/// whole number of blocks and `bytes` exactly that many blocks.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    check_lengths(ty, bytes.len(), out.len())?;
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            // Convert through a small aligned buffer so `half` can use its vectorised slice conversion.
            use half::slice::HalfFloatSliceExt;
            const CHUNK: usize = 256;
            let mut tmp = [f16::ZERO; CHUNK];
            for (o, b) in out.chunks_mut(CHUNK).zip(bytes.chunks(2 * CHUNK)) {
                let t = &mut tmp[..o.len()];
                for (h, p) in t.iter_mut().zip(b.chunks_exact(2)) {
                    *h = f16::from_le_bytes([p[0], p[1]]);
                }
                t.convert_to_f32_slice(o);
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q8_0_BYTES)) {
                let d = f16_at(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q4_0_BYTES)) {
                let d = f16_at(b, 0);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..]) {
                    *l = d * ((q & 0x0f) as i32 - 8) as f32;
                    *h = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q4_1_BYTES)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..]) {
                    *l = d * (q & 0x0f) as f32 + m;
                    *h = d * (q >> 4) as f32 + m;
                }
            }
        }
    }
    Ok(())
}

fn worker_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(16)
    })
}

/// [`dequantize_into`] split over the available cores (in whole blocks) for large tensors.
pub fn dequantize_into_parallel(
    ty: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), GgufError> {
    let n_blocks = check_lengths(ty, bytes.len(), out.len())?;
    let threads = worker_threads();
    const MIN_VALUES_PER_THREAD: usize = 1 << 18;
    if threads <= 1 || out.len() < 2 * MIN_VALUES_PER_THREAD {
        return dequantize_into(ty, bytes, out);
    }
    let threads = threads.min(out.len() / MIN_VALUES_PER_THREAD);
    let blocks_per = n_blocks.div_ceil(threads);
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    std::thread::scope(|s| {
        let handles: Vec<_> = out
            .chunks_mut(blocks_per * bs)
            .zip(bytes.chunks(blocks_per * bb))
            .map(|(o, b)| s.spawn(move || dequantize_into(ty, b, o)))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

// ------------------------------------------------------------------------------------------------------
// Reference quantizers (ggml's reference rounding)

/// Encodes `values` as `ty`. `values.len()` must be a multiple of the block size. The 4/8-bit
/// quantizers follow ggml's reference rounding: Q8_0 `d = amax / 127`, `q = round(x / d)`; Q4_0
/// `d = x_amax / -8` (the value of largest magnitude, signed), `q = min(15, trunc(x / d + 8.5))`; Q4_1
/// `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - min) / d + 0.5))`.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, GgufError> {
    if !values.len().is_multiple_of(ty.block_size()) {
        return Err(GgufError::BadLength {
            what: format!("{ty} quantization"),
            msg: format!(
                "{} values is not a multiple of the block size {}",
                values.len(),
                ty.block_size()
            ),
        });
    }
    let mut out = Vec::with_capacity(values.len() / ty.block_size() * ty.block_bytes());
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for blk in values.chunks_exact(QK) {
                let amax = blk.iter().fold(0f32, |a, &x| a.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|&x| ((x * id).round() as i8) as u8));
            }
        }
        GgmlType::Q4_0 => {
            for blk in values.chunks_exact(QK) {
                let (mut amax, mut max) = (0f32, 0f32);
                for &x in blk {
                    if x.abs() > amax {
                        amax = x.abs();
                        max = x;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |x: f32| ((x * id + 8.5) as u8).min(15);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let (lo, hi) = blk.split_at(QK / 2);
                out.extend(lo.iter().zip(hi).map(|(&l, &h)| q(l) | (q(h) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for blk in values.chunks_exact(QK) {
                let (min, max) = blk
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                        (lo.min(x), hi.max(x))
                    });
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |x: f32| (((x - min) * id + 0.5) as u8).min(15);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let (lo, hi) = blk.split_at(QK / 2);
                out.extend(lo.iter().zip(hi).map(|(&l, &h)| q(l) | (q(h) << 4)));
            }
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------------------
// Writer

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF v3 file in memory. The data alignment is `general.alignment` when that is set to a
/// power of two, else 32. The writer does not validate tensor data against the declared shape (tests
/// use it to build broken files); arrays must hold elements of one type (elements whose type differs
/// from the first element's are dropped).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            let elem_type = items.first().map_or(0, GgufValue::type_id);
            let n = items.iter().filter(|i| i.type_id() == elem_type).count();
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(n as u64).to_le_bytes());
            for item in items.iter().filter(|i| i.type_id() == elem_type) {
                put_value(out, item);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_metadata(&mut self, key: impl Into<String>, v: GgufValue) {
        self.metadata.push((key.into(), v));
    }

    /// Adds a tensor given its row-major shape (written to the file reversed, ne0 first) and its encoded
    /// bytes (e.g. from [`quantize`]).
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape_row_major: &[usize],
        data: Vec<u8>,
    ) {
        self.tensors.push(PendingTensor {
            name: name.into(),
            dims: shape_row_major.iter().rev().map(|&d| d as u64).collect(),
            ty,
            data,
        });
    }

    fn alignment(&self) -> usize {
        self.metadata
            .iter()
            .find(|(k, _)| k == ALIGNMENT_KEY)
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two() && *a <= 1 << 30)
            .map_or(DEFAULT_ALIGNMENT, |a| a as usize)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment();
        let pad = |out: &mut Vec<u8>| out.resize(out.len().div_ceil(align) * align, 0);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + t.data.len()).div_ceil(align) * align;
        }
        if !self.tensors.is_empty() {
            pad(&mut out);
        }
        for (i, t) in self.tensors.iter().enumerate() {
            out.extend_from_slice(&t.data);
            if i + 1 < self.tensors.len() {
                pad(&mut out);
            }
        }
        out
    }

    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        std::fs::write(path, self.to_bytes()).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

// ------------------------------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

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
