#!/usr/bin/env python3
"""Build SmolLM2 model folders in other formats from the GGUF, and an MLX 4-bit reference.

What it makes (model folders go to $MLXSERVER_CACHE/models, default ~/.cache/mlxserver/models;
never into the repository):

  SmolLM2-135M-Instruct-hf/        Hugging Face folder: config.json, model.safetensors
                                   (float32 weights dequantized from the Q4_1/Q8_0 GGUF by
                                   transformers, Q/K un-permuted, tied embeddings),
                                   generation_config.json, tokenizer.json,
                                   tokenizer_config.json with chat_template, and the same
                                   template as chat_template.jinja.
  SmolLM2-135M-Instruct-mlx-4bit/  `python -m mlx_lm convert --hf-path <hf folder> -q
                                   --q-bits 4 --q-group-size 64 --dtype bfloat16` (affine
                                   4-bit, group 64; scales/biases and unquantized tensors in
                                   bfloat16, the usual layout of MLX community 4-bit models).

and one committed reference file:

  tests/fixtures/reference/smollm2_mlx4bit_greedy.json
      Greedy decoding (32 tokens, EOS does not stop) with mlx_lm on the 4-bit folder for the
      prompts of smollm2_greedy.json (the France prompt first): prompt ids, output ids, text,
      top-5 logits of the first 4 steps, per-step margins. Also: the same prompts through the
      float32 HF folder loaded by mlx_lm, and whether that matches the transformers reference.

Each folder is built into NAME.partial and renamed when complete; an existing folder is kept
unless --force is given. How to run (from the repository root):

  ~/.cache/mlxserver/refvenv/bin/python scripts/reference/make_model_folders.py [--force]

CPU only (mlx[cpu]). About 30 minutes on two busy cores: on mlx's CPU backend a 4-bit
matmul with bfloat16 scales is several times slower than with float32 ones (and float16 is
slower still), and prefill costs about as much per token as decoding. CI does not run it.
--mlx-dtype float32 makes a faster (non-standard) 4-bit folder; the committed reference was
made with the default, bfloat16.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_references as refs  # noqa: E402  (shares paths, prompts and helpers)

MODELS = refs.MODELS
HF_DIR = MODELS / "SmolLM2-135M-Instruct-hf"
MLX_DIR = MODELS / "SmolLM2-135M-Instruct-mlx-4bit"
Q_BITS, Q_GROUP = 4, 64


def build_hf_folder(force: bool) -> None:
    import torch

    if HF_DIR.exists() and not force:
        print(f"keep existing {HF_DIR}")
        return
    tmp = HF_DIR.with_name(HF_DIR.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = refs.smollm_tokenizer()
    model = refs.load_smollm_model()
    # The GGUF loader leaves quantization_config={quant_method: gguf} on the config although
    # the weights are plain dequantized tensors; a saved folder must not claim that.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "SmolLM2-135M-Instruct (from SmolLM2-135M-Instruct.Q4_1.gguf)"
    model.save_pretrained(str(tmp), safe_serialization=True)
    # save_jinja_files=False keeps chat_template inside tokenizer_config.json (the older layout
    # many loaders read); the same template is also written as chat_template.jinja.
    tok.save_pretrained(str(tmp), save_jinja_files=False)
    (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")

    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg.setdefault("torch_dtype", "float32")  # older readers (mlx_lm convert) look for this key
    # transformers 5 writes rope_theta only inside rope_parameters; mlx_lm's llama (0.32.x)
    # reads the top-level rope_theta and would silently fall back to 10000. The original
    # HF SmolLM2 config has the top-level key, so write it as well.
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"unexpected rope_parameters {rope}; extend this script")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    tc = json.loads((tmp / "tokenizer_config.json").read_text())
    assert tc.get("chat_template") == tok.chat_template, "chat_template missing in tokenizer_config.json"
    shutil.rmtree(HF_DIR, ignore_errors=True)
    os.replace(tmp, HF_DIR)
    print(f"built {HF_DIR}: {sorted(p.name for p in HF_DIR.iterdir())}")
    del model
    torch.set_num_threads(1)


def check_hf_folder() -> dict:
    """Reload the HF folder with transformers and compare first-step logits with the GGUF path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_g = refs.smollm_tokenizer()
    tok_h = AutoTokenizer.from_pretrained(str(HF_DIR))
    model_h = AutoModelForCausalLM.from_pretrained(str(HF_DIR), dtype=torch.float32,
                                                   attn_implementation="eager").eval()
    model_g = refs.load_smollm_model()
    same_ids, max_diff = True, 0.0
    for name, chat, text in refs.GREEDY_PROMPTS:
        if chat:
            msgs = [{"role": "user", "content": text}]
            ids_g = refs.chat_ids(tok_g, msgs, True)
            ids_h = refs.chat_ids(tok_h, msgs, True)
        else:
            ids_g = tok_g.encode(text, add_special_tokens=False)
            ids_h = tok_h.encode(text, add_special_tokens=False)
        same_ids &= ids_g == ids_h
        with torch.inference_mode():
            x = torch.tensor([ids_g])
            diff = (model_h(x).logits[0, -1] - model_g(x).logits[0, -1]).abs().max().item()
        max_diff = max(max_diff, diff)
    for _, text in refs.TOKENIZER_STRINGS:
        same_ids &= tok_g.encode(text, add_special_tokens=False) == tok_h.encode(text, add_special_tokens=False)
    print(f"HF folder: tokenizer ids equal to GGUF tokenizer: {same_ids}; "
          f"max |first-step logit diff| vs GGUF-loaded model: {max_diff:.3g}")
    return {"tokenizer_ids_equal_to_gguf_tokenizer": bool(same_ids),
            "max_abs_first_step_logit_diff_vs_gguf_model": max_diff}


