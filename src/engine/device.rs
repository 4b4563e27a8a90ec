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

/// Points MLX's CUDA kernel cache at the project's cache folder (`$MLXSERVER_CACHE/kernels`,
/// default `~/.cache/mlxserver/kernels`) unless `MLX_PTX_CACHE_DIR` is set: MLX compiles
/// kernels on first use (28-45 s for a model's first request) and otherwise keeps them under
/// /tmp, which a reboot empties. Runs before the engine thread touches MLX.
pub fn prepare_kernel_cache() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("MLX_PTX_CACHE_DIR").is_some() {
            return;
        }
        let root = std::env::var_os("MLXSERVER_CACHE")
            .map(std::path::PathBuf::from)
            .or_else(|| dirs::cache_dir().map(|c| c.join("mlxserver")));
        if let Some(dir) = root.map(|r| r.join("kernels")) {
            if std::fs::create_dir_all(&dir).is_ok() {
                // SAFETY: set once, before the engine thread starts MLX; nothing else in this
                // process reads this variable.
                unsafe { std::env::set_var("MLX_PTX_CACHE_DIR", &dir) };
            }
        }
    });
}

/// Makes `backend` the default device of the calling thread's MLX operations.
pub fn activate(backend: Backend) {
    let device = match backend {
        Backend::Cpu => Device::cpu(),
        Backend::Metal | Backend::Cuda => Device::gpu(),
    };
    Device::set_default(&device);
}

/// How to hold weights on a backend: the one place for the dtype policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightPolicy {
    /// Dequantize quantized weights at load time.
    pub dense: bool,
    /// Dtype of dense weights, norms, quantization scales and biases, and so of every
    /// activation: one dtype through the whole forward pass, so MLX never promotes.
    pub dtype: Dtype,
}

/// The rule a load applies once it knows the checkpoint's own dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePolicy {
    pub backend: Backend,
    pub cpu_dtype: CpuDtype,
}

impl DevicePolicy {
    pub fn new(backend: Backend, cpu_dtype: CpuDtype) -> DevicePolicy {
        DevicePolicy { backend, cpu_dtype }
    }

    /// `native`: the dtype the weights were trained or stored in (for quantized
    /// checkpoints, the dtype of their scales).
    pub fn for_model(self, native: Dtype) -> WeightPolicy {
        match self.backend {
            Backend::Cpu => match self.cpu_dtype {
                CpuDtype::Float32 => WeightPolicy { dense: true, dtype: Dtype::Float32 },
                CpuDtype::Float16 => WeightPolicy { dense: true, dtype: Dtype::Float16 },
                CpuDtype::Bfloat16 => WeightPolicy { dense: true, dtype: Dtype::Bfloat16 },
                CpuDtype::Quantized => WeightPolicy { dense: false, dtype: Dtype::Float32 },
            },
            Backend::Metal | Backend::Cuda => {
                let dtype = match native {
                    Dtype::Float16 | Dtype::Bfloat16 => native,
                    // Float32 checkpoints run in half precision on a GPU: Metal's fast type
                    // is float16, NVIDIA's tensor cores prefer bfloat16 (float16's range
                    // overflows on some models' activations).
                    _ if self.backend == Backend::Metal => Dtype::Float16,
                    _ => Dtype::Bfloat16,
                };
                WeightPolicy { dense: false, dtype }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_compute_in_the_checkpoint_dtype() {
        let cuda = DevicePolicy::new(Backend::Cuda, CpuDtype::Float32);
        assert_eq!(cuda.for_model(Dtype::Bfloat16), WeightPolicy { dense: false, dtype: Dtype::Bfloat16 });
        assert_eq!(cuda.for_model(Dtype::Float16), WeightPolicy { dense: false, dtype: Dtype::Float16 });
        assert_eq!(cuda.for_model(Dtype::Float32).dtype, Dtype::Bfloat16);
        assert_eq!(DevicePolicy::new(Backend::Metal, CpuDtype::Float32).for_model(Dtype::Float32).dtype, Dtype::Float16);
        assert_eq!(DevicePolicy::new(Backend::Cpu, CpuDtype::Float32).for_model(Dtype::Bfloat16), WeightPolicy { dense: true, dtype: Dtype::Float32 });
    }
}
