"""`archkit bench --serve`: many concurrent requests through the engine, against transformers' batched
generate() and against the roofline of a batched step.

Each concurrency level C submits C requests at once (distinct random prompts of `prompt_tokens`, `new_tokens`
new tokens each, greedy, no EOS stop) and steps the engine until all have finished. Reported per level:
output tok/s over the whole run, TTFT (arrival to first token) and inter-token latency (the gaps between a
request's consecutive tokens) p50 / p99, and the roofline: a decode step of C rows reads every weight once
plus each sequence's keys and values, so at best it takes (weight bytes + KV bytes) / bandwidth and makes
C tokens. transformers runs the same C prompts as one padded static batch (`generate(max_new_tokens=...)`).

A second measurement, `prefix`: a shared system prompt of `system_tokens` followed by distinct questions,
sent one after another; TTFT of the later requests over the first (the prefix cache's effect).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .bench_shapes import bytes_per_token, named_config
from .sampling import SamplingParams
from .synth import write_checkpoint

CONCURRENCY = (1, 8, 32, 128)


def kv_bytes_per_position(model) -> int:
    """Bytes of keys and values one position holds over all layers, in the backend's KV dtype."""
    c = model.config
    width = 4 if model.dtype == "float32" else 2
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * width


def percentiles(xs, ps=(50, 99)) -> dict:
    """{"p50": ..., "p99": ...} of xs in milliseconds (None when empty)."""
    if not len(xs):
        return {f"p{p}": None for p in ps}
    a = np.asarray(xs, dtype=np.float64) * 1e3
    return {f"p{p}": float(np.percentile(a, p)) for p in ps}


