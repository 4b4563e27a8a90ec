#!/usr/bin/env python3
"""Record what llama.cpp's own converter (convert_hf_to_gguf.py) makes of each tiny family model.

Writes tests/fixtures/reference/gguf/<gguf arch>.json: every metadata key and value of the GGUF
file the converter writes (the tokenizer's long arrays as length + sha256), and every tensor's
name, dims (GGUF order, fastest first), ggml type and the sha256 of its data bytes.
tests/it/gguf_families.rs writes the same GGUF with a small Rust writer from the same recipe,
asserts it equals this record bit for bit, then loads it and compares the model's logits and
greedy tokens with mlx-lm's (tests/fixtures/reference/families/<family>.json). No weights are
stored: the models are rebuilt from the recipe in the families fixtures.

How to run (from the repository root, ~1 min):

    ~/.cache/mlxserver/compat-venv/bin/pip download --no-deps --no-binary :all: \
        llama-cpp-python==0.3.36 -d /tmp/lcp && tar -xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    # any venv with torch, transformers, safetensors, numpy, sentencepiece, pyyaml, tqdm, requests
    ~/.cache/mlxserver/rerankvenv/bin/python scripts/reference/make_gguf_references.py \
        [--llama-cpp /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp] [--only qwen3,phi3] [--keep DIR]

The converter runs unmodified except for its tokenizer step (see TOKENIZER below): the tiny
models have no real tokenizer, so each folder gets a 512-token byte-level BPE vocabulary
(256 GPT-2 byte symbols + 256 merges of two letters a..p) and the converter is told
`tokenizer.ggml.pre = "gpt-2"` instead of hashing a test string (the hash of a made-up
vocabulary is in no table) and, for gemma2 (whose converter only knows SentencePiece), to use
its GPT-2 vocabulary path (_set_vocab_gpt2, which gemma3 uses when there is no
tokenizer.model). Weights and hyper-parameters go through the converter's own code.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FAMILIES_DIR = REPO / "tests" / "fixtures" / "reference" / "families"
OUT_DIR = REPO / "tests" / "fixtures" / "reference" / "gguf"
DEFAULT_LCP = Path("/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp")
LCP_PYTHON_VERSION = "0.3.36"
LCP_COMMIT = "0c1e57098"  # llama-cpp-python 0.3.36's CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@0c1e57098"

# llama.cpp architecture -> (families fixture, outtype). f16 for two families as well.
ARCHS = {
    "llama": ("llama", ["f32", "f16"]),
    "qwen2": ("qwen2", ["f32"]),
    "qwen3": ("qwen3", ["f32", "f16"]),
    "qwen3moe": ("qwen3_moe", ["f32"]),
    "gemma2": ("gemma2", ["f32"]),
    "gemma3": ("gemma3_text", ["f32"]),
    "phi3": ("phi3", ["f32"]),
    "olmo2": ("olmo2", ["f32"]),
    "granite": ("granite", ["f32"]),
    "smollm3": ("smollm3", ["f32"]),
    "exaone4": ("exaone4", ["f32"]),
    "cohere2": ("cohere2", ["f32"]),
}

# Arrays longer than this are recorded as length + sha256 (the tokenizer's).
SHORT_ARRAY = 64

# Architectures whose converter cannot take the families model as it is: the config changes
# that make it convertible. llama.cpp's qwen3moe has no dense layers (every block has
# experts), so the variant makes layer 0 sparse as well: its router and experts follow the
# recipe of layer 1's (same distributions, seeds from the same formula on their own names).
# The variant has its own salt (every seed recomputed with it): with the families salt the
# greedy path under llama.cpp repeats one token; salt 0..23 were tried with
# `make_gguf_llama_cpp_references.py --only qwen3moe --try-salts 24` and this one gives the
# most distinct greedy ids, then the largest smallest margin.
VARIANTS = {
    "qwen3moe": {"changes": {"mlp_only_layers": []}, "salt": 21},
}


def fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def variant_fixture(arch: str, fixture: dict, salt: int | None = None) -> dict | None:
    """The families fixture with VARIANTS[arch] applied: config and tensor recipe (the
    prompt stays; mlx-lm's numbers do not apply to it)."""
    if arch not in VARIANTS:
        return None
    assert arch == "qwen3moe", "only qwen3moe's variant is written here"
    changes = VARIANTS[arch]["changes"]
    family = fixture["family"]
    salt = VARIANTS[arch]["salt"] if salt is None else salt
    config = dict(fixture["config"], **changes)
    layers = config["num_hidden_layers"]
    by_name = {t["name"]: t for t in fixture["tensors"]}
    # a sparse layer of the original (the pattern every layer now follows)
    sparse = next(l for l in range(layers) if f"model.layers.{l}.mlp.gate.weight" in by_name)
    tensors = []
    for t in fixture["tensors"]:
        prefix = "model.layers."
        if t["name"].startswith(prefix):
            layer = int(t["name"][len(prefix):].split(".")[0])
            if layer not in config["mlp_only_layers"] and ".mlp." in t["name"] and f"model.layers.{layer}.mlp.gate.weight" not in by_name:
                continue  # the dense MLP of a layer that becomes sparse
        tensors.append(dict(t, seed=fnv1a64(f"{family}/{salt}/{t['name']}") & ((1 << 52) - 1)))
        if t["name"].endswith("self_attn.k_norm.weight"):
            layer = int(t["name"][len(prefix):].split(".")[0])
            if f"model.layers.{layer}.mlp.gate.weight" in by_name or layer in config["mlp_only_layers"]:
                continue
            for pattern in [x for x in fixture["tensors"] if x["name"].startswith(f"model.layers.{sparse}.mlp.")]:
                name = pattern["name"].replace(f"model.layers.{sparse}.", f"model.layers.{layer}.", 1)
                seed = fnv1a64(f"{family}/{salt}/{name}") & ((1 << 52) - 1)
                tensors.append(dict(pattern, name=name, seed=seed))
    seeds = [t["seed"] for t in tensors]
    assert len(set(seeds)) == len(seeds)
    return dict(fixture, config=config, tensors=tensors, variant_changes=changes, variant_salt=salt)


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def recipe_values(shape, seed: int, offset: float, scale: float) -> np.ndarray:
    """The families recipe (scripts/reference/make_family_references.py, recipe_values)."""
    n = int(np.prod(shape))
    idx = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = splitmix64(np.uint64(seed) + idx)
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    v = offset + scale * (2.0 * u - 1.0)
    return v.astype(np.float32).reshape(shape)


# ------------------------------------------------------------------------------------------
# TOKENIZER: 256 byte symbols (GPT-2's bytes_to_unicode, id = byte value) + 256 merges
# "x y" of the letters a..p (id 256 + 16*i + j for letters i, j). tests/it/gguf_families.rs
# rebuilds the same token list.
LETTERS = "abcdefghijklmnop"


def bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def vocab_tokens() -> tuple[list[str], list[str]]:
    tokens = bytes_to_unicode()
    merges = []
    for a in LETTERS:
        for b in LETTERS:
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    assert len(tokens) == 512 and len(set(tokens)) == 512
    return tokens, merges


def write_tokenizer(folder: Path, cfg: dict):
    tokens, merges = vocab_tokens()
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    bos, eos = tokens[cfg["bos_token_id"]], tokens[cfg["eos_token_id"]]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        # phi3's converter reads tokenizer_class and takes its GPT-2 path for GPT2Tokenizer.
        "tokenizer_class": "GPT2Tokenizer", "bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos,
        "add_bos_token": False, "model_max_length": cfg["max_position_embeddings"],
    }, ensure_ascii=False))


