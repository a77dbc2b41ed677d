"""Where a batched engine step's time goes on CUDA (TinyLlama shape, random fp16 weights): per-step wall time of
decode-only steps at several concurrencies, kernel launches per step, and a cProfile of the host side.

    python tools/profile_engine.py [--model tinyllama-1.1b] [--concurrency 1 16 64] [--new 64]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np

from core.bench_shapes import resolve
from core.cuda.bench import random_model
from core.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tinyllama-1.1b")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--trace", action="store_true", help="per-kernel GPU time of decode-only steps (torch.profiler)")
    ap.add_argument("--prefix", type=int, default=0,
                    help="trace instead one later request over a cached shared prompt of this many tokens")
    a = ap.parse_args()
    _, raw = resolve(a.model)
    model = random_model(raw, "float16", context=max(a.prompt + a.new, a.prefix + 32) + 64)
    be = model.backend
    launches = [0]
    real = be.launch

    def counting(*args, **kw):
        launches[0] += 1
        return real(*args, **kw)

    be.launch = counting
    engine = model.engine(max_running=max(a.concurrency), max_batch_tokens=2048,
                          kv_tokens=max(a.concurrency) * (a.prompt + a.new) + 4096)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    if a.prefix:
        prefix_trace(model, engine, rng, V, a.prefix)
        return
    for C in [2] + ([] if a.trace else a.concurrency):
        engine.pool.forget_all()
        reqs = [engine.add(rng.integers(0, V, a.prompt).tolist(), SamplingParams(), a.new, stop_at_eos=False)
                for _ in range(C)]
        rows = []
        prof = cProfile.Profile() if C == max(a.concurrency) else None
        while engine.has_work():
            decode_only = all(r.computed >= len(r.prompt) for r in engine.running) and not engine.waiting
            l0, t0 = launches[0], time.perf_counter()
            if prof is not None and decode_only:
                prof.enable()
            engine.step()
            if prof is not None:
                prof.disable()
            be.synchronize("profile")
            rows.append((decode_only, time.perf_counter() - t0, launches[0] - l0))
        dec = [(t, n) for d, t, n in rows if d]
        pre = [(t, n) for d, t, n in rows if not d]
        if dec:
            ts = np.array([t for t, _ in dec]) * 1e3
            print(f"C={C}: {len(dec)} decode-only steps: median {np.median(ts):.2f} ms (p90 {np.percentile(ts, 90):.2f}), "
                  f"{dec[len(dec) // 2][1]} launches/step -> {C / np.median(ts) * 1e3:,.0f} tok/s; "
                  f"{len(pre)} steps with prefill: {sum(t for t, _ in pre) * 1e3:.0f} ms total", flush=True)
        stats = getattr(be, "batch_graph_stats", lambda: {})()
        print(f"  batch graphs: {stats}", flush=True)
        if prof is not None:
            st = pstats.Stats(prof)
            st.sort_stats("tottime").print_stats(22)
    if a.trace:
        trace(model, engine, rng, V, a)
        return
    # how long each part of one decode-only step takes at the largest C, timed with syncs around the forward
    from core import engine as eng_mod

    C = max(a.concurrency)
    reqs = [engine.add(rng.integers(0, V, a.prompt).tolist(), SamplingParams(), 40, stop_at_eos=False)
            for _ in range(C)]
    while any(r.computed < len(r.prompt) for r in reqs):
        engine.step()
    real_forward = eng_mod.forward
    spent = {"forward": 0.0}

    def timed_forward(*args, **kw):
        be.synchronize("profile")
        t = time.perf_counter()
        out = real_forward(*args, **kw)
        be.synchronize("profile")
        spent["forward"] += time.perf_counter() - t
        return out

    eng_mod.forward = timed_forward
    t0, n = time.perf_counter(), 0
    while engine.has_work() and n < 20:
        engine.step()
        n += 1
    total = time.perf_counter() - t0
    print(f"C={C}, {n} decode steps: {total / n * 1e3:.2f} ms/step, forward (synced) {spent['forward'] / n * 1e3:.2f} "
          f"ms, the rest (schedule, logits to host, sampling, bookkeeping) {(total - spent['forward']) / n * 1e3:.2f} ms")
    eng_mod.forward = real_forward


def kernel_table(prof, label: str) -> None:
    """Print the kernels of a torch.profiler run: total GPU us and launches per kernel name, and span vs busy."""
    import json
    import tempfile

    path = tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    ev = sorted((e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not ev:
        print(f"{label}: no kernels traced")
        return
    per: dict = {}
    for e in ev:
        k = e["name"].split("(")[0][:60]
        us, n = per.get(k, (0.0, 0))
        per[k] = (us + e["dur"], n + 1)
    span = ev[-1]["ts"] + ev[-1]["dur"] - ev[0]["ts"]
    print(f"{label}: {len(ev)} kernels, span {span:.0f} us, busy {sum(e['dur'] for e in ev):.0f} us")
    for k, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:18]:
        print(f"   {us:8.1f} us  {n:5d}x  {k}")


def prefix_trace(model, engine, rng, V, system_tokens: int) -> None:
    """Wall time and kernels of a later request's prefill over a cached shared prompt (the prefix-cache TTFT)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()
    system = rng.integers(0, V, system_tokens).tolist()
    walls = []
    for i in range(6):
        r = engine.add(system + rng.integers(0, V, 16).tolist(), SamplingParams(), 1, stop_at_eos=False)
        t0 = time.perf_counter()
        steps = 0
        if i == 5:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                while not r.finished:
                    engine.step()
                    steps += 1
        else:
            while not r.finished:
                engine.step()
                steps += 1
        walls.append((time.perf_counter() - t0) * 1e3)
        print(f"request {i}: {walls[-1]:.2f} ms, {steps} steps", flush=True)
    kernel_table(prof, f"later request (traced, {walls[-1]:.2f} ms wall incl. profiler)")


