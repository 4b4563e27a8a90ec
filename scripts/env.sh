# Shared environment of the project's scripts (sourced, not run).
# Everything downloaded or built lives under $MLXSERVER_CACHE (default ~/.cache/mlxserver)
# so later runs on the same machine are warm; nothing depends on it being there.
export MLXSERVER_CACHE="${MLXSERVER_CACHE:-$HOME/.cache/mlxserver}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MLXSERVER_CACHE/target}"
export MLX_PREFIX="${MLX_PREFIX:-$MLXSERVER_CACHE/mlx-cpu/mlx}"
export MLXSERVER_TEST_MODELS="${MLXSERVER_TEST_MODELS:-$MLXSERVER_CACHE/models}"
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
MLXSERVER_BIN="$CARGO_TARGET_DIR/debug/mlxserver"
# MLX's CUDA build, when setup.sh installed it (an NVIDIA machine) and MLXSERVER_BACKEND is
# not "cpu": mlx-c compiles against the CPU wheel's headers, the binary links the CUDA library.
if [ "${MLXSERVER_BACKEND:-}" != "cpu" ] && [ -z "${MLX_LIB_DIR:-}" ] && [ -f "$MLXSERVER_CACHE/mlx-cuda/mlx/lib/libmlx.so" ]; then
  export MLX_LIB_DIR="$MLXSERVER_CACHE/mlx-cuda/mlx/lib"
fi
# Debian's OpenBLAS 0.3.21 falls back to Prescott kernels (8x slower sgemm) on CPU models it
# does not know, such as cloud VMs; the server re-runs itself with the right kernels
# (engine/device.rs), and this covers the in-process test and bench binaries.
if [ -z "${OPENBLAS_CORETYPE:-}" ] && [ "$(uname -s)" = "Linux" ] && [ -r /proc/cpuinfo ]; then
  cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo) "
  if [[ "$cpu_flags" == *" avx512f "* && "$cpu_flags" == *" avx512bw "* && "$cpu_flags" == *" avx512vl "* && "$cpu_flags" == *" avx512dq "* ]]; then
    export OPENBLAS_CORETYPE=SkylakeX
  elif [[ "$cpu_flags" == *" avx2 "* && "$cpu_flags" == *" fma "* ]]; then
    export OPENBLAS_CORETYPE=Haswell
  fi
  unset cpu_flags
fi
