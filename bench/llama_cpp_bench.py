"""llama.cpp (llama-cpp-python) on the same GGUF and workload as engine_bench: prompt tok/s
over N prompt tokens and decode tok/s over M greedy tokens, best of R. Prints one JSON line."""
import argparse
import json
import os
import time

import numpy as np

from llama_cpp import Llama


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    threads = os.cpu_count() or 2
    llm = Llama(model_path=args.model, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    prompt = [1000 + (i * 7919) % 20000 for i in range(args.prompt_tokens)]
    n_vocab = llm.n_vocab()

    def next_token():
        # Without logits_all, llama-cpp-python keeps no scores: read the last logits directly.
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

    best_prompt, best_decode = 0.0, 0.0
    for _ in range(args.runs):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_done = time.perf_counter()
        token = next_token()
        decode_start = time.perf_counter()
        for _ in range(args.decode_tokens - 1):
            llm.eval([token])
            token = next_token()
        end = time.perf_counter()
        best_prompt = max(best_prompt, args.prompt_tokens / (prompt_done - start))
        best_decode = max(best_decode, (args.decode_tokens - 1) / (end - decode_start))
    print(json.dumps({"engine": "llama.cpp", "model": args.model, "threads": threads, "prompt_tokens": args.prompt_tokens,
                      "decode_tokens": args.decode_tokens, "prompt_tok_per_s": best_prompt, "decode_tok_per_s": best_decode}))


main()
