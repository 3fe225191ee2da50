//! One test per `GgufError` kind: a valid file built with `GgufWriter`, then corrupted. Each test checks
//! the variant and that the message names the file and the key or tensor at fault. The last tests are a
//! small deterministic stand-in for the fuzzer (every prefix, many byte flips: errors, never panics).
use std::path::{Path, PathBuf};

use qtale_model::gguf::{quantize, GgmlType, GgufError, GgufFile, GgufValue, GgufWriter};

const Q_NAME: &str = "blk.0.attn_q.weight";
const NORM_NAME: &str = "output_norm.weight";
const TOKENS_KEY: &str = "tokenizer.ggml.tokens";

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
}

fn base_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    w.add_metadata(
        "general.name",
        GgufValue::String("corruption-test-model".into()),
    );
    w.add_metadata("llama.block_count", GgufValue::U32(1));
    w.add_metadata(
        TOKENS_KEY,
        GgufValue::Array(
            ["a", "b", "ab"]
                .iter()
                .map(|s| GgufValue::String(s.to_string()))
                .collect(),
        ),
    );
    w.add_tensor(
        Q_NAME,
        GgmlType::Q4_1,
        &[4, 64],
        quantize(GgmlType::Q4_1, &ramp(256)).unwrap(),
    );
    w.add_tensor(
        NORM_NAME,
        GgmlType::F32,
        &[64],
        quantize(GgmlType::F32, &ramp(64)).unwrap(),
    );
    w
}

fn base_bytes() -> Vec<u8> {
    base_writer().to_bytes()
}

/// The first position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(needle)))
}

