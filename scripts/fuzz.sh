#!/usr/bin/env bash
# Longer runs of the parser fuzzers in tests/it/fuzz.rs: every target for SECONDS each
# (default 300). A panic saves its input under tests/fixtures/fuzz/<target>/, where the
# normal test run replays it from then on; commit it with the fix.
# usage: scripts/fuzz.sh [SECONDS] [TARGET-NAME-FILTER]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
. "$here/env.sh"
MLXSERVER_FUZZ_SECONDS="${1:-300}" cargo test --locked --test it "fuzz::${2:-}" -- --test-threads=1 --nocapture
