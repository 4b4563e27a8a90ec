"""Soak: many concurrent clients against the real server for a bounded time, then a graceful
stop under that load and a restart.

Clients (threads, loopback only) mix streamed OpenAI and Ollama chats, embeddings, RAG
generation (`/generate` with use_rag), model management (tags, show, create and delete a
personality) and clients that hang up mid-stream. A 503 is the server saying "busy": the
client waits `Retry-After` and tries again, and the answer counts as refused-then-served.
Anything else that is not a whole, well-formed answer is a failure.

Reported: requests per kind, failures, 503s, latency p50/p99 per kind, the server's RSS
(after warm-up, peak, end) sampled every second, MLX memory from /metrics, how long a hung-up
client's place took to free, and the stop: in-flight answers finished, exit code, seconds to
exit, seconds until a restarted server answered.

usage: python bench/soak.py [--clients 32] [--seconds 600] [--max-queue 16] [--out bench/results/soak-DATE.jsonl]
Needs MLXSERVER_BIN and MLXSERVER_TEST_MODELS (`. scripts/env.sh`).
"""
import argparse
import collections
import datetime
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import requests

BIN = os.environ["MLXSERVER_BIN"]
MODELS = os.environ["MLXSERVER_TEST_MODELS"]
CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"
HERE = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.", "What is 12 times 7?",
             "Give me a tip for sleeping well.", "Who wrote Hamlet?", "Describe a cat in one sentence."]
FACTS = [f"Fact {i}: the lighthouse on island {i} is painted {c} and its keeper feeds {i % 7 + 2} gulls each morning."
         for i, c in enumerate(["red", "blue", "green", "white", "black", "yellow", "orange", "purple"] * 4)]


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * p))] if ordered else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None


