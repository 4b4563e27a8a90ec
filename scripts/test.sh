#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (real MLX, real models, real HTTP),
# then the Python compatibility suite with the official OpenAI and Ollama clients and
# schemathesis against the OpenAPI document.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. "$here/env.sh"
"$here/setup.sh" --test

cargo build --locked --bins
cargo test --locked -- --test-threads=2

venv="$MLXSERVER_CACHE/compat-venv"
if [ ! -x "$venv/bin/pytest" ] || ! cmp -s compat-tests/requirements.txt "$venv/requirements.txt"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r compat-tests/requirements.txt
  cp compat-tests/requirements.txt "$venv/requirements.txt"
fi
MLXSERVER_BIN="$MLXSERVER_BIN" PATH="$venv/bin:$PATH" "$venv/bin/pytest" -q compat-tests
