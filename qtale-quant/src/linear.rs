//! The linear layers a model is built from: the [`Linear`] interface, the dense [`DenseLinear`], and
//! the packed [`QuantLinear`] that runs the int4 CPU kernel (as mistralrs-quant keeps its quantized
//! linears beside the packed formats). Models ask for "a linear" and never name a method.
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::kernels::int4::Int4Matrix;
use crate::packed::GptqPacked;
use crate::weight::QuantizedWeight;

/// A linear map `y = x W^T (+ b)` with `W` of shape `[out, in]`.
pub trait Linear: std::fmt::Debug + Send {
    fn forward(&self, x: &Tensor) -> Tensor;
    fn in_features(&self) -> i64;
    fn out_features(&self) -> i64;
    /// The effective weight `[out, in]` (dequantized for packed formats), for calibration and merging.
    fn weight(&self) -> Tensor;
    /// Bytes the weight (and bias) occupy in memory as stored.
    fn weight_bytes(&self) -> usize;
    /// Bytes resident in memory at run time: storage plus any run-time copy (a kernel layout or a
    /// cached dequantized weight). Defaults to the storage.
    fn resident_bytes(&self) -> usize {
        self.weight_bytes()
    }
    /// The bias `[out]`, if any (kept apart from `weight()` so merging and re-quantizing keep it).
    fn bias(&self) -> Option<Tensor> {
        None
    }
    /// The packed form, for linears that have one (checkpoint writers, native kernels).
    fn packed(&self) -> Option<&GptqPacked> {
        None
    }
    /// The weight in the int4 CPU kernel's format, for linears that hold one (packed 4-bit with
    /// in-order groups): the native decoder runs those through the kernel instead of `weight()`.
    fn int4(&self) -> Option<&Int4Matrix> {
        None
    }
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Plain dense linear layer.
#[derive(Debug)]
pub struct DenseLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl DenseLinear {
    pub fn new(weight: Tensor) -> Self {
        DenseLinear { weight, bias: None }
    }
}

impl Linear for DenseLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
    fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
    fn weight(&self) -> Tensor {
        self.weight.shallow_clone()
    }
    fn weight_bytes(&self) -> usize {
        tensor_bytes(&self.weight) + self.bias.as_ref().map_or(0, tensor_bytes)
    }
    fn bias(&self) -> Option<Tensor> {
        self.bias.as_ref().map(Tensor::shallow_clone)
    }
}

/// A linear layer stored in the GPTQ packed layout. On CPU, 4-bit weights with in-order groups run
/// through the int4 AVX2 kernel for up to [`KERNEL_MAX_TOKENS`] tokens; larger batches (and other bit
/// widths, and CUDA) dequantize with tch and call the dense matmul. With `cache_dense` the dequantized
/// weight is kept after first use (as fast as dense, at dense memory cost; always on for CUDA).
#[derive(Debug)]
pub struct QuantLinear {
    packed: GptqPacked,
    kernel: Option<Int4Matrix>,
    bias: Option<Tensor>,
    cache_dense: bool,
    cache: Mutex<Option<Tensor>>,
}

/// Token count up to which the int4 kernel is used on CPU.
pub const KERNEL_MAX_TOKENS: i64 = 8;

impl QuantLinear {
    pub fn new(packed: GptqPacked, cache_dense: bool) -> Self {
        QuantLinear {
            kernel: packed.to_int4(),
            packed,
            bias: None,
            cache_dense,
            cache: Mutex::new(None),
        }
    }

    /// The same linear with a (dense) bias `[out]` added to its output.
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    pub fn from_quantized(q: &QuantizedWeight, cache_dense: bool) -> Result<Self> {
        Ok(Self::new(GptqPacked::from_quantized(q)?, cache_dense))
    }

    /// The int4 kernel's form of the weight, when the CPU kernel serves this linear.
    pub fn kernel(&self) -> Option<&Int4Matrix> {
        self.kernel.as_ref()
    }

    /// Whether the int4 CPU kernel serves small batches.
    pub fn has_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    fn dense_weight(&self, device: Device, kind: Kind) -> Tensor {
        let make = || self.packed.dequantize().to_device(device).to_kind(kind);
        if !(self.cache_dense || device.is_cuda()) {
            return make();
        }
        let mut c = self.cache.lock().expect("cache lock");
        match c.as_ref() {
            Some(t) if t.device() == device && t.kind() == kind => t.shallow_clone(),
            _ => {
                let t = make();
                *c = Some(t.shallow_clone());
                t
            }
        }
    }
}

impl Linear for QuantLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let inf = self.packed.in_features as i64;
        let out = self.packed.out_features as i64;
        let n = x.numel() as i64 / inf.max(1);
        if let Some(k) = &self.kernel {
            if x.device() == Device::Cpu && x.kind() == Kind::Float && n <= KERNEL_MAX_TOKENS {
                let xs: Vec<f32> = Vec::try_from(x.contiguous().view([-1])).expect("f32 input");
                let mut y = vec![0f32; (n * out) as usize];
                k.gemm(&xs, n as usize, &mut y).expect("shapes checked");
                let mut shape = x.size();
                *shape.last_mut().expect("input has a feature dimension") = out;
                let y = Tensor::from_slice(&y).view(shape.as_slice());
                return match &self.bias {
                    Some(b) => y + b.to_kind(Kind::Float),
                    None => y,
                };
            }
        }
        let b = self
            .bias
            .as_ref()
            .map(|b| b.to_device(x.device()).to_kind(x.kind()));
        x.linear(&self.dense_weight(x.device(), x.kind()), b.as_ref())
    }
    fn in_features(&self) -> i64 {
        self.packed.in_features as i64
    }
    fn out_features(&self) -> i64 {
        self.packed.out_features as i64
    }
    fn weight(&self) -> Tensor {
        self.packed.dequantize()
    }
    /// Bytes of the packed GPTQ tensors and the bias (the CPU kernel's int4 copy is a run-time form,
    /// counted in [`Linear::resident_bytes`]).
    fn weight_bytes(&self) -> usize {
        self.packed.bytes() + self.bias.as_ref().map_or(0, tensor_bytes)
    }
    fn resident_bytes(&self) -> usize {
        let cached = self
            .cache
            .lock()
            .expect("cache lock")
            .as_ref()
            .map_or(0, tensor_bytes);
        self.weight_bytes() + self.kernel.as_ref().map_or(0, Int4Matrix::bytes) + cached
    }
    fn bias(&self) -> Option<Tensor> {
        self.bias.as_ref().map(Tensor::shallow_clone)
    }
    fn packed(&self) -> Option<&GptqPacked> {
        Some(&self.packed)
    }
    fn int4(&self) -> Option<&Int4Matrix> {
        self.kernel.as_ref()
    }
}
