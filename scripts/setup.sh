#!/usr/bin/env bash
# Installs what building and running mlxserver needs on a fresh Linux machine (Debian):
# system packages, the prebuilt MLX from PyPI's mlx-cpu wheel, and the small test models.
# Idempotent and quick when everything is already there. On macOS nothing is needed beyond
# Xcode's tools: mlx-rs builds MLX with Metal itself.
#   --test   also what the test suite needs (headless Chromium for the Swagger UI check).
#   --cuda   also MLX's CUDA build (PyPI mlx-cuda-13 and the NVIDIA libraries it needs);
#            chosen by itself when an NVIDIA driver answers (`nvidia-smi`), unless --cpu.
#   --cpu    never the CUDA build.
set -euo pipefail
with_test_tools=0
cuda=auto
for arg in "$@"; do
  case "$arg" in
    --test) with_test_tools=1 ;;
    --cuda) cuda=yes ;;
    --cpu) cuda=no ;;
    *) echo "setup: unknown option $arg" >&2; exit 2 ;;
  esac
done
if [ "$cuda" = auto ]; then
  cuda=no
  if [ "$(uname -s)" = "Linux" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=yes; fi
fi
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/env.sh"

MLX_VERSION=0.32.4

if [ "$(uname -s)" = "Linux" ]; then
  needed=(cmake clang libclang-dev protobuf-compiler libprotobuf-dev libopenblas-dev libopenblas0-pthread pkg-config unzip python3-venv)
  [ "$with_test_tools" = 1 ] && needed+=(chromium)
  missing=()
  for package in "${needed[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi

  if [ ! -f "$MLX_PREFIX/lib/libmlx.so" ]; then
    echo "setup: fetching MLX $MLX_VERSION (PyPI mlx-cpu)"
    mkdir -p "$MLXSERVER_CACHE/wheels"
    python3 -m pip download --no-deps --quiet --disable-pip-version-check \
      -d "$MLXSERVER_CACHE/wheels" "mlx-cpu==$MLX_VERSION"
    wheel=$(ls "$MLXSERVER_CACHE"/wheels/mlx_cpu-"$MLX_VERSION"-*.whl | head -n 1)
    rm -rf "$MLXSERVER_CACHE/mlx-cpu.partial"
    mkdir -p "$MLXSERVER_CACHE/mlx-cpu.partial"
    unzip -q "$wheel" -d "$MLXSERVER_CACHE/mlx-cpu.partial"
    rm -rf "$MLXSERVER_CACHE/mlx-cpu"
    mv "$MLXSERVER_CACHE/mlx-cpu.partial" "$MLXSERVER_CACHE/mlx-cpu"
  fi

  # The CUDA build: mlx-c still compiles against the mlx-cpu headers (the same version),
  # and the binary links and runs the CUDA libmlx.so (scripts/env.sh sets MLX_LIB_DIR).
  # pip's --target layout keeps the wheel's RPATH ($ORIGIN/../../nvidia/...) valid.
  if [ "$cuda" = yes ] && [ ! -f "$MLXSERVER_CACHE/mlx-cuda/mlx/lib/libmlx.so" ]; then
    echo "setup: fetching MLX $MLX_VERSION for CUDA (PyPI mlx-cuda-13 and NVIDIA's libraries, a few GB)"
    rm -rf "$MLXSERVER_CACHE/mlx-cuda.partial"
    python3 -m pip install --quiet --disable-pip-version-check --target "$MLXSERVER_CACHE/mlx-cuda.partial" "mlx-cuda-13==$MLX_VERSION"
    rm -rf "$MLXSERVER_CACHE/mlx-cuda"
    mv "$MLXSERVER_CACHE/mlx-cuda.partial" "$MLXSERVER_CACHE/mlx-cuda"
  fi
  if [ "$cuda" = yes ]; then
    echo "setup: CUDA build selected (MLX_LIB_DIR=$MLXSERVER_CACHE/mlx-cuda/mlx/lib)"
  fi
fi

# Fail now, in one line, rather than twenty minutes into a build.
if [ "$(uname -s)" = "Linux" ]; then
  missing_tools=()
  for tool in cargo cmake clang protoc pkg-config; do command -v "$tool" >/dev/null 2>&1 || missing_tools+=("$tool"); done
  [ -f /usr/include/google/protobuf/empty.proto ] || missing_tools+=("protobuf's well-known .proto files (libprotobuf-dev)")
  [ -f "$MLX_PREFIX/lib/libmlx.so" ] || missing_tools+=("MLX ($MLX_PREFIX/lib/libmlx.so)")
  if [ "${#missing_tools[@]}" -gt 0 ]; then
    echo "setup: missing: ${missing_tools[*]}" >&2
    exit 1
  fi
fi

"$here/fetch-models.sh" >/dev/null
echo "setup: ready (cache: $MLXSERVER_CACHE)"
