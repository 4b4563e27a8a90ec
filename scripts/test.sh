#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (real MLX, real models, real HTTP,
# LanceDB on a local folder and on moto's S3 server),
# then the Python compatibility suite with the official OpenAI and Ollama clients and
# schemathesis against the OpenAPI document.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. "$here/env.sh"
"$here/setup.sh" --test

# moto's S3 server, for the object-storage test (tests/it/rag_s3.rs).
moto_venv="$MLXSERVER_CACHE/motovenv"
if [ ! -x "$moto_venv/bin/moto_server" ]; then
  rm -rf "$moto_venv"
  python3 -m venv "$moto_venv"
  "$moto_venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==5.2.5"
fi

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
