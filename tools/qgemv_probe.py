"""GPU time of one quantized decode GEMV launch (gemv_q.cu) for the Qwen3-8B layer shapes and several block
geometries (threads x rows x unroll x scales-with-words x QFOLD x QWORDS x QDIAG): how close each comes to the copy bandwidth on the bytes it reads (codes and
scales). CUDA events, launches back to back, median of 3 x 20. Device only.

    python tools/qgemv_probe.py [--kinds int4,fp8] [--geos 128x4x2x1,64x8x2x0x0,...] [--tokens 1,4] [--json F]

Each geometry's output is compared with the first's (rel_err_vs_first), so put a gemv_q.cu geometry first.
A geometry "tcWxU" is gemv_qtc.cu's tensor-core kernel instead (int4 / int8, the gated product only): W warps (a
block of 16 rows), U steps in flight a warp. A geometry's fields after the third default to 1 (scales loaded with the words), geometry.QFOLD, 4 (words a lane
loads at once) and 0 (QDIAG: 1 reads x from L1 only, 2 the weights from L2 only, 3 both; results then wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

# (name, N, K, gated): the products of one Qwen3-8B decoder layer (q, k and v as one 6,144-row launch)
SHAPES = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 12288, 4096, True),
          ("down", 4096, 12288, False)]


def _geo(geo: str) -> list[int]:
    """threads, rows, unroll, scales-with-words, QFOLD, QWORDS, QDIAG of a geometry string "THxRxU[xP[xF[xW[xD]]]]"."""
    from core.cuda.geometry import QFOLD

    given = list(map(int, geo.split("x")))
    return (given + [1, int(QFOLD), 4, 0][len(given) - 3:])[:7]


def _tc(geo: str) -> list[int] | None:
    """warps, unroll of a tensor-core geometry "tcWxU" (None for gemv_q.cu's)."""
    return (list(map(int, geo[2:].split("x"))) + [2])[:2] if geo.startswith("tc") else None


def _defines(kind: str, T: int, geo: str) -> dict:
    if _tc(geo):
        W, U = _tc(geo)
        return dict(SDTYPE=1, QTC_WARPS=W, QTC_UNROLL=U)
    th, R, U, P, F, W, D = _geo(geo)
    return dict(SDTYPE=1, GEMV_MAX_T=1 if T == 1 else 4, QTHREADS=th, QROWS=R, QUNROLL=U,
                QPRESCALE=P, QFOLD=F, QWORDS_INT4=W, QWORDS_INT8=W, QDIAG=D)


def main() -> None:
    """Print one JSON line per (kind, shape, tokens, geometry) and a best-geometry summary per kind."""
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default="int4,fp8,int8")
    p.add_argument("--geos", default="128x4x2x0,128x4x2x1,128x4x1x1,128x8x1x0,128x8x1x1,64x4x2x0,64x4x2x1,64x4x4x0,"
                   "32x4x4x0,32x4x4x1,256x4x1x1,256x2x1x1,128x4x3x1,128x4x4x0")
    p.add_argument("--tokens", default="1")
    p.add_argument("--json")
    a = p.parse_args()
    import pycuda.autoprimaryctx  # noqa: F401
    from core.cuda.backend import CudaBackend
    from core.cuda.bench import copy_bandwidth
    from core.cuda.geometry import qtc_smem
    from core.cuda.qlayout import WHOLE_ROW
    from core.cuda.qlinear import FORMATS

    be = CudaBackend("float16")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gemv_probe
    import warm_kernels

    # every build the sweep needs, compiled on all cores first (PyCUDA's disk cache then hits)
    builds = {tuple(sorted(_defines(kind, T, geo).items())) for kind in a.kinds.split(",")
              for T in map(int, a.tokens.split(",")) for geo in a.geos.split(",")}
    arch = warm_kernels._arch()
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(warm_kernels._compile, [("gemv_qtc.cu" if "QTC_WARPS" in dict(b) else "gemv_q.cu",
                                               dict(b, WDTYPE=1), arch) for b in builds]))
    bw = copy_bandwidth(be)
    rng = np.random.default_rng(0)
    rows, total = [], {}
    for kind in a.kinds.split(","):
        per = 8 if kind == "int4" else 4  # codes a 32-bit word
        for name, N, K, gated in SHAPES:
            # as core/cuda/bench_quant.py: int4 g128 fp16 scales per row; int8 one fp16 scale a row; fp8 one fp16
            # scale per 128 x 128 block
            lg, srow = {"int4": (7, 1), "int8": (WHOLE_ROW, 1), "fp8": (7, 128)}[kind]
            G = max(1, K >> lg)
            mats = []
            for _ in range(2 if gated else 1):
                q = be.random_weight((N, 2 * K // per), 1, 1.0)  # K / per 32-bit words a row; any bits are codes
                s = be.random_weight((N // srow, G), 2, 0.001, 0.01)
                mats.append((q, s))
            nbytes = len(mats) * (N * K * 4 // per + (N // srow) * G * 2)
            for T in map(int, a.tokens.split(",")):
                x = be.from_host(rng.normal(size=(T, K)).astype(np.float32))
                y = be.alloc((T, N))
                first = None
                for geo in a.geos.split(","):
                    if _tc(geo) and (T > 1 or kind == "fp8" or not gated):
                        continue
                    defs = _defines(kind, T, geo)
                    src, mid, shared = "gemv_q.cu", "", 0
                    if _tc(geo):
                        warps = _tc(geo)[0]
                        th, R, src, mid, shared = 32 * warps, 16, "gemv_qtc.cu", "_tc", qtc_smem(kind, K, warps)
                    else:
                        th, R = _geo(geo)[:2]
                    if gated:
                        fn = be.kernel(src, f"qgemv_gated{mid}_{kind}", FORMATS["qgemv_gated"], **defs)
                        args = (y, x, T, K, lg, G, srow, 2, N, mats[0][0], mats[0][1], None, None,
                                mats[1][0], mats[1][1], None, None)
                    else:
                        fn = be.kernel("gemv_q.cu", f"qgemv_{kind}", FORMATS["qgemv"], **defs)
                        args = (x, T, K, lg, G, srow, -1, y, mats[0][0], mats[0][1], None, None, N) + (
                            None, None, None, None, None, 0) * 2
                    if shared > 48 * 1024:
                        fn.set_attribute(be.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
                    us = gemv_probe.launch_us(be, fn, (-(-N // R), 1, 1), (th, 1, 1), args, shared)
                    out = be.to_host(y).astype(np.float64)  # the first geometry's output is the others' yardstick
                    first = first if geo != a.geos.split(",")[0] else out
                    row = {"kind": kind, "shape": name, "N": N, "K": K, "T": T, "geo": geo, "us": round(us, 2),
                           "pct_copy_bw": round(100 * nbytes / (us * 1e-6) / bw, 1), "regs": fn.num_regs,
                           "rel_err_vs_first": float(np.linalg.norm(out - first) / np.linalg.norm(first))}
                    rows.append(row)
                    total.setdefault((kind, T, geo), 0.0)
                    total[(kind, T, geo)] += us
                    print(json.dumps(row), flush=True)
    print("layer total (us, the four launches; a tc geometry's is its gate + up alone) by geometry:")
    for (kind, T, geo), us in sorted(total.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[1])):
        print(f"  {kind} T={T} {geo:>9}: {us:8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"copy_bw": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