def metrics(base):
    text = requests.get(base + "/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("mlxserver_") and " " in line}


def metric(base, name):
    return metrics(base).get(name)


class Server:
    def __init__(self, home, port, max_queue):
        self.home, self.port = home, port
        self.base = f"http://127.0.0.1:{port}"
        self.env = dict(os.environ, MLXSERVER_HOME=home, RUST_LOG="warn", MLXSERVER_METRICS="true", MLXSERVER_MAX_QUEUE=str(max_queue))
        self.process = None

    def cli(self, *args):
        return subprocess.run([BIN, *args], env=self.env, check=True, capture_output=True, text=True)

    def start(self):
        self.process = subprocess.Popen([BIN, "serve", "--port", str(self.port)], env=self.env)
        started = time.perf_counter()
        while time.perf_counter() - started < 120:
            try:
                if requests.get(self.base + "/health", timeout=1).ok:
                    return time.perf_counter() - started
            except requests.RequestException:
                time.sleep(0.05)
        raise RuntimeError("the server did not start")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency = collections.defaultdict(list)
        self.first_token = collections.defaultdict(list)
        self.failures = collections.Counter()
        self.failure_examples = []
        self.busy = collections.Counter()

    def ok(self, kind, seconds, first=None):
        with self.lock:
            self.latency[kind].append(seconds)
            if first is not None:
                self.first_token[kind].append(first)

    def fail(self, kind, detail):
        with self.lock:
            self.failures[kind] += 1
            if len(self.failure_examples) < 20:
                self.failure_examples.append(f"{kind}: {detail}"[:300])


class Busy(Exception):
    def __init__(self, retry_after):
        self.retry_after = retry_after


def check(response):
    if response.status_code == 503:
        retry = response.headers.get("Retry-After")
        if retry is None:
            raise RuntimeError("503 without Retry-After")
        raise Busy(float(retry))
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")


def openai_stream(base, rng, hang_up=False):
    body = {"model": CHAT, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_tokens": rng.randint(16, 48),
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        check(response)
        done = usage = False
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            if first is None:
                first = time.perf_counter() - started
                if hang_up:
                    return first, None
            if line == b"data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            usage = usage or bool(chunk.get("usage"))
        if not (done and usage):
            raise RuntimeError("the stream ended without usage and [DONE]")
    return first, time.perf_counter() - started


def ollama_stream(base, rng):
    body = {"model": CHAT, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "options": {"num_predict": rng.randint(16, 48)}}
    started = time.perf_counter()
    first = None
    with requests.post(base + "/api/chat", json=body, stream=True, timeout=600) as response:
        check(response)
        last = None
        for line in response.iter_lines():
            if line:
                first = first or time.perf_counter() - started
                last = json.loads(line)
                if "error" in last:
                    raise RuntimeError(last["error"])
        if not (last and last.get("done") and last.get("eval_count")):
            raise RuntimeError(f"the stream ended without a done line: {last}")
    return first, time.perf_counter() - started


def embeddings(base, rng):
    texts = [rng.choice(FACTS) + f" ({rng.random():.6f})" for _ in range(rng.randint(1, 8))]
    started = time.perf_counter()
    response = requests.post(base + "/v1/embeddings", json={"model": EMBED, "input": texts}, timeout=600)
    check(response)
    data = response.json()["data"]
    if len(data) != len(texts) or len(data[0]["embedding"]) != 384:
        raise RuntimeError("wrong embeddings")
    return None, time.perf_counter() - started


def rag_generate(base, rng):
    island = rng.randrange(len(FACTS))
    body = {"personality_name": CHAT, "prompt": f"What colour is the lighthouse on island {island}?", "max_tokens": 24, "stream": False,
            "use_rag": True, "rag": {"collection": "soak", "top_k": 3}}
    started = time.perf_counter()
    response = requests.post(base + "/generate", json=body, timeout=600)
    check(response)
    answer = response.json()
    if not answer.get("sources"):
        raise RuntimeError(f"no sources: {str(answer)[:200]}")
    return None, time.perf_counter() - started


def manage(base, rng, client_id):
    started = time.perf_counter()
    name = f"soak-persona-{client_id}"
    for method, path, body in [
        ("get", "/api/tags", None),
        ("post", "/api/show", {"model": CHAT}),
        ("post", "/api/create", {"model": name, "from": CHAT, "system": "You answer briefly.", "stream": False}),
        ("post", "/api/show", {"model": name}),
        ("get", "/api/ps", None),
        ("delete", "/api/delete", {"model": name}),
    ]:
        response = requests.request(method, base + path, json=body, timeout=600)
        check(response)
    return None, time.perf_counter() - started


KINDS = [("openai_stream", 30), ("ollama_stream", 25), ("embeddings", 20), ("rag_generate", 10), ("manage", 7), ("hang_up", 8)]


def client(base, client_id, deadline, stats, seed):
    rng = random.Random(seed)
    names = [k for k, _ in KINDS]
    weights = [w for _, w in KINDS]
    while time.time() < deadline:
        kind = rng.choices(names, weights)[0]
        for _attempt in range(100):
            try:
                if kind == "openai_stream":
                    first, total = openai_stream(base, rng)
                elif kind == "hang_up":
                    first, total = openai_stream(base, rng, hang_up=True)
                elif kind == "ollama_stream":
                    first, total = ollama_stream(base, rng)
                elif kind == "embeddings":
                    first, total = embeddings(base, rng)
                elif kind == "rag_generate":
                    first, total = rag_generate(base, rng)
                else:
                    first, total = manage(base, rng, client_id)
                stats.ok(kind, total if total is not None else first, first)
                break
            except Busy as busy:
                with stats.lock:
                    stats.busy[kind] += 1
                time.sleep(busy.retry_after)
            except Exception as error:  # any other outcome is a failed request
                stats.fail(kind, repr(error))
                break


def hang_up_release(base):
    """Seconds from a client hanging up mid-stream until /metrics shows its place free."""
    baseline = metric(base, "mlxserver_answers_in_flight")
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 2000, "stream": True}
    response = requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=600)
    lines = response.iter_lines()
    next(line for line in lines if line.startswith(b"data: "))
    response.close()
    gone = time.perf_counter()
    while metric(base, "mlxserver_answers_in_flight") > baseline:
        if time.perf_counter() - gone > 30:
            return None
        time.sleep(0.01)
    return time.perf_counter() - gone


