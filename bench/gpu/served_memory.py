"""Memory of the served path under concurrent streams: rounds of N concurrent streamed chats
against a running `mlxserver serve` (prefix cache and buffer cache at their defaults), with
MLX's memory (/metrics) and the GPU's (nvidia-smi) sampled every 0.5 s.

usage: python served_memory.py BASE_URL MODEL [--streams 16] [--rounds 4] [--tokens 128]
Prints one JSON line.
"""
import argparse
import json
import subprocess
import threading
import time
import urllib.request

# Only the standard library: the GPU machine's Python has no guaranteed `requests`.


def get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def post(url, body, timeout=900):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def metrics(base):
    text = get(base + "/metrics")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("mlxserver_") and " " in line}


def gpu_used_mib():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except Exception:
        return None


def stream(base, model, prompt, tokens, results):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0.7, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    completion = 0
    with post(base + "/v1/chat/completions", body) as response:
        for line in response:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    completion = chunk["usage"]["completion_tokens"]
    results.append((completion, time.perf_counter() - started))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("model")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    words = "the quick brown fox jumps over a lazy dog while seven curious owls watch from an old oak".split()
    peaks = {}
    gpu_peak = 0.0
    stop = threading.Event()

    def sample():
        nonlocal gpu_peak
        while not stop.is_set():
            gpu_peak = max(gpu_peak, gpu_used_mib() or 0.0)
            try:
                for name, value in metrics(args.base).items():
                    peaks[name] = max(peaks.get(name, 0.0), value)
            except OSError:
                # /metrics waits for the engine thread, which may be compiling kernels.
                pass
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results = []
    rounds = []
    began = time.perf_counter()
    for round_index in range(args.rounds):
        threads = []
        for i in range(args.streams):
            prompt = f"Round {round_index}, reader {i}: " + " ".join(words[(i + k) % len(words)] for k in range(180)) + " Continue the story."
            threads.append(threading.Thread(target=stream, args=(args.base, args.model, prompt, args.tokens, results)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        now = metrics(args.base)
        rounds.append({"round": round_index, "mlx_active_gib": round(now["mlxserver_memory_bytes"] / 2**30, 2),
                       "prefix_cache_gib": round(now["mlxserver_prefix_cache_bytes"] / 2**30, 2), "gpu_used_gib": round((gpu_used_mib() or 0) / 1024, 2)})
    elapsed = time.perf_counter() - began
    stop.set()
    sampler.join()
    models = json.loads(get(args.base + "/api/ps"))["models"]
    print(json.dumps({
        "engine": "mlxserver serve", "streams": args.streams, "rounds": args.rounds, "tokens": args.tokens,
        "completed": len(results), "aggregate_tok_s": round(sum(r[0] for r in results) / elapsed, 1),
        "weights_gib": round(sum(m["size"] for m in models) / 2**30, 2),
        "mlx_peak_gib": round(peaks.get("mlxserver_peak_memory_bytes", 0) / 2**30, 2),
        "mlx_active_peak_gib": round(peaks.get("mlxserver_memory_bytes", 0) / 2**30, 2),
        "buffer_cache_peak_gib": round(peaks.get("mlxserver_cache_memory_bytes", 0) / 2**30, 2),
        "prefix_cache_peak_gib": round(peaks.get("mlxserver_prefix_cache_bytes", 0) / 2**30, 2),
        "gpu_used_peak_gib": round(gpu_peak / 1024, 2), "after_each_round": rounds,
    }))


if __name__ == "__main__":
    main()
