#!/usr/bin/env bash
# Runs on the NVIDIA machine, in a copy of the repository (see bench/gpu/README.md).
#   remote.sh receive      keep the carried .gpu/part-* under /tmp/mlxs (survives between calls)
#   remote.sh setup        unpack the bundle: MLX's CUDA build into the Python site folder,
#                          mlx/mlx-lm wheels, our binaries; start building llama.cpp (background)
#   remote.sh models       write the random 8B-shaped model, 4-bit copies for mlx-lm and us,
#                          and a Q4_0 GGUF of the same weights once llama.cpp is built
#   remote.sh peers        mlx-lm and llama.cpp benchmarks
#   remote.sh ours         mlxserver: engine bench (batch 1, 16), served first-request latency,
#                          GGUF pull and serve
#   remote.sh memory       the served path's MLX and GPU memory over rounds of 16 streams
#   remote.sh families     every model family on the GPU against mlx-lm (needs .gpu/it.xz)
#   remote.sh compare      batch-1 decode of ours and mlx-lm's alternated, batch 16 unprofiled
#   remote.sh decode       batch-1 decode split into build/launch/wait, ours and mlx-lm's
#   remote.sh kernels      GPU time per kernel over one decode step, ours and mlx-lm's (ncu)
# Results are JSON lines in $OUT/results.jsonl, logs in $OUT.
set -uo pipefail
stage="${1:?stage}"
W=/tmp/mlxs
SP=/opt/torch/.venv/lib/python3.12/site-packages
OUT="${OUT:-$W/out}"
mkdir -p "$W" "$OUT"
export MLX_PTX_CACHE_DIR="$W/kernels" PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH="$SP/mlx/lib:${LD_LIBRARY_PATH:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NCCL_NVLS_ENABLE=0
result() { echo "$1" | tee -a "$OUT/results.jsonl"; }
gpu_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
# The random Llama-3.1-8B-shaped model (bf16) and engine_bench's 4-bit g64 copy of it, each
# made once per machine.
M="$W/m/big-hf"; Q="$M-4bit"
big_model() { [ -d "$M" ] || python3 "$(dirname "$0")/make_random_model.py" "$M" "$W/b/tokenizer" --shape 8b >/dev/null; }
big_4bit() { big_model || return 1; [ -d "$Q" ] || "$W/b/bin/engine_bench" "$M" --quantize 4 --prompt-tokens 16 --decode-tokens 4 --runs 1 >/dev/null 2>"$OUT/quantize.log"; }

