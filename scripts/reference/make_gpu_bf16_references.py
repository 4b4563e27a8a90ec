"""mlx-lm's own bfloat16 run of every tiny family fixture on this machine's GPU: the reference
for our bfloat16 run there (tests/it/families.rs, every_family_on_this_machines_gpu).

The committed fixtures hold mlx-lm's CPU runs; on the CPU MLX's GatherMM is float32-only, so
they hold no bfloat16 run of a mixture-of-experts family, and a GPU's bfloat16 kernels round
differently from the CPU's anyway. Run on the NVIDIA device (bench/gpu/README.md), then copy
the files into tests/fixtures/reference/gpu-bf16/:

    python3 scripts/reference/make_gpu_bf16_references.py OUT_DIR [FAMILY ...]

Each file: the greedy ids and first-step logits of mlx-lm's bfloat16 run (weights cast from the
float32 recipe with astype, as the sharded bfloat16 reference does), and how far that run is
from the float32 reference (max |diff| over the largest |logit|): the tolerance a bfloat16 run
of that family needs on that GPU.
"""
import importlib.metadata
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

out_dir = Path(sys.argv[1])
out_dir.mkdir(parents=True, exist_ok=True)
fixtures = root / "tests/fixtures/reference/families"
families = sys.argv[2:] or sorted(p.stem for p in fixtures.glob("*.json"))
for family in families:
    fixture = json.loads((fixtures / f"{family}.json").read_text())
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
    diff = float(np.max(np.abs(first - np.array(fixture["first_logits"], dtype=np.float32))))
    same = sum(a == b for a, b in zip(ids, fixture["greedy_ids"]))
    record = {
        "family": family,
        "families_salt": fixture["salt"],
        "how": "mlx-lm " + importlib.metadata.version("mlx-lm") + " with mlx " + mx.__version__ + " on " + str(mx.default_device()) + ", bfloat16 weights (float32 recipe cast with astype), run in bfloat16",
        "device": str(mx.default_device()),
        "greedy_ids": ids,
        "first_logits": ref.rnd(first),
        "margins": ref.rnd(margins, 6),
        "float32_reference_diff_of_range": round(diff / span, 5),
        "float32_reference_tokens_same": same,
    }
    (out_dir / f"{family}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{family}: {diff / span:.4f} of the range from float32, {same}/{len(ids)} tokens, min margin {min(margins):.4f}", flush=True)
