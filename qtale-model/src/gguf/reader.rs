//! The bounds-checked GGUF reader: header, metadata, tensor table, and slices of tensor data.
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::*;

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