def trace(model, engine, rng, V, a) -> None:
    """Per-kernel GPU time of decode-only batched steps (graph replays) at each concurrency, from a CUPTI trace
    (torch.profiler): microseconds per kernel name per step, and the step's span against its busy time."""
    import json
    import statistics
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()
    for C in a.concurrency:
        engine.pool.forget_all()
        reqs = [engine.add(rng.integers(0, V, a.prompt).tolist(), SamplingParams(), 24, stop_at_eos=False)
                for _ in range(C)]
        while any(r.computed < len(r.prompt) for r in reqs) or engine.waiting:
            engine.step()
        for _ in range(4):  # the shape's eager step and its capture
            engine.step()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(8):
                engine.step()
        while engine.has_work():
            engine.step()
        path = tempfile.mktemp(suffix=".json")
        prof.export_chrome_trace(path)
        ev = sorted((e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
        ends = [i for i, e in enumerate(ev) if "argmax_rows" in e["name"]]
        steps = [ev[x + 1:y + 1] for x, y in zip(ends, ends[1:])]
        if not steps:
            print(f"C={C}: no steps traced")
            continue
        per: dict = {}
        for st in steps:
            for e in st:
                k = e["name"].split("(")[0][:60]
                us, n = per.get(k, (0.0, 0))
                per[k] = (us + e["dur"] / len(steps), n + 1 / len(steps))
        span = statistics.median(st[-1]["ts"] + st[-1]["dur"] - st[0]["ts"] for st in steps)
        busy = statistics.median(sum(e["dur"] for e in st) for st in steps)
        print(f"C={C}: {len(steps)} steps, {len(steps[0])} kernels/step, span {span:.0f} us, busy {busy:.0f} us")
        for k, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:16]:
            print(f"   {us:8.1f} us  {n:5.0f}x  {k}")


if __name__ == "__main__":
    main()
