#!/usr/bin/env bash
# Packs what an NVIDIA machine without registry access needs to run mlxserver and the GPU
# benchmark side by side with mlx-lm and llama.cpp (bench/gpu/README.md):
#   - MLX's CUDA build (PyPI mlx-cuda-13, same version as the mlx-cpu we link against: the
#     same binary runs on it through LD_LIBRARY_PATH), the mlx and mlx-lm wheels;
#   - our binaries (mlxserver, engine_bench), stripped;
#   - llama.cpp's source from the llama-cpp-python source package (trimmed);
#   - SmolLM2's tokenizer files (for random-weight models at real shapes).
# Everything goes into one xz-compressed tar split into parts of at most 55 MB under .gpu/
# (ignored by git), to be carried one or two per call.
#   --engine-only   only what the engine benchmark needs (no mlxserver binary, no llama.cpp);
#                   a kernel cache saved from an earlier run (KERNELS=file.tgz) goes along.
#   --server-only   only the mlxserver binary, MLX's CUDA build and the tokenizer (the
#                   `memory` stage of bench/gpu/remote.sh); no wheels, no llama.cpp.
#   --no-llama      everything but llama.cpp (the `engine` and `memory` stages in one session).
#   --tests         --server-only, plus the stripped integration-test binary as .gpu/it.xz
#                   (the `families` stage: every model family on the GPU).
#   --no-llama --tests   both: the engine benchmark, mlx-lm and the families test in one session.
set -euo pipefail
engine_only=0 server_only=0 no_llama=0 tests=0
for flag in "$@"; do
  case "$flag" in
    --engine-only) engine_only=1 ;;
    --server-only) server_only=1 ;;
    --no-llama) no_llama=1 ;;
    --tests) tests=1 ;;
    *) echo "unknown option $flag" >&2; exit 2 ;;
  esac
done
# --tests alone packs only what the families test needs.
[ "$tests" = 1 ] && [ "$#" = 1 ] && server_only=1
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. "$here/env.sh"
MLX_VERSION=0.32.4
wheels="$MLXSERVER_CACHE/gpu-wheels"
stage="$MLXSERVER_CACHE/gpu-bundle"
mkdir -p "$wheels"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_35_x86_64 -d "$wheels" \
  "mlx-cuda-13==$MLX_VERSION" "mlx==$MLX_VERSION" "mlx-lm==0.32.2"
[ -f "$wheels/llama_cpp_python-0.3.36.tar.gz" ] || python3 -m pip download --quiet --no-deps --no-binary :all: -d "$wheels" llama-cpp-python==0.3.36

cargo build --locked --bins --example engine_bench
rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/wheels" "$stage/mlx-cuda" "$stage/tokenizer"
[ "$engine_only" = 1 ] || strip -o "$stage/bin/mlxserver" "$MLXSERVER_BIN"
if [ -n "${KERNELS:-}" ]; then tar xzf "$KERNELS" -C "$stage"; fi
[ "$server_only" = 1 ] || strip -o "$stage/bin/engine_bench" "$CARGO_TARGET_DIR/debug/examples/engine_bench"
[ "$server_only" = 1 ] || cp "$wheels/mlx-$MLX_VERSION"-*.whl "$wheels"/mlx_lm-0.32.2-*.whl "$stage/wheels/"
(cd "$stage/mlx-cuda" && unzip -q "$wheels"/mlx_cuda_13-"$MLX_VERSION"-*.whl)

if [ "$engine_only" = 0 ] && [ "$server_only" = 0 ] && [ "$no_llama" = 0 ]; then
# llama.cpp without its docs, test models, web UI and the backends other than CPU and CUDA.
tmp=$(mktemp -d)
tar xzf "$wheels/llama_cpp_python-0.3.36.tar.gz" -C "$tmp" llama_cpp_python-0.3.36/vendor/llama.cpp
src="$tmp/llama_cpp_python-0.3.36/vendor"
rm -rf "$src"/llama.cpp/{docs,tests,benches,media,.git*} "$src"/llama.cpp/models/*.gguf "$src"/llama.cpp/models/templates \
  "$src"/llama.cpp/examples/*/ "$src"/llama.cpp/tools/server/public* "$src"/llama.cpp/tools/server/webui
for backend in cann et hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do rm -rf "$src/llama.cpp/ggml/src/ggml-$backend"; done
tar cJf "$stage/llama.cpp.tar.xz" -C "$src" llama.cpp
rm -rf "$tmp"
fi

# SmolLM2's tokenizer, as our GGUF conversion writes it.
home=$(mktemp -d)
MLXSERVER_HOME="$home" "$MLXSERVER_BIN" pull "$MLXSERVER_TEST_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" --name tok >/dev/null
cp "$home"/models/tok/tokenizer.json "$home"/models/tok/tokenizer_config.json "$stage/tokenizer/"
rm -rf "$home"

rm -rf .gpu && mkdir -p .gpu
tar cf - -C "$stage" . | xz -T2 -6 | split -b 55M - .gpu/part-
ls -la .gpu
if [ "$tests" = 1 ]; then
  # A clean clone's CI run in the shared target folder leaves its own test binary there, newer
  # than this tree's sources: rebuild from this tree.
  touch tests/it/main.rs
  it=$(cargo test --locked --test it --no-run 2>&1 | grep -oE '/[^ )]*/deps/it-[0-9a-f]+' | tail -1)
  strip -o "$stage/it" "$it" && xz -T2 -6 -c "$stage/it" >.gpu/it.xz && rm "$stage/it"
  pwd >.gpu/it.dir  # where the binary looks for tests/fixtures
  ls -la .gpu/it.xz
fi
