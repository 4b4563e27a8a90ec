#!/usr/bin/env python3
"""Writes a random-weight Llama model as a Hugging Face folder (bfloat16 safetensors, sharded),
for speed measurements at real shapes without downloading weights. Runs where torch is.

  make_random_model.py OUT_DIR TOKENIZER_DIR [--shape 8b|1b|small] [--seed 0]

Shapes: 8b = Llama-3.1-8B (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336);
1b = Llama-3.2-1B (2048, 16, 32, 8, 8192); small = SmolLM2-135M (576, 30, 9, 3, 1536).
The vocabulary is the tokenizer's (SmolLM2's 49152 tokens, copied from TOKENIZER_DIR), so
llama.cpp's converter and mlx-lm accept the folder too.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

SHAPES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192),
    "small": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("tokenizer")
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    vocab = 49152
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def rand(*size, std=0.02):
        return (torch.randn(*size, generator=generator, device=device, dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    tmp = args.out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        if not shard:
            return
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        for key in shard:
            weight_map[key] = name
        shard, shard_bytes = {}, 0

    def add(name, tensor):
        nonlocal shard_bytes
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes > 4 << 30:
            flush()

    add("model.embed_tokens.weight", rand(vocab, hidden, std=1.0))
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        add(f"{p}.input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        add(f"{p}.post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        add(f"{p}.self_attn.q_proj.weight", rand(heads * head_dim, hidden))
        add(f"{p}.self_attn.k_proj.weight", rand(kv * head_dim, hidden))
        add(f"{p}.self_attn.v_proj.weight", rand(kv * head_dim, hidden))
        add(f"{p}.self_attn.o_proj.weight", rand(hidden, heads * head_dim))
        add(f"{p}.mlp.gate_proj.weight", rand(inter, hidden))
        add(f"{p}.mlp.up_proj.weight", rand(inter, hidden))
        add(f"{p}.mlp.down_proj.weight", rand(hidden, inter))
    add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    head = rand(vocab, hidden)
    # Special tokens (EOS among them) get zero logits, which the random others outscore: every
    # engine then decodes the full count of tokens it is asked for.
    head[:17] = 0
    add("lm_head.weight", head)
    flush()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape, "head_dim": head_dim,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        source = os.path.join(args.tokenizer, name)
        if os.path.exists(source):
            shutil.copy(source, tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {args.shape}, {index} shards")


if __name__ == "__main__":
    main()
