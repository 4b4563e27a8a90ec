#!/usr/bin/env bash
# The object-storage tests (tests/it/rag_s3.rs): RAG collections at s3://… on moto's S3
# server (PyPI moto[server], installed into $MLXSERVER_CACHE/motovenv), with a build that
# has LanceDB's AWS support (`--features rag-s3`). Not part of scripts/test.sh: the feature
# adds the AWS SDK and a rebuild of the Arrow/LanceDB stack to a cold build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. "$here/env.sh"
"$here/setup.sh" --test
venv="$MLXSERVER_CACHE/motovenv"
if [ ! -x "$venv/bin/moto_server" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==5.2.5"
fi
cargo test --locked --features rag-s3 --test it rag_s3 -- --test-threads=1