def build_mlx_folder(force: bool, dtype: str) -> None:
    if MLX_DIR.exists() and not force:
        print(f"keep existing {MLX_DIR}")
        return
    tmp = MLX_DIR.with_name(MLX_DIR.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(HF_DIR), "-q",
           "--q-bits", str(Q_BITS), "--q-group-size", str(Q_GROUP), "--dtype", dtype,
           "--mlx-path", str(tmp)]
    print("+", " ".join(cmd))
    subprocess.run(cmd, check=True)
    shutil.rmtree(MLX_DIR, ignore_errors=True)
    os.replace(tmp, MLX_DIR)
    print(f"built {MLX_DIR}: {sorted(p.name for p in MLX_DIR.iterdir())}")


def mlx_greedy(model, prompt_ids: list[int], n: int):
    """Greedy loop with mlx_lm's KV cache, keeping the float32 logits of each step."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt_ids]), cache=cache)[0, -1].astype(mx.float32)
    gen, all_logits = [], []
    for step in range(n):
        mx.eval(logits)
        all_logits.append(logits)
        nxt = int(mx.argmax(logits).item())
        gen.append(nxt)
        if step == n - 1:
            break
        logits = model(mx.array([[nxt]]), cache=cache)[0, -1].astype(mx.float32)
    return gen, all_logits


def describe_run(tok, prompt_ids, gen, logits) -> dict:
    import numpy as np

    steps, margins = [], []
    for i, lg in enumerate(logits):
        a = np.array(lg)
        order = np.argsort(-a, kind="stable")[: refs.TOPK]
        margins.append(refs.r6(a[order[0]] - a[order[1]]))
        if i < refs.N_TOPK_STEPS:
            steps.append({"step": i, "chosen": gen[i],
                          "top5": [[int(t), refs.r6(a[t])] for t in order],
                          "margin_top1_top2": refs.r6(a[order[0]] - a[order[1]])})
    return {
        "prompt_ids": prompt_ids,
        "generated_ids": gen,
        "generated_text": tok.decode(gen),
        "eos_positions": [i for i, t in enumerate(gen) if t == tok.eos_token_id],
        "steps": steps,
        "margins_top1_top2_all_steps": margins,
        "first_step_with_margin_below_0_1": next((i for i, m in enumerate(margins) if m < 0.1), None),
    }


def mlx_reference(hf_check: dict, dtype: str) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    ref_path = refs.OUT_DIR / "smollm2_greedy.json"
    torch_ref = {p["name"]: p for p in json.loads(ref_path.read_text())["prompts"]} if ref_path.exists() else {}

    model4, tok4 = load(str(MLX_DIR))
    model32, tok32 = load(str(HF_DIR))
    qcfg = json.loads((MLX_DIR / "config.json").read_text()).get("quantization")
    prompts = []
    for name, chat, text in refs.GREEDY_PROMPTS:
        if chat:
            msgs = [{"role": "user", "content": text}]
            prompt_ids = tok4.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
            if hasattr(prompt_ids, "keys"):
                prompt_ids = prompt_ids["input_ids"]
            prompt_ids = [int(i) for i in prompt_ids]
        else:
            msgs = None
            prompt_ids = tok4.encode(text, add_special_tokens=False)
        gen4, lg4 = mlx_greedy(model4, prompt_ids, refs.N_GEN)
        # Cross-check the hand loop against mlx_lm's own generate_step (argmax sampler).
        gs = [int(t) for t, _ in generate_step(mx.array(prompt_ids), model4, max_tokens=refs.N_GEN)]
        gen32, lg32 = mlx_greedy(model32, prompt_ids, refs.N_GEN)
        entry = {"name": name, "chat_template_applied": chat, "messages": msgs,
                 **describe_run(tok4, prompt_ids, gen4, lg4),
                 "mlx_lm_generate_step_matches": gs == gen4}
        tr = torch_ref.get(name)
        f32 = {"generated_ids": gen32, "generated_text": tok32.decode(gen32),
               "first_step_top5": describe_run(tok32, prompt_ids, gen32, lg32)["steps"][0]["top5"]}
        if tr:
            entry["prompt_ids_equal_transformers"] = tr["prompt_ids"] == prompt_ids
            f32["matches_transformers_reference"] = tr["generated_ids"] == gen32
            f32["tokens_equal_to_transformers_prefix"] = next(
                (i for i, (a, b) in enumerate(zip(tr["generated_ids"], gen32)) if a != b), len(gen32))
            entry["tokens_equal_to_transformers_prefix_4bit"] = next(
                (i for i, (a, b) in enumerate(zip(tr["generated_ids"], gen4)) if a != b), len(gen4))
        entry["mlx_float32_hf_folder"] = f32
        prompts.append(entry)
        print(f"  {name}: 4bit -> {tok4.decode(gen4)!r}")
        print(f"  {name}: f32  -> {tok32.decode(gen32)!r} (matches torch: {f32.get('matches_transformers_reference')})")
        if name == "france":
            print(f"  france, first 10 tokens (4bit): {tok4.decode(gen4[:10])!r}")

    import importlib.metadata as md
    obj = {
        "meta": refs.meta({
            "generator": "scripts/reference/make_model_folders.py",
            "mlx_versions": {p: md.version(p) for p in ("mlx", "mlx-cpu", "mlx-lm")},
            "mlx_device": str(mx.default_device()),
            "model_folder": MLX_DIR.name,
            "made_with": f"python -m mlx_lm convert --hf-path {HF_DIR.name} -q --q-bits {Q_BITS} "
                         f"--q-group-size {Q_GROUP} --dtype {dtype}",
            "quantization": qcfg,
            "hf_folder": HF_DIR.name,
            "hf_folder_check": hf_check,
            "decoding": f"greedy argmax of float32-cast logits, {refs.N_GEN} tokens, mlx_lm KV "
                        "cache, EOS does not stop the loop; prompt ids from mlx_lm's tokenizer "
                        "(apply_chat_template, add_generation_prompt=True)",
        }),
        "prompts": prompts,
    }
    refs.write_json("smollm2_mlx4bit_greedy.json", obj)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild folders that already exist")
    ap.add_argument("--mlx-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of scales/biases and unquantized tensors in the 4-bit folder")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    MODELS.mkdir(parents=True, exist_ok=True)
    build_hf_folder(args.force)
    hf_check = check_hf_folder()
    build_mlx_folder(args.force, args.mlx_dtype)
    mlx_reference(hf_check, args.mlx_dtype)


if __name__ == "__main__":
    main()
