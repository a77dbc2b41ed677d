"""GPU time of skinny.cu's batched-decode product against the cuBLAS path, for the products of a decode layer at a
few row counts, over a sweep of skinny.cu's compile-time geometry (SK_SUB, SK_WARPS) and split of K (blocks a
multiprocessor the split aims for): CUDA events around 20 launches back to back, median of 3. Device only.

    python tools/skinny_probe.py [--model tinyllama-1.1b] [--rows 16 32 64] [--subs 2 4] [--warps 4 8]
        [--want 1 2 3 4 6]

The cuBLAS row is `linears` with ARCHKIT_CUDA_SKINNY off (one rounding of x to the weight type and one cuBLAS
product per weight, the path batched decode steps take by default), launched eagerly: at these sizes its host side
(ctypes calls, the rounding launch) is longer than its GPU time, so that row measures the host, not the product;
`tools/profile_engine.py --trace` gives the cuBLAS products' GPU time inside the step graph. skinny.cu's single
launches take longer on the GPU than on the host, so their rows are GPU time (they match the same trace).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from gemv_probe import timed_us  # (tools/ is on the path when this runs as a script)


def layer_products(cfg) -> list[tuple[str, list[int], int]]:
    """(name, output sizes, K) of one decoder layer's products, grouped as the backend launches them."""
    D, I = cfg["hidden_size"], cfg["intermediate_size"]
    H = cfg["num_attention_heads"]
    Dh = cfg.get("head_dim") or D // H
    kv = cfg.get("num_key_value_heads", H) * Dh
    return [("qkv", [H * Dh, kv, kv], D), ("o", [D], H * Dh), ("gate_up", [I, I], D), ("down", [D], I)]


def split(K: int, tiles: int, sms: int, want_per_sm: int, kc: int) -> tuple[int, int]:
    """(kslice, slices): K cut into whole chunks of kc columns (at least 256) until ~want_per_sm blocks a
    multiprocessor, as geometry.skinny_geometry does with 3."""
    want = max(1, -(-want_per_sm * sms // max(tiles, 1)))
    kchunks = -(-K // kc) * kc
    kslice = min(max(-(-(-(-K // want)) // kc) * kc, 256), kchunks)
    return kslice, -(-K // kslice)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--subs", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--want", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    p.add_argument("--json")
    a = p.parse_args()
    import pycuda.autoprimaryctx  # noqa: F401
    from core.backend import Weights
    from core.bench_shapes import resolve
    from core.cuda.backend import CudaBackend
    from core.cuda.bench import copy_bandwidth
    from core.cuda.geometry import SK_COUNTERS
    from core.cuda.tensors import DTensor

    _, cfg = resolve(a.model)
    be = CudaBackend("float16")
    bw = copy_bandwidth(be)
    sms = be.sm_count()
    c = be.mem_alloc(4 * SK_COUNTERS, "probe counters")
    be.drv.memset_d32(c, 0, SK_COUNTERS)
    counters = DTensor(c, int(c), (SK_COUNTERS,), "int32")
    rows = []
    for name, Ns, K in layer_products(cfg):
        ws = [be.random_weight((n, K), 1, 0.02) for n in Ns]
        nbytes = 2 * K * sum(Ns)
        for M in a.rows:
            x = be.from_host(np.random.default_rng(0).normal(size=(M, K)).astype(np.float32))
            be.skinny, be.gemm = False, "cublas"
            pairs = [(w, None) for w in ws]
            us = timed_us(be, lambda: be.linears(x, pairs))
            best = {"product": name, "M": M, "Ns": Ns, "K": K, "path": "cublas", "us": round(us, 2),
                    "pct_copy_bw": round(100 * nbytes / (us * 1e-6) / bw, 1)}
            print(json.dumps(best), flush=True)
            rows.append(best)
            nt = 1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8
            ys = [be.alloc((M, n)) for n in Ns]
            segs = []
            for w, y, n in zip(ws, ys, Ns):
                segs += [y, w, None, n]
            segs += [None, None, None, 0] * (3 - len(Ns))
            for sub, warps in [(s, w) for s in a.subs for w in a.warps]:
                    fn = be.kernel("skinny.cu", "skinny_linear", "Piii" + "PP" + "PPPi" * 3, SK_NT=nt, SK_WARPS=warps,
                                   SK_SUB=sub)
                    kc = 32 * sub
                    smem = 2 * 8 * nt * (kc + 4) * 4
                    if smem > 48 * 1024:
                        fn.set_attribute(be.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                    tiles = sum(-(-n // (16 * warps)) for n in Ns)
                    for want in a.want:
                        kslice, slices = split(K, tiles, sms, want, kc)
                        part = be.alloc((slices, tiles, 8 * nt, 16 * warps)) if slices > 1 else None
                        args = (x, M, K, kslice, part, counters, *segs)
                        us = timed_us(be, lambda: be.launch("probe", fn, (tiles, slices, 1), (32 * warps, 1, 1), *args,
                                                            shared=smem))
                        row = {"product": name, "M": M, "path": "skinny", "sub": sub, "warps": warps, "want": want,
                               "slices": slices, "regs": fn.num_regs, "spill": fn.local_size_bytes, "us": round(us, 2),
                               "pct_copy_bw": round(100 * nbytes / (us * 1e-6) / bw, 1)}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
        be.release(Weights())
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s, {sms} multiprocessors")
    if a.json:
        open(a.json, "w").write(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