def stop_under_load(server, clients=8):
    """`mlxserver stop` while `clients` answers stream: they must finish, the server exit 0."""
    results = []

    def one():
        try:
            first, total = ollama_stream(server.base, random.Random(), )
            results.append(("ok", total))
        except Exception as error:
            results.append(("failed", repr(error)))

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    asked = time.perf_counter()
    stop = subprocess.run([BIN, "stop"], env=server.env, capture_output=True, text=True)
    code = server.process.wait(timeout=120)
    exited = time.perf_counter() - asked
    for thread in threads:
        thread.join()
    restart = server.start()
    first_answer_started = time.perf_counter()
    requests.post(server.base + "/api/chat", json={"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "stream": False, "options": {"num_predict": 4}}, timeout=120).raise_for_status()
    return {
        "in_flight": clients,
        "finished": sum(1 for r in results if r[0] == "ok"),
        "failed": [r[1] for r in results if r[0] != "ok"],
        "stop_exit_code": stop.returncode,
        "server_exit_code": code,
        "seconds_to_exit": round(exited, 2),
        "restart_seconds_to_health": round(restart, 2),
        "restart_first_answer_seconds": round(time.perf_counter() - first_answer_started, 2),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=600)
    # Answers in flight are capped at engine.max_batch (16) + max_queue; a small queue makes
    # the busy path (503, Retry-After, retry) part of the soak.
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(HERE, "results", f"soak-{datetime.date.today():%Y-%m-%d}.jsonl"))
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="mlxserver-soak-")
    server = Server(home, free_port(), args.max_queue)
    server.cli("pull", os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf"), "--name", CHAT)
    server.cli("pull", os.path.join(MODELS, "all-MiniLM-L6-v2"), "--name", EMBED)
    weights = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(os.path.join(home, "models")) for f in files)
    server.start()
    try:
        documents = [{"source": f"island-{i}.txt", "text": fact} for i, fact in enumerate(FACTS)]
        requests.post(server.base + "/api/rag/documents", json={"collection": "soak", "model": EMBED, "documents": documents}, timeout=600).raise_for_status()
        # Warm-up: both models loaded once before the clock starts.
        embeddings(server.base, random.Random(0))
        openai_stream(server.base, random.Random(0))
        rss_start = rss_bytes(server.process.pid)

        stats = Stats()
        samples = []
        deadline = time.time() + args.seconds
        threads = [threading.Thread(target=client, args=(server.base, i, deadline, stats, i)) for i in range(args.clients)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        peaks = collections.Counter()
        while any(thread.is_alive() for thread in threads):
            samples.append(rss_bytes(server.process.pid) or 0)
            try:
                for name, value in metrics(server.base).items():
                    peaks[name] = max(peaks[name], value)
            except requests.RequestException:
                pass
            time.sleep(1)
        elapsed = time.perf_counter() - began
        rss_end = rss_bytes(server.process.pid)
        release = hang_up_release(server.base)
        cache = metric(server.base, "mlxserver_cache_memory_bytes")
        stop = stop_under_load(server)
    finally:
        if server.process and server.process.poll() is None:
            server.process.terminate()
            server.process.wait(timeout=60)
        shutil.rmtree(home, ignore_errors=True)

    kinds = {}
    for kind, _ in KINDS:
        values = stats.latency.get(kind, [])
        firsts = stats.first_token.get(kind, [])
        kinds[kind] = {"ok": len(values), "failed": stats.failures[kind], "busy_503": stats.busy[kind],
                       "p50_s": round(percentile(values, 0.5), 3) if values else None, "p99_s": round(percentile(values, 0.99), 3) if values else None,
                       "first_token_p50_s": round(percentile(firsts, 0.5), 3) if firsts else None, "first_token_p99_s": round(percentile(firsts, 0.99), 3) if firsts else None}
    mib = lambda b: round(b / 2**20, 1) if b else None
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "clients": args.clients, "max_queue": args.max_queue, "seconds": round(elapsed, 1),
        "requests": sum(k["ok"] for k in kinds.values()), "failures": sum(stats.failures.values()), "busy_503": sum(stats.busy.values()),
        "failure_examples": stats.failure_examples,
        "weights_mib": mib(weights),
        "rss_mib": {"after_warmup": mib(rss_start), "peak": mib(max(samples) if samples else 0), "end": mib(rss_end)},
        # Peaks of the sampled gauges: MLX arrays in use, MLX's buffer cache, the prefix cache.
        "mlx_peak_mib": mib(peaks["mlxserver_peak_memory_bytes"]), "mlx_active_peak_mib": mib(peaks["mlxserver_memory_bytes"]),
        "mlx_buffer_cache_peak_mib": mib(peaks["mlxserver_cache_memory_bytes"]), "prefix_cache_peak_mib": mib(peaks["mlxserver_prefix_cache_bytes"]),
        "answers_in_flight_peak": peaks["mlxserver_answers_in_flight"], "mlx_cache_after_mib": mib(cache),
        "hung_up_place_freed_s": round(release, 3) if release is not None else None,
        "kinds": kinds, "stop_under_load": stop,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as out:
        out.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
    print()
    print("| kind | ok | failed | 503 then retried | p50 s | p99 s | first token p50 / p99 s |")
    print("|---|---|---|---|---|---|---|")
    for kind, row in kinds.items():
        ft = f"{row['first_token_p50_s']} / {row['first_token_p99_s']}" if row["first_token_p50_s"] is not None else "-"
        print(f"| {kind} | {row['ok']} | {row['failed']} | {row['busy_503']} | {row['p50_s']} | {row['p99_s']} | {ft} |")
    if result["failures"] or stop["finished"] != stop["in_flight"] or stop["server_exit_code"] != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
