"""Quantized weights drawn at random in each format's stored form, and tiny quantized checkpoints, for the tests of
the CUDA backend's quantized layout and kernels (test_quant_layout.py on the CPU, test_cuda_quant.py on a GPU).

A Case holds one weight's parts repacked by core/cuda/qlayout.py (`packed`) and the reference dequantization of the
same parts by core/quant/dequant.py (`ref`, float32 of the scale dtype's values).
"""

from __future__ import annotations

import json

import numpy as np
from hypothesis import strategies as st

from core.cuda import qlayout as L
from core.quant import dequant
from core.quant.pack import AWQ_ORDER, float32_to_e4m3, gptq_to_v1_zeros, pack, round_to
from core.quant.quantize import quantize
from core.safetensors_io import to_float32
from core.testing import rng
from tinyckpt import LLAMA_CONFIG, write_checkpoint

SDTYPES = ("F16", "BF16", "F32")


class S:
    """Strategies: one format's random parts (a Case) per draw."""

    seed = st.integers(0, 2**32 - 1)
    sdtype = st.sampled_from(SDTYPES)
    rows = st.one_of(st.integers(1, 40), st.sampled_from([64, 128]))
    group = st.sampled_from([8, 16, 32, 64, 128, -1])  # in input columns; -1: one group a row
    groups = st.integers(1, 4)


class Case:
    """A weight's stored parts in one format: `packed` (qlayout's repack of them) and `ref` (dequant.py's dense
    weight, float32 of the scale dtype)."""

    def __init__(self, packed, ref):
        self.packed, self.ref = packed, ref


def scales(r, shape, sdtype):
    return round_to((r.random(shape) * 0.02 + 1e-3).astype(np.float32), sdtype)


def gptq_case(seed, bits, n, k, group, sym, desc_act, v1, sdtype) -> Case:
    r = rng(seed)
    g = k if group == -1 else group
    G = k // g
    q = r.integers(0, 1 << bits, (k, n))
    z = np.full((G, n), 1 << (bits - 1)) if sym else r.integers(1 if v1 else 0, 1 << bits, (G, n))  # v1: see pack
    order = r.permutation(k) if desc_act else np.arange(k)
    g_idx = np.empty(k, np.int32)
    g_idx[order] = np.arange(k) // g  # desc_act: columns grouped in activation order, as GPTQ writes it
    qzeros = pack(z, bits, axis=1)
    qzeros = gptq_to_v1_zeros(qzeros, bits) if v1 else qzeros
    args = (pack(q, bits, axis=0), qzeros, scales(r, (G, n), sdtype), g_idx, bits, v1, sdtype)
    return Case(L.from_gptq(*args), to_float32(dequant.gptq(*args), sdtype))


