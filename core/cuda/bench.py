"""GPU benchmark: decode and prefill speed against the memory-bandwidth roofline measured in the same run.

    bench_cuda("tinyllama-1.1b", compare_hf=True, out_json="bench.json")   # a named shape, random weights
    bench_cuda("path/to/ckpt")                                              # a checkpoint directory

Named shapes (bench_configs.json) are config.json contents: the plugin is picked by the same config
scoring as detection, the weights are made on the GPU (no download, no checkpoint on disk).

What is reported, per model (dtype float16 unless the checkpoint says otherwise):
- copy_gbps: device-to-device copy bandwidth (bytes read + written per second), measured first.
- weight_bytes, bytes_per_token: a batch-1 decode step reads every weight once, except the token and
  position tables of which it reads one row each (a tied table is read whole, as the output projection),
  and, in a mixture-of-experts layer, the experts a token does not pick: the active bytes are attention,
  norms, router, top_k of num_experts experts and any shared expert (core/bench_shapes.py bytes_per_token).
  Named MoE shapes in fp16: qwen3-30b-a3b holds 61.1 GB of weights (6.09 GB active a token; fits an 80 GB
  H100), mixtral-8x7b 93.4 GB (25.5 GB active; needs an H200's 141 GB).
- roofline_tok_s = copy bandwidth / bytes_per_token; decode_tok_s (128 new tokens after an 8-token
  prompt, wall clock around generate(), CUDA graphs on) and its % of the roofline; decode without graphs.
- prefill_tok_s for 512 and 2048 tokens (last-position logits; None past the model's context).
- with compare_hf: the same decode / prefill figures for transformers (generate(), eager forward) in the
  same dtype on the same card, in the same process after ours is freed.
- gpu_used_bytes: device memory taken by loading + the runs above, beside weights + KV cache.

`load_check(name)` writes a sharded random checkpoint of a named shape and loads it with core.load in a
child process, reporting peak host RSS against the largest shard and GPU memory against weights + KV.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ..backend import Weights
from ..config import ModelConfig
from ..bench_shapes import (DECODE_TOKENS, PREFILL_LENGTHS, PROMPT_TOKENS, bytes_per_token, named_configs,  # noqa: F401
                           pick_spec, resolve)
from ..model import Model, forward
from ..weights import condition, expected_shape
from .bench_hf import bench_hf, hf_model, hf_prefill  # noqa: F401  (hf_model: part of this module's surface)
from . import bench_trace
from .loadcheck import load_check



def weight_shapes(spec, config: ModelConfig) -> list[tuple[str, int | None, tuple]]:
    """(role, layer, shape) of every weight the spec loads under this config, each role once per layer: a rule's
    `when` is asked per layer (dense and sparse MLP layers), and of rules that are alternative layouts of the same
    role (experts one tensor each, or stacked) only the first counts. Expert roles are stacked [E, out, in]."""
    out, seen = [], set()
    for rule in spec.weights:
        for layer in (range(config.num_layers) if rule.per_layer else [None]):
            if not condition(rule.when, config, layer):
                continue
            out += [(role, layer, expected_shape(role, config, spec)) for role in rule.targets
                    if (role, layer) not in seen]
            seen |= {(role, layer) for role in rule.targets}
    return out


def _init(role: str, shape: tuple) -> tuple[float, float]:
    """(center, half-width) of the uniform init: unit-ish norms, 1/sqrt(fan-in) matrices, small biases."""
    if "norm" in role:
        return 1.0, 0.05
    if len(shape) == 1:
        return 0.0, 0.02
    if role in ("embed", "pos_embed"):
        return 0.0, 0.5
    return 0.0, 1.0 / math.sqrt(shape[-1])  # fan-in: the last axis ([out, in], experts [E, out, in])


def random_model(raw: dict, dtype: str = "float16", context: int | None = None, seed: int = 0,
                 weight=None) -> Model:
    """A Model of config.json contents `raw` with random weights made on the GPU; weight(be, role, shape, seed), when
    given, may make a weight instead (a tensor, or None to leave it random; bench_quant.py's quantized ones)."""
    from .backend import CudaBackend

    spec = pick_spec(raw)
    config = ModelConfig.from_hf(spec, raw, source="bench config")
    be = CudaBackend(dtype, context=context)
    shapes = weight_shapes(spec, config)
    weights = Weights(layers=[{} for _ in range(config.num_layers)])
    try:
        be.begin_loading(config, sum(math.prod(s) for _, _, s in shapes))
        for i, (role, layer, shape) in enumerate(shapes):
            center, a = _init(role, shape)
            t = weight and weight(be, role, shape, seed * 100_003 + i + 1)
            t = be.random_weight(shape, seed * 100_003 + i + 1, a, center) if t is None else t
            (weights.globals if layer is None else weights.layers[layer])[role] = t
        be.finish_loading(weights)
    except BaseException:
        be.release(weights)
        raise
    return Model(spec, config, be, weights, device="cuda")


def copy_bandwidth(be, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    drv = be.drv
    src, dst = drv.mem_alloc(nbytes), drv.mem_alloc(nbytes)
    try:
        drv.memset_d8(src, 1, nbytes)
        t0, t1 = drv.Event(), drv.Event()
        drv.memcpy_dtod_async(dst, src, nbytes, be.stream)  # warm-up
        t0.record(be.stream)
        for _ in range(reps):
            drv.memcpy_dtod_async(dst, src, nbytes, be.stream)
        t1.record(be.stream)
        t1.synchronize()
        return 2 * nbytes * reps / (t1.time_since(t0) / 1e3)
    finally:
        src.free()
        dst.free()


def prompt_ids(model: Model, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, n).tolist()


def time_decode(model: Model, n: int = DECODE_TOKENS, graphs: bool = True, runs: int = 3) -> float:
    """Decode tok/s: n tokens after a PROMPT_TOKENS prompt, timed from the first new token on (the prompt's
    forward pass and the first token are prefill, as in llama.cpp's tg and vLLM's inter-token latency);
    median of `runs` after a warm-up run (the first timed run can find the clocks still ramping up)."""
    model.backend.graphs = graphs
    prompt = prompt_ids(model, PROMPT_TOKENS)
    model.generate(prompt, max_new_tokens=8, stop_at_eos=False)  # compiles, captures the step graph
    speeds = []
    for _ in range(runs):
        it = model.stream(prompt, max_new_tokens=n + 1, stop_at_eos=False)
        next(it)
        t = time.perf_counter()
        k = sum(1 for _ in it)
        speeds.append(k / (time.perf_counter() - t))
        assert k == n
    return statistics.median(speeds)


def time_prefill(model: Model, T: int, reps: int = 3) -> float | None:
    """tok/s of one forward pass over T tokens (last-position logits), median of `reps` after a warm-up."""
    c = model.config
    if T > c.max_position_embeddings:
        return None
    be, ids = model.backend, np.asarray(prompt_ids(model, T, seed=1))
    cache = be.new_cache(c, T)
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        forward(be, model.weights, c, ids, cache, 0, model.inv_freq, all_logits=False)
        if i:
            times.append(time.perf_counter() - t)
    return T / statistics.median(times)


def bench_ours(model: Model, bw: float) -> dict:
    bpt = bytes_per_token(model)
    res = {"dtype": model.backend.dtype, "weight_bytes": model.backend.weight_bytes, "kv_bytes": model.backend.kv_bytes,
           "bytes_per_token": bpt, "roofline_tok_s": bw / bpt}
    res["decode_tok_s"] = time_decode(model)
    res["decode_pct_roofline"] = 100 * res["decode_tok_s"] / res["roofline_tok_s"]
    res["decode_nograph_tok_s"] = time_decode(model, 64, graphs=False)
    for T in PREFILL_LENGTHS:
        res[f"prefill{T}_tok_s"] = time_prefill(model, T)
    return res


def decode_ab(name: str, reps: int = 2, attr: str = "fused") -> dict:
    """Decode tok/s of a named shape with backend switch `attr` off ("old") and on ("new"), alternating, in
    one process on one card, CUDA graphs on; also whether both give the same greedy tokens. attr "fused":
    the previous kernels against the fused ones; "pdl": programmatic dependent launch in the graphs."""
    import pycuda.autoprimaryctx  # noqa: F401

    name, raw = resolve(name)
    max_pos = ModelConfig.from_hf(pick_spec(raw), raw).max_position_embeddings
    model = random_model(raw, "float16", context=min(max_pos, max(PREFILL_LENGTHS) + 256))  # as bench_cuda
    be = model.backend
    res = {"config": name, "device": be.device.name(), "date": datetime.date.today().isoformat(), "switch": attr,
           "copy_gbps": copy_bandwidth(be) / 1e9, "bytes_per_token": bytes_per_token(model)}
    res["roofline_tok_s"] = res["copy_gbps"] * 1e9 / res["bytes_per_token"]
    prompt, tokens = prompt_ids(model, PROMPT_TOKENS), {}
    try:
        for rep in range(reps):
            for fused in (False, True):
                setattr(be, attr, fused)
                be.clear_graphs()
                model.generate(prompt, max_new_tokens=8, stop_at_eos=False)  # compile, capture
                # timed from the first new token on, as time_decode. Until 2026-12-07 this timed the prompt's
                # forward pass too: small for dense shapes, but an 8-token prompt of a mixture-of-experts model
                # takes the per-expert prefill path (a host round trip a layer), so --ab understated MoE decode.
                it = model.stream(prompt, max_new_tokens=DECODE_TOKENS + 1, stop_at_eos=False)
                out = [next(it)]
                t = time.perf_counter()
                out += list(it)
                rate = DECODE_TOKENS / (time.perf_counter() - t)
                res.setdefault("new" if fused else "old", []).append(rate)
                tokens[fused] = out[1:]  # the DECODE_TOKENS timed ones
    finally:
        be.release(model.weights)
    for k in ("old", "new"):
        res[k + "_tok_s"] = max(res[k])
        res[k + "_pct_roofline"] = 100 * res[k + "_tok_s"] / res["roofline_tok_s"]
    res["speedup"] = res["new_tok_s"] / res["old_tok_s"]
    res["same_tokens"] = sum(a == b for a, b in zip(tokens[False], tokens[True]))
    return res


def _timed_forward(model: Model, ids, cache, start: int) -> dict[str, float]:
    """Microseconds per op name for one uncaptured forward (events around every launch and cuBLAS call)."""
    be, c = model.backend, model.config
    events, launch, cublas_op = [], be.launch, be.cublas_op

    def timed(inner):
        def run(op, *a, **kw):
            e0, e1 = be.drv.Event(), be.drv.Event()
            e0.record(be.stream)
            inner(op, *a, **kw)
            e1.record(be.stream)
            events.append((op, e0, e1))
        return run

    be.launch, be.cublas_op = timed(launch), timed(cublas_op)
    try:
        forward(be, model.weights, c, ids, cache, start, model.inv_freq, all_logits=False)
    finally:
        del be.launch, be.cublas_op
    be.synchronize("profile")
    out: dict[str, float] = {}
    for op, e0, e1 in events:
        out[op] = out.get(op, 0.0) + e1.time_since(e0) * 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile_step(model: Model, context: int = 128) -> dict[str, float]:
    """Microseconds per op name for one uncaptured decode step at position `context` (events per launch)."""
    be, c = model.backend, model.config
    ids = np.asarray(prompt_ids(model, context))
    cache = be.new_cache(c, context + 1)
    forward(be, model.weights, c, ids, cache, 0, model.inv_freq, all_logits=False)
    forward(be, model.weights, c, ids[-1:], cache, context, model.inv_freq, all_logits=False)  # warm-up
    return _timed_forward(model, ids[-1:], cache, context)


def model_for(name: str, positions: int) -> tuple[str, Model]:
    """(name, fp16 random model of a named shape with a KV cache of `positions`); max_position_embeddings is
    raised where the shape's own is shorter (speed depends on the shape, not on that number)."""
    name, raw = resolve(name)
    raw = dict(raw, max_position_embeddings=max(raw.get("max_position_embeddings", 0), positions))
    return name, random_model(raw, "float16", context=positions)


def time_decode_at(name: str, context: int, n: int = DECODE_TOKENS) -> dict:
    """Greedy decode tok/s (graphs) of a named shape after a `context`-token prompt against after an
    8-token one, same model and cache; the prompt's prefill is not timed. max_position_embeddings is
    raised when the shape's own is shorter (the speed depends on the shape, not on that number)."""
    import pycuda.autoprimaryctx  # noqa: F401

    name, model = model_for(name, context + n + 1)
    res = {"config": name, "device": model.backend.device.name(), "date": datetime.date.today().isoformat()}
    try:
        model.generate(prompt_ids(model, PROMPT_TOKENS), max_new_tokens=8, stop_at_eos=False)  # compile, capture
        for key, length in (("short", PROMPT_TOKENS), ("long", context), ("short", PROMPT_TOKENS), ("long", context)):
            it = model.stream(prompt_ids(model, length), max_new_tokens=n + 1, stop_at_eos=False)
            next(it)  # the prompt's forward pass and the first token
            t = time.perf_counter()
            k = sum(1 for _ in it)
            res.setdefault(key, []).append(k / (time.perf_counter() - t))
    finally:
        model.backend.release(model.weights)
    res["context"], res["short_tok_s"], res["long_tok_s"] = context, max(res["short"]), max(res["long"])
    res["ratio"] = res["long_tok_s"] / res["short_tok_s"]
    return res


def op_shares(prof: dict[str, float]) -> dict[str, float]:
    """GPU microseconds of a profile grouped: matrix products, attention, everything else."""
    out = {"gemm_us": 0.0, "attention_us": 0.0, "other_us": 0.0}
    for op, us in prof.items():
        key = "gemm_us" if op.startswith("linear") else "attention_us" if op.startswith("attention") else "other_us"
        out[key] += us
    return out


PREFILL_VARIANTS = (("own", "simt"), ("cublas", "simt"), ("own", "tc"), ("cublas", "tc"))


def prefill_ab(name: str, T: int = 2048, reps: int = 2, compare_hf: bool = True) -> dict:
    """Prefill tok/s of a named shape (fp16, T tokens, last-position logits) for each (GEMM, attention)
    variant the backend has (PREFILL_VARIANTS: our WMMA GEMM or cuBLAS; SIMT or tensor-core attention),
    alternating, best of `reps`, in one process on one card; a per-op GPU profile of each; the largest
    relative logit difference to the first variant; then transformers' eager forward (cuBLAS + SDPA)."""
    import pycuda.autoprimaryctx  # noqa: F401

    name, raw = resolve(name)
    model = random_model(raw, "float16", context=T)
    be, c = model.backend, model.config
    from . import cublas

    found, where = cublas.available()
    res = {"config": name, "T": T, "device": be.device.name(), "date": datetime.date.today().isoformat(),
           "cublas": where if found else None, "variants": {}}
    variants = [v for v in PREFILL_VARIANTS if (v[0] == "own" or found) and (v[1] == "simt" or be.attn_tc_available)]
    ids = np.asarray(prompt_ids(model, T, seed=1))
    try:
        cache = be.new_cache(c, T)
        ref = None
        for gemm, attn in variants:
            be.gemm, be.attn = gemm, attn
            logits = forward(be, model.weights, c, ids, cache, 0, model.inv_freq, all_logits=False)[-1]
            ref = logits if ref is None else ref
            key = f"{gemm}+{attn}"
            res["variants"][key] = {"logit_rel_diff": float(np.linalg.norm(logits - ref) / np.linalg.norm(ref)),
                                    "profile_us": op_shares(_timed_forward(model, ids, cache, 0)), "tok_s": []}
        del cache
        for _ in range(reps):
            for gemm, attn in variants:
                be.gemm, be.attn = gemm, attn
                res["variants"][f"{gemm}+{attn}"]["tok_s"].append(time_prefill(model, T))
    finally:
        be.release(model.weights)
    for v in res["variants"].values():
        v["best_tok_s"] = max(v["tok_s"])
    if compare_hf:
        import torch

        hf = hf_model(raw, None, "float16")
        try:
            with torch.no_grad():
                res["hf_tok_s"] = hf_prefill(hf, hf.config.vocab_size, T)
        finally:
            del hf
            torch.cuda.empty_cache()
        for v in res["variants"].values():
            v["x_hf"] = v["best_tok_s"] / res["hf_tok_s"]
    return res


def prefill_table(rows: list[dict]) -> str:
    out = [f"{'config':<16}{'variant':<14}{'tok/s':>9}{'ms':>8}{'x HF':>7}{'gemm ms':>9}{'attn ms':>9}{'other ms':>9}"
           f"{'logit diff':>11}"]
    for r in rows:
        for k, v in r["variants"].items():
            p = v["profile_us"]
            out.append(f"{r['config'][:15]:<16}{k:<14}{v['best_tok_s']:>9,.0f}{1e3 * r['T'] / v['best_tok_s']:>8.1f}"
                       f"{v.get('x_hf', float('nan')):>7.2f}{p['gemm_us'] / 1e3:>9.1f}{p['attention_us'] / 1e3:>9.1f}"
                       f"{p['other_us'] / 1e3:>9.1f}{v['logit_rel_diff']:>11.1e}")
        if "hf_tok_s" in r:
            out.append(f"{r['config'][:15]:<16}{'transformers':<14}{r['hf_tok_s']:>9,.0f}{1e3 * r['T'] / r['hf_tok_s']:>8.1f}"
                       f"{1.0:>7.2f}")
    if rows:
        out.append(f"card: {rows[0]['device']}, T = {rows[0]['T']}, fp16, {rows[0]['date']}, cuBLAS: {rows[0]['cublas']}")
    return "\n".join(out)


# -- transformers on the same card ---------------------------------------------------------------------
def bench_cuda(config_name_or_path: str, compare_hf: bool = False, out_json: str | None = None,
               dtype: str | None = None) -> dict:
    """Benchmark one named shape or checkpoint on the GPU; returns (and optionally writes) the results."""
    import pycuda.autoprimaryctx  # noqa: F401
    import pycuda.driver as drv

    from .. import load as core_load

    is_path = os.path.isdir(config_name_or_path)
    free0 = drv.mem_get_info()[0]
    if is_path:
        raw, name = None, str(config_name_or_path)
        model = core_load(config_name_or_path, device="cuda", dtype=dtype, quiet=True)
    else:
        name, raw = resolve(config_name_or_path)
        max_pos = ModelConfig.from_hf(pick_spec(raw), raw).max_position_embeddings
        model = random_model(raw, dtype or "float16", context=min(max_pos, max(PREFILL_LENGTHS) + 256))
    be = model.backend
    result = {"config": name, "device": be.device.name(), "date": datetime.date.today().isoformat(),
              "copy_gbps": copy_bandwidth(be) / 1e9}
    try:
        result.update(bench_ours(model, result["copy_gbps"] * 1e9))
        result["gpu_used_bytes"] = free0 - drv.mem_get_info()[0]
    finally:
        max_pos = model.config.max_position_embeddings
        be.release(model.weights)
    if compare_hf:
        result["hf"] = bench_hf(raw, None if raw else name, result["dtype"], max_pos)
        result["hf"]["decode_speedup"] = result["decode_tok_s"] / result["hf"]["decode_tok_s"]
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict]) -> str:
    """A plain-text table of bench_cuda results."""
    def f(v, fmt="{:,.0f}"):
        return "-" if v is None else fmt.format(v)

    head = (f"{'config':<16}{'weights MB':>11}{'roof tok/s':>11}{'decode':>9}{'%roof':>7}{'nograph':>9}"
            f"{'pf512':>9}{'pf2048':>9}{'HF dec':>8}{'HF pf512':>10}{'HF pf2048':>10}{'x HF':>7}")
    rows = [head]
    for r in results:
        hf = r.get("hf", {})
        rows.append(f"{r['config'][:15]:<16}{r['weight_bytes'] / 1e6:>11,.0f}{f(r['roofline_tok_s']):>11}"
                    f"{f(r['decode_tok_s']):>9}{f(r['decode_pct_roofline'], '{:.1f}'):>7}{f(r['decode_nograph_tok_s']):>9}"
                    f"{f(r['prefill512_tok_s']):>9}{f(r['prefill2048_tok_s']):>9}{f(hf.get('decode_tok_s'), '{:.1f}'):>8}"
                    f"{f(hf.get('prefill512_tok_s')):>10}{f(hf.get('prefill2048_tok_s')):>10}"
                    f"{f(hf.get('decode_speedup'), '{:.1f}'):>7}")
    if results:
        rows.append(f"card: {results[0]['device']}, copy bandwidth {results[0]['copy_gbps']:,.0f} GB/s, {results[0]['date']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m core.cuda.bench", description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="*", default=sorted(named_configs()))
    p.add_argument("--compare-hf", action="store_true")
    p.add_argument("--json")
    p.add_argument("--load-check", metavar="NAME")
    p.add_argument("--profile", action="store_true", help="per-op GPU time of one decode step (no bench)")
    p.add_argument("--ab", nargs="?", const="fused", choices=("fused", "pdl", "fold"),
                   help="decode only, one switch off vs on in the same run: fused (previous kernels vs fused "
                        "ones, the default), pdl (programmatic dependent launch in the decode graphs) or "
                        "fold (norms and residual adds folded into the GEMVs)")
    p.add_argument("--prefill-only", action="store_true",
                   help="prefill only: our GEMM vs cuBLAS, SIMT vs tensor-core attention, and transformers, same run")
    p.add_argument("--tokens", type=int, default=2048, help="prompt length for --prefill-only")
    p.add_argument("--trace", action="store_true",
                   help="per-kernel GPU time of graph decode steps (CUPTI through torch.profiler; no bench)")
    p.add_argument("--context", type=int, help="decode speed after a prompt of this many tokens vs after 8")
    p.add_argument("--out", help="folder for trace files")
    p.add_argument("--quant", choices=("w4a16", "w8a16", "fp8"), help="random quantized weights against fp16 "
                   "(core/cuda/bench_quant.py; name the shapes, e.g. qwen3-8b)")
    a = p.parse_args(argv)
    if a.quant:
        from . import bench_quant
        return bench_quant.main(sys.modules[__name__], a.configs, a.quant, a.json)
    if a.trace or a.context:
        rows = []
        for c in a.configs:
            rows.append(bench_trace.trace_decode(sys.modules[__name__], c, out_dir=a.out) if a.trace
                            else time_decode_at(c, a.context))
            print(json.dumps(rows[-1]), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))
        return 0
    if a.prefill_only:
        rows = []
        for c in a.configs:
            rows.append(prefill_ab(c, a.tokens, compare_hf=a.compare_hf))
            print(json.dumps(rows[-1]), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))
        print(prefill_table(rows))
        return 0
    if a.ab:
        rows = []
        for c in a.configs:
            rows.append(decode_ab(c, attr=a.ab))
            print(json.dumps(rows[-1]), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))
        print(f"{'config':<16}{'roof tok/s':>11}{'old tok/s':>10}{'%roof':>7}{'new tok/s':>10}{'%roof':>7}{'x':>6}"
              f"{'same tok':>9}")
        for r in rows:
            print(f"{r['config'][:15]:<16}{r['roofline_tok_s']:>11,.0f}{r['old_tok_s']:>10,.0f}{r['old_pct_roofline']:>7.1f}"
                  f"{r['new_tok_s']:>10,.0f}{r['new_pct_roofline']:>7.1f}{r['speedup']:>6.2f}{r['same_tokens']:>6}/{DECODE_TOKENS}")
        if rows:
            print(f"card: {rows[0]['device']}, copy bandwidth {rows[0]['copy_gbps']:,.0f} GB/s, {rows[0]['date']}")
        return 0
    if a.profile:
        for c in a.configs:
            name, raw = resolve(c)
            model = random_model(raw, context=1024)
            prof = profile_step(model)
            model.backend.release(model.weights)
            print(f"{name}: one decode step at position 128, GPU time per op (us), total {sum(prof.values()):,.0f}")
            for op, us in prof.items():
                print(f"  {op:<22}{us:>10,.1f}")
        return 0
    results = []
    for c in a.configs:
        results.append(bench_cuda(c, a.compare_hf))
        print(json.dumps(results[-1]), flush=True)
    report = {"results": results}
    if a.load_check:
        report["load_check"] = load_check(a.load_check)
        print(json.dumps(report["load_check"]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
