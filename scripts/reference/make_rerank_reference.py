#!/usr/bin/env python3
"""Make the reference for cross-encoder (reranker) scoring: a tiny random-weight
BertForSequenceClassification run by Hugging Face transformers (PyTorch, float32, CPU).

Writes tests/fixtures/reference/rerank/tiny_bert_reranker.json. The weights are not stored:
like the family references (make_family_references.py, same recipe, same splitmix64), each
tensor is a seeded recipe that tests/it/rerank.rs replays bit for bit into a Hugging Face
folder, beside a copy of the real all-MiniLM-L6-v2 tokenizer, so tokenization is real.

How to run (from the repository root; a few seconds once torch is installed):

    python3 -m venv ~/.cache/mlxserver/rerankvenv
    ~/.cache/mlxserver/rerankvenv/bin/pip install torch transformers safetensors numpy
    OMP_NUM_THREADS=1 ~/.cache/mlxserver/rerankvenv/bin/python \\
        scripts/reference/make_rerank_reference.py [--models DIR] [--out FILE]

The tokenizer comes from $MLXSERVER_TEST_MODELS/all-MiniLM-L6-v2 (default
~/.cache/mlxserver/models; scripts/fetch-models.sh puts it there). Nothing is downloaded.
Versions used for the committed fixture are recorded in its "meta".

The model: BertConfig(vocab 30522 (the tokenizer's), hidden 32, 2 layers, 4 heads,
intermediate 64, max_position_embeddings 64, type_vocab_size 2, gelu, layer_norm_eps 1e-12),
architectures ["BertForSequenceClassification"], in two variants sharing every tensor but the
classifier: "one_label" (num_labels 1, the ms-marco / bge-reranker shape; score = logit 0)
and "two_labels" (num_labels 2; score = logit of label 1).

Weight recipe (as make_family_references.py):

    value_i = float32(offset + scale * (2*u_i - 1))      computed in float64, this order
    u_i     = (splitmix64(seed + i) >> 40) / 2**24        i = row-major index, seed + i wrapping
    seed    = FNV-1a-64("rerank/<salt>/<variant-or-shared>/<tensor name>") & (2**52 - 1)

Distributions (uniform): embeddings (word, position, token type) std 1; LayerNorm weights
1 +- 0.2, biases 0 +- 0.2; encoder matrices std 1.5/sqrt(fan_in); pooler and classifier
std 1/sqrt(fan_in). Token type row 1 differs from row 0, so an implementation that ignores
token_type_ids gets different scores.

Pairs: two queries with four and two documents; one document is longer than the 64-token
window, so it is truncated (longest first: `tokenizer(q, d, truncation=True, max_length=64)`).
The fixture records, per pair, the ids and token type ids transformers fed the model, and per
variant every logit and the score. All pairs run in one padded batch (padding=True), as the
engine batches them. Salts are tried from 0 until consecutive sorted scores of each query
differ by at least MIN_GAP in both variants, so the expected order is well defined.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "reference" / "rerank" / "tiny_bert_reranker.json"
MASK64 = (1 << 64) - 1
SEED_MASK = (1 << 52) - 1
MAX_TOKENS = 64
MIN_GAP = 0.01
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

H, LAYERS, HEADS, INTER, MAXPOS = 32, 2, 4, 64, MAX_TOKENS

QUERIES = [
    "how tall is mount fuji",
    "what do koalas eat",
]
DOCUMENTS = [
    [
        "Mount Fuji is 3,776 metres tall, the highest mountain in Japan.",
        "The Eiffel Tower in Paris was finished in 1889.",
        "Fuji apples are a popular variety grown in many countries.",
        # Longer than the window: truncated.
        "Mount Fuji, an active stratovolcano on Honshu, last erupted in 1707 and 1708. "
        "It stands about a hundred kilometres south-west of Tokyo and can be seen from the city "
        "on a clear day. Climbing season runs from early July to early September, when the huts "
        "along the trails are open and the summit is usually free of snow; thousands of people "
        "walk up every night to watch the sunrise from the crater rim.",
    ],
    [
        "Koalas feed almost only on eucalyptus leaves.",
        "The stock market closed higher on Friday.",
    ],
]


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def recipe_values(shape, seed: int, offset: float, scale: float) -> np.ndarray:
    n = int(np.prod(shape))
    idx = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = splitmix64(np.uint64(seed) + idx)
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return (offset + scale * (2.0 * u - 1.0)).astype(np.float32).reshape(shape)


def fnv1a64(s: str) -> int:
    h = 0xCBF29CE484222325
    for b in s.encode("utf-8"):
        h ^= b
        h = (h * 0x100000001B3) & MASK64
    return h


def sig(x: float) -> float:
    return float(f"{x:.6g}")


def self_test():
    z = int(splitmix64(np.array([0], dtype=np.uint64))[0])
    assert z == 0xE220A8397B1DCDAF, hex(z)


def uniform(std):
    return 0.0, sig(std * math.sqrt(3))


def tensor_list(vocab, labels):
    """(name, shape, (offset, scale), shared) in Hugging Face naming."""
    out = [
        ("bert.embeddings.word_embeddings.weight", [vocab, H], uniform(1.0), True),
        ("bert.embeddings.position_embeddings.weight", [MAXPOS, H], uniform(1.0), True),
        ("bert.embeddings.token_type_embeddings.weight", [2, H], uniform(1.0), True),
        ("bert.embeddings.LayerNorm.weight", [H], (1.0, 0.2), True),
        ("bert.embeddings.LayerNorm.bias", [H], (0.0, 0.2), True),
    ]
    mat = lambda fan_in, gain=1.5: uniform(gain / math.sqrt(fan_in))  # noqa: E731
    for i in range(LAYERS):
        p = f"bert.encoder.layer.{i}"
        for name, out_f, in_f in [
            ("attention.self.query", H, H),
            ("attention.self.key", H, H),
            ("attention.self.value", H, H),
            ("attention.output.dense", H, H),
            ("intermediate.dense", INTER, H),
            ("output.dense", H, INTER),
        ]:
            out.append((f"{p}.{name}.weight", [out_f, in_f], mat(in_f), True))
            out.append((f"{p}.{name}.bias", [out_f], (0.0, 0.2), True))
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            out.append((f"{p}.{norm}.weight", [H], (1.0, 0.2), True))
            out.append((f"{p}.{norm}.bias", [H], (0.0, 0.2), True))
    out.append(("bert.pooler.dense.weight", [H, H], mat(H, 1.0), True))
    out.append(("bert.pooler.dense.bias", [H], (0.0, 0.2), True))
    out.append(("classifier.weight", [labels, H], mat(H, 1.0), False))
    out.append(("classifier.bias", [labels], (0.0, 0.2), False))
    return out


def recipe(variant, salt, vocab, labels):
    entries = []
    for name, shape, (offset, scale), shared in tensor_list(vocab, labels):
        owner = "shared" if shared else variant
        seed = fnv1a64(f"rerank/{salt}/{owner}/{name}") & SEED_MASK
        entries.append({"name": name, "shape": shape, "seed": seed, "offset": offset, "scale": scale})
    return entries


def config_for(vocab, labels):
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        max_position_embeddings=MAXPOS,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=labels,
        architectures=["BertForSequenceClassification"],
    )
    return config


def write_folder(folder: Path, config, entries, tokenizer_dir: Path):
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({e["name"]: recipe_values(e["shape"], e["seed"], e["offset"], e["scale"]) for e in entries},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)


def run(folder: Path, entries):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    # Every tensor was loaded from the recipe (none newly initialised).
    state = model.state_dict()
    for e in entries:
        expected = recipe_values(e["shape"], e["seed"], e["offset"], e["scale"])
        assert np.array_equal(state[e["name"]].numpy(), expected), e["name"]
    queries = [q for q, docs in zip(QUERIES, DOCUMENTS) for _ in docs]
    documents = [d for docs in DOCUMENTS for d in docs]
    batch = tokenizer(queries, documents, truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits.float().numpy()
    pairs = []
    for row in range(len(queries)):
        length = int(batch["attention_mask"][row].sum())
        pairs.append({
            "query": queries[row],
            "document": documents[row],
            "ids": batch["input_ids"][row][:length].tolist(),
            "type_ids": batch["token_type_ids"][row][:length].tolist(),
        })
    # The batch does not change a row's logits: each pair alone gives the same.
    for row, pair in enumerate(pairs):
        single = tokenizer(pair["query"], pair["document"], truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with torch.no_grad():
            alone = model(**single).logits.float().numpy()[0]
        assert np.allclose(alone, logits[row], atol=1e-5), (row, alone, logits[row])
    return pairs, logits


def groups():
    out, start = [], 0
    for docs in DOCUMENTS:
        out.append(list(range(start, start + len(docs))))
        start += len(docs)
    return out


def well_ordered(scores):
    for group in groups():
        values = sorted(scores[i] for i in group)
        if min(b - a for a, b in zip(values, values[1:])) < MIN_GAP:
            return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_models = os.environ.get("MLXSERVER_TEST_MODELS", str(Path.home() / ".cache/mlxserver/models"))
    parser.add_argument("--models", default=default_models)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--tries", type=int, default=32)
    args = parser.parse_args()
    self_test()
    torch.set_num_threads(1)
    tokenizer_dir = Path(args.models) / "all-MiniLM-L6-v2"
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    variants = {"one_label": 1, "two_labels": 2}
    with tempfile.TemporaryDirectory() as tmp:
        for salt in range(args.tries):
            results = {}
            for variant, labels in variants.items():
                entries = recipe(variant, salt, vocab, labels)
                config = config_for(vocab, labels)
                folder = Path(tmp) / f"{variant}-{salt}"
                write_folder(folder, config, entries, tokenizer_dir)
                pairs, logits = run(folder, entries)
                score_label = 1 if labels > 1 else 0
                scores = [float(row[score_label]) for row in logits]
                config_json = json.loads((folder / "config.json").read_text())
                results[variant] = (entries, config_json, pairs, logits, scores, score_label)
            if all(well_ordered(r[4]) for r in results.values()):
                break
        else:
            raise SystemExit(f"no salt below {args.tries} gives well-separated scores")
    pairs = results["one_label"][2]
    assert pairs == results["two_labels"][2]
    assert any(len(p["ids"]) == MAX_TOKENS for p in pairs), "no pair was truncated"
    fixture = {
        "meta": {
            "script": "scripts/reference/make_rerank_reference.py",
            "reference": "transformers BertForSequenceClassification, float32, CPU, one padded batch",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizer_from": "all-MiniLM-L6-v2",
            "tokenizer_files": TOKENIZER_FILES,
            "salt": salt,
            "max_tokens": MAX_TOKENS,
        },
        "groups": groups(),
        "pairs": pairs,
        "models": [
            {
                "name": variant,
                "config": config_json,
                "tensors": entries,
                "score_label": score_label,
                "logits": [[float(f"{v:.7g}") for v in row] for row in logits],
                "scores": [float(f"{s:.7g}") for s in scores],
            }
            for variant, (entries, config_json, _, logits, scores, score_label) in results.items()
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    for model in fixture["models"]:
        print(model["name"], "scores", model["scores"])
    print(f"salt {salt}; wrote {out}")


if __name__ == "__main__":
    main()