case "$stage" in
receive)
  cp .gpu/* "$W/" && ls -la "$W" | grep -E "part-|it.xz" ;;
setup)
  cd "$W" && cat part-* | python3 -c "import sys,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$W/b')" || exit 1
  # MLX's CUDA build and its Python packages go where the NVIDIA libraries are: libmlx's
  # RPATH is $ORIGIN/../../nvidia/..., and the mlx wheel's core module finds mlx/lib beside it.
  cp -r "$W"/b/mlx-cuda/mlx "$SP/" && cp -r "$W"/b/mlx-cuda/mlx_cuda_13* "$SP/" 2>/dev/null
  for wheel in "$W"/b/wheels/*.whl; do (cd "$SP" && python3 -m zipfile -e "$wheel" .); done
  # MLX compiles some kernels at run time (the quantized matmuls of small shapes) against the
  # pip CUDA headers; this image's nvidia/cu13/include has no crt/ (CUDA 13 ships it as its own
  # wheel, nvidia-cuda-crt), so take it from the system toolkit when there is one.
  crt=$(ls -d /usr/local/cuda*/targets/x86_64-linux/include/crt 2>/dev/null | head -1)
  [ -d "$SP/nvidia/cu13/include/crt" ] || [ -z "$crt" ] || cp -r "$crt" "$SP/nvidia/cu13/include/"
  chmod +x "$W"/b/bin/*
  python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.cuda.is_available())"
  [ -d "$W/b/kernels" ] && cp -r "$W/b/kernels" "$W/"
  [ -f "$W/b/llama.cpp.tar.xz" ] || { echo "setup done (engine only)"; exit 0; }
  mkdir -p "$W/llama" && tar xJf "$W/b/llama.cpp.tar.xz" -C "$W/llama"
  (cd "$W/llama/llama.cpp" && setsid nohup bash -c "cmake -S . -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >$W/llama-build.log 2>&1 && cmake --build build -j 14 --target llama-bench llama-quantize llama-batched-bench >>$W/llama-build.log 2>&1; echo done >>$W/llama-build.log" >/dev/null 2>&1 &)
  echo "setup done" ;;
models)
  python3 "$(dirname "$0")/make_random_model.py" "$W/m/big-hf" "$W/b/tokenizer" --shape 8b || exit 1
  # mlx-lm's 4-bit copy (group 64, its default), the peer's own conversion of the same weights.
  python3 -m mlx_lm convert --hf-path "$W/m/big-hf" --mlx-path "$W/m/big-mlxlm-4bit" -q --q-bits 4 --q-group-size 64 >"$OUT/mlxlm-convert.log" 2>&1 || tail -5 "$OUT/mlxlm-convert.log"
  du -sh "$W"/m/* ;;
peers)
  for b in 1 16; do
    python3 -m mlx_lm benchmark --model "$W/m/big-mlxlm-4bit" -p 512 -g 128 -b "$b" -n 3 >"$OUT/mlxlm-b$b.log" 2>&1
    tail -4 "$OUT/mlxlm-b$b.log"
  done
  python3 "$(dirname "$0")/../mlx_lm_bench.py" "$W/m/big-mlxlm-4bit" --prompt-tokens 512 --decode-tokens 128 --runs 3 --label "mlx-lm 0.32.2 (4-bit g64)" | tee -a "$OUT/results.jsonl"
  echo "mlx-lm peak GPU memory (MiB, after): $(gpu_mem)" ;;
llama)
  tail -3 "$W/llama-build.log"
  L="$W/llama/llama.cpp"
  [ -x "$L/build/bin/llama-bench" ] || { echo "llama.cpp not built yet"; exit 0; }
  if [ ! -f "$W/m/big-q4_0.gguf" ]; then
    PYTHONPATH="$L/gguf-py" python3 "$L/convert_hf_to_gguf.py" "$W/m/big-hf" --outtype f16 --outfile "$W/m/big-f16.gguf" >"$OUT/gguf-convert.log" 2>&1 || tail -5 "$OUT/gguf-convert.log"
    "$L/build/bin/llama-quantize" "$W/m/big-f16.gguf" "$W/m/big-q4_0.gguf" Q4_0 >"$OUT/gguf-quantize.log" 2>&1 || tail -5 "$OUT/gguf-quantize.log"
    rm -f "$W/m/big-f16.gguf"
  fi
  "$L/build/bin/llama-bench" -m "$W/m/big-q4_0.gguf" -p 512 -n 128 -ngl 99 -fa 1 -o json >"$OUT/llama-bench.json" 2>"$OUT/llama-bench.log"; python3 -c "import json;[print(r['n_prompt'],r['n_gen'],round(r['avg_ts'],1)) for r in json.load(open('$OUT/llama-bench.json'))]"
  "$L/build/bin/llama-batched-bench" -m "$W/m/big-q4_0.gguf" -c 16384 -b 2048 -ub 512 -npp 512 -ntg 128 -npl 1,16 -ngl 99 -fa 1 >"$OUT/llama-batched.log" 2>&1; grep -E "^\|" "$OUT/llama-batched.log" | tail -3 ;;
ours)
  B="$W/b/bin"; export MLXSERVER_HOME="$W/home"; mkdir -p "$MLXSERVER_HOME"
  "$B/mlxserver" --version
  [ -d "$MLXSERVER_HOME/models" ] && "$B/mlxserver" rm big big-4bit >/dev/null 2>&1
  start=$(date +%s.%N); "$B/mlxserver" pull "$W/m/big-hf" --name big --quantize 4 2>&1 | tail -2; echo "pull+quantize: $(echo "$(date +%s.%N) - $start" | bc) s"
  model="$MLXSERVER_HOME/models/big"; [ -d "$model" ] || model=$(ls -d "$MLXSERVER_HOME"/models/*big* | head -1)
  for b in 1 16; do
    "$B/engine_bench" "$model" --prompt-tokens 512 --decode-tokens 128 --runs 3 --batch "$b" 2>"$OUT/ours-b$b.log" | tee -a "$OUT/results.jsonl"
    echo "GPU memory after batch $b: $(gpu_mem) MiB"
  done ;;
serve)
  B="$W/b/bin"; export MLXSERVER_HOME="$W/home"
  port=27123
  for cache in cold warm; do
    [ "$cache" = cold ] && rm -rf "$W/kernels-serve" ; export MLX_PTX_CACHE_DIR="$W/kernels-serve"
    "$B/mlxserver" serve --port $port >"$OUT/serve-$cache.log" 2>&1 &
    pid=$!
    for i in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
    ready=$(date +%s.%N)
    curl -s "http://127.0.0.1:$port/api/generate" -d '{"model":"big","prompt":"Hello","stream":false,"options":{"num_predict":8,"temperature":0}}' -o "$OUT/first-$cache.json"
    result "{\"engine\": \"mlxserver serve\", \"kernel_cache\": \"$cache\", \"first_request_s\": $(echo "$(date +%s.%N) - $ready" | bc)}"
    kill $pid; wait $pid 2>/dev/null
  done
  if [ -f "$W/m/big-q4_0.gguf" ]; then
    "$B/mlxserver" pull "$W/m/big-q4_0.gguf" --name big-gguf 2>&1 | tail -1
    "$B/mlxserver" run big-gguf "Say hello" --verbose 2>&1 | tail -4
  fi ;;
memory)
  # The served path's memory under rounds of 16 concurrent streams (prefix cache and MLX buffer
  # cache at their defaults): MLX's and the GPU's peaks against weights + KV + those bounds.
  B="$W/b/bin"; export MLXSERVER_HOME="$W/home" MLXSERVER_METRICS=true
  big_model || exit 1
  [ -f "$W/home/models/big/manifest.json" ] || "$B/mlxserver" pull "$M" --name big --quantize 4 2>&1 | tail -1
  port=27124
  "$B/mlxserver" serve --port $port >"$OUT/serve-memory.log" 2>&1 &
  pid=$!
  for i in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
  curl -s "http://127.0.0.1:$port/api/generate" -d '{"model":"big","prompt":"","keep_alive":-1}' >/dev/null
  result "$(python3 "$(dirname "$0")/served_memory.py" "http://127.0.0.1:$port" big --streams 16 --rounds 4 --tokens 128)"
  kill $pid; wait $pid 2>/dev/null ;;
engine)
  # The engine alone, on the random 8B model quantized by engine_bench itself (group 64):
  # where decode time goes (MLXSERVER_PROFILE), and mlx-lm on the very same 4-bit folder.
  B="$W/b/bin"
  big_4bit || exit 1; tail -1 "$OUT/quantize.log" 2>/dev/null
  # MLX's CUDA backend commits a CUDA graph every MLX_MAX_OPS_PER_BUFFER kernels (100 on
  # sm90); 50, 300 and 1200 measured alike (bench/README.md), so they are not swept here.
  # SETTINGS="a;b" replaces the batch-1 variants (each a list of VAR=value).
  IFS=';' read -r -a settings <<<"${SETTINGS:-MLXSERVER_PROFILE=1;MLXSERVER_PROFILE=1 MLXSERVER_FUSE_PROJECTIONS=1;MLXSERVER_PROFILE=1 MLXSERVER_PIPELINE=0}"
  for setting in "${settings[@]}"; do
    echo "== $setting"
    env $setting "$B/engine_bench" "$Q" --prompt-tokens 512 --decode-tokens 128 --runs 3 2>"$OUT/engine.log" | tee -a "$OUT/results.jsonl"; grep "decode profile" "$OUT/engine.log" | tail -1
  done
  echo "== batch 16"
  MLXSERVER_PROFILE=1 "$B/engine_bench" "$Q" --prompt-tokens 512 --decode-tokens 128 --runs 3 --batch 16 2>"$OUT/engine16.log" | tee -a "$OUT/results.jsonl"; grep "decode profile" "$OUT/engine16.log" | tail -1
  for b in 1 16; do python3 -m mlx_lm benchmark --model "$Q" -p 512 -g 128 -b "$b" -n 3 2>&1 | tail -1; done
  python3 "$(dirname "$0")/../mlx_lm_bench.py" "$Q" --prompt-tokens 512 --decode-tokens 128 --runs 3 --label "mlx-lm 0.32.2 (same folder)" | tee -a "$OUT/results.jsonl" ;;
compare)
  # Batch-1 decode of ours and mlx-lm's alternated on the same 4-bit folder (machines of this
  # kind vary by 15% and more between runs, so one run of each compares little), then batch 16
  # without the profiler (its per-phase resets of MLX's peak counter hide the serving peak).
  B="$W/b/bin"
  big_4bit || exit 1
  mlxlm() { python3 -m mlx_lm benchmark --model "$Q" -p 512 -g 128 -b "$1" -n 3 2>&1 | tail -1 | sed "s/^/mlx-lm b$1: /" | tee -a "$OUT/results.jsonl"; }
  for round in ${ROUNDS:-1 2 3}; do
    echo "== round $round"
    "$B/engine_bench" "$Q" --prompt-tokens 512 --decode-tokens 128 --runs 3 2>>"$OUT/compare.log" | tee -a "$OUT/results.jsonl"
    mlxlm 1
  done
  "$B/engine_bench" "$Q" --prompt-tokens 512 --decode-tokens 128 --runs 3 --batch 16 2>>"$OUT/compare.log" | tee -a "$OUT/results.jsonl"
  mlxlm 16 ;;
families)
  # Every model family on the GPU against mlx-lm's references (tests/it/families.rs,
  # every_family_on_this_machines_gpu): the integration-test binary carried as .gpu/it.xz
  # (scripts/gpu-pack.sh --tests); it reads its fixtures where it was built, so that path
  # points at this copy of the repository.
  [ -x "$W/it" ] || { xz -dc "$W/it.xz" >"$W/it" && chmod +x "$W/it"; } || exit 1
  repo="$(cd "$(dirname "$0")/../.." && pwd)"
  built="$(cat "$W/it.dir")"
  [ -e "$built" ] || { mkdir -p "$(dirname "$built")" && ln -s "$repo" "$built"; }
  MLXSERVER_GPU_FAMILIES="${FAMILIES:-}" "$W/it" --ignored --exact families::every_family_on_this_machines_gpu --nocapture --test-threads=1 2>&1 | grep -vE "^\s+[0-9]+:|^\s+at " | tail -40 ;;
decode)
  # Decode only, on the same 4-bit folder for us and mlx-lm: the server's MLX buffer-cache
  # bound against an unbounded one (is a freed buffer reallocated every step?).
  B="$W/b/bin"
  big_4bit || exit 1
  for setting in "" "MLXSERVER_PIPELINE=0"; do
    echo "== batch 1 $setting"
    env MLXSERVER_PROFILE=1 $setting "$B/engine_bench" "$Q" --prompt-tokens 512 --decode-tokens 128 --runs 3 --cache-limit 100000000000 2>"$OUT/decode.log" | tee -a "$OUT/results.jsonl"; grep "decode profile" "$OUT/decode.log" | tail -1
  done
  python3 -m mlx_lm benchmark --model "$Q" -p 512 -g 128 -b 1 -n 3 2>&1 | tail -1
  python3 "$(dirname "$0")/step_split.py" "$Q" 128 2>&1 | grep thread ;;
kernels)
  # GPU time of each kernel over about one decode step in the middle of a run (Nsight
  # Compute: kernels 30000..31000 of the process), ours and mlx-lm's on the same folder.
  B="$W/b/bin"; N=/opt/nvidia/nsight-compute/ncu
  [ -x "$N" ] || N=$(ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  summary() { python3 "$(dirname "$0")/ncu_summary.py" "$1"; }
  "$N" --launch-skip 30000 --launch-count 1000 --metrics gpu__time_duration.sum --csv --page raw "$B/engine_bench" "$Q" --prompt-tokens 16 --decode-tokens 64 --runs 1 >"$OUT/ncu-ours.csv" 2>"$OUT/ncu-ours.log"; echo "== ours"; summary "$OUT/ncu-ours.csv"
  "$N" --launch-skip 30000 --launch-count 1000 --metrics gpu__time_duration.sum --csv --page raw python3 -m mlx_lm generate --model "$Q" --prompt hi -m 64 --ignore-chat-template >"$OUT/ncu-mlxlm.csv" 2>"$OUT/ncu-mlxlm.log"; echo "== mlx-lm"; summary "$OUT/ncu-mlxlm.csv" ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
