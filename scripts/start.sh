#!/usr/bin/env bash
# Builds mlxserver, registers the small default models (SmolLM2-135M-Instruct for chat,
# all-MiniLM-L6-v2 for embeddings) and starts the server in the foreground.
# Extra arguments go to `mlxserver serve` (e.g. --port 8080 --api-key KEY).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. "$here/env.sh"
"$here/setup.sh"
. "$here/env.sh"   # again: setup may have installed MLX's CUDA build
cargo build --locked --bins
register() { # name source
  if ! "$MLXSERVER_BIN" show "$1" >/dev/null 2>&1; then
    "$MLXSERVER_BIN" pull "$2" --name "$1"
  fi
}
register SmolLM2-135M-Instruct "$MLXSERVER_TEST_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
register all-MiniLM-L6-v2 "$MLXSERVER_TEST_MODELS/all-MiniLM-L6-v2"
exec "$MLXSERVER_BIN" serve "$@"