def run_level(model, engine, prompts, new_tokens: int) -> dict:
    """Submit every prompt at once, step until all finish; throughput and latency figures of the run."""
    stamps = {}

    def record(out, stamps=stamps):
        if out.token is not None:
            stamps.setdefault(out.request.id, []).append(time.perf_counter())

    t0 = time.perf_counter()
    reqs = [engine.add(p, SamplingParams(), new_tokens, stop_at_eos=False, callback=record) for p in prompts]
    while engine.has_work():
        engine.step()
    wall = time.perf_counter() - t0
    ttft = [stamps[r.id][0] - t0 for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(stamps[r.id], stamps[r.id][1:])]
    total = sum(len(r.output) for r in reqs)
    return {"requests": len(reqs), "output_tokens": total, "wall_s": wall, "output_tok_s": total / wall,
            "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl), "preemptions": engine.stats()["preemptions"]}


def roofline_tok_s(model, concurrency: int, prompt_tokens: int, new_tokens: int, bandwidth: float) -> float:
    """Output tok/s bound of C concurrent decodes: each step reads the weights once and every sequence's KV
    (at the mean context length of the decode phase), then yields C tokens."""
    mean_ctx = prompt_tokens + new_tokens / 2
    step_bytes = bytes_per_token(model) + concurrency * mean_ctx * kv_bytes_per_position(model)
    return concurrency * bandwidth / step_bytes


def hf_batched_tok_s(m, prompts, new_tokens: int) -> float:
    """transformers' generate() (model `m`) on all prompts as one static batch: output tok/s (greedy). The
    prompts have equal lengths, so the batch needs no padding and no row waits for another."""
    import torch

    from .bench_shapes import hf_generate_seconds

    ids = torch.as_tensor(np.asarray(prompts)).to(m.device)
    hf_generate_seconds(m, ids, 2)  # warm-up
    return len(prompts) * new_tokens / hf_generate_seconds(m, ids, new_tokens)


def run_prefix(model, engine, system_tokens: int, question_tokens: int, requests: int, rng) -> dict:
    """TTFT of requests sharing a system prompt, sent one after another: the first computes it, the rest hit
    the prefix cache."""
    V = model.config.vocab_size
    system = rng.integers(0, V, system_tokens).tolist()
    ttft = []
    for _ in range(requests):
        p = system + rng.integers(0, V, question_tokens).tolist()
        t0 = time.perf_counter()
        r = engine.add(p, SamplingParams(), 1, stop_at_eos=False)
        while not r.finished:
            engine.step()
        ttft.append(time.perf_counter() - t0)
    later = float(np.median(ttft[1:])) if len(ttft) > 1 else None
    return {"system_tokens": system_tokens, "first_ttft_ms": ttft[0] * 1e3,
            "later_ttft_ms_median": later * 1e3 if later else None,
            "ratio": later / ttft[0] if later else None, "cached_blocks_hit": engine.stats()["prefix_cache_hits"]}


def bench_serve(name: str, device: str = "cpu", concurrency=CONCURRENCY, prompt_tokens: int = 512,
                new_tokens: int = 128, compare_hf: bool = False, system_tokens: int = 2000, bandwidth=None,
                engine_kw=None) -> dict:
    """One shape (a named bench config or a checkpoint dir) at each concurrency; returns a JSON-able dict."""
    from .load import load

    tmp, path, raw = None, None, None
    ctx = prompt_tokens + new_tokens
    if Path(name).is_dir():
        path = Path(name)
        model = load(path, device=device, quiet=True)
    elif device == "cuda":  # random weights made on the GPU (a 60 GB shape needs no checkpoint on disk)
        from .bench_shapes import resolve
        from .cuda.bench import random_model

        _, raw = resolve(name)
        model = random_model(raw, "float16", context=max(ctx, system_tokens + 64))
    else:
        spec, cfg = named_config(name)
        tmp = Path(tempfile.mkdtemp(prefix="archkit-serve-bench-"))
        path = write_checkpoint(spec, cfg, tmp / name, std=0.02)
        model = load(path, device=device, quiet=True)
    hf = None
    try:
        if bandwidth is None:
            bandwidth = _bandwidth(model)
        rng = np.random.default_rng(0)
        V = model.config.vocab_size
        kw = dict(max_running=max(concurrency), max_batch_tokens=2048)
        kw.update(engine_kw or {})
        kw.setdefault("kv_tokens", max(concurrency) * ctx + 4 * max(ctx, system_tokens + 64))
        engine = model.engine(**kw)
        # warm-up: compiles, captures, first-touch of the KV pool; one request alone first, since a one-row step
        # takes other kernels (the GEMV with the residual add or the norm folded in) than a step of several rows
        for n in (1, 2):
            run_level(model, engine, [rng.integers(0, V, prompt_tokens).tolist() for _ in range(n)], 4)
        levels, level_prompts = [], []
        for C in concurrency:
            prompts = [rng.integers(0, V, prompt_tokens).tolist() for _ in range(C)]
            level_prompts.append(prompts)
            engine.pool.forget_all()  # every level computes its prompts: no help from the one before
            lv = run_level(model, engine, prompts, new_tokens)
            lv["concurrency"] = C
            lv["roofline_tok_s"] = roofline_tok_s(model, C, prompt_tokens, new_tokens, bandwidth)
            levels.append(lv)
        prefix = run_prefix(model, model.engine(**kw), system_tokens, 16, 5, rng) if system_tokens else None
        weights_bytes = bytes_per_token(model)
        if compare_hf:  # transformers on the same prompts, after our model has given its memory back
            del engine
            model.backend.release(model.weights)
            hf = _hf_model(path, raw, device)
            for lv, prompts in zip(levels, level_prompts):
                lv["transformers_tok_s"] = hf_batched_tok_s(hf, prompts, new_tokens)
        return {"model": name, "device": device, "dtype": model.dtype, "date": time.strftime("%Y-%m-%d"),
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "bandwidth_GBs": bandwidth / 1e9,
                "weights_bytes_per_step": weights_bytes, "levels": levels, "prefix": prefix}
    finally:
        del hf
        if model.weights.layers:
            model.backend.release(model.weights)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _hf_model(path, raw, device: str):
    """transformers' model of the checkpoint `path`, or of config `raw` with random weights (fp16 on the GPU)."""
    import torch
    import transformers

    if device == "cuda":
        from .cuda.bench_hf import hf_model
        return hf_model(raw, None if path is None else str(path), "float16")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _bandwidth(model) -> float:
    """Copy bandwidth (bytes read + written per second) where the model's weights live, measured now."""
    if model.device == "cuda":
        from .cuda.bench import copy_bandwidth
        return copy_bandwidth(model.backend)
    from .bench import host_copy_bandwidth
    return host_copy_bandwidth()


def table(results: list[dict]) -> str:
    """The human-readable table of bench_serve results."""
    lines = [f"{'model':<16}{'conc':>5}{'tok/s':>10}{'roofline':>10}{'% roof':>7}{'hf tok/s':>10}{'vs hf':>7}"
             f"{'TTFT p50':>10}{'p99':>9}{'ITL p50':>9}{'p99':>8}  (ms)"]
    for r in results:
        for lv in r["levels"]:
            hf, tps = lv.get("transformers_tok_s"), lv["output_tok_s"]
            lines.append(f"{r['model']:<16}{lv['concurrency']:>5}{lv['output_tok_s']:>10.1f}{lv['roofline_tok_s']:>10.1f}"
                         f"{100 * lv['output_tok_s'] / lv['roofline_tok_s']:>6.0f}%"
                         f"{(f'{hf:.1f}' if hf else '-'):>10}{(f'{tps / hf:.1f}x' if hf else '-'):>7}"
                         f"{lv['ttft_ms']['p50']:>10.1f}{lv['ttft_ms']['p99']:>9.1f}"
                         f"{(lv['itl_ms']['p50'] or 0):>9.2f}{(lv['itl_ms']['p99'] or 0):>8.2f}")
        p = r.get("prefix")
        if p and p["ratio"] is not None:
            lines.append(f"{r['model']:<16} prefix cache: {p['system_tokens']}-token system prompt, TTFT first "
                         f"{p['first_ttft_ms']:.1f} ms, later {p['later_ttft_ms_median']:.1f} ms ({p['ratio']:.2f}x)")
    return "\n".join(lines)
