#!/usr/bin/env python3
"""Sliding-window attention, exercised: transformers' own models with a window shorter than the chat.

The families fixtures (make_family_references.py) come from mlx-lm, whose mistral and gemma2
ignore `sliding_window`, so their windows there are longer than the test. Here the same tiny
random-weight models (the families recipe, weights rebuilt from tests/fixtures/reference/
families/<family>.json) get `sliding_window = 5`, shorter than the 12-token prompt, and
transformers (PyTorch float32 CPU, eager attention, the whole sequence recomputed every step:
no cache of ours or theirs involved) records the first-step logits, 16 greedy tokens with
their margins, and the last step's logits. gemma2 slides in its even layers, mistral in all,
gemma3_text in the layers its `sliding_window_pattern` marks.

Writes tests/fixtures/reference/windows/<family>.json; tests/it/families.rs replays them.

    ~/.cache/mlxserver/rerankvenv/bin/python scripts/reference/make_window_references.py   # ~10 s
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_gguf_references as recipe  # noqa: E402

OUT_DIR = recipe.REPO / "tests" / "fixtures" / "reference" / "windows"
WINDOW = 5
STEPS = 16
FAMILIES = ["mistral", "gemma2", "gemma3_text"]


def main():
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        fixture = json.loads((recipe.FAMILIES_DIR / f"{family}.json").read_text())
        config = dict(fixture["config"], sliding_window=WINDOW)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / family
            recipe.write_folder(folder, dict(fixture, config=config))
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
            model.eval()
            kinds = list(getattr(model.config, "layer_types", None) or [])
            ids = list(fixture["prompt_ids"])
            tokens, margins, first, last = [], [], None, None
            with torch.no_grad():
                for step in range(STEPS):
                    logits = model(torch.tensor([ids])).logits[0, -1].float().numpy()
                    if first is None:
                        first = logits
                    last = logits
                    order = np.argsort(-logits, kind="stable")
                    tokens.append(int(order[0]))
                    margins.append(float(logits[order[0]] - logits[order[1]]))
                    ids.append(tokens[-1])
        record = {
            "family": family,
            "families_salt": fixture["salt"],
            "config": config,
            "layer_types": kinds,
            "engine": f"transformers {transformers.__version__}, torch {torch.__version__}, float32 CPU, eager attention, "
                      "the whole sequence each step",
            "prompt_ids": fixture["prompt_ids"],
            "first_logits": [float(v) for v in first],
            "last_logits": [float(v) for v in last],
            "greedy_ids": tokens,
            "margins": margins,
        }
        (OUT_DIR / f"{family}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"[{family}] layers {kinds}: greedy {tokens}, min margin {min(margins):.3g}", flush=True)


if __name__ == "__main__":
    main()
