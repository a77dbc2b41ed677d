"""GPU time of one decode GEMV launch for a few weight shapes and gemv.cu geometries (CUDA events, launches
back to back, median of 3 x 20): how close each shape's GEMV comes to the copy bandwidth. Device only.

    python tools/gemv_probe.py [--shapes 151936x1024,4096x1024,...]
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np


def timed_us(be, call) -> float:
    """Median GPU microseconds of call() (which launches on be.stream): CUDA events around 20 calls back to back,
    3 times after a warm-up round."""
    times = []
    for rep in range(4):
        e0, e1 = be.drv.Event(), be.drv.Event()
        e0.record(be.stream)
        for _ in range(20):
            call()
        e1.record(be.stream)
        e1.synchronize()
        if rep:
            times.append(e1.time_since(e0) * 1e3 / 20)
    return statistics.median(times)


def launch_us(be, fn, grid, block, args, shared: int = 0) -> float:
    """Median GPU microseconds of one launch of fn (`shared` bytes of dynamic shared memory), by timed_us."""
    return timed_us(be, lambda: be.launch("probe", fn, grid, block, *args, shared=shared))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="151936x1024,32000x2048,50257x768,4096x1024,3072x1024,1024x3072,1024x2048")
    p.add_argument("--geos", default="8x1,4x1,4x2,2x2,8x2,4x4")
    p.add_argument("--json")
    a = p.parse_args()
    import pycuda.autoprimaryctx  # noqa: F401
    from core.backend import Weights
    from core.cuda.backend import CudaBackend
    from core.cuda.bench import copy_bandwidth

    be = CudaBackend("float16")
    bw = copy_bandwidth(be)
    rows = []
    for shape in a.shapes.split(","):
        N, K = map(int, shape.split("x"))
        w = be.random_weight((N, K), 1, 0.02)
        x = be.from_host(np.random.default_rng(0).normal(size=(1, K)).astype(np.float32))
        g = be.random_weight((K,), 2, 0.1, 1.0)
        y = be.alloc((1, N))
        for geo in a.geos.split(","):
            R, U = map(int, geo.split("x"))
            if K // 8 < 128 * U and U > 1:
                continue  # fewer 16-byte chunks a row than the threads x unroll
            for fold in ("", "_norm"):
                fn = be.kernel("gemv.cu", "gemv_rows" + fold, "PiiiPPffP" + "PPPi" * 3, GEMV_MAX_T=1, GEMV_ROWS=R,
                                GEMV_UNROLL=U)
                args = (x, 1, K, -1, g if fold else None, None, 1e-6, 0.0, None, y, w, None, N) + (None, None, None, 0) * 2
                us = launch_us(be, fn, (-(-N // R), 1, 1), (128, 1, 1), args)
                row = {"N": N, "K": K, "rows": R, "unroll": U, "fold": fold or "-", "us": round(us, 2),
                       "pct_copy_bw": round(100 * N * K * 2 / (us * 1e-6) / bw, 1),
                       "regs": fn.num_regs}
                rows.append(row)
                print(json.dumps(row), flush=True)
        be.release(Weights())
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s")
    if a.json:
        open(a.json, "w").write(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
