#!/usr/bin/env python3
"""Hugging Face float16 checkpoints of every family, run by transformers.

The families fixtures' tiny random-weight models (weights rebuilt from the recipe in
tests/fixtures/reference/families/<family>.json) are cast to float16 (torch's round to
nearest even) and written as one `model.safetensors` with `torch_dtype: float16`, as float16
checkpoints on the Hub are. transformers (PyTorch CPU, eager attention, the whole sequence
recomputed each step) loads that folder twice and records the first-step logits, 16 greedy
tokens and their margins:
- `f32_compute`: loaded with `dtype=float32` (the float16 weights upcast exactly), computed in
  float32; pins the reading of float16 files (mlxserver's CPU float32 policy must match as
  tightly as the float32 families test);
- `f16_compute`: loaded and computed in float16 (mlxserver's float16 policy, the dtype a GPU
  runs such a model in, must stay float16-close).

Writes tests/fixtures/reference/float16/<family>.json; tests/it/families.rs replays them.

    ~/.cache/mlxserver/rerankvenv/bin/python scripts/reference/make_float16_references.py   # ~30 s
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_gguf_references as recipe  # noqa: E402

OUT_DIR = recipe.REPO / "tests" / "fixtures" / "reference" / "float16"
STEPS = 16


def greedy(model, prompt, torch) -> dict:
    ids = list(prompt)
    tokens, margins, first = [], [], None
    with torch.no_grad():
        for _ in range(STEPS):
            logits = model(torch.tensor([ids])).logits[0, -1].float().numpy()
            if first is None:
                first = logits
            order = np.argsort(-logits, kind="stable")
            tokens.append(int(order[0]))
            margins.append(float(logits[order[0]] - logits[order[1]]))
            ids.append(tokens[-1])
    return {"first_logits": [float(v) for v in first], "greedy_ids": tokens, "margins": margins}


def main():
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for path in sorted(recipe.FAMILIES_DIR.glob("*.json")):
        fixture = json.loads(path.read_text())
        family = fixture["family"]
        # transformers defaults phi3's pad_token_id to 32000, outside the tiny vocabulary.
        config = dict(fixture["config"], torch_dtype="float16", pad_token_id=fixture["config"]["eos_token_id"])
        if family == "phi3":
            # transformers picks longrope's short factors while a sequence is within
            # original_max_position_embeddings, mlxserver (like mlx-lm) the long ones at every
            # length (README, model families); Phi-3-mini-4k's own config has no rope_scaling.
            config.pop("rope_scaling", None)
            config.pop("original_max_position_embeddings", None)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / family
            recipe.write_folder(folder, dict(fixture, config=config))
            tensors = {t["name"]: torch.from_numpy(recipe.recipe_values(t["shape"], t["seed"], t["offset"], t["scale"])).half()
                       for t in fixture["tensors"]}
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
            runs = {}
            for label, dtype in [("f32_compute", torch.float32), ("f16_compute", torch.float16)]:
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
                model.eval()
                runs[label] = greedy(model, fixture["prompt_ids"], torch)
                print(f"[{family}] {label}: greedy {runs[label]['greedy_ids']}, "
                      f"min margin {min(runs[label]['margins']):.3g}", flush=True)
        record = {
            "family": family,
            "families_salt": fixture["salt"],
            "engine": f"transformers {transformers.__version__}, torch {torch.__version__}, CPU, eager attention, "
                      "the whole sequence each step",
            "weights": "the recipe's float32 values cast with torch .half() (round to nearest even), one "
                       "model.safetensors, config torch_dtype float16",
            "config": config,
            "prompt_ids": fixture["prompt_ids"],
            **runs,
        }
        (OUT_DIR / f"{family}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
