"""Python baselines for embedding throughput: all-MiniLM-L6-v2 (sentence-transformers folder).

Two implementations over the same texts, batch size and tokenization:
  numpy  a plain NumPy float32 forward pass of the 6-layer BERT encoder, mean pooling over real
         tokens and L2 normalisation (what sentence-transformers does for this model); texts are
         sorted by length and padded per batch.
  st     sentence_transformers.SentenceTransformer(folder, device="cpu").encode(texts, batch_size).

Each prints one JSON line: {"bench":"embed","impl":..,"chunks":N,"tokens_per_chunk":mean tokens
incl. [CLS]/[SEP],"chunks_per_s":..,"tokens_per_s":..,"threads":..,"blas":..} (one warm-up batch
first). With both, a last line gives the max abs difference of the first 8 embeddings.

Interpreter: ~/.cache/mlxserver/rerankvenv/bin/python (numpy, tokenizers, safetensors, torch,
sentence-transformers, scipy, threadpoolctl). Any venv with numpy + tokenizers runs --impl numpy;
without scipy, erf falls back to Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7), without safetensors
the file is parsed by hand. Do not preload a system BLAS; leave OPENBLAS_CORETYPE unset.

  ~/.cache/mlxserver/rerankvenv/bin/python bench/embed_baseline.py --texts texts.jsonl \
      [--model ~/.cache/mlxserver/models/all-MiniLM-L6-v2] [--batch 32] [--impl numpy|st|both] \
      [--out first8.json]
--texts is JSON Lines, one JSON string per line.
"""
import argparse
import json
import os
import time

import numpy as np
from tokenizers import Tokenizer

try:
    from scipy.special import erf
    ERF = "scipy.special.erf"
except ImportError:
    ERF = "Abramowitz-Stegun 7.1.26 (numpy)"

    def erf(x):
        s, a = np.sign(x), np.abs(x)
        t = 1.0 / (1.0 + 0.3275911 * a)
        p = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        return (s * (1.0 - p * np.exp(-a * a))).astype(np.float32)


def load_weights(path):
    try:
        from safetensors.numpy import load_file
        return load_file(path)
    except ImportError:  # plain parse: u64 header length, JSON header, raw little-endian data
        raw = open(path, "rb").read()
        n = int.from_bytes(raw[:8], "little")
        dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
        out = {}
        for k, v in json.loads(raw[8:8 + n]).items():
            if k != "__metadata__":
                a, b = v["data_offsets"]
                out[k] = np.frombuffer(raw[8 + n + a:8 + n + b], dtypes[v["dtype"]]).reshape(v["shape"])
        return out


def blas_info():
    cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    desc = f"{cfg.get('name')} {cfg.get('version')}"
    try:
        from threadpoolctl import threadpool_info
        for i in threadpool_info():
            if i["user_api"] == "blas" and "numpy" in i["filepath"]:
                return f"{desc} ({i['internal_api']}, {i.get('architecture')}, {i['num_threads']} threads)", i["num_threads"]
    except ImportError:
        pass
    return desc, int(os.environ.get("OPENBLAS_NUM_THREADS", os.cpu_count()))


