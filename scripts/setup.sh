#!/usr/bin/env bash
# Installs what building and running mlxserver needs on a fresh Linux machine (Debian):
# system packages, the prebuilt MLX from PyPI's mlx-cpu wheel, and the small test models.
# Idempotent and quick when everything is already there. On macOS nothing is needed beyond
# Xcode's tools: mlx-rs builds MLX with Metal itself.
#   --test   also what the test suite needs (headless Chromium for the Swagger UI check).
set -euo pipefail
with_test_tools=0
[ "${1:-}" = "--test" ] && with_test_tools=1
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/env.sh"

MLX_VERSION=0.32.4

if [ "$(uname -s)" = "Linux" ]; then
  needed=(cmake clang libclang-dev protobuf-compiler libopenblas-dev libopenblas0-pthread pkg-config unzip python3-venv)
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
fi

"$here/fetch-models.sh" >/dev/null
echo "setup: ready (cache: $MLXSERVER_CACHE)"
