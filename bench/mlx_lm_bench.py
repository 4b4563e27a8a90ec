"""mlx-lm (Python MLX, the same libmlx as mlxserver) on the same model and workload as
engine_bench: prompt tok/s over N prompt tokens and decode tok/s over M greedy tokens, best of R.
Prints one JSON line."""
import argparse
import json
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="mlx-lm")
    args = parser.parse_args()
    model, _ = load(args.model)
    prompt = mx.array([1000 + (i * 7919) % 20000 for i in range(args.prompt_tokens)])
    best_prompt, best_decode = 0.0, 0.0
    for _ in range(args.runs):
        start = time.perf_counter()
        first = None
        count = 0
        for token, _ in generate_step(prompt, model, max_tokens=args.decode_tokens, prefill_step_size=512):
            if first is None:
                first = time.perf_counter()
            count += 1
        end = time.perf_counter()
        best_prompt = max(best_prompt, args.prompt_tokens / (first - start))
        best_decode = max(best_decode, (count - 1) / (end - first))
    print(json.dumps({"engine": args.label, "model": args.model, "prompt_tokens": args.prompt_tokens,
                      "decode_tokens": args.decode_tokens, "prompt_tok_per_s": best_prompt, "decode_tok_per_s": best_decode}))


main()
