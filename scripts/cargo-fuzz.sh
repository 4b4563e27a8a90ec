#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer through cargo-fuzz) of the parsers of files users bring:
# each target of fuzz/ (mlxserver::fuzz_targets: gguf, safetensors, config, modelfile,
# template, tokenizer) runs for SECONDS (default 120), starting from the seeds of
# scripts/fuzz_seeds.py, the corpus earlier runs kept ($MLXSERVER_CACHE/fuzz-corpus) and the
# saved crashes. A crash is written to tests/fixtures/fuzz/<target>/, which `cargo test`
# (tests/it/fuzz.rs) replays from then on: commit it with the fix.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`); the first build
# instruments the whole dependency tree (~50 min on 2 cores, cached under $MLXSERVER_CACHE).
# usage: scripts/cargo-fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. "$here/env.sh"
seconds="${1:-120}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf safetensors config modelfile template tokenizer)
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
rustup toolchain list | grep -q '^nightly' || { echo "the nightly toolchain is missing: rustup toolchain install nightly" >&2; exit 1; }
# its own target folder: instrumented artifacts never mix with the test build's
fuzz_target_dir="$MLXSERVER_CACHE/fuzz-target"
unset CARGO_TARGET_DIR
export LD_LIBRARY_PATH="${MLX_LIB_DIR:-$MLX_PREFIX/lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# no sanitizer: the parsers are safe Rust (a panic is the failure looked for), and MLX's C++
# library is not built for AddressSanitizer
cargo +nightly fuzz build --target-dir "$fuzz_target_dir" -s none
seeds="$(mktemp -d)"
trap 'rm -rf "$seeds"' EXIT
python3 "$here/fuzz_seeds.py" "$seeds" >/dev/null
status=0
for target in "${targets[@]}"; do
  corpus="$MLXSERVER_CACHE/fuzz-corpus/$target"
  saved="tests/fixtures/fuzz/$target"
  mkdir -p "$corpus" "$saved"
  echo "== $target: ${seconds}s"
  if ! cargo +nightly fuzz run --target-dir "$fuzz_target_dir" -s none "$target" "$corpus" "$seeds/$target" "$saved" -- \
      -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
      -artifact_prefix="$saved/" 2>"$seeds/$target.log"; then
    status=1
    echo "$target: FAILED, input saved under $saved/ (log: tail of libFuzzer's output below)"
  fi
  grep -E "^(#[0-9]+\s+DONE|stat::number_of_executed_units|stat::peak_rss_mb)|INITED|Done [0-9]+ runs" "$seeds/$target.log" | tr '\n' ' '
  grep -E "cov: [0-9]+" "$seeds/$target.log" | tail -1
  [ $status -eq 0 ] || tail -30 "$seeds/$target.log"
done
exit $status
