"""`python -m core.cuda.bench CONFIG... --trace`: per-kernel GPU time of graph-replayed decode steps (CUPTI through
torch.profiler). Split from core/cuda/bench.py, which calls it with itself as `bench`.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from pathlib import Path


def trace_decode(bench, name: str, steps: int = 16, context: int = 128, out_dir: str | None = None) -> dict:
    """Per-kernel GPU time of graph-replayed greedy decode steps at ~`context` positions, from a CUPTI
    trace taken through torch.profiler (kernels inside a CUDA graph are traced one by one): microseconds
    per kernel name per step, the kernel count, and the step's span (first kernel start to last kernel end)
    against its summed kernel time, whose difference is the gaps between kernels; and one step's kernels in
    order ("one_step": name, blocks, start in microseconds from the step's first kernel, duration), which shows
    each kernel's place on the critical path when programmatic dependent launch overlaps them. `bench`: the
    core.cuda.bench module (passed in, so that this module does not import it back)."""
    import pycuda.autoprimaryctx  # noqa: F401
    import torch
    from torch.profiler import ProfilerActivity, profile

    name, model = bench.model_for(name, context + steps + 64)
    torch.cuda.init()
    prompt = bench.prompt_ids(model, context)
    try:
        model.generate(prompt, max_new_tokens=8, stop_at_eos=False)  # compile, capture
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.generate(prompt, max_new_tokens=steps, stop_at_eos=False)
    finally:
        model.backend.release(model.weights)
    path = Path(out_dir or tempfile.gettempdir()) / f"trace-{name}.json"
    prof.export_chrome_trace(str(path))
    ev = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    ev.sort(key=lambda e: e["ts"])
    # a step ends in the argmax kernel; the prefill's kernels come first and are dropped with the first step
    ends = [i for i, e in enumerate(ev) if "argmax" in e["name"]]
    steps_ev = [ev[a + 1:b + 1] for a, b in zip(ends, ends[1:])]
    per: dict[str, float] = {}
    count: dict[str, int] = {}
    for st in steps_ev:
        for e in st:
            k = e["name"].split("(")[0]
            per[k] = per.get(k, 0.0) + e["dur"] / len(steps_ev)
            count[k] = count.get(k, 0) + 1
    span = statistics.median(st[-1]["ts"] + st[-1]["dur"] - st[0]["ts"] for st in steps_ev)
    busy = statistics.median(sum(e["dur"] for e in st) for st in steps_ev)
    between = statistics.median(b[0]["ts"] - (a[-1]["ts"] + a[-1]["dur"]) for a, b in zip(steps_ev, steps_ev[1:]))
    mid = steps_ev[len(steps_ev) // 2]
    one = [[e["name"].split("(")[0], math.prod(e.get("args", {}).get("grid", [0])), round(e["ts"] - mid[0]["ts"], 2),
            round(e["dur"], 2)] for e in mid]  # one step's kernels: name, blocks, start (us from the first), duration
    return {"config": name, "device": torch.cuda.get_device_name(), "context": context, "steps": len(steps_ev),
            "one_step": one,
            "kernels_per_step": len(steps_ev[0]), "span_us": span, "busy_us": busy, "host_gap_us": between,
            "per_kernel_us": dict(sorted(per.items(), key=lambda kv: -kv[1])),
            "count_per_step": {k: v // len(steps_ev) for k, v in count.items()}}
