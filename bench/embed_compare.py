"""Embedding throughput side by side, in one run, on the same texts (all-MiniLM-L6-v2):

  numpy                  a plain NumPy/OpenBLAS forward pass (bench/embed_baseline.py)
  sentence-transformers  PyTorch's CPU kernels (when installed in the interpreter's venv)
  /v1/embeddings         mlxserver's server, batches of 32 texts per request, one client
  add-docs               `mlxserver rag add-docs` over a folder with one text per file,
                         end to end (files read, chunked, embedded, written to LanceDB)

usage: ~/.cache/mlxserver/rerankvenv/bin/python bench/embed_compare.py [--texts 256] [--runs 2]
Needs MLXSERVER_BIN and MLXSERVER_TEST_MODELS (scripts/env.sh sets them). Prints a markdown
table and writes JSON lines to bench/results/embed-<date>.jsonl.
"""
import argparse
import datetime
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ["MLXSERVER_BIN"]
MODELS = os.environ["MLXSERVER_TEST_MODELS"]
MODEL = "all-MiniLM-L6-v2"
FOLDER = os.path.join(MODELS, MODEL)

WORDS = ("the of and to in is was for on that with as by at from his her it an are were this which be or "
         "has had not but have they one all their new also after first two been other who more when time "
         "year city during school may over people into world only most some would used three its later "
         "such both through state between under since river music family where while many team national "
         "system around water known game member government season film against work high part well small "
         "house great group company early number public made local include second war country area day "
         "north south west east long built power market order road line light model engine service data").split()


def texts(count):
    """Texts of about 130 tokens (the issue's 132-token chunks), seeded."""
    rng = random.Random(1234)
    out = []
    for _ in range(count):
        n, sentences = rng.randint(106, 132), []
        while n > 0:
            k = min(n, rng.randint(8, 20))
            n -= k
            s = " ".join(rng.choice(WORDS) for _ in range(k))
            sentences.append(s[0].upper() + s[1:] + ".")
        out.append(" ".join(sentences))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def run_baselines(path):
    out = subprocess.run([sys.executable, os.path.join(HERE, "embed_baseline.py"), "--texts", path, "--model", FOLDER, "--impl", "both"],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def run_server(home, corpus, env, runs):
    port = free_port()
    server = subprocess.Popen([BIN, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/api/version", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        post(url + "/v1/embeddings", {"model": MODEL, "input": corpus[:32]})  # load and warm up
        best = 0.0
        tokens = 0
        for _ in range(runs):
            started = time.perf_counter()
            tokens = 0
            for i in range(0, len(corpus), 32):
                tokens += post(url + "/v1/embeddings", {"model": MODEL, "input": corpus[i:i + 32]})["usage"]["prompt_tokens"]
            best = max(best, len(corpus) / (time.perf_counter() - started))
        return {"bench": "embed", "impl": "mlxserver /v1/embeddings", "chunks": len(corpus), "tokens_per_chunk": tokens / len(corpus),
                "chunks_per_s": best, "tokens_per_s": best * tokens / len(corpus)}
    finally:
        server.terminate()
        server.wait()


def run_add_docs(home, corpus, env, runs):
    best = 0.0
    for run in range(runs):
        folder = tempfile.mkdtemp(prefix="embed-docs-")
        for i, text in enumerate(corpus):
            with open(os.path.join(folder, f"note{i:05}.txt"), "w") as f:
                f.write(text)
        started = time.perf_counter()
        output = subprocess.run([BIN, "rag", "add-docs", folder, "--model", MODEL, "--collection", f"bench{run}"], env=env,
                                capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - started
        chunks = int(re.search(r"\((\d+) chunks\)", output).group(1))
        best = max(best, chunks / wall)
    return {"bench": "embed", "impl": "mlxserver rag add-docs (end to end, process start and model load included)", "chunks": chunks,
            "chunks_per_s": best}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    corpus = texts(args.texts)
    home = tempfile.mkdtemp(prefix="embed-home-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXSERVER_") or k in ("MLXSERVER_BIN", "MLXSERVER_TEST_MODELS")}
    env.update({"MLXSERVER_HOME": home, "RUST_LOG": "warn"})
    subprocess.run([BIN, "pull", FOLDER, "--name", MODEL], env=env, check=True, capture_output=True)
    path = os.path.join(home, "texts.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in corpus)

    rows = [r for r in run_baselines(path) if "impl" in r]
    rows.append(run_server(home, corpus, env, args.runs))
    rows.append(run_add_docs(home, corpus, env, args.runs))
    numpy_rate = next((r["chunks_per_s"] for r in rows if r["impl"] == "numpy"), None)
    server_rate = next(r["chunks_per_s"] for r in rows if r["impl"].startswith("mlxserver /v1"))
    print("| implementation | chunks/s | tokens/s | vs NumPy |")
    print("|---|---|---|---|")
    for r in rows:
        ratio = f"{r['chunks_per_s'] / numpy_rate:.2f}x" if numpy_rate else "-"
        tokens = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        print(f"| {r['impl']} | {r['chunks_per_s']:.1f} | {tokens} | {ratio} |")
    add_docs_rate = rows[-1]["chunks_per_s"]
    print(f"\nadd-docs end to end = {add_docs_rate / server_rate:.0%} of /v1/embeddings")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"embed-{datetime.date.today()}.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
