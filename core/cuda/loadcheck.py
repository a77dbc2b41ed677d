"""Loading a real sharded checkpoint: host RSS and GPU memory (`load_check`), and the random fp16 checkpoint
writer it uses. `python -m core.cuda.loadcheck PATH` is the child process that loads PATH and reports."""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..bench_shapes import pick_spec, resolve
from ..config import ModelConfig
from ..synth import checkpoint_tensors, stored_shape


def write_random_checkpoint(raw: dict, path: Path, shard_bytes: int = 4 << 30, seed: int = 0) -> list[Path]:
    """A hub-layout F16 checkpoint of `raw` with random values, written one tensor at a time."""
    spec = pick_spec(raw)
    config = ModelConfig.from_hf(spec, raw)
    tensors = [(name, stored_shape(rule, config)) for name, rule, _ in checkpoint_tensors(spec, config)]
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    pool = (np.random.default_rng(seed).standard_normal(1 << 25, dtype=np.float32) * 0.02).astype(np.float16)
    path.mkdir(parents=True, exist_ok=True)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        files.append(path / fname)
        _write_shard(path / fname, shard, pool)
        weight_map.update({name: fname for name, _ in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({**raw, "torch_dtype": "float16"}))
    return files


def _write_shard(file: Path, tensors: list, pool: np.ndarray) -> None:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(file, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for _, shape in tensors:
            left = math.prod(shape)
            while left:
                k = min(left, pool.size)
                f.write(memoryview(pool)[:k])
                left -= k


def load_check(name: str = "qwen3-8b", workdir: str | None = None) -> dict:
    """Load a written checkpoint of a named shape in fp16 in a child process: peak RSS and GPU memory."""
    name, raw = resolve(name)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t = time.perf_counter()
        files = write_random_checkpoint(raw, Path(tmp) / name)
        write_s = time.perf_counter() - t
        out = subprocess.run([sys.executable, "-m", "core.cuda.loadcheck", str(Path(tmp) / name)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"load child failed:\n{out.stderr[-4000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        largest = max(f.stat().st_size for f in files)
    res.update(config=name, write_s=write_s, largest_shard_bytes=largest,
               rss_limit_bytes=largest + (1 << 30), rss_ok=res["peak_rss_bytes"] <= largest + (1 << 30),
               gpu_limit_bytes=int(1.1 * (res["weight_bytes"] + res["kv_bytes"])),
               gpu_ok=res["gpu_used_bytes"] <= 1.1 * (res["weight_bytes"] + res["kv_bytes"]))
    return res


def _load_child(path: str) -> None:
    """Load `path` on the GPU in fp16, generate 16 tokens, print one JSON line of times and memory."""
    import pycuda.autoprimaryctx  # noqa: F401
    import pycuda.driver as drv

    from .. import load as core_load

    free0 = drv.mem_get_info()[0]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    model = core_load(path, device="cuda", dtype="float16", quiet=True)
    load_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.generate(list(range(1, 513)), max_new_tokens=16, stop_at_eos=False)
    used = free0 - drv.mem_get_info()[0]
    print(json.dumps({"load_s": load_s, "peak_rss_bytes": rss, "rss_before_load_bytes": rss0,
                      "weight_bytes": model.backend.weight_bytes, "kv_bytes": model.backend.kv_bytes,
                      "kv_positions": model.backend.kv_positions, "gpu_used_bytes": used}))


if __name__ == "__main__":
    _load_child(sys.argv[1])
