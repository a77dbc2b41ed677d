"""`archkit bench`: decode and prefill speed against the memory-bandwidth roofline, and against transformers.

Batch-1 decode reads every weight once per token, so its floor is (weight bytes read per token) /
(copy bandwidth measured in the same run). The checkpoint is synthesized from the family's spec (random
weights, hub layout), so transformers loads the very same files when --compare-hf is given.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .bench_shapes import bytes_per_token, hf_generate_seconds, named_config, named_configs, pick_spec, resolve
from .errors import ConfigError
from .synth import write_checkpoint

# the named shapes and bytes_per_token live in core/bench_shapes.py, shared with core/cuda/bench.py; kept
# importable from here
__all__ = ["run_bench", "named_configs", "named_config", "resolve", "pick_spec", "bytes_per_token",
           "host_copy_bandwidth", "time_ours", "time_hf", "hf_generate_seconds"]


def host_copy_bandwidth(nbytes: int = 1 << 28, reps: int = 5) -> float:
    """Host memory copy bandwidth in bytes/s, counting bytes read plus bytes written (best of reps)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def time_ours(model, prompt: np.ndarray, tokens: int) -> dict:
    """Prefill time of the prompt and decode tok/s (first token to last) for greedy generation."""
    t0 = time.perf_counter()
    stamps = []
    for _ in model.stream(prompt, max_new_tokens=tokens, stop_at_eos=False):
        stamps.append(time.perf_counter())
    prefill = stamps[0] - t0
    return {"prefill_s": prefill, "prefill_tok_s": len(prompt) / prefill,
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def time_hf(path: Path, prompt: np.ndarray, tokens: int, device: str) -> dict:
    """transformers generate(): decode tok/s from the difference between a long and a 1-token generate."""
    import torch
    import transformers

    dev = "cuda" if device == "cuda" else "cpu"
    dtype = torch.float32 if dev == "cpu" else torch.float16
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(dev).eval()
    ids = torch.as_tensor(prompt)[None].to(dev)
    hf_generate_seconds(m, ids, 2)  # warm-up
    t1, tn = hf_generate_seconds(m, ids, 1), hf_generate_seconds(m, ids, tokens)
    return {"prefill_s": t1, "decode_tok_s": (tokens - 1) / (tn - t1)}


def run_bench(models: list[str], device: str = "cpu", compare_hf: bool = False, tokens: int | None = None,
              prompt_tokens: int = 16, json_path: str | None = None) -> list[dict]:
    """Benchmark each named config or checkpoint dir; print a table; optionally write JSON."""
    if compare_hf:
        import importlib.util

        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--compare-hf needs {' and '.join(missing)} installed (pip install 'archkit[test]')")
    if device == "cuda":
        from .errors import DeviceError
        from .load import cuda_available

        ok, why = cuda_available()
        if not ok:
            raise DeviceError(f"device 'cuda' is not usable: {why}")
        from .cuda.bench import bench_cuda, table
        results = [bench_cuda(m, compare_hf=compare_hf, out_json=None) for m in models]
        print(table(results))
    else:
        results = [_bench_cpu(m, compare_hf, tokens or 32, prompt_tokens) for m in models]
        _print_cpu(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results


def _bench_cpu(name: str, compare_hf: bool, tokens: int, prompt_tokens: int) -> dict:
    from .load import load

    tmp = None
    if Path(name).is_dir():
        path = Path(name)
    else:
        spec, cfg = named_config(name)
        tmp = Path(tempfile.mkdtemp(prefix="archkit-bench-"))
        path = write_checkpoint(spec, cfg, tmp / name, std=0.02)
    try:
        model = load(path, device="cpu", quiet=True)
        prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt_tokens)
        bw = host_copy_bandwidth()
        bpt = bytes_per_token(model)
        ours = time_ours(model, prompt, tokens)
        res = {"model": name, "device": "cpu", "cpu": platform.processor() or platform.machine(),
               "date": time.strftime("%Y-%m-%d"), "weights_bytes_per_token": bpt, "copy_bandwidth_GBs": bw / 1e9,
               "roofline_tok_s": bw / bpt, "archkit": ours, "decode_tokens": tokens, "prompt_tokens": prompt_tokens}
        del model
        if compare_hf:
            res["transformers"] = time_hf(path, prompt, tokens, "cpu")
        return res
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _print_cpu(results: list[dict]) -> None:
    print(f"{'model':<16}{'MB/token':>10}{'copy GB/s':>11}{'roofline':>10}{'archkit tok/s':>15}{'% roof':>8}"
          f"{'hf tok/s':>10}{'vs hf':>7}{'prefill tok/s':>15}")
    for r in results:
        a = r["archkit"]["decode_tok_s"]
        hf = r.get("transformers", {}).get("decode_tok_s")
        print(f"{r['model']:<16}{r['weights_bytes_per_token'] / 1e6:>10.1f}{r['copy_bandwidth_GBs']:>11.1f}"
              f"{r['roofline_tok_s']:>10.1f}{a:>15.1f}{100 * a / r['roofline_tok_s']:>7.0f}%"
              f"{(f'{hf:.1f}' if hf else '-'):>10}{(f'{a / hf:.2f}x' if hf else '-'):>7}{r['archkit']['prefill_tok_s']:>15.1f}")
