//! Feeds arbitrary bytes to the GGUF reader, then dequantizes every tensor it accepted. Any panic,
//! overflow or oversized allocation is a bug: malformed files must come back as `GgufError`s.
//!
//! Run with `cargo +nightly fuzz run gguf_reader` from the repository root (needs `cargo install cargo-fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qtale_model::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") else {
        return;
    };
    for info in &file.tensors {
        let _ = file.dequantize(&info.name);
    }
    for (key, _) in &file.metadata {
        let _ = file.get_u64(key);
        let _ = file.get_f64(key);
        let _ = file.get_str(key);
    }
});