def write_folder(folder: Path, fixture: dict):
    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(fixture["config"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    arrays = {t["name"]: recipe_values(t["shape"], t["seed"], t["offset"], t["scale"]) for t in fixture["tensors"]}
    save_file(arrays, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(folder, cfg)


# ------------------------------------------------------------------------------------------
# Running the converter (in a child process: `--convert FOLDER OUTFILE OUTTYPE`).

def convert_child(lcp: Path, folder: str, outfile: str, outtype: str):
    sys.path.insert(0, str(lcp))
    sys.path.insert(1, str(lcp / "gguf-py"))
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", outfile, "--outtype", outtype]
    import convert_hf_to_gguf as conv  # noqa: E402
    from conversion import base, gemma  # noqa: E402

    # TOKENIZER (see the module docstring): a made-up vocabulary has no known pre-tokenizer
    # hash; gemma2's converter only reads SentencePiece files.
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"

    def gemma2_vocab(self):
        self._set_vocab_gpt2()
        self.gguf_writer.add_add_space_prefix(False)

    gemma.Gemma2Model.set_vocab = gemma2_vocab
    conv.main()


def run_converter(lcp: Path, folder: Path, outfile: Path, outtype: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_LOCAL_GGUF="")
    env.pop("NO_LOCAL_GGUF")
    cmd = [sys.executable, __file__, "--llama-cpp", str(lcp), "--convert", str(folder), str(outfile), outtype]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converter failed for {folder.name} ({outtype}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stderr


# ------------------------------------------------------------------------------------------
# Reading the GGUF back with gguf-py's GGUFReader.

def field_record(field, gguf):
    VT = gguf.GGUFValueType
    kind = VT(int(field.types[0]))
    if kind == VT.ARRAY:
        item = VT(int(field.types[1])) if len(field.types) > 1 else None
        n = len(field.data)
        # raw bytes of the items as stored (strings: u64 length + UTF-8 bytes)
        raw = b"".join(bytes(field.parts[i].tobytes()) for i in range(5, len(field.parts)))
        rec = {"type": "array", "item_type": item.name.lower() if item else None, "len": n}
        if n > SHORT_ARRAY:
            rec["sha256"] = hashlib.sha256(raw).hexdigest()
        else:
            rec["value"] = field.contents()
        return rec
    value = field.contents()
    if isinstance(value, (np.floating, float)) and kind in (VT.FLOAT32, VT.FLOAT64):
        value = float(value)
    elif isinstance(value, (np.integer,)):
        value = int(value)
    elif isinstance(value, np.bool_):
        value = bool(value)
    return {"type": kind.name.lower(), "value": value}


def read_gguf(lcp: Path, path: Path):
    sys.path.insert(0, str(lcp / "gguf-py"))
    import gguf  # noqa: E402
    reader = gguf.GGUFReader(str(path))
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        metadata[name] = field_record(field, gguf)
    tensors = []
    for t in reader.tensors:
        tensors.append({
            "name": t.name,
            "dims": [int(d) for d in t.shape],  # GGUF order: fastest-varying first
            "ggml_type": t.tensor_type.name,
            "ggml_type_id": int(t.tensor_type),
            "n_bytes": int(t.n_bytes),
            "sha256": hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest(),
        })
    return {"gguf_version": int(reader.fields["GGUF.version"].contents()), "alignment": reader.alignment,
            "metadata": metadata, "tensors": tensors}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", default=str(DEFAULT_LCP))
    ap.add_argument("--only", default="")
    ap.add_argument("--keep", default="", help="keep the folders and GGUF files here")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--convert", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    lcp = Path(args.llama_cpp)
    if args.convert:
        convert_child(lcp, *args.convert)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mlxserver-gguf-"))
    try:
        for arch, (family, outtypes) in ARCHS.items():
            if args.only and arch not in args.only.split(","):
                continue
            print(f"[{arch}] from families/{family}.json", flush=True)
            fixture = json.loads((FAMILIES_DIR / f"{family}.json").read_text())
            variant = variant_fixture(arch, fixture)
            fixture = variant or fixture
            # the folder's name becomes general.name; keep it fixed
            folder = tmp / family / "tiny"
            write_folder(folder, fixture)
            files = {}
            refused = None
            for outtype in outtypes:
                gguf_path = tmp / family / f"tiny-{outtype}.gguf"
                try:
                    run_converter(lcp, folder, gguf_path, outtype)
                except RuntimeError as error:
                    # recorded, and the Rust test skips the family with this reason
                    last = [l for l in str(error).splitlines() if l.strip()][-1]
                    refused = f"convert_hf_to_gguf.py --outtype {outtype} failed: {last}"
                    print(f"  {refused}", flush=True)
                    break
                files[outtype] = read_gguf(lcp, gguf_path)
                print(f"  {outtype}: {len(files[outtype]['tensors'])} tensors, "
                      f"{len(files[outtype]['metadata'])} keys", flush=True)
            rec = {
                "arch": arch,
                "family": family,
                "families_fixture": f"tests/fixtures/reference/families/{family}.json",
                "families_salt": fixture["salt"],
                "converter": {
                    "script": "convert_hf_to_gguf.py (llama.cpp, vendored in the llama-cpp-python sdist)",
                    "llama_cpp_python": LCP_PYTHON_VERSION,
                    "llama_cpp_commit": LCP_COMMIT,
                    "gguf_py_version": gguf_py_version(lcp),
                    "folder_name": "tiny",
                    "tokenizer": "512-token byte-level BPE made up here (see the script's TOKENIZER); "
                                 "tokenizer.ggml.pre forced to gpt-2",
                },
                "files": files,
            }
            if variant:
                # what the Rust test builds instead of the families model (config and recipe)
                rec["variant"] = {"changes": variant["variant_changes"], "salt": variant["variant_salt"],
                                  "config": variant["config"], "tensors": variant["tensors"]}
            if refused:
                rec["converter_refused"] = refused
            path = out / f"{arch}.json"
            path.write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
            print(f"  wrote {path}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def gguf_py_version(lcp: Path) -> str:
    for line in (lcp / "gguf-py" / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    return "?"


if __name__ == "__main__":
    main()