class NumpyBert:
    def __init__(self, folder):
        cfg = json.load(open(os.path.join(folder, "config.json")))
        w = load_weights(os.path.join(folder, "model.safetensors"))
        lin = lambda k: k.startswith("encoder.") and k.endswith(".weight") and "LayerNorm" not in k
        self.w = {k: np.ascontiguousarray(v.T if lin(k) else v, dtype=np.float32)  # linears -> (in, out)
                  for k, v in w.items() if k.startswith(("embeddings.", "encoder.")) and k != "embeddings.position_ids"}
        self.heads, self.layers, self.eps = cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["layer_norm_eps"]

    def ln(self, x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * self.w[p + ".weight"] + self.w[p + ".bias"]

    def lin(self, x, p):  # x: (tokens, in); weights pre-transposed to (in, out)
        return x @ self.w[p + ".weight"] + self.w[p + ".bias"]

    def __call__(self, ids, mask):
        w, (b, n), h = self.w, ids.shape, self.heads
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self.ln(x, "embeddings.LayerNorm").reshape(b * n, -1)  # all linears run on (b*n, hidden)
        d = x.shape[-1] // h
        bias = np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
        scale = np.float32(1.0 / np.sqrt(d))
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (np.ascontiguousarray(self.lin(x, p + "attention.self." + t).reshape(b, n, h, d)
                                            .transpose(0, 2, 1, 3)) for t in ("query", "key", "value"))
            s = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(0, 2, 1, 3).reshape(b * n, h * d)
            x = self.ln(self.lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            g = self.lin(x, p + "intermediate.dense")
            g = g * np.float32(0.5) * (np.float32(1.0) + erf(g * np.float32(1 / np.sqrt(2))))
            x = self.ln(self.lin(g, p + "output.dense") + x, p + "output.LayerNorm")
        x, m = x.reshape(b, n, -1), mask[:, :, None].astype(np.float32)
        e = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def run_numpy(folder, texts, batch, max_len):
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.no_padding()  # tokenizer.json pads/truncates to 128; sentence-transformers uses max_seq_length
    tok.enable_truncation(max_len)
    model = NumpyBert(folder)

    def embed(sub):
        enc = tok.encode_batch(sub)
        order = sorted(range(len(sub)), key=lambda i: -len(enc[i].ids))
        out = np.zeros((len(sub), model.w["embeddings.LayerNorm.weight"].size), np.float32)
        for s in range(0, len(sub), batch):
            idx = order[s:s + batch]
            n = max(len(enc[i].ids) for i in idx)
            ids = np.zeros((len(idx), n), np.int64)
            mask = np.zeros((len(idx), n), np.int64)
            for r, i in enumerate(idx):
                ids[r, :len(enc[i].ids)], mask[r, :len(enc[i].ids)] = enc[i].ids, 1
            out[idx] = model(ids, mask)
        return out, sum(len(e.ids) for e in enc)

    embed(texts[:batch])  # warm-up
    t0 = time.perf_counter()
    out, ntok = embed(texts)  # timed: tokenization included, as in encode()
    dt = time.perf_counter() - t0
    blas, threads = blas_info()
    return out, ntok, dt, threads, f"numpy {np.__version__}, {blas}, erf: {ERF}"


def run_st(folder, texts, batch):
    import torch
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(folder, device="cpu")
    model.encode(texts[:batch], batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    out = model.encode(texts, batch_size=batch, convert_to_numpy=True)
    dt = time.perf_counter() - t0
    prep = getattr(model, "preprocess", None) or model.tokenize  # tokenize() is deprecated in 6.x
    ntok = int(prep(texts)["attention_mask"].sum())  # real tokens incl. [CLS]/[SEP]
    blas = f"torch {torch.__version__} (MKL {torch.backends.mkl.is_available()}, oneDNN {torch.backends.mkldnn.is_available()})"
    return out, ntok, dt, torch.get_num_threads(), blas


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", required=True)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/mlxserver/models/all-MiniLM-L6-v2"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--impl", choices=["numpy", "st", "both"], default="both")
    ap.add_argument("--out")
    args = ap.parse_args()
    texts = [json.loads(line) for line in open(args.texts) if line.strip()]
    max_len = json.load(open(os.path.join(args.model, "sentence_bert_config.json")))["max_seq_length"]
    results = {}
    runs = [("numpy", "numpy"), ("st", "sentence-transformers")]
    for key, name in runs:
        if args.impl not in (key, "both"):
            continue
        if key == "st":
            try:
                import sentence_transformers  # noqa: F401
            except ImportError as e:
                print(json.dumps({"bench": "embed", "impl": name, "unavailable": str(e)}), flush=True)
                continue
        out, ntok, dt, threads, blas = (run_numpy(args.model, texts, args.batch, max_len) if key == "numpy"
                                        else run_st(args.model, texts, args.batch))
        results[name] = out
        print(json.dumps({"bench": "embed", "impl": name, "chunks": len(texts),
                          "tokens_per_chunk": round(ntok / len(texts), 2),
                          "chunks_per_s": round(len(texts) / dt, 2), "tokens_per_s": round(ntok / dt, 1),
                          "threads": threads, "blas": blas}), flush=True)
    if len(results) == 2:
        diff = float(np.abs(results["numpy"][:8] - results["sentence-transformers"][:8]).max())
        print(json.dumps({"bench": "embed", "check": "numpy vs sentence-transformers, first 8",
                          "max_abs_diff": diff}), flush=True)
    if args.out and results:
        json.dump({k: v[:8].tolist() for k, v in results.items()}, open(args.out, "w"))


if __name__ == "__main__":
    main()
