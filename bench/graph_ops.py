"""Counts the operations of one decode step, ours against mlx-lm's, on the same model folder.

    python bench/graph_ops.py FOLDER OURS.dot      # writes mlx-lm's graph beside, prints both

OURS.dot comes from running mlxserver's engine with MLXSERVER_DUMP_GRAPH=OURS.dot (the first
pipelined decode step is written). Per-step host cost on a GPU grows with the number of
operations MLX encodes, so a count by kind shows where a step has more work than mlx-lm's.
"""
import collections
import re
import sys

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache


def mlx_lm_graph(folder, path):
    model, _ = load(folder)
    cache = make_prompt_cache(model)
    prompt = mx.array([[1] * 16])
    logits = model(prompt, cache=cache)
    mx.eval(logits, [c.state for c in cache])
    token = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(token)
    logits = model(token[:, None], cache=cache)
    step = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32)
    mx.export_to_dot(path, step)


def count(path):
    text = open(path).read()
    # Primitive nodes are boxes labelled with the primitive's name; arrays are ovals/records.
    labels = re.findall(r'\[label\s*=\s*"([^"]+)"[^\]]*shape\s*=\s*"?box', text)
    if not labels:
        labels = [l for l in re.findall(r'label\s*=\s*"([^"]+)"', text) if not re.match(r"^[\d,\s()]*$", l)]
    kinds = collections.Counter(re.sub(r"\s*\(.*", "", l).strip() for l in labels)
    return kinds


if __name__ == "__main__":
    folder, ours = sys.argv[1], sys.argv[2]
    theirs = ours.replace(".dot", "") + "-mlxlm.dot"
    mlx_lm_graph(folder, theirs)
    a, b = count(ours), count(theirs)
    print(f"{'op':28} {'ours':>6} {'mlx-lm':>7}")
    for kind in sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k])):
        print(f"{kind:28} {a[kind]:>6} {b[kind]:>7}")
    print(f"{'total':28} {sum(a.values()):>6} {sum(b.values()):>7}")
