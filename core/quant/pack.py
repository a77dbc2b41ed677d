"""Bit-level codecs of the quantized formats: integers packed into int32 words, and the two FP8 encodings.

Packing, as every format here writes it: a run of 32 / bits values fills one 32-bit word, value i at bits
[i * bits, (i + 1) * bits) counting from the least significant bit (words are stored little-endian, as
safetensors stores every integer). The formats differ only in the axis they pack along and, for AWQ, in which
value of the run goes to which slot of the word (`order`). Widths that do not divide 32 are not read: the formats
pack them differently from version to version (compressed-tensors went from padded words to dense packing).
"""

from __future__ import annotations

import functools

import numpy as np

from ..safetensors_io import float32_to_bf16_bits

PACKED_BITS = (2, 4, 8)
# AutoAWQ's GEMM layout: slot i of each word holds value AWQ_ORDER[i] of its run of 8 (awq/modules/linear/gemm.py,
# from_linear: order_map = [0, 2, 4, 6, 1, 3, 5, 7]); its kernels' dequantization undoes exactly this.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn (S.1111.110): the format has no infinities


def unpack(words: np.ndarray, bits: int, axis: int, count: int | None = None, order=None) -> np.ndarray:
    """Unsigned `bits`-bit values packed into int32 `words` along `axis` → uint8 (uint16 for 8 bits is not needed:
    values stay below 256), with `count` values kept along that axis (the packed run may be padded).

    order: for each slot of a word, which value of its run it holds (AWQ_ORDER); None is the natural order.
    """
    assert bits in PACKED_BITS, bits
    per = 32 // bits
    u = np.moveaxis(np.ascontiguousarray(words).view(np.uint32), axis, -1)
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
    slots = ((u[..., None] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.uint8)  # [..., words, per]
    if order is not None:
        slots = slots[..., np.argsort(order)]  # value j of a run sits in the slot that order maps to j
    vals = slots.reshape(u.shape[:-1] + (u.shape[-1] * per,))
    if count is not None:
        vals = vals[..., :count]
    return np.moveaxis(vals, -1, axis)


def pack(values: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """The inverse of unpack: unsigned integer `values` (each < 2**bits) → int32 words along `axis`, the last run
    padded with zeros."""
    assert bits in PACKED_BITS, bits
    v = np.moveaxis(np.asarray(values), axis, -1).astype(np.uint32)
    assert v.size == 0 or int(v.max()) < (1 << bits), "a value does not fit in the bit width"
    per = 32 // bits
    pad = -v.shape[-1] % per
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.uint32)], axis=-1)
    runs = v.reshape(v.shape[:-1] + (v.shape[-1] // per, per))
    if order is not None:
        runs = runs[..., list(order)]  # slot i takes value order[i] of the run
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
    words = np.bitwise_or.reduce(runs << shifts, axis=-1).astype(np.uint32)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))


def v1_offset(bits: int) -> int:
    """The word GPTQ's v1 checkpoint format subtracts from every qzeros word: 1 in each field (0x11111111 at 4 bits)."""
    return sum(1 << (bits * i) for i in range(32 // bits))


def gptq_v1_zeros(words: np.ndarray, bits: int) -> np.ndarray:
    """qzeros words of a v1 ("gptq") checkpoint → the words of the true zero points (the "gptq_v2" layout).

    v1 stores every zero point minus one. The correction is done on whole words modulo 2**32, as GPTQModel does on
    load (convert_gptq_v1_to_v2_format) and undoes on save: a true zero point of 0 was stored with a borrow from the
    field above, which the word addition gives back. (AutoGPTQ's kernels add 1 field by field instead; the two agree
    unless a field below the top one holds all ones, which only a true zero point of 0 produces.)
    """
    u = np.ascontiguousarray(words).view(np.uint32).astype(np.uint64)
    return ((u + v1_offset(bits)) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def gptq_to_v1_zeros(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of gptq_v1_zeros: true zero-point words → what a v1 checkpoint stores."""
    u = np.ascontiguousarray(words).view(np.uint32).astype(np.uint64)
    return ((u + (1 << 32) - v1_offset(bits)) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


# -- FP8 ----------------------------------------------------------------------------------------------------------

@functools.cache
def fp8_table(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 codes of "F8_E4M3" (OCP float8_e4m3fn: bias 7, no infinities, NaN only at
    S.1111.111) or "F8_E5M2" (IEEE-like: bias 15, infinities and NaNs at exponent 31)."""
    c = np.arange(256)
    sign = np.where(c >> 7, -1.0, 1.0)
    if dtype == "F8_E4M3":
        e, m, mbits, bias, top = (c >> 3) & 0xF, c & 7, 3, 7, None
    elif dtype == "F8_E5M2":
        e, m, mbits, bias, top = (c >> 2) & 0x1F, c & 3, 2, 15, 31
    else:
        raise ValueError(dtype)
    frac = m / (1 << mbits)
    mag = np.where(e == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (e - bias))
    if top is None:
        mag = np.where((e == 15) & (m == 7), np.nan, mag)
    else:
        mag = np.where(e == top, np.where(m == 0, np.inf, np.nan), mag)
    table = (sign * mag).astype(np.float32)
    table.flags.writeable = False
    return table


def fp8_to_float32(codes: np.ndarray, dtype: str) -> np.ndarray:
    """FP8 codes (the stored bytes, as uint8) → float32, exactly."""
    return fp8_table(dtype)[np.asarray(codes, dtype=np.uint8)]


def float32_to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 → float8_e4m3fn codes (uint8): saturated to ±448 (as compressed-tensors clamps before casting), then
    rounded to nearest, ties to the even code (torch's cast); NaN stays NaN."""
    x = np.asarray(x, dtype=np.float32)
    grid = fp8_table("F8_E4M3")[:127].astype(np.float64)  # codes 0..126: the non-negative finite values, ascending
    a = np.minimum(np.abs(x).astype(np.float64), E4M3_MAX)
    hi = np.clip(np.searchsorted(grid, a, side="left"), 1, 126)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(a == 0, 0, code)
    code = code | np.where(np.signbit(x), 0x80, 0)
    return np.where(np.isnan(x), 0x7F, code).astype(np.uint8)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values → the bits of `dtype` ("F32", "F16", "BF16" as uint16), rounded to nearest even: what a
    multiplication carried out in that dtype returns."""
    if dtype == "F16":
        return np.asarray(x, np.float32).astype(np.float16)
    if dtype == "BF16":
        return float32_to_bf16_bits(x)
    return np.asarray(x, np.float32)


def fp8_scale(w: np.ndarray, scale_dtype: str) -> np.ndarray:
    """The bits [N, 1] (scale_dtype) of FP8's per-channel scale of w [N, K]: each row's absolute maximum over 448
    (compressed-tensors' min-max observer), 1 for an all-zero row."""
    amax = np.abs(w).max(axis=1, keepdims=True)
    return round_to(np.where(amax > 0, amax / E4M3_MAX, 1.0), scale_dtype)
