"""GPU benchmark of quantized weights (issue 16): a named shape with random quantized projection weights, decode and
prefill, against the same shape in fp16 in the same process and on the same card.

    python -m core.cuda.bench qwen3-8b --quant w4a16      # or w8a16, fp8; --json FILE
    python -m core.cuda.bench qwen3-30b-a3b --quant w4a16  # MoE: the experts quantized too (stacked, moe_q.cu)

Schemes (the projections of every layer and the experts, as loading keeps them: core/cuda/loading.py QUANT_ROLES;
lm_head, the embedding, the norms and the router stay fp16, as quantized checkpoints leave them):
- w4a16: int4 codes, symmetric, one fp16 scale per 128 input columns (GPTQ / AWQ / compressed-tensors' w4a16 g128);
- w8a16: int8 codes, symmetric, one fp16 scale per output row;
- fp8: E4M3 codes with one fp16 scale per 128 x 128 block (the Qwen3-*-FP8 layout).
The weights are random codes made on the host in the device layout (core/cuda/qlayout.py) and uploaded as loading
uploads them; only speed is measured here (tests/test_cuda_quant.py checks the results).

Reported per shape: copy bandwidth (bench.copy_bandwidth), the bytes a decode step reads (core/bench_shapes.py
bytes_per_token: a quantized weight counts the bytes the GPU holds for it, codes, scales, zero points) and the roofline
they give, decode tok/s and its % of that roofline, prefill tok/s at 2,048 tokens; the same for the fp16 model; and the
issue's ratios: quantized / fp16 decode (bars: w4a16 >= 2.8x, fp8 >= 1.7x), % of its own roofline (>= 75%), prefill
quantized / fp16 (>= 0.7x).
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import numpy as np

from ..bench_shapes import PREFILL_LENGTHS, bytes_per_token, pick_spec, resolve
from ..config import ModelConfig
from ..quant.pack import round_to
from . import qlayout
from .loading import EXPERT_ROLES, QUANT_ROLES

SCHEMES = ("w4a16", "w8a16", "fp8")
PREFILL_T = max(PREFILL_LENGTHS)


def random_packed(scheme: str, shape, seed: int) -> qlayout.Packed:
    """A weight [N, K] (experts: [E, N, K], stacked) of random codes in the device layout, scaled so that a row's
    products stay O(1)."""
    *lead, n, k = shape
    r = np.random.default_rng(seed)
    kind = {"w4a16": "int4", "w8a16": "int8", "fp8": "fp8"}[scheme]
    kp = qlayout.padded_k(kind, k)
    nbytes = math.prod(lead) * n * kp * qlayout.KINDS[kind] // 8
    words = np.frombuffer(r.bytes(nbytes), np.uint32).reshape(*lead, n, -1).copy()
    if kind == "fp8":
        b = words.view(np.uint8)
        b[(b & 0x7F) == 0x7F] = 0x38  # no NaN codes (1.0 instead)
        s = np.full((*lead, -(-n // 128), -(-k // 128)), qlayout.FP8_SCALE / (448 * math.sqrt(k)), np.float32)
        return qlayout.Packed(kind, tuple(shape), words, round_to(s, "F16"), "F16", 7, 128)
    group, lg = (128, 7) if kind == "int4" else (k, qlayout.WHOLE_ROW)
    s = np.full((*lead, n, -(-k // group)), 1 / (8 * math.sqrt(k)) if kind == "int4" else 1 / (128 * math.sqrt(k)),
                np.float32)
    return qlayout.Packed(kind, tuple(shape), words, round_to(s, "F16"), "F16", lg)


def quantized_weight(scheme: str):
    """bench.random_model's `weight` hook: the projections and the stacked experts as random quantized weights, the
    rest left to it."""
    def make(be, role, shape, seed):
        if role in QUANT_ROLES and role != "lm_head" and len(shape) == (3 if role in EXPERT_ROLES else 2):
            return be.upload_packed(random_packed(scheme, shape, seed), role)
        return None
    return make


def measure(bench, model, bw: float) -> dict:
    """Bytes per decode token, roofline, decode and prefill tok/s of one model (released after)."""
    be = model.backend
    try:
        bpt = bytes_per_token(model)
        res = {"weight_bytes": be.weight_bytes, "bytes_per_token": bpt, "roofline_tok_s": bw / bpt}
        res["decode_tok_s"] = bench.time_decode(model)
        res["decode_pct_roofline"] = 100 * res["decode_tok_s"] / res["roofline_tok_s"]
        res["prefill_tok_s"] = bench.time_prefill(model, PREFILL_T)
    finally:
        be.release(model.weights)
    return res


def bench_quant(bench, name: str, scheme: str) -> dict:
    """The quantized and the fp16 model of a named shape, one after the other on one card (see the module docstring).
    `bench`: core.cuda.bench, whose random_model and timings these are (it imports this module for its --quant
    flag, so this one takes it as an argument rather than importing it back: core/ has no import cycle)."""
    import pycuda.autoprimaryctx  # noqa: F401

    name, raw = resolve(name)
    context = min(ModelConfig.from_hf(pick_spec(raw), raw).max_position_embeddings, PREFILL_T + 256)
    model = bench.random_model(raw, "float16", context=context, weight=quantized_weight(scheme))
    res = {"config": name, "scheme": scheme, "device": model.backend.device.name(),
           "date": datetime.date.today().isoformat(), "copy_gbps": bench.copy_bandwidth(model.backend) / 1e9}
    res["quant"] = measure(bench, model, res["copy_gbps"] * 1e9)
    del model
    res["fp16"] = measure(bench, bench.random_model(raw, "float16", context=context), res["copy_gbps"] * 1e9)
    q, d = res["quant"], res["fp16"]
    res["decode_x_fp16"] = q["decode_tok_s"] / d["decode_tok_s"]
    both = q["prefill_tok_s"] and d["prefill_tok_s"]  # None past the model's context
    res["prefill_x_fp16"] = q["prefill_tok_s"] / d["prefill_tok_s"] if both else None
    return res


def table(rows: list[dict]) -> str:
    """A plain-text table of bench_quant results."""
    out = [f"{'config':<14}{'scheme':<8}{'GB/token':>9}{'roof tok/s':>11}{'decode':>9}{'%roof':>7}{'x fp16':>8}"
           f"{'pf2048':>9}{'x fp16':>8}"]
    for r in rows:
        for label, m in ((r["scheme"], r["quant"]), ("fp16", r["fp16"])):
            ratio = (f"{r['decode_x_fp16']:>8.2f}", f"{r['prefill_x_fp16'] or float('nan'):>8.2f}") \
                if label != "fp16" else (f"{'':>8}", f"{'':>8}")
            out.append(f"{r['config'][:13]:<14}{label:<8}{m['bytes_per_token'] / 1e9:>9.2f}"
                       f"{m['roofline_tok_s']:>11,.0f}"
                       f"{m['decode_tok_s']:>9,.0f}{m['decode_pct_roofline']:>7.1f}{ratio[0]}"
                       f"{m['prefill_tok_s'] or float('nan'):>9,.0f}{ratio[1]}")
    if rows:
        out.append(f"card: {rows[0]['device']}, copy bandwidth {rows[0]['copy_gbps']:,.0f} GB/s, {rows[0]['date']}")
    return "\n".join(out)


def main(bench, configs: list[str], scheme: str, out_json: str | None = None) -> int:
    """`python -m core.cuda.bench CONFIG... --quant SCHEME`: bench_quant per shape, JSON lines, then the table."""
    rows = []
    for c in configs:
        rows.append(bench_quant(bench, c, scheme))
        print(json.dumps(rows[-1]), flush=True)
    if out_json:
        Path(out_json).write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0
