#!/usr/bin/env python3
"""llama.cpp's own inference on each tiny family GGUF: the independent numbers for the GGUF path.

For every architecture of make_gguf_references.py that llama.cpp's converter accepts, the tiny
family model is converted exactly as there (same folder, tokenizer and converter), and
llama-cpp-python (llama.cpp on the CPU, float32 compute) runs the file: the first-step logits
of the families fixture's prompt and 16 greedy tokens, with each step's margin between the
best and second-best logit. Written to tests/fixtures/reference/gguf-llama-cpp/<arch>.json;
tests/it/gguf_families.rs loads its bit-identical GGUF and compares with these numbers. This
is the reference for the families whose tiny settings a GGUF cannot carry (gemma2's query
scale, gemma3's layer pattern, smollm3's NoPE layers): llama.cpp reads the same file we do.

How to run (from the repository root, ~1 min after llama-cpp-python is built):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        ~/.cache/mlxserver/rerankvenv/bin/pip install llama-cpp-python==0.3.36   # ~12 min on 2 cores
    ~/.cache/mlxserver/rerankvenv/bin/python scripts/reference/make_gguf_llama_cpp_references.py \
        [--llama-cpp /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp] [--only gemma2,smollm3]

(the converter's source: see make_gguf_references.py.)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_gguf_references as gguf_refs  # noqa: E402

OUT_DIR = gguf_refs.REPO / "tests" / "fixtures" / "reference" / "gguf-llama-cpp"
# Architectures whose tiny file llama.cpp runs as another model than the file describes.
NOT_COMPARABLE = {
    "exaone4": "llama.cpp applies EXAONE 4's sliding windows (and the RoPE-less global layers) "
               "only to 64-layer models (src/models/exaone4.cpp), so it reads the 2-layer file as "
               "all-global with RoPE everywhere; the file itself is checked against mlx-lm",
}
STEPS = 16


def run_llama_cpp(path: Path, prompt: list[int], n_ctx: int) -> dict:
    from llama_cpp import Llama

    # float32 keys and values (llama.cpp caches them in float16 by default).
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=64, n_threads=1, logits_all=True, verbose=False, seed=0,
                type_k=0, type_v=0)
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    first = logits.copy()
    tokens, margins = [], []
    for step in range(STEPS):
        order = np.argsort(-logits, kind="stable")
        tokens.append(int(order[0]))
        margins.append(float(logits[order[0]] - logits[order[1]]))
        if step + 1 < STEPS:
            llm.eval([tokens[-1]])
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return {"first_logits": [float(v) for v in first], "greedy_ids": tokens, "margins": margins}


def try_salts(lcp: Path, tmp: Path, arch: str, fixture: dict, salts: int):
    for salt in range(salts):
        variant = gguf_refs.variant_fixture(arch, fixture, salt)
        folder = tmp / f"{arch}-{salt}" / "tiny"
        gguf_refs.write_folder(folder, variant)
        path = folder.parent / "tiny-f32.gguf"
        gguf_refs.run_converter(lcp, folder, path, "f32")
        run = run_llama_cpp(path, variant["prompt_ids"], int(variant["config"]["max_position_embeddings"]))
        print(f"[{arch}] salt {salt}: {len(set(run['greedy_ids']))} distinct, min margin {min(run['margins']):.3g}, "
              f"greedy {run['greedy_ids']}", flush=True)


def main():
    import llama_cpp

    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", default=str(gguf_refs.DEFAULT_LCP))
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--try-salts", type=int, default=0,
                    help="for an architecture with a variant (make_gguf_references.VARIANTS): print the "
                         "greedy path for salts 0..N-1 instead of writing the reference")
    args = ap.parse_args()
    lcp = Path(args.llama_cpp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="mlxserver-gguf-llama-cpp-"))
    try:
        for arch, (family, outtypes) in gguf_refs.ARCHS.items():
            if args.only and arch not in args.only.split(","):
                continue
            fixture = json.loads((gguf_refs.FAMILIES_DIR / f"{family}.json").read_text())
            if arch in NOT_COMPARABLE:
                print(f"[{arch}] skipped: {NOT_COMPARABLE[arch]}", flush=True)
                continue
            if args.try_salts and arch in gguf_refs.VARIANTS:
                try_salts(lcp, tmp, arch, fixture, args.try_salts)
                continue
            fixture = gguf_refs.variant_fixture(arch, fixture) or fixture
            folder = tmp / family / "tiny"
            gguf_refs.write_folder(folder, fixture)
            # The model's whole context, as mlxserver runs it: llama.cpp picks some settings by
            # the context size (phi3's long or short RoPE factors: long past the original length).
            n_ctx = int(fixture["config"]["max_position_embeddings"])
            runs = {}
            for outtype in outtypes:
                path = tmp / family / f"tiny-{outtype}.gguf"
                try:
                    gguf_refs.run_converter(lcp, folder, path, outtype)
                except RuntimeError:
                    print(f"[{arch}] the converter refuses it (see gguf/{arch}.json); skipped", flush=True)
                    break
                runs[outtype] = run_llama_cpp(path, fixture["prompt_ids"], n_ctx)
                print(f"[{arch}] {outtype}: greedy {runs[outtype]['greedy_ids']}, "
                      f"min margin {min(runs[outtype]['margins']):.3g}", flush=True)
            if not runs:
                continue
            record = {
                "arch": arch,
                "family": family,
                "families_salt": fixture["salt"],
                "prompt_ids": fixture["prompt_ids"],
                "engine": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp {gguf_refs.LCP_COMMIT}), CPU, "
                          "n_threads 1, the file convert_hf_to_gguf.py writes (gguf/<arch>.json)",
                "n_ctx": n_ctx,
                "runs": runs,
            }
            (out / f"{arch}.json").write_text(json.dumps(record, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
