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

/// The OpenBLAS kernel family this CPU should use when the linked OpenBLAS picked an older
/// one, else None.
///
/// Debian 12's OpenBLAS (0.3.21) chooses its kernels by CPU model when it loads; a CPU model
/// newer than it knows (cloud VMs report a generic "Intel Xeon Processor") falls back to
/// Prescott's SSE3 kernels. Measured on this project's 2-core CI VM (AVX-512): a
/// 5216x384 · 384x1536 sgemm takes 189 ms with Prescott kernels and 24 ms with SkylakeX ones,
/// so every CPU matmul of the engine (prompts, embeddings) runs ~8x slower than it can.
pub fn better_blas_core() -> Option<&'static str> {
    #[cfg(all(mlxserver_openblas, target_arch = "x86_64"))]
    {
        extern "C" {
            fn openblas_get_corename() -> *const std::os::raw::c_char;
        }
        if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
            return None;
        }
        // SAFETY: OpenBLAS returns a pointer to a static NUL-terminated name.
        let current = unsafe { std::ffi::CStr::from_ptr(openblas_get_corename()) }.to_string_lossy().to_ascii_lowercase();
        let pre_avx2 = ["prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai", "coppermine", "northwood", "banias", "sandybridge", "unknown"];
        if !pre_avx2.contains(&current.as_str()) {
            return None;
        }
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq");
        if avx512 {
            return Some("SkylakeX");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Some("Haswell");
        }
    }
    None
}

/// Runs this program again with `OPENBLAS_CORETYPE` set when the linked OpenBLAS picked
/// kernels older than the CPU ([`better_blas_core`]); the choice is made as the library
/// loads, so only a fresh exec can change it. Returns (and the program goes on as it is) when
/// nothing needs changing or the exec fails.
pub fn reexec_with_better_blas() {
    #[cfg(unix)]
    if let Some(core) = better_blas_core() {
        use std::os::unix::process::CommandExt;
        let Ok(program) = std::env::current_exe() else { return };
        let error = std::process::Command::new(program).args(std::env::args_os().skip(1)).env("OPENBLAS_CORETYPE", core).exec();
        tracing::debug!("could not re-run with OPENBLAS_CORETYPE={core}: {error}");
    }
}

/// Lets freed large buffers be reused from the heap on the CPU backend.
///
/// MLX's CPU allocator is plain malloc; glibc serves blocks above its mmap threshold (which
/// it tunes up to 32 MiB at most) with fresh mappings, so every large op output is
/// page-faulted in anew. Measured on the 2-core VM: writing one 40 MB attention-softmax
/// result into a new MLX array took 30 ms from fresh mappings, 7 ms from the heap. The cost
/// is that up to 256 MiB of freed memory may stay resident for reuse.
pub fn reuse_large_host_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            const LIMIT: libc::c_int = 256 << 20;
            // SAFETY: mallopt only changes allocator tunables; any value is valid.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT);
                libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT);
            }
        });
    }
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
    /// Quantized weights with fewer input columns than this are dequantized at load. MLX
    /// 0.32.4's CUDA quantized matmul returns wrong values (or inf) for 64 input columns
    /// (one group of 64) and more than one row, and right ones from 128 up (measured on an
    /// H200, tests/it/families.rs every_family_on_this_machines_gpu); no released model is
    /// that narrow, the tiny test models are.
    pub dense_below_width: i32,
}

impl WeightPolicy {
    /// Whether a quantized weight of `in_features` input columns is held dense.
    pub fn dense_for(&self, in_features: i32) -> bool {
        self.dense || in_features < self.dense_below_width
    }
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
                CpuDtype::Float32 => WeightPolicy { dense: true, dtype: Dtype::Float32, dense_below_width: 0 },
                CpuDtype::Float16 => WeightPolicy { dense: true, dtype: Dtype::Float16, dense_below_width: 0 },
                CpuDtype::Bfloat16 => WeightPolicy { dense: true, dtype: Dtype::Bfloat16, dense_below_width: 0 },
                CpuDtype::Quantized => WeightPolicy { dense: false, dtype: Dtype::Float32, dense_below_width: 0 },
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
                WeightPolicy { dense: false, dtype, dense_below_width: if self.backend == Backend::Cuda { 128 } else { 0 } }
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
        assert_eq!(cuda.for_model(Dtype::Bfloat16), WeightPolicy { dense: false, dtype: Dtype::Bfloat16, dense_below_width: 128 });
        assert_eq!(cuda.for_model(Dtype::Float16), WeightPolicy { dense: false, dtype: Dtype::Float16, dense_below_width: 128 });
        assert_eq!(cuda.for_model(Dtype::Float32).dtype, Dtype::Bfloat16);
        // one group of 64 columns goes dense on CUDA; 128 and real widths stay quantized
        let policy = cuda.for_model(Dtype::Bfloat16);
        assert!(policy.dense_for(64) && !policy.dense_for(128) && !policy.dense_for(4096));
        assert!(!DevicePolicy::new(Backend::Metal, CpuDtype::Float32).for_model(Dtype::Float16).dense_for(64));
        assert_eq!(DevicePolicy::new(Backend::Metal, CpuDtype::Float32).for_model(Dtype::Float32).dtype, Dtype::Float16);
        assert_eq!(DevicePolicy::new(Backend::Cpu, CpuDtype::Float32).for_model(Dtype::Bfloat16), WeightPolicy { dense: true, dtype: Dtype::Float32, dense_below_width: 0 });
    }
}