def awq_case(seed, n8, k, group, sdtype) -> Case:
    r = rng(seed)
    n, g = 8 * n8, k if group == -1 else group
    q, z = r.integers(0, 16, (k, n)), r.integers(0, 16, (k // g, n))
    qw, qz = pack(q, 4, axis=1, order=AWQ_ORDER), pack(z, 4, axis=1, order=AWQ_ORDER)
    s = scales(r, (k // g, n), sdtype)
    return Case(L.from_awq(qw, qz, s, sdtype), to_float32(dequant.awq(qw, qz, s, g, sdtype), sdtype))


def ct_int_case(seed, bits, n, k, strategy, group, sym, actorder, packed, sdtype) -> Case:
    """compressed-tensors' integers: signed q and zero points, pack-quantized words or an I8 tensor (`group` is read
    with strategy "group" only)."""
    r = rng(seed)
    group = group or k
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = r.integers(lo, hi, (n, k))
    block = {"tensor": (n, k), "channel": (1, k), "group": (1, group)}[strategy]
    sshape = {"tensor": (1,), "channel": (n, 1), "group": (n, k // group)}[strategy]
    s = scales(r, sshape, sdtype)
    z = None if sym else r.integers(lo, hi, sshape).astype(np.int8)
    g_idx = None
    if actorder and strategy == "group":
        g_idx = np.empty(k, np.int32)
        g_idx[r.permutation(k)] = np.arange(k) // group
    values = pack((q - lo).astype(np.uint8), bits, axis=1) if packed else q.astype(np.int8)
    ref = dequant.int_weight(dequant.ct_packed(values, bits, (n, k)) if packed else values, s, sdtype, z, block, g_idx)
    return Case(L.from_int(values, bits, (n, k), s, sdtype, z, block, g_idx, packed), to_float32(ref, sdtype))


def fp8_case(seed, n, k, block, sdtype) -> Case:
    r = rng(seed)
    br, bc = block
    codes = float32_to_e4m3(r.normal(size=(n, k)).astype(np.float32) * 100)  # subnormals to 448 (saturated)
    s = scales(r, (-(-n // br), -(-k // bc)), sdtype)
    ref = dequant.fp8(codes, "F8_E4M3", s, sdtype, block)
    return Case(L.from_fp8(codes, s, sdtype, block), to_float32(ref, sdtype))


@st.composite
def cases(draw, kinds=("gptq", "awq", "ct", "fp8")) -> Case:
    """Any covered format, with K off the 16-byte chunk now and then (K = groups x group, group down to a word)."""
    kind, seed, sdtype, n = draw(st.sampled_from(kinds)), draw(S.seed), draw(S.sdtype), draw(S.rows)
    group = draw(S.group)
    if kind == "gptq":
        bits = draw(st.sampled_from([4, 8]))
        g = max(group, 32 // bits) if group != -1 else -1
        k = draw(S.groups) * (g if g != -1 else 8 * draw(st.integers(1, 40)))
        return gptq_case(seed, bits, n, k, g, draw(st.booleans()), draw(st.booleans()), draw(st.booleans()), sdtype)
    if kind == "awq":
        g = max(group, 8) if group != -1 else -1
        k = draw(S.groups) * (g if g != -1 else draw(st.integers(1, 300)))
        return awq_case(seed, -(-n // 8), k, g, sdtype)
    if kind == "ct":
        bits, strategy = draw(st.sampled_from([4, 8])), draw(st.sampled_from(["tensor", "channel", "group"]))
        g = max(group if group != -1 else 128, 32 // bits)
        k = draw(S.groups) * g if strategy == "group" else draw(st.integers(1, 300))
        return ct_int_case(seed, bits, n, k, strategy, g, draw(st.booleans()), draw(st.booleans()),
                           draw(st.booleans()), sdtype)
    block = draw(st.sampled_from([(128, 128), (1, None), (None, None), (16, 32)]))  # block, channel, tensor
    k = draw(st.one_of(st.integers(1, 300), st.sampled_from([128, 256, 384])))
    block = (block[0] or n, block[1] or k)
    return fp8_case(seed, n, k, block, sdtype)


def groups_for(bits: int, k: int) -> list[int]:
    """The groups (input columns per scale) the layout holds over k columns at `bits`: -1 (one a row), or a power of
    two of at least a word's codes, below k, dividing it."""
    return [-1] + [g for g in (8, 16, 32, 64, 128) if g >= 32 // bits and g < k and k % g == 0]


@st.composite
def expert_cases(draw, n: int, k: int, experts: int) -> list[Case]:
    """`experts` weights [n, k] in one format and one layout, each expert its own random parts (seeds drawn), zero
    points or none drawn per expert where the format may have either (so a stack mixes symmetric experts with
    asymmetric ones): the per-expert tensors of a quantized MoE checkpoint. Formats whose packing k or n does not
    fit are not drawn (GPTQ packs k down whole words, AWQ n along them)."""
    sdtype, seed = draw(S.sdtype), draw(S.seed)
    kinds = ["ct", "fp8"] + (["gptq"] if k % 8 == 0 else []) + (["awq"] if n % 8 == 0 else [])
    kind = draw(st.sampled_from(kinds))
    syms = [draw(st.booleans()) for _ in range(experts)]
    seeds = [(seed + 7919 * e) % 2**32 for e in range(experts)]
    if kind == "gptq":
        bits = draw(st.sampled_from([4, 8]))
        group, v1 = draw(st.sampled_from(groups_for(bits, k))), draw(st.booleans())
        return [gptq_case(s, bits, n, k, group, sym, False, v1, sdtype) for s, sym in zip(seeds, syms)]
    if kind == "awq":
        group = draw(st.sampled_from(groups_for(4, k)))
        return [awq_case(s, n // 8, k, group, sdtype) for s in seeds]
    if kind == "ct":
        bits, packed = draw(st.sampled_from([4, 8])), draw(st.booleans())
        strategy = draw(st.sampled_from(["tensor", "channel"] + (["group"] if len(groups_for(bits, k)) > 1 else [])))
        group = draw(st.sampled_from(groups_for(bits, k)[1:])) if strategy == "group" else None
        return [ct_int_case(s, bits, n, k, strategy, group, sym, False, packed, sdtype) for s, sym in zip(seeds, syms)]
    block = draw(st.sampled_from([(128, 128), (1, k), (n, k), (16, 32)]))
    return [fp8_case(s, n, k, block, sdtype) for s in seeds]


def gptq_checkpoint(tmp, cfg=None, bits=4, group=32, desc_act=True, sdtype="F16", seed=0):
    """A tiny llama checkpoint whose linear weights are random GPTQ parts (asymmetric, v1 zero points; F16 or F32
    scales: numpy cannot write BF16)."""
    path = write_checkpoint(tmp, cfg, tokenizer=True, dtype=np.float16)
    return to_gptq(path, bits, group, desc_act, sdtype, seed)


GPTQ_WEIGHTS = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")  # llama / qwen3_moe's and mixtral's experts


def to_gptq(path, bits=4, group=32, desc_act=True, sdtype="F16", seed=0):
    """Plain checkpoint `path` (one safetensors file) made GPTQ in place: every 2-D weight named as GPTQ_WEIGHTS
    (attention, MLP, experts; not the router, embeddings, lm_head) replaced by random GPTQ parts of its shape."""
    from safetensors.numpy import load_file, save_file

    t = load_file(str(path / "model.safetensors"))
    r = rng(seed)
    for name in [n for n in t if n.endswith(GPTQ_WEIGHTS) and t[n].ndim == 2]:
        n, k = t.pop(name).shape
        c = name.removesuffix(".weight")
        g = k if group == -1 else group
        w = gptq_parts(r, bits, n, k, g, desc_act, sdtype)
        t.update({f"{c}.{s}": v for s, v in w.items()})
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfgd = json.loads((path / "config.json").read_text())
    cfgd["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act,
                                   "sym": False}
    (path / "config.json").write_text(json.dumps(cfgd))
    return path


def gptq_parts(r, bits, n, k, g, desc_act, sdtype):
    """Round-to-nearest GPTQ parts of a random weight [n, k] (small values, so a model stays well-conditioned)."""
    G = k // g
    g_idx = np.empty(k, np.int32)
    g_idx[r.permutation(k) if desc_act else np.arange(k)] = np.arange(k) // g
    q = r.integers(0, 1 << bits, (k, n))
    z = r.integers(1, 1 << bits, (G, n))
    s = round_to((r.random((G, n)) * 0.3 / (1 << bits) / np.sqrt(k)).astype(np.float32) + 1e-4, sdtype)
    return {"qweight": pack(q, bits, axis=0), "qzeros": gptq_to_v1_zeros(pack(z, bits, axis=1), bits),
            "scales": s, "g_idx": g_idx}


QUANTIZED = {  # name -> make(tmp) -> a checkpoint directory (tinyckpt's llama, 14 quantized weights)
    "ct-w4a16-g16": lambda t: ct_checkpoint(t, "w4a16", 16, True),
    "ct-w4a16-g16-asym": lambda t: ct_checkpoint(t, "w4a16", 16, False),
    "ct-w8a16": lambda t: ct_checkpoint(t, "w8a16", None, True),
    "ct-w8a16-asym": lambda t: ct_checkpoint(t, "w8a16", None, False),
    "ct-fp8": lambda t: ct_checkpoint(t, "fp8", None, True),
    "gptq-desc-act": lambda t: gptq_checkpoint(t / "g", group=16),
    "gptq-8bit-channel": lambda t: gptq_checkpoint(t / "g", bits=8, group=-1, desc_act=False),
}


def ct_checkpoint(tmp, scheme, group, sym, cfg=None, dtype=np.float32):
    src = write_checkpoint(tmp / "plain", cfg, tokenizer=True, dtype=dtype)
    quantize(src, tmp / "q", scheme, group, sym)
    return tmp / "q"


def tiny_config(**kw):
    """A llama shape whose products take the kernels' aligned paths (K a multiple of 32) and groups of 32."""
    return dict(LLAMA_CONFIG, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, **kw)


MOE_SIZES = {  # family -> core.synth.make_config sizes of a tiny MoE model (experts of K = 128 and 64 or 96)
    "qwen3_moe": dict(vocab_size=320, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, intermediate_size=192, max_position_embeddings=256,
                      num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64, norm_topk_prob=True,
                      mlp_only_layers=[1]),  # layer 1 dense: a quantized dense MLP beside the experts
    "mixtral": dict(vocab_size=320, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256, num_local_experts=4,
                    num_experts_per_tok=2),
}


def moe_checkpoint(path, family="qwen3_moe", dtype="float32", std=0.15, **sizes):
    """A tiny random MoE checkpoint of `family` in its hub layout, experts one tensor each (core.synth), sizes
    MOE_SIZES[family] updated with `sizes`."""
    from core.registry import default_registry
    from core.synth import make_config, write_checkpoint as synth_checkpoint

    spec = default_registry()[family].spec
    return synth_checkpoint(spec, make_config(spec, **dict(MOE_SIZES[family], **sizes)), path, dtype=dtype, std=std)


def moe_quantized(tmp, how: str, family="qwen3_moe", **sizes):
    """A quantized tiny MoE checkpoint: how "gptq" (4-bit, group 32, random parts; "gptq-desc-act" with act-order)
    or an `archkit quantize` scheme with its group ("w4a16-g32-asym", "w8a16", "fp8")."""
    if how.startswith("gptq"):
        path = moe_checkpoint(tmp / "g", family, "float16", **sizes)
        return to_gptq(path, 4, 32, how == "gptq-desc-act")
    scheme, *rest = how.split("-")
    group = next((int(x[1:]) for x in rest if x.startswith("g")), None)
    quantize(moe_checkpoint(tmp / "plain", family, **sizes), tmp / "q", scheme, group, "asym" not in rest)
    return tmp / "q"

