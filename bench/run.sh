#!/usr/bin/env bash
# Engine benchmark, side by side in one run on this machine and model (SmolLM2-135M-Instruct
# Q4_1): prompt processing tok/s (512-token prompt) and decode tok/s (128 tokens) for
# mlxserver's engine, mlx-lm (Python MLX, the same libmlx) and llama.cpp (llama-cpp-python,
# built from its PyPI source). Prints a markdown table; raw JSON lines go to bench/results/.
#   bench/run.sh [--quick]     (--quick: 1 run each, 128-token prompt, 32 tokens decoded)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. scripts/env.sh
scripts/setup.sh >/dev/null
prompt=512; decode=128; runs=3
if [ "${1:-}" = "--quick" ]; then prompt=128; decode=32; runs=1; fi
gguf="$MLXSERVER_TEST_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
out="$here/results"; mkdir -p "$out"
results="$out/engine-$(date +%Y%m%d-%H%M%S).jsonl"

# The same profile as the served binary (see Cargo.toml): the heavy lifting is in libmlx.
cargo build --locked --example engine_bench
bench_bin="$CARGO_TARGET_DIR/debug/examples/engine_bench"

dense="$MLXSERVER_CACHE/bench/SmolLM2-135M-Instruct-f32"
if [ ! -f "$dense/config.json" ]; then
  rm -rf "$dense.partial"; mkdir -p "$dense.partial"
  "$bench_bin" "$gguf" --write-dense "$dense.partial"
  mv "$dense.partial" "$dense"
fi

venv="$MLXSERVER_CACHE/bench-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "mlx[cpu]==0.32.4" "mlx-lm==0.32.2"
  # llama-cpp-python compiles llama.cpp from its source package (about 10 minutes on 2 cores).
  # Not GGML_NATIVE (nor AVX-512): on this VM the native build dies with SIGILL.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" "$venv/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
fi

run() { echo "$*" >&2; "$@" | tee -a "$results"; }
run "$bench_bin" "$gguf" --prompt-tokens "$prompt" --decode-tokens "$decode" --runs "$runs"
run "$bench_bin" "$gguf" --prompt-tokens "$prompt" --decode-tokens "$decode" --runs "$runs" --batch 16
run "$venv/bin/python" bench/mlx_lm_bench.py "$dense" --prompt-tokens "$prompt" --decode-tokens "$decode" --runs "$runs" --label "mlx-lm (f32, wheel BLAS)"
LD_PRELOAD="$(ls /usr/lib/x86_64-linux-gnu/libopenblas.so.0 2>/dev/null || true)" run "$venv/bin/python" bench/mlx_lm_bench.py "$dense" --prompt-tokens "$prompt" --decode-tokens "$decode" --runs "$runs" --label "mlx-lm (f32, OpenBLAS preloaded)"
run "$venv/bin/python" bench/llama_cpp_bench.py "$gguf" --prompt-tokens "$prompt" --decode-tokens "$decode" --runs "$runs"

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip().startswith("{")]
print(f"\n| engine | prompt tok/s ({rows[0]['prompt_tokens']} tokens) | decode tok/s ({rows[0]['decode_tokens']} tokens) |")
print("|---|---|---|")
for r in rows:
    name = r["engine"] + (f" (batch {r['batch']}, aggregate)" if r.get("batch", 1) > 1 else "")
    print(f"| {name} | {r['prompt_tok_per_s']:.1f} | {r['decode_tok_per_s']:.1f} |")
PY
