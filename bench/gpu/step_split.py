"""Where mlx-lm's decode step spends its time on the GPU, measured the way mlxserver's
MLXSERVER_PROFILE does (build the graph, async_eval it, wait for the previous token): on the
main thread and on another thread, on the default stream and on a stream of its own.

    python step_split.py FOLDER [STEPS]
"""
import sys
import threading
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache


def run(model, steps, stream):
    with mx.stream(stream):
        cache = make_prompt_cache(model)
        prompt = mx.array([[1000 + (i * 7919) % 20000 for i in range(512)]])
        logits = model(prompt, cache=cache)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(y)
        build = launch = wait = 0.0
        previous = y
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = model(previous[:, None], cache=cache)
            nxt = mx.argmax(logits[:, -1, :], axis=-1)
            t1 = time.perf_counter()
            mx.async_eval(nxt)
            t2 = time.perf_counter()
            previous.item()
            t3 = time.perf_counter()
            build += t1 - t0
            launch += t2 - t1
            wait += t3 - t2
            previous = nxt
        mx.eval(previous)
        total = time.perf_counter() - start
        us = lambda v: f"{v / steps * 1e6:.0f}"
        return f"tok/s {steps / total:.1f} build_us {us(build)} launch_us {us(launch)} wait_us {us(wait)}"


def main():
    folder = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    model, _ = load(folder)
    default = mx.default_stream(mx.default_device())
    own = mx.new_stream(mx.default_device())
    for label, stream in [("main thread, default stream", default), ("main thread, own stream", own)]:
        run(model, 16, stream)
        print(label, run(model, steps, stream), flush=True)
    result = {}
    # Streams belong to the thread that made them.
    thread = threading.Thread(target=lambda: result.update(r=(run(model, 16, mx.new_stream(mx.default_device())), run(model, steps, mx.default_stream(mx.default_device())))[1]))
    thread.start()
    thread.join()
    print("other thread, its default stream", result.get("r"), flush=True)


if __name__ == "__main__":
    main()
