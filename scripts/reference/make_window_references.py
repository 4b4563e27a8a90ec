#!/usr/bin/env python3
"""Sliding-window attention, exercised: transformers' own models with a window shorter than the chat.

The families fixtures (make_family_references.py) come from mlx-lm, whose mistral and gemma2
ignore `sliding_window`, so their windows there are longer than the test. Here the same tiny
random-weight models (the families recipe, weights rebuilt from tests/fixtures/reference/
families/<family>.json) get `sliding_window = 5`, shorter than the 12-token prompt, and
transformers (PyTorch float32 CPU, eager attention, the whole sequence recomputed every step:
no cache of ours or theirs involved) records the first-step logits and 16 greedy tokens with
their margins. gemma2 slides in its even layers, mistral in all,
gemma3_text in the layers its `sliding_window_pattern` marks.

Writes tests/fixtures/reference/windows/<family>.json; tests/it/families.rs replays them.

    ~/.cache/mlxserver/rerankvenv/bin/python scripts/reference/make_window_references.py   # ~10 s
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_gguf_references as recipe  # noqa: E402
from make_float16_references import greedy as transformers_greedy  # noqa: E402

OUT_DIR = recipe.REPO / "tests" / "fixtures" / "reference" / "windows"
WINDOW = 5
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
            run = transformers_greedy(model, fixture["prompt_ids"], torch)
        record = {
            "family": family,
            "families_salt": fixture["salt"],
            "config": config,
            "layer_types": kinds,
            "engine": f"transformers {transformers.__version__}, torch {torch.__version__}, float32 CPU, eager attention, "
                      "the whole sequence each step",
            "prompt_ids": fixture["prompt_ids"],
            **run,
        }
        (OUT_DIR / f"{family}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"[{family}] layers {kinds}: greedy {run['greedy_ids']}, min margin {min(run['margins']):.3g}", flush=True)


if __name__ == "__main__":
    main()
