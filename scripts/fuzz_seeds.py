#!/usr/bin/env python3
"""Seed inputs for the libFuzzer targets of fuzz/ (scripts/cargo-fuzz.sh), standard library only.

usage: fuzz_seeds.py OUT_DIR    -> OUT_DIR/<target>/<seed files>

Small, valid examples of each file format, so libFuzzer starts from inputs that reach deep
into the parsers: a GGUF header with a byte-level vocabulary and a tensor table, safetensors
files, every families fixture's config.json, Modelfiles, the real chat templates of
tests/fixtures/templates/ and a byte-level BPE tokenizer.json.
"""
import json
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_value(value) -> bytes:
    # (type id, payload) as GGUF v3 stores them
    if isinstance(value, bool):
        return struct.pack("<I", 7) + struct.pack("<?", value)
    if isinstance(value, int):
        return struct.pack("<I", 4) + struct.pack("<I", value)
    if isinstance(value, float):
        return struct.pack("<I", 6) + struct.pack("<f", value)
    if isinstance(value, str):
        return struct.pack("<I", 8) + gguf_string(value)
    if isinstance(value, list) and value and isinstance(value[0], str):
        return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(gguf_string(v) for v in value)
    if isinstance(value, list):
        return struct.pack("<IIQ", 9, 5, len(value)) + b"".join(struct.pack("<i", v) for v in value)
    raise TypeError(value)


def gguf_header() -> bytes:
    letters = "abcdefgh"
    tokens = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [a + b for a in letters for b in letters]
    merges = [f"{a} {b}" for a in letters for b in letters]
    hidden, vocab, ffn = 32, len(tokens), 64
    metadata = {
        "general.architecture": "llama",
        "general.name": "seed",
        "llama.block_count": 1,
        "llama.context_length": 256,
        "llama.embedding_length": hidden,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    # name, dims (fastest first), ggml type (0 F32, 1 F16, 2 Q4_0, 8 Q8_0)
    tensors = [
        ("token_embd.weight", [hidden, vocab], 1),
        ("blk.0.attn_norm.weight", [hidden], 0),
        ("blk.0.attn_q.weight", [hidden, hidden], 2),
        ("blk.0.attn_k.weight", [hidden, hidden // 2], 2),
        ("blk.0.attn_v.weight", [hidden, hidden // 2], 8),
        ("blk.0.attn_output.weight", [hidden, hidden], 2),
        ("blk.0.ffn_norm.weight", [hidden], 0),
        ("blk.0.ffn_gate.weight", [hidden, ffn], 2),
        ("blk.0.ffn_up.weight", [hidden, ffn], 2),
        ("blk.0.ffn_down.weight", [ffn, hidden], 2),
        ("output_norm.weight", [hidden], 0),
    ]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        out += gguf_string(key) + gguf_value(value)
    offset = 0
    for name, dims, kind in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
        offset += 4096  # aligned, generous; the data itself is not part of the seed
    return out + b"\0" * (-len(out) % 32)


def safetensors(tensors) -> bytes:
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        size = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    data = json.dumps(header).encode()
    return struct.pack("<Q", len(data)) + data + b"\0" * offset


def tokenizer_json() -> bytes:
    letters = "abcdefgh"
    vocab = {chr(c): i for i, c in enumerate(range(ord("!"), ord("~") + 1))}
    for a in letters:
        for b in letters:
            vocab[a + b] = len(vocab)
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 0, "content": "!", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a in letters for b in letters]},
    }).encode()


def main():
    out = Path(sys.argv[1])
    seeds = {
        "gguf": {"llama-q4": gguf_header()},
        "safetensors": {
            "two": safetensors([("model.embed_tokens.weight", "F32", [16, 8]), ("model.norm.weight", "BF16", [8])]),
            "quantized": safetensors([("model.layers.0.mlp.up_proj.weight", "U32", [8, 4]),
                                      ("model.layers.0.mlp.up_proj.scales", "F16", [8, 1]),
                                      ("model.layers.0.mlp.up_proj.biases", "F16", [8, 1])]),
        },
        "config": {p.stem: json.dumps(json.loads(p.read_text())["config"]).encode()
                   for p in sorted((REPO / "tests/fixtures/reference/families").glob("*.json"))},
        "modelfile": {
            "system": b'FROM smol\nSYSTEM "You are a cat."\nPARAMETER temperature 0.3\nPARAMETER stop "<|im_end|>"\n',
            "template": b'FROM smol\nTEMPLATE """{{ .System }} {{ .Prompt }}"""\nMESSAGE user Hi\nMESSAGE assistant Hello\n'
                        b'PARAMETER num_ctx 2048\nLICENSE """MIT"""\n',
            "lowercase": b"# comment\nfrom ./model.gguf\nparameter seed 42\nadapter x\n",
        },
        "template": {p.stem: p.read_bytes() for p in sorted((REPO / "tests/fixtures/templates").glob("*.jinja"))},
        "tokenizer": {"bpe": tokenizer_json()},
    }
    for target, files in seeds.items():
        folder = out / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(files)} seeds, largest {max(len(d) for d in files.values())} bytes")


if __name__ == "__main__":
    main()