/// Position just after a length-prefixed string equal to `s`.
fn after_string(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    find(bytes, &needle) + needle.len()
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Positions of a tensor info's fields: (n_dims, first dim, type, offset).
fn tensor_fields(bytes: &[u8], name: &str) -> (usize, usize, usize, usize) {
    let p = after_string(bytes, name);
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    let ty = p + 4 + 8 * n_dims;
    (p, p + 4, ty, ty + 4)
}

struct Case {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// Writes `bytes` to a file called `name` and opens it, expecting an error.
fn open_bad(name: &str, bytes: &[u8]) -> (GgufError, String, Case) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let err = match GgufFile::open(&path) {
        Ok(_) => panic!("{name}: expected an error"),
        Err(e) => e,
    };
    // from_bytes must agree with open.
    let err2 = match GgufFile::from_bytes(bytes.to_vec(), &path) {
        Ok(_) => panic!("{name}: from_bytes accepted it"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert_eq!(msg, err2.to_string());
    assert!(msg.contains(name), "message does not name the file: {msg}");
    (err, msg, Case { _dir: dir, path })
}

#[test]
fn gguf_error_io_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("does_not_exist.gguf");
    let err = GgufFile::open(&path).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("does_not_exist.gguf"), "{err}");
}

#[test]
fn gguf_error_bad_magic() {
    let mut b = base_bytes();
    b[..4].copy_from_slice(b"GGML");
    let (err, msg, _c) = open_bad("bad_magic.gguf", &b);
    assert!(
        matches!(err, GgufError::BadMagic { found, .. } if &found == b"GGML"),
        "{err:?}"
    );
    assert!(msg.contains("GGUF"), "{msg}");
    // An empty file is truncated at the magic.
    let (err, msg, _c) = open_bad("empty.gguf", &[]);
    assert!(
        matches!(err, GgufError::Truncated { offset: 0, .. }),
        "{err:?}"
    );
    assert!(msg.contains("magic"), "{msg}");
}

#[test]
fn gguf_error_version_1() {
    let mut b = base_bytes();
    put_u32(&mut b, 4, 1);
    let (err, msg, _c) = open_bad("version1.gguf", &b);
    assert!(
        matches!(err, GgufError::UnsupportedVersion { version: 1, .. }),
        "{err:?}"
    );
    assert!(msg.contains("version 1"), "{msg}");
}

#[test]
fn gguf_error_truncated_header() {
    let b = base_bytes();
    let (err, msg, _c) = open_bad("short_header.gguf", &b[..14]);
    assert!(
        matches!(&err, GgufError::Truncated { what, offset: 8, .. } if what == "tensor count"),
        "{err:?}"
    );
    assert!(msg.contains("tensor count"), "{msg}");
}

#[test]
fn gguf_error_truncated_in_metadata() {
    let b = base_bytes();
    let p = find(&b, b"corruption-test-model");
    let (err, msg, _c) = open_bad("short_metadata.gguf", &b[..p + 5]);
    assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    assert!(msg.contains("general.name"), "{msg}");

    // Cut inside the string array: the element that runs out is named by its key.
    let p = after_string(&b, "a");
    let (err, msg, _c) = open_bad("short_array.gguf", &b[..p + 3]);
    assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    assert!(msg.contains(TOKENS_KEY), "{msg}");
}

#[test]
fn gguf_error_truncated_in_tensor_info() {
    let b = base_bytes();
    let (_, _, ty, _) = tensor_fields(&b, NORM_NAME);
    let (err, msg, _c) = open_bad("short_infos.gguf", &b[..ty + 2]);
    assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    assert!(msg.contains(NORM_NAME), "{msg}");
}

#[test]
fn gguf_error_truncated_tensor_data() {
    let b = base_bytes();
    let (err, msg, c) = open_bad("short_data.gguf", &b[..b.len() - 16]);
    match &err {
        GgufError::TensorOutOfBounds {
            tensor,
            end,
            file_len,
            ..
        } => {
            assert_eq!(tensor, NORM_NAME);
            assert_eq!(*end, b.len() as u64);
            assert_eq!(*file_len, b.len() as u64 - 16);
        }
        other => panic!("{other:?}"),
    }
    assert!(msg.contains(NORM_NAME), "{msg}");
    assert!(c.path.exists());
}

#[test]
fn gguf_error_unsupported_tensor_type() {
    let mut b = base_bytes();
    let (_, _, ty, _) = tensor_fields(&b, Q_NAME);
    put_u32(&mut b, ty, 12); // Q4_K
    let (err, msg, _c) = open_bad("q4k.gguf", &b);
    assert!(
        matches!(&err, GgufError::UnsupportedTensorType { tensor, type_id: 12, .. } if tensor == Q_NAME),
        "{err:?}"
    );
    assert!(msg.contains(Q_NAME) && msg.contains("Q4_K"), "{msg}");
}

#[test]
fn gguf_error_bad_dims() {
    // n_dims above 4.
    let mut b = base_bytes();
    let (nd, _, _, _) = tensor_fields(&b, Q_NAME);
    put_u32(&mut b, nd, 5);
    let (err, msg, _c) = open_bad("five_dims.gguf", &b);
    assert!(
        matches!(&err, GgufError::BadDims { tensor, .. } if tensor == Q_NAME),
        "{err:?}"
    );
    assert!(msg.contains(Q_NAME) && msg.contains("n_dims = 5"), "{msg}");

    // n_dims 0.
    put_u32(&mut b, nd, 0);
    let (err, _, _c) = open_bad("zero_dims.gguf", &b);
    assert!(matches!(err, GgufError::BadDims { .. }), "{err:?}");

    // Element count overflow.
    let mut b = base_bytes();
    let (_, d0, _, _) = tensor_fields(&b, Q_NAME);
    put_u64(&mut b, d0, 1 << 40);
    put_u64(&mut b, d0 + 8, 1 << 40);
    let (err, msg, _c) = open_bad("overflow_dims.gguf", &b);
    assert!(matches!(err, GgufError::BadDims { .. }), "{err:?}");
    assert!(msg.contains(Q_NAME) && msg.contains("overflow"), "{msg}");

    // ne0 not a multiple of the block size.
    let mut w = GgufWriter::new();
    w.add_tensor(
        "odd_rows",
        GgmlType::Q8_0,
        &[2, 48],
        vec![0; 2 * 48 / 32 * 34],
    );
    let (err, msg, _c) = open_bad("odd_rows.gguf", &w.to_bytes());
    assert!(matches!(err, GgufError::BadDims { .. }), "{err:?}");
    assert!(
        msg.contains("odd_rows") && msg.contains("block size"),
        "{msg}"
    );
}

#[test]
fn gguf_error_duplicate_tensor() {
    let mut w = base_writer();
    w.add_tensor(
        NORM_NAME,
        GgmlType::F32,
        &[64],
        quantize(GgmlType::F32, &ramp(64)).unwrap(),
    );
    let (err, msg, _c) = open_bad("duplicate.gguf", &w.to_bytes());
    assert!(
        matches!(&err, GgufError::DuplicateTensor { tensor, .. } if tensor == NORM_NAME),
        "{err:?}"
    );
    assert!(msg.contains(NORM_NAME), "{msg}");
}

#[test]
fn gguf_error_misaligned_tensor() {
    let mut b = base_bytes();
    let (_, _, _, off) = tensor_fields(&b, NORM_NAME);
    let old = u64::from_le_bytes(b[off..off + 8].try_into().unwrap());
    put_u64(&mut b, off, old + 4);
    let (err, msg, _c) = open_bad("misaligned.gguf", &b);
    assert!(
        matches!(&err, GgufError::MisalignedTensor { tensor, .. } if tensor == NORM_NAME),
        "{err:?}"
    );
    assert!(msg.contains(NORM_NAME), "{msg}");
}

#[test]
fn gguf_error_non_power_of_two_alignment() {
    let mut w = base_writer();
    w.add_metadata("general.alignment", GgufValue::U32(48));
    let (err, msg, _c) = open_bad("align48.gguf", &w.to_bytes());
    assert!(
        matches!(err, GgufError::BadAlignment { value: 48, .. }),
        "{err:?}"
    );
    assert!(
        msg.contains("general.alignment") && msg.contains("48"),
        "{msg}"
    );

    let mut w = base_writer();
    w.add_metadata("general.alignment", GgufValue::U32(0));
    let (err, _, _c) = open_bad("align0.gguf", &w.to_bytes());
    assert!(
        matches!(err, GgufError::BadAlignment { value: 0, .. }),
        "{err:?}"
    );

    let mut w = base_writer();
    w.add_metadata("general.alignment", GgufValue::String("32".into()));
    let (err, msg, _c) = open_bad("align_str.gguf", &w.to_bytes());
    assert!(matches!(err, GgufError::WrongKeyType { .. }), "{err:?}");
    assert!(msg.contains("general.alignment"), "{msg}");
}

#[test]
fn gguf_error_huge_array_count() {
    let mut b = base_bytes();
    // key, u32 value type (9), u32 element type (8), u64 count
    let count_at = after_string(&b, TOKENS_KEY) + 8;
    assert_eq!(
        u64::from_le_bytes(b[count_at..count_at + 8].try_into().unwrap()),
        3
    );
    put_u64(&mut b, count_at, u64::MAX / 3);
    let (err, msg, _c) = open_bad("huge_array.gguf", &b);
    assert!(matches!(err, GgufError::TooLarge { .. }), "{err:?}");
    assert!(msg.contains(TOKENS_KEY), "{msg}");

    // Huge header counts and string lengths are refused before any allocation too.
    let mut b = base_bytes();
    put_u64(&mut b, 8, u64::MAX);
    let (err, msg, _c) = open_bad("huge_tensor_count.gguf", &b);
    assert!(matches!(err, GgufError::TooLarge { .. }), "{err:?}");
    assert!(msg.contains("tensor"), "{msg}");
    let mut b = base_bytes();
    let p = find(&b, b"general.name") - 8;
    put_u64(&mut b, p, 1 << 62);
    let (err, _, _c) = open_bad("huge_key.gguf", &b);
    assert!(matches!(err, GgufError::TooLarge { .. }), "{err:?}");
}

#[test]
fn gguf_error_deeply_nested_array() {
    let mut v = GgufValue::Array(vec![]);
    for _ in 0..40 {
        v = GgufValue::Array(vec![v]);
    }
    let mut w = GgufWriter::new();
    w.add_metadata("deep.key", v);
    let (err, msg, _c) = open_bad("deep.gguf", &w.to_bytes());
    assert!(matches!(err, GgufError::TooLarge { .. }), "{err:?}");
    assert!(msg.contains("deep.key"), "{msg}");
}

#[test]
fn gguf_error_invalid_utf8() {
    let mut w = base_writer();
    w.add_metadata("general.badkey", GgufValue::U8(1));
    let mut b = w.to_bytes();
    let p = find(&b, b"general.badkey");
    b[p + "general.badke".len()] = 0xff;
    let (err, msg, _c) = open_bad("bad_utf8_key.gguf", &b);
    assert!(matches!(err, GgufError::InvalidUtf8 { .. }), "{err:?}");
    assert!(msg.contains("general.badke"), "{msg}");

    // In a value: the key is named.
    let mut b = base_bytes();
    let p = find(&b, b"corruption-test-model");
    b[p] = 0xc3; // a lone lead byte
    let (err, msg, _c) = open_bad("bad_utf8_value.gguf", &b);
    assert!(matches!(err, GgufError::InvalidUtf8 { .. }), "{err:?}");
    assert!(msg.contains("general.name"), "{msg}");
}

#[test]
fn gguf_error_invalid_value_type() {
    let mut b = base_bytes();
    let at = after_string(&b, "llama.block_count");
    assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 4);
    put_u32(&mut b, at, 13);
    let (err, msg, _c) = open_bad("bad_value_type.gguf", &b);
    assert!(
        matches!(&err, GgufError::InvalidValueType { key, type_id: 13, .. } if key == "llama.block_count"),
        "{err:?}"
    );
    assert!(msg.contains("llama.block_count"), "{msg}");

    // An invalid array element type.
    let mut b = base_bytes();
    let at = after_string(&b, TOKENS_KEY) + 4;
    put_u32(&mut b, at, 99);
    let (err, msg, _c) = open_bad("bad_elem_type.gguf", &b);
    assert!(
        matches!(err, GgufError::InvalidValueType { type_id: 99, .. }),
        "{err:?}"
    );
    assert!(msg.contains(TOKENS_KEY), "{msg}");
}

