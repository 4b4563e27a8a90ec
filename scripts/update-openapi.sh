#!/usr/bin/env bash
# Regenerates openapi/openapi.json from the code (a test fails when they differ).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. "$here/env.sh"
cargo build --locked --bins
"$MLXSERVER_BIN" openapi > openapi/openapi.json.tmp
mv openapi/openapi.json.tmp openapi/openapi.json
echo "updated openapi/openapi.json"
