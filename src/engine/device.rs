//! Where MLX runs and how weights are held there: the one place for the device policy.
//!
//! On a GPU (Metal, CUDA) quantized weights stay quantized and run through
//! `quantized_matmul`. On the CPU, MLX's quantized and f16 kernels are far slower than f32
//! matmuls through OpenBLAS on x86 (measured: a 576x1536 matvec takes 28 ms 4-bit, 1.5 ms f16,
//! 0.22 ms f32), so weights are dequantized at load time to `engine.cpu_dtype` (f32 unless
//! configured otherwise) and memory is accounted for what is really held.

use mlx_rs::{Device, Dtype};

use crate::config::CpuDtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Metal,
    Cuda,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Metal => "metal",
            Backend::Cuda => "cuda",
        }
    }
}

/// The accelerator MLX offers in this process, if any.
pub fn detect() -> Backend {
    let mut available = false;
    // SAFETY: both calls only write the bool they are given.
    if unsafe { mlx_sys::mlx_metal_is_available(&mut available) } == 0 && available {
        return Backend::Metal;
    }
    available = false;
    if unsafe { mlx_sys::mlx_cuda_is_available(&mut available) } == 0 && available {
        return Backend::Cuda;
    }
    Backend::Cpu
}

/// Makes `backend` the default device of the calling thread's MLX operations.
pub fn activate(backend: Backend) {
    let device = match backend {
        Backend::Cpu => Device::cpu(),
        Backend::Metal | Backend::Cuda => Device::gpu(),
    };
    Device::set_default(&device);
}

/// How to hold weights on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightPolicy {
    /// Dequantize quantized weights at load time.
    pub dense: bool,
    /// Dtype of dense weights and activations.
    pub dtype: Dtype,
}

impl WeightPolicy {
    pub fn for_backend(backend: Backend, cpu_dtype: CpuDtype) -> WeightPolicy {
        match backend {
            Backend::Cpu => match cpu_dtype {
                CpuDtype::Float32 => WeightPolicy { dense: true, dtype: Dtype::Float32 },
                CpuDtype::Float16 => WeightPolicy { dense: true, dtype: Dtype::Float16 },
                CpuDtype::Bfloat16 => WeightPolicy { dense: true, dtype: Dtype::Bfloat16 },
                CpuDtype::Quantized => WeightPolicy { dense: false, dtype: Dtype::Float32 },
            },
            Backend::Metal | Backend::Cuda => WeightPolicy { dense: false, dtype: Dtype::Float16 },
        }
    }
}
