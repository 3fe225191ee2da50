//! CUDA visibility. tch references no symbol of `libtorch_cuda.so`, so the linker drops it
//! (`--as-needed`) and libtorch never registers its CUDA backend: `tch::Cuda::is_available()` is then
//! false even on a GPU machine. [`is_available`] loads the library once (found through the binary's
//! rpath or `LD_LIBRARY_PATH`) before asking; use it instead of `tch::Cuda::is_available()`.
use std::sync::OnceLock;

/// Load `libtorch_cuda.so` (once) and report whether a CUDA device is usable. False when the library
/// is absent (a CPU-only libtorch) or no GPU/driver is present.
pub fn is_available() -> bool {
    load_backend();
    tch::Cuda::is_available()
}

/// Number of CUDA devices visible to libtorch (0 without a GPU).
pub fn device_count() -> i64 {
    load_backend();
    tch::Cuda::device_count()
}

fn load_backend() {
    static LOADED: OnceLock<bool> = OnceLock::new();
    LOADED.get_or_init(|| {
        // SAFETY: dlopen with a constant, NUL-terminated name; the handle is intentionally never closed,
        // so the library's static initializers (which register the CUDA hooks) stay in effect.
        let handle = unsafe {
            libc::dlopen(
                c"libtorch_cuda.so".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_GLOBAL,
            )
        };
        !handle.is_null()
    });
}

#[cfg(test)]
mod tests {
    /// On a machine without a GPU this must say so (and not crash); with one, a tensor must round-trip.
    #[test]
    fn cuda_visibility_is_consistent() {
        if super::is_available() {
            assert!(super::device_count() >= 1);
            let t = tch::Tensor::from_slice(&[1.0f32, 2.0]).to_device(tch::Device::Cuda(0));
            assert_eq!(
                Vec::<f32>::try_from(t.to_device(tch::Device::Cpu)).unwrap(),
                vec![1.0, 2.0]
            );
        } else {
            assert_eq!(super::device_count(), 0);
        }
    }
}
