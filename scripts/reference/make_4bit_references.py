#!/usr/bin/env python3
"""MLX 4-bit, group 64 (the MLX-community "-4bit" folders) for every family, by mlx-lm.

make_family_references.py records a 4-bit reference (group 32) for five families only, and an
8-bit one for all. This adds the common case for all twelve without touching those fixtures:
each family's tiny float32 model is rebuilt from its recipe (tests/fixtures/reference/
families/<family>.json), loaded by mlx_lm.utils.load_model, quantized by
mlx_lm.utils.quantize_model(model, config, 64, 4) (what `mlx_lm convert -q` does by default),
and run greedily in float32 on the CPU. Every quantized tensor is checked bit for bit against
the numpy port of MLX's quantizer in make_family_references.py.

Writes tests/fixtures/reference/families-4bit/<family>.json; tests/it/families.rs quantizes
the same model with `pull --quantize 4`'s converter and must match.

    ~/.cache/mlxserver/familyvenv/bin/python scripts/reference/make_4bit_references.py   # ~1 min
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_family_references as families  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FAMILIES_DIR = REPO / "tests" / "fixtures" / "reference" / "families"
OUT_DIR = REPO / "tests" / "fixtures" / "reference" / "families-4bit"
BITS, GROUP = 4, 64


def main():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="mlxserver-4bit-"))
    try:
        for path in sorted(FAMILIES_DIR.glob("*.json")):
            fixture = json.loads(path.read_text())
            family, cfg = fixture["family"], fixture["config"]
            folder = tmp / family
            families.write_folder(folder, cfg, fixture["tensors"])
            model, _ = families.load_model(folder)
            qmodel, _ = families.load_model(folder)
            qmodel, qcfg = families.quantize_model(qmodel, copy.deepcopy(cfg), GROUP, BITS)
            q = families.greedy(qmodel, fixture["prompt_ids"])
            record = families.quantized_record(
                model, qmodel, qcfg, q, BITS, GROUP,
                "mlx_lm.utils.quantize_model(model, config, 64, 4) on the float32 model loaded by "
                "mlx_lm.utils.load_model (mlx_lm convert -q --q-bits 4 --q-group-size 64)", full=False)
            record = {"family": family, "families_salt": fixture["salt"], "mlx_lm_version": fixture["mlx_lm_version"], **record}
            (OUT_DIR / f"{family}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(f"[{family}] 4-bit g64: ids={q[0]} min_margin={min(q[3]):.4f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
