"""Serving benchmarks against the real server binary and the real SmolLM2 model.

  throughput  1, 4 and 16 concurrent streaming clients (/v1/chat/completions): aggregate
              tokens/s and time to first token p50/p99.
  overhead    one client, /api/generate: wall time seen by the client minus the engine's own
              prompt-eval and eval time that the server reports = server overhead per request.
  prefix      time to first token of turn 10 of a growing chat, prefix cache on and off.
  structured  decode tokens/s of the same request with and without a JSON schema (the cost of
              constrained decoding per token).

usage: python bench/serve_bench.py [--sections throughput,overhead,prefix,structured] [--quick]
Needs MLXSERVER_BIN and MLXSERVER_TEST_MODELS (scripts/env.sh sets them). Prints markdown
tables and writes JSON lines to bench/results/.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time

import requests

BIN = os.environ["MLXSERVER_BIN"]
MODELS = os.environ["MLXSERVER_TEST_MODELS"]
MODEL = "SmolLM2-135M-Instruct"
HERE = os.path.dirname(os.path.abspath(__file__))


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * p))]


class Server:
    def __init__(self, env=None):
        self.home = tempfile.mkdtemp(prefix="mlxserver-bench-")
        environment = dict(os.environ, MLXSERVER_HOME=self.home, RUST_LOG="warn", **(env or {}))
        subprocess.run([BIN, "pull", os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf"), "--name", MODEL], env=environment, check=True, capture_output=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([BIN, "serve", "--port", str(port)], env=environment)
        for _ in range(600):
            try:
                if requests.get(self.base + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        # Load the model before anything is timed.
        requests.post(self.base + "/api/generate", json={"model": MODEL, "prompt": "", "keep_alive": -1}).raise_for_status()

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=60)
        shutil.rmtree(self.home, ignore_errors=True)


def stream_chat(base, messages, max_tokens, extra=None):
    """One streaming chat request: (seconds to first token, tokens, total seconds, text)."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    started = time.perf_counter()
    first = None
    tokens = 0
    text = []
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - started
                    text.append(piece)
    return first or 0.0, tokens, time.perf_counter() - started, "".join(text)


def throughput(server, quick, emit):
    rows = []
    max_tokens = 32 if quick else 64
    for clients in ([1, 4] if quick else [1, 4, 16]):
        results = [None] * clients
        def worker(index):
            prompt = f"Write a short story about a robot named Unit {index}."
            results[index] = stream_chat(server.base, [{"role": "user", "content": prompt}], max_tokens)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        ttfts = [r[0] for r in results]
        total = sum(r[1] for r in results)
        row = {"bench": "throughput", "clients": clients, "tokens": total, "seconds": wall, "aggregate_tok_per_s": total / wall,
               "ttft_p50_ms": percentile(ttfts, 0.5) * 1000, "ttft_p99_ms": percentile(ttfts, 0.99) * 1000}
        emit(row)
        rows.append(row)
    print("\n| clients | aggregate tok/s | TTFT p50 (ms) | TTFT p99 (ms) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['aggregate_tok_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |")


def overhead(server, quick, emit):
    samples = []
    for i in range(3 if quick else 10):
        body = {"model": MODEL, "prompt": f"Count to {i + 3}.", "stream": False, "options": {"num_predict": 16, "temperature": 0}}
        started = time.perf_counter()
        response = requests.post(server.base + "/api/generate", json=body).json()
        wall = time.perf_counter() - started
        engine = (response["prompt_eval_duration"] + response["eval_duration"]) / 1e9
        samples.append((wall - engine) * 1000)
    row = {"bench": "overhead", "requests": len(samples), "overhead_ms_p50": percentile(samples, 0.5), "overhead_ms_max": max(samples)}
    emit(row)
    print(f"\nServer overhead per request (client wall time minus engine prompt+eval time, {len(samples)} requests): "
          f"p50 {row['overhead_ms_p50']:.1f} ms, max {row['overhead_ms_max']:.1f} ms")


def prefix(quick, emit):
    turns = 4 if quick else 10
    system = "You are a meticulous assistant for a small bakery. " * 20
    results = {}
    for label, env in [("prefix cache on", {}), ("prefix cache off", {"MLXSERVER_ENGINE_PREFIX_CACHE": "0"})]:
        server = Server(env)
        try:
            messages = [{"role": "system", "content": system}]
            ttft = None
            for turn in range(turns):
                messages.append({"role": "user", "content": f"Question {turn + 1}: suggest one bread for day {turn + 1}."})
                ttft, _, _, text = stream_chat(server.base, messages, 24)
                messages.append({"role": "assistant", "content": text})
            prompt_tokens = requests.post(server.base + "/api/chat", json={"model": MODEL, "messages": messages[:-1], "stream": False, "options": {"num_predict": 1}}).json()["prompt_eval_count"]
            results[label] = (ttft, prompt_tokens)
            emit({"bench": "prefix", "mode": label, "turn": turns, "ttft_ms": ttft * 1000, "prompt_tokens": prompt_tokens})
        finally:
            server.close()
    print(f"\n| turn {turns} of a chat | prompt tokens | time to first token (ms) |\n|---|---|---|")
    for label, (ttft, tokens) in results.items():
        print(f"| {label} | {tokens} | {ttft * 1000:.0f} |")


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "tags"],
}


def structured(server, quick, emit):
    rows = {}
    for label, extra in [("free text", {}), ("json_schema", {"format": SCHEMA}), ("json", {"format": "json"})]:
        rates = []
        per_token = []
        for seed in range(2 if quick else 5):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Invent a user profile as JSON."}], "stream": False,
                    "options": {"num_predict": 64, "seed": seed}, **extra}
            response = requests.post(server.base + "/api/chat", json=body).json()
            rates.append(response["eval_count"] / (response["eval_duration"] / 1e9))
            per_token.append(response["eval_duration"] / 1e6 / response["eval_count"])
        rows[label] = (statistics.median(rates), statistics.median(per_token))
        emit({"bench": "structured", "mode": label, "decode_tok_per_s": rows[label][0], "ms_per_token": rows[label][1]})
    base = rows["free text"][1]
    print("\n| output | decode tok/s | ms per token | cost per token vs free text |\n|---|---|---|---|")
    for label, (rate, ms) in rows.items():
        print(f"| {label} | {rate:.1f} | {ms:.1f} | {ms - base:+.2f} ms |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="throughput,overhead,prefix,structured")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sections = args.sections.split(",")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", time.strftime("serve-%Y%m%d-%H%M%S.jsonl"))
    with open(path, "w") as out:
        def emit(row):
            out.write(json.dumps(row) + "\n")
            out.flush()
        if {"throughput", "overhead", "structured"} & set(sections):
            server = Server()
            try:
                if "throughput" in sections:
                    throughput(server, args.quick, emit)
                if "overhead" in sections:
                    overhead(server, args.quick, emit)
                if "structured" in sections:
                    structured(server, args.quick, emit)
            finally:
                server.close()
        if "prefix" in sections:
            prefix(args.quick, emit)
    print(f"\nraw results: {path}")


if __name__ == "__main__":
    main()
