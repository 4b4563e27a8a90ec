"""mlx-lm's own run of the tiny mixture-of-experts fixtures in bfloat16 on this machine's GPU,
against the float32 references the families test uses (MLX's CPU GatherMM is float32-only, so
the committed fixtures hold no bfloat16 run of an MoE family). Tells whether a bfloat16 gap
of ours on the GPU is bfloat16 itself (mlx-lm shows it too) or our model code.

    python3 bench/gpu/moe_bf16.py [FAMILY ...]     (default: mixtral qwen3_moe)
"""
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

root = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(root / "scripts" / "reference"))
import make_family_references as ref  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

families = sys.argv[1:] or ["mixtral", "qwen3_moe"]
for family in families:
    fixture = json.loads((root / "tests/fixtures/reference/families" / f"{family}.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / family
        folder.mkdir()
        cfg = dict(fixture["config"], torch_dtype="bfloat16")
        (folder / "config.json").write_text(json.dumps(cfg))
        arrays = {r["name"]: mx.array(ref.recipe_values(r["shape"], r["seed"], r["offset"], r["scale"])).astype(mx.bfloat16) for r in fixture["tensors"]}
        mx.save_safetensors(str(folder / "model.safetensors"), arrays, metadata={"format": "pt"})
        model, _ = load_model(folder)
        ids, first, _, margins = ref.greedy(model, fixture["prompt_ids"])
    span = float(np.max(np.abs(fixture["first_logits"])))
    references = [("float32 weights, float32 compute", fixture), ("bfloat16 weights, float32 compute", fixture["bfloat16"]["f32_compute"])]
    if "bf16_compute" in fixture["bfloat16"]:
        references.append(("bfloat16 on the CPU", fixture["bfloat16"]["bf16_compute"]))
    for label, reference in references:
        diff = float(np.max(np.abs(first - np.array(reference["first_logits"], dtype=np.float32))))
        same = sum(a == b for a, b in zip(ids, reference["greedy_ids"]))
        print(json.dumps({"family": family, "engine": "mlx-lm bf16 on " + str(mx.default_device()), "against": label, "max_abs_diff": round(diff, 4), "of_range": round(diff / span, 4), "tokens_same": f"{same}/{len(ids)}", "min_margin": round(min(margins), 4)}))
