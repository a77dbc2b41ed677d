"""Peak host RSS while loading a sharded checkpoint (issue 5: bar <= largest shard + 1 GB).

Writes a random llama-shaped checkpoint with numpy alone (tests/tinyckpt.py, one shard in memory at a
time) into --dir, then loads it in a fresh child process per mode and reads the kernel's high-water mark
(VmHWM in /proc/self/status) against the RSS just before the load:

  numpy   core.load(device="cpu"): the numpy backend keeps every weight in host memory, so its peak is
          the model itself plus the loader's overhead; the overhead (peak - baseline - resident weights)
          is what the bar is about.
  stream  the same load with the numpy backend's convert() replaced by "convert, then drop": what the
          loader itself holds when each tensor leaves the host as soon as it is converted (as an upload
          to a GPU does). Its peak over the baseline is compared with the bar directly.
  cuda    core.load(device="cuda") where a GPU is present: the real thing (not run without one).

    python tools/measure_load_rss.py --dir /tmp/archkit-rss --size-gb 1.5 --shards 6 [--modes numpy,stream,cuda]

The checkpoint is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r"""
import json, sys

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

import numpy as np
import core
from core.backend import NumpyBackend

mode, path = sys.argv[1], sys.argv[2]
if mode == "stream":
    convert = NumpyBackend.convert
    NumpyBackend.convert = lambda self, bits, stored, role: convert(self, bits, stored, role).nbytes
baseline = status("VmRSS")
model = core.load(path, device="cpu" if mode != "cuda" else "cuda", quiet=True)
resident = 0
if mode == "numpy":
    ws = list(model.weights.globals.values()) + [t for layer in model.weights.layers for t in layer.values()]
    resident = sum(t.nbytes for t in ws)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "after": status("VmRSS"), "resident_weights": resident}))
"""


def llama_config(size_gb: float) -> dict:
    """A Llama-shaped config (hidden 2048, GQA 32/8 heads, vocab 32000) with as many layers as reach size_gb in F32."""
    from tinyckpt import LLAMA_CONFIG, llama_shapes

    cfg = {**LLAMA_CONFIG, "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 2048, "num_hidden_layers": 1}
    while sum(4 * _numel(s) for s in llama_shapes(cfg).values()) < size_gb * 1e9:
        cfg["num_hidden_layers"] += 1
    return cfg


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def measure(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{mode}: load failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/archkit-rss-ckpt")
    ap.add_argument("--size-gb", type=float, default=1.5, help="checkpoint size (F32), rounded up to whole layers")
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--modes", default="numpy,stream")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from tinyckpt import write_checkpoint

    path = Path(args.dir)
    if path.exists():
        shutil.rmtree(path)
    cfg = llama_config(args.size_gb)
    t = time.perf_counter()
    write_checkpoint(path, cfg, shards=args.shards)
    shards = sorted(path.glob("*.safetensors"))
    total, largest = sum(f.stat().st_size for f in shards), max(f.stat().st_size for f in shards)
    print(f"checkpoint  {path}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}, "
          f"{len(shards)} shards, {total / 1e9:.3f} GB, largest shard {largest / 1e9:.3f} GB "
          f"(written in {time.perf_counter() - t:.0f} s)")
    bar = largest + 2 ** 30
    print(f"bar         largest shard + 1 GiB = {bar / 1e9:.3f} GB")
    try:
        for mode in args.modes.split(","):
            r = measure(path, mode)
            over = r["peak"] - r["baseline"]
            line = (f"{mode:<7}     baseline RSS {r['baseline'] / 1e9:.3f} GB, peak RSS {r['peak'] / 1e9:.3f} GB "
                    f"(+{over / 1e9:.3f} GB during the load)")
            if mode == "numpy":
                extra = over - r["resident_weights"]
                line += (f"; resident weights {r['resident_weights'] / 1e9:.3f} GB, so the loader's own overhead is "
                         f"{extra / 1e9:.3f} GB: {'within' if extra <= bar else 'OVER'} the bar")
            else:
                line += f": {'within' if over <= bar else 'OVER'} the bar"
            print(line)
    finally:
        if not args.keep:
            shutil.rmtree(path)


if __name__ == "__main__":
    main()