fn open_good(name: &str) -> (tempfile::TempDir, GgufFile) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    base_writer().write(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    (dir, g)
}

#[test]
fn gguf_error_missing_key_wrong_type_unknown_tensor() {
    let (_dir, g) = open_good("lookups.gguf");
    let err = g.get_u64("llama.context_length").unwrap_err();
    assert!(matches!(err, GgufError::MissingKey { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("lookups.gguf") && msg.contains("llama.context_length"),
        "{msg}"
    );

    let err = g.get_u64("general.name").unwrap_err();
    assert!(matches!(err, GgufError::WrongKeyType { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("lookups.gguf") && msg.contains("general.name"),
        "{msg}"
    );
    let err = g.get_str("llama.block_count").unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::WrongKeyType {
                expected: "a string",
                ..
            }
        ),
        "{err:?}"
    );
    let err = g.get_f64(TOKENS_KEY).unwrap_err();
    assert!(matches!(err, GgufError::WrongKeyType { .. }), "{err:?}");

    let err = g.dequantize("blk.7.attn_k.weight").unwrap_err();
    assert!(matches!(err, GgufError::UnknownTensor { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("lookups.gguf") && msg.contains("blk.7.attn_k.weight"),
        "{msg}"
    );

    // And the good file reads back.
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 1);
    let (v, shape) = g.dequantize(Q_NAME).unwrap();
    assert_eq!(shape, vec![4, 64]);
    let want = ramp(256);
    let err = v
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(err < 2.0 / 15.0 / 2.0 + 1e-2, "{err}");
}

/// Every prefix of a valid file is an error (or, past the last tensor's end, the file), never a panic.
#[test]
fn gguf_every_prefix_is_an_error() {
    let b = base_bytes();
    for n in 0..b.len() {
        let r = GgufFile::from_bytes(b[..n].to_vec(), Path::new("prefix.gguf"));
        assert!(r.is_err(), "prefix of {n} bytes accepted");
    }
    assert!(GgufFile::from_bytes(b, "full.gguf").is_ok());
}

/// Deterministic byte corruption: flips and overwrites everywhere; the reader and the dequantizer must
/// return (Ok or Err) without panicking.
#[test]
fn gguf_byte_corruption_never_panics() {
    let base = base_bytes();
    let mut s: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut accepted = 0;
    for round in 0..4000 {
        let mut b = base.clone();
        let n_edits = 1 + (round % 4);
        for _ in 0..n_edits {
            let at = (next() % b.len() as u64) as usize;
            b[at] = match next() % 4 {
                0 => 0xff,
                1 => 0,
                2 => b[at] ^ (1 << (next() % 8)),
                _ => next() as u8,
            };
        }
        if let Ok(g) = GgufFile::from_bytes(b, "corrupt.gguf") {
            accepted += 1;
            for t in &g.tensors {
                let _ = g.dequantize(&t.name);
            }
        }
    }
    // Edits inside tensor data or string contents keep the file valid.
    assert!(accepted > 0);
}
