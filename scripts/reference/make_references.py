#!/usr/bin/env python3
"""Make the small JSON reference files that mlxserver's Rust tests compare against.

What it makes (all under tests/fixtures/reference/, each well under 200 KB):

  smollm2_tokenizer.json      The Hugging Face tokenizer that transformers builds from the
                              SmolLM2 GGUF metadata (AutoTokenizer.from_pretrained(dir,
                              gguf_file=...)): for a set of tricky strings, the ids
                              (add_special_tokens=False), the token pieces and the decoded
                              text; bos/eos/pad/unk ids and the special tokens.
  smollm2_chat_template.json  The raw chat_template string from the GGUF metadata and several
                              conversations rendered with tokenizer.apply_chat_template
                              (tokenize=False), plus the ids of each rendering.
  smollm2_greedy.json         Greedy decoding with transformers' LlamaForCausalLM loaded from
                              the GGUF (weights dequantized to float32, eager attention, CPU):
                              per prompt the fed prompt ids, 32 generated ids (EOS does not
                              stop the loop; its positions are recorded), the decoded text,
                              the top-5 (id, logit) pairs and top1-top2 margin of the first 4
                              steps, the margin of every step, and first-step logit stats and
                              logits of 20 fixed ids. Also a few dequantized GGUF weight
                              samples and a check of the Q/K un-permutation.
  minilm_embeddings.json      all-MiniLM-L6-v2 sentence embeddings (Transformer -> mean
                              Pooling -> Normalize, max_seq_length 256) with their token ids.

Inputs (see scripts/fetch-models.sh; nothing is downloaded from a model hub):
  $MLXSERVER_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
  $MLXSERVER_CACHE/models/all-MiniLM-L6-v2/
  ($MLXSERVER_CACHE defaults to ~/.cache/mlxserver)

How to run (from the repository root; the venv is described in README.md beside this file):

  ~/.cache/mlxserver/refvenv/bin/python scripts/reference/make_references.py
  ~/.cache/mlxserver/refvenv/bin/python scripts/reference/make_references.py --only greedy,minilm

Torch runs on the CPU with one thread so the numbers are reproducible and the run stays light
(about a minute or two). The outputs are committed; CI does not run this script.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "reference"
CACHE = Path(os.environ.get("MLXSERVER_CACHE", Path.home() / ".cache" / "mlxserver"))
MODELS = CACHE / "models"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = MODELS / "all-MiniLM-L6-v2"

N_GEN = 32          # generated tokens per prompt
N_TOPK_STEPS = 4    # steps with a stored top-5
TOPK = 5
# Fixed ids whose first-step logits are stored (spread over the vocabulary: specials, digits,
# whitespace pieces, common words, the last id).
FIXED_LOGIT_IDS = [0, 1, 2, 17, 30, 33, 104, 198, 216, 253, 314, 504, 905, 1116, 2114,
                   4093, 9509, 19556, 33662, 49151]


# ----------------------------------------------------------------------------- helpers

def r6(x: float) -> float:
    return round(float(x), 6)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for pkg in ["torch", "transformers", "tokenizers", "sentence-transformers", "gguf",
                "numpy", "jinja2", "safetensors", "accelerate"]:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def meta(extra: dict | None = None) -> dict:
    m = {
        "generator": "scripts/reference/make_references.py",
        "versions": versions(),
        "torch_num_threads": torch.get_num_threads(),
    }
    if extra:
        m.update(extra)
    return m


def write_json(name: str, obj: dict) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / name
    text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    path.write_text(text, encoding="utf-8")
    size = path.stat().st_size
    print(f"wrote {path.relative_to(REPO)} ({size} bytes)")
    if size > 200_000:
        raise SystemExit(f"{name} is {size} bytes, over the 200 KB budget")


_gguf_meta_cache: dict | None = None


def gguf_metadata() -> dict:
    """The GGUF metadata we care about, read with the gguf package."""
    global _gguf_meta_cache
    if _gguf_meta_cache is None:
        from gguf import GGUFReader
        r = GGUFReader(str(MODELS / GGUF_NAME))
        keep = {}
        for k, f in r.fields.items():
            if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.scores"):
                continue
            try:
                keep[k] = f.contents()
            except Exception:  # pragma: no cover - exotic field types
                pass
        _gguf_meta_cache = keep
    return _gguf_meta_cache


def gguf_info() -> dict:
    md = gguf_metadata()
    return {
        "file": GGUF_NAME,
        "sha256": sha256_file(MODELS / GGUF_NAME),
        "tokenizer.ggml.model": md.get("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": md.get("tokenizer.ggml.pre"),
        "tokenizer.ggml.add_bos_token": md.get("tokenizer.ggml.add_bos_token"),
        "tokenizer.ggml.add_space_prefix": md.get("tokenizer.ggml.add_space_prefix"),
    }


_tok = None


def smollm_tokenizer():
    global _tok
    if _tok is None:
        from transformers import AutoTokenizer
        _tok = AutoTokenizer.from_pretrained(str(MODELS), gguf_file=GGUF_NAME)
    return _tok


def chat_ids(tok, messages, add_generation_prompt: bool) -> list[int]:
    """Token ids exactly as transformers' apply_chat_template(tokenize=True) produces them."""
    out = tok.apply_chat_template(messages, tokenize=True,
                                  add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        assert len(out) == 1
        out = out[0]
    return [int(i) for i in out]


def smollm_pretokenized_variant(tok):
    """The same BPE with the pre-tokenizer of the original HF SmolLM2 tokenizer.json
    (Digits(individual_digits) then ByteLevel), which is what GGUF's pre='smollm' stands for
    in llama.cpp. transformers' GGUF converter builds a plain ByteLevel pre-tokenizer instead;
    we record whether that makes any difference on our strings."""
    from tokenizers import Tokenizer, pre_tokenizers
    t = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return t


# ----------------------------------------------------------------------------- a. tokenizer

TOKENIZER_STRINGS = [
    ("ascii", "Hello, world! How are you today?"),
    ("empty", ""),
    ("single_space", " "),
    ("leading_spaces", "  two leading spaces"),
    ("trailing_spaces", "trailing spaces   "),
    ("multiple_spaces", "multiple    internal     spaces"),
    ("newlines", "line1\nline2\n\nline4\r\nwindows line\n\n\n"),
    ("tabs", "\ttab\tseparated\t\tvalues\t"),
    ("code", "def add(a, b):\n    return a + b  # sum\n\nprint(add(2, 3))\n"),
    ("numbers", "12345.678 and -0.5e10, 1,000,000 items in 2024"),
    ("url", "See https://example.com/path/to?q=1&lang=ja#frag or http://x.io."),
    ("special_tokens", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    ("other_specials", "<file_sep>main.py<|endoftext|><jupyter_code>"),
    ("emoji", "🙂👍🏽 family: 👨‍👩‍👧 flags 🇯🇵 ❤️"),
    ("japanese", "日本語のテキストです。東京タワーは高い！"),
    ("chinese", "中文测试：你好，世界！"),
    ("accented_latin", "Crème brûlée, naïve café, Ærøskøbing, São Paulo, Łódź"),
    ("contractions_case", "I'm sure they'll say we've DONE it; HELLO World hElLo"),
    ("unicode_spaces", "nbsp\u00a0here, zero\u200bwidth, ideographic\u3000space"),
    ("mixed", "Mixed: café 東京 🙂 x=42; <file_sep> end\n\tfin  "),
]


def make_tokenizer_json() -> None:
    tok = smollm_tokenizer()
    variant = smollm_pretokenized_variant(tok)
    backend = json.loads(tok.backend_tokenizer.to_str())
    cases = []
    n_diff = 0
    for name, text in TOKENIZER_STRINGS:
        ids = tok.encode(text, add_special_tokens=False)
        case = {
            "name": name,
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        }
        ids_with_specials = tok.encode(text, add_special_tokens=True)
        if ids_with_specials != ids:
            case["ids_add_special_tokens_true"] = ids_with_specials
        var_ids = variant.encode(text, add_special_tokens=False).ids
        if var_ids != ids:
            case["ids_with_smollm_digit_pretokenizer"] = var_ids
            n_diff += 1
        cases.append(case)

    special = sorted(
        ({"id": int(i), "content": t.content, "special": bool(t.special)}
         for i, t in tok.added_tokens_decoder.items()),
        key=lambda d: d["id"],
    )
    obj = {
        "meta": meta({"gguf": gguf_info(),
                      "loader": "transformers.AutoTokenizer.from_pretrained(models_dir, gguf_file=...)",
                      "encode": "tokenizer.encode(text, add_special_tokens=False)",
                      "decode": "tokenizer.decode(ids) (skip_special_tokens=False)"}),
        "vocab_size": len(tok),
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
        "all_special_tokens": list(tok.all_special_tokens),
        "added_tokens": special,
        "hf_pre_tokenizer": backend.get("pre_tokenizer"),
        "hf_decoder": backend.get("decoder"),
        "hf_normalizer": backend.get("normalizer"),
        "hf_post_processor": backend.get("post_processor"),
        "note": ("transformers' GGUF converter maps tokenizer.ggml.pre='smollm' to a plain "
                 "ByteLevel pre-tokenizer (GPT-2 regex), without the Digits(individual_digits) "
                 "step of the original HF tokenizer / llama.cpp's smollm regex. The vocabulary "
                 "has no multi-digit tokens, so the ids agree anyway; a case carries "
                 "ids_with_smollm_digit_pretokenizer only where they would differ."),
        "cases_differing_with_smollm_digit_pretokenizer": n_diff,
        "cases": cases,
    }
    write_json("smollm2_tokenizer.json", obj)


# ----------------------------------------------------------------------------- b. chat template

CHAT_CASES = [
    ("single_user", [
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
    ], True),
    ("single_user_no_generation_prompt", [
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
    ], False),
    ("system_user", [
        {"role": "system", "content": "You are a terse assistant. Reply in as few words as possible."},
        {"role": "user", "content": "Hello! Who are you?"},
    ], True),
    ("system_user_assistant_user", [
        {"role": "system", "content": "You are a helpful math tutor."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And times 3?\nShow the steps."},
    ], True),
    ("multi_turn_no_generation_prompt", [
        {"role": "system", "content": "You are a helpful math tutor."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
    ], False),
    ("japanese", [
        {"role": "system", "content": "あなたは親切なアシスタントです。日本語で答えてください。"},
        {"role": "user", "content": "日本の首都はどこですか？"},
        {"role": "assistant", "content": "日本の首都は東京です。"},
        {"role": "user", "content": "人口はどれくらいですか？"},
    ], True),
    ("no_system_multi_turn", [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road? To get to the other side!"},
        {"role": "user", "content": "  Another one, please.  "},
    ], True),
]


def make_chat_template_json() -> None:
    tok = smollm_tokenizer()
    gguf_template = gguf_metadata().get("tokenizer.chat_template")
    cases = []
    for name, messages, agp in CHAT_CASES:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
        ids = chat_ids(tok, messages, agp)
        assert ids == tok.encode(rendered, add_special_tokens=False), name
        cases.append({
            "name": name,
            "messages": messages,
            "add_generation_prompt": agp,
            "rendered": rendered,
            "ids": ids,
        })
    obj = {
        "meta": meta({"gguf": gguf_info(),
                      "render": "tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)",
                      "ids": "tokenizer.apply_chat_template(..., tokenize=True) (equal to encode(rendered, add_special_tokens=False))"}),
        "gguf_chat_template": gguf_template,
        "tokenizer_chat_template_equals_gguf": tok.chat_template == gguf_template,
        "cases": cases,
    }
    write_json("smollm2_chat_template.json", obj)


# ----------------------------------------------------------------------------- c. greedy

LONG_PASSAGE = (
    "The printing press, developed by Johannes Gutenberg around 1440 in Mainz, combined several "
    "existing technologies into a practical system for mass-producing text. Movable metal type, "
    "cast from an alloy of lead, tin and antimony, could be arranged into pages, inked with an "
    "oil-based ink, and pressed onto paper with a screw press adapted from those used for wine "
    "and olive oil. Before this, books in Europe were copied by hand, usually by monks or "
    "professional scribes, which made them rare and expensive. Within fifty years of "
    "Gutenberg's first Bible, presses had spread to more than two hundred cities, and millions "
    "of volumes had been printed. The cost of books fell sharply, literacy rose, and ideas "
    "travelled faster than ever before. Scholars could compare identical copies of a text, "
    "which helped standardise spelling, grammar and scientific notation. The Reformation, the "
    "Scientific Revolution and the growth of newspapers all owed a great deal to cheap "
    "printing. Historians still debate how much the press caused these changes and how much it "
    "simply accelerated trends that were already under way, but few doubt that it was one of "
    "the most important inventions of the second millennium."
)

GREEDY_PROMPTS = [
    ("france", True, "What is the capital of France? Answer in one word."),
    ("haiku", True, "Write a haiku about the sea."),
    ("japanese_capital", True, "日本の首都はどこですか？"),
    ("count", True, "Count from 1 to 10."),
    ("raw_fox", False, "The quick brown fox"),
    ("long_summary", True, LONG_PASSAGE + "\n\nSummarize the text above in one sentence."),
]


def load_smollm_model():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        str(MODELS), gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


@torch.inference_mode()
def greedy_with_logits(model, prompt_ids: list[int], n: int):
    """Plain greedy loop with the KV cache (what generate(do_sample=False) does, minus its
    stopping criteria): returns the generated ids and the raw logits of every step."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=input_ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1].float()
    gen, all_logits = [], []
    for step in range(n):
        all_logits.append(logits.clone())
        nxt = int(torch.argmax(logits))
        gen.append(nxt)
        if step == n - 1:
            break
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
    return gen, all_logits


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_weight_checks(model) -> dict:
    """Dequantize a few tensors straight from the GGUF and compare with transformers' weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(str(MODELS / GGUF_NAME))
    tensors = {t.name: t for t in r.tensors}
    cfg = model.config
    res = {}

    def deq(name):
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        # gguf lists shapes innermost-first; numpy data is [rows, cols] = [out, in].
        return t.tensor_type.name, w.reshape([int(x) for x in reversed(t.shape)])

    layer0 = model.model.layers[0].self_attn
    for gname, hf_w, n_head in [
        ("token_embd.weight", model.model.embed_tokens.weight, None),
        ("blk.0.attn_q.weight", layer0.q_proj.weight, cfg.num_attention_heads),
        ("blk.0.attn_k.weight", layer0.k_proj.weight, cfg.num_key_value_heads),
        ("blk.0.attn_v.weight", layer0.v_proj.weight, None),
    ]:
        qtype, w = deq(gname)
        hf = hf_w.detach().float().numpy()
        entry = {
            "ggml_type": qtype,
            "shape_out_in": list(w.shape),
            "gguf_row0_first8": [r6(x) for x in w[0, :8]],
            "gguf_row1_first8": [r6(x) for x in w[1, :8]],
            "equal_as_is": bool(np.array_equal(w, hf)),
        }
        if n_head is not None:
            entry["equal_after_reverse_permute"] = bool(np.array_equal(reverse_permute(w, n_head), hf))
        res[gname] = entry
    res["note"] = ("GGUF stores attn_q/attn_k rows permuted for llama.cpp's interleaved (NORM) "
                   "RoPE. transformers' LlamaTensorProcessor reverse-permutes them per head "
                   "(w.reshape(n_head, head_dim//2, 2, in).swapaxes(1, 2)) so the HF "
                   "rotate_half RoPE applies. A Rust GGUF loader must either do the same or use "
                   "the interleaved RoPE variant (mlx 'traditional' rope).")
    res["tied_embeddings"] = bool(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
    return res


def make_greedy_json() -> None:
    tok = smollm_tokenizer()
    model = load_smollm_model()
    eos = tok.eos_token_id
    special_ids = {int(i) for i in tok.added_tokens_decoder}
    prompts = []
    for name, chat, text in GREEDY_PROMPTS:
        if chat:
            messages = [{"role": "user", "content": text}]
            prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = chat_ids(tok, messages, True)
        else:
            messages = None
            prompt_text = text
            prompt_ids = tok.encode(text, add_special_tokens=False)

        gen, logits = greedy_with_logits(model, prompt_ids, N_GEN)

        # Cross-check against transformers' own generate() (which stops at EOS).
        with torch.inference_mode():
            ref = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 max_new_tokens=N_GEN, do_sample=False, repetition_penalty=1.0,
                                 pad_token_id=tok.pad_token_id)[0, len(prompt_ids):].tolist()
        first_eos = gen.index(eos) if eos in gen else None
        upto = gen[: first_eos + 1] if first_eos is not None else gen
        generate_matches = ref == upto

        steps = []
        margins = []
        for i, lg in enumerate(logits):
            top = torch.topk(lg, TOPK)
            vals, ids = top.values.tolist(), top.indices.tolist()
            margins.append(r6(vals[0] - vals[1]))
            if i < N_TOPK_STEPS:
                steps.append({
                    "step": i,
                    "chosen": gen[i],
                    "top5": [[int(t), r6(v)] for t, v in zip(ids, vals)],
                    "margin_top1_top2": r6(vals[0] - vals[1]),
                })
        l0 = logits[0].double()
        prompts.append({
            "name": name,
            "chat_template_applied": chat,
            "messages": messages,
            "prompt_text": prompt_text,
            "prompt_ids": prompt_ids,
            "n_prompt_tokens": len(prompt_ids),
            "generated_ids": gen,
            "generated_text": tok.decode(gen),
            "generated_text_skip_special": tok.decode(gen, skip_special_tokens=True),
            "eos_positions": [i for i, t in enumerate(gen) if t == eos],
            "special_token_positions": [i for i, t in enumerate(gen) if t in special_ids],
            "hf_generate_matches_until_eos": generate_matches,
            "hf_generate_ids": ref,
            "steps": steps,
            "margins_top1_top2_all_steps": margins,
            # Steps before this one have a top1-top2 margin of at least 0.1: an implementation
            # with small float differences should reproduce generated_ids at least that far.
            "first_step_with_margin_below_0_1": next((i for i, m in enumerate(margins) if m < 0.1), None),
            "first_step_logits": {
                "mean": r6(l0.mean()),
                "std": r6(l0.std(unbiased=False)),
                "min": r6(l0.min()),
                "max": r6(l0.max()),
                "argmax": int(torch.argmax(l0)),
                "fixed_ids": FIXED_LOGIT_IDS,
                "fixed_logits": [r6(l0[i]) for i in FIXED_LOGIT_IDS],
            },
        })
        print(f"  {name}: {len(prompt_ids)} prompt tokens -> {tok.decode(gen)!r}"
              f" (generate() matches: {generate_matches})")

    obj = {
        "meta": meta({
            "gguf": gguf_info(),
            "model": "transformers.AutoModelForCausalLM.from_pretrained(models_dir, gguf_file=..., "
                     "dtype=torch.float32, attn_implementation='eager'), CPU",
            "decoding": f"greedy argmax of raw logits, {N_GEN} tokens, KV cache, no repetition "
                        "penalty, EOS does not stop the loop (eos_positions records it)",
            "logits": "raw float32 logits of the last position, rounded to 6 decimals; std is "
                      "the population std over the whole vocabulary",
            "eos_token_id": eos,
            "bos_handling": "no BOS is prepended: the GGUF says add_bos_token=false and the HF "
                            "post-processor adds nothing; chat prompts start with <|im_start|> "
                            "(id 1, which is also the nominal bos_token) from the template",
        }),
        "gguf_weight_checks": gguf_weight_checks(model),
        "prompts": prompts,
    }
    write_json("smollm2_greedy.json", obj)


# ----------------------------------------------------------------------------- d. MiniLM

LONG_SENTENCE = " ".join(
    f"Sentence number {i} talks about embeddings, tokenizers, pooling and truncation limits."
    for i in range(1, 41)
)

MINILM_SENTENCES = [
    ("simple", "This is a test sentence."),
    ("fox", "The quick brown fox jumps over the lazy dog."),
    ("guitar", "A man is playing a guitar."),
    ("japanese", "日本語の文章も埋め込みできますか？東京は日本の首都です。"),
    ("accents_emoji", "Café naïve résumé — ÜBER cool 🙂 déjà vu"),
    ("short", "Hi"),
    ("empty", ""),
    ("long_truncated", LONG_SENTENCE),
]


def load_minilm():
    from sentence_transformers import SentenceTransformer, models
    st = SentenceTransformer(str(MINILM_DIR), device="cpu")
    names = [type(m).__name__ for m in st]
    built = "SentenceTransformer(folder)"
    if names != ["Transformer", "Pooling", "Normalize"]:
        # The folder's modules.json names 2_Normalize but the folder is absent; if this
        # sentence-transformers cannot load it, assemble the pipeline explicitly.
        word = models.Transformer(str(MINILM_DIR), max_seq_length=256)
        pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
        st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
        built = "explicit Transformer + Pooling(mean) + Normalize"
        names = [type(m).__name__ for m in st]
    st.max_seq_length = 256
    return st, built, names


@torch.inference_mode()
def manual_minilm(st, text: str) -> tuple[np.ndarray, float]:
    """Independent path: HF BertModel + masked mean + L2 normalize."""
    tokenizer = st.tokenizer
    enc = tokenizer([text], truncation=True, max_length=st.max_seq_length, return_tensors="pt",
                    padding=True)
    bert = st[0].auto_model
    out = bert(**enc).last_hidden_state[0]
    mask = enc["attention_mask"][0].unsqueeze(-1).float()
    mean = (out * mask).sum(0) / mask.sum(0).clamp(min=1e-9)
    norm = float(mean.norm())
    return (mean / max(norm, 1e-12)).numpy(), norm


def make_minilm_json() -> None:
    st, built, names = load_minilm()
    tokenizer = st.tokenizer
    texts = [t for _, t in MINILM_SENTENCES]
    emb = st.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=False)
    cases = []
    max_diff = 0.0
    for (name, text), e in zip(MINILM_SENTENCES, emb):
        ids = tokenizer(text, truncation=True, max_length=st.max_seq_length)["input_ids"]
        full = tokenizer(text, truncation=False)["input_ids"]
        manual, pre_norm = manual_minilm(st, text)
        max_diff = max(max_diff, float(np.abs(manual - e).max()))
        cases.append({
            "name": name,
            "text": text,
            "token_ids": ids,
            "n_tokens": len(ids),
            "n_tokens_untruncated": len(full),
            "tokens": tokenizer.convert_ids_to_tokens(ids) if len(ids) <= 40 else None,
            "pre_normalize_l2_norm": r6(pre_norm),
            "embedding": [r6(x) for x in e],
        })
    norm = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = (norm @ norm.T).tolist()
    obj = {
        "meta": meta({
            "model_dir": "all-MiniLM-L6-v2 (sentence-transformers folder)",
            "model_safetensors_sha256": sha256_file(MINILM_DIR / "model.safetensors"),
            "pipeline": built,
            "modules": names,
            "max_seq_length": st.max_seq_length,
            "pooling": "mean over attention-masked token embeddings, then L2 normalize",
            "token_ids": "tokenizer(text, truncation=True, max_length=256) incl. [CLS]/[SEP]",
            "embedding_rounding": 6,
            "max_abs_diff_vs_manual_bert_mean_normalize": max_diff,
            "encode_batching": "all sentences in one padded batch (as sentence-transformers does)",
        }),
        "dimension": int(emb.shape[1]),
        "cases": cases,
        "cosine_similarity": [[r6(x) for x in row] for row in cos],
    }
    write_json("minilm_embeddings.json", obj)


# ----------------------------------------------------------------------------- main

JOBS = {
    "tokenizer": make_tokenizer_json,
    "chat": make_chat_template_json,
    "greedy": make_greedy_json,
    "minilm": make_minilm_json,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(JOBS), help=f"comma list of {', '.join(JOBS)}")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for job in args.only.split(","):
        job = job.strip()
        if job not in JOBS:
            raise SystemExit(f"unknown job {job!r}; choose from {', '.join(JOBS)}")
        print(f"[{job}]")
        JOBS[job]()


if __name__ == "__main__":
    main()
