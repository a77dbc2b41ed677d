"""The numpy reference of every quantized format: stored parts → the dense weight [out, in], one function per format.

Every format stores integers q (or FP8 values) and float scales s (and, when asymmetric, zero points z) and means

    W[n, k] = (q[n, k] - z[n, group(k)]) * s[n, group(k)]

(z = 0 when symmetric). The product is formed in float32 (exactly for F16 and BF16 scales: |q - z| < 2**9 and the
scale has at most 11 significant bits; rounded once, like any float32 multiply, for F32 scales) and then rounded to
nearest even to the scales' stored dtype. The reference implementations (compressed-tensors' dequantize, GPTQModel's
and AutoAWQ's torch dequantization) multiply in the scales' dtype, so this is bit for bit the weight they compute.
The inputs here are arrays already checked for shape and dtype (core.quant.formats); these functions only do the
arithmetic.
"""

from __future__ import annotations

import numpy as np

from ..safetensors_io import to_float32
from .pack import AWQ_ORDER, fp8_to_float32, gptq_v1_zeros, round_to, unpack


def _scaled(x: np.ndarray, s: np.ndarray, scale_dtype: str) -> np.ndarray:
    """x * s in float32, rounded to the scales' stored dtype (see the module docstring)."""
    return round_to(x.astype(np.float32) * s, scale_dtype)


def gptq(qweight, qzeros, scales, g_idx, bits: int, v1: bool, scale_dtype: str) -> np.ndarray:
    """GPTQ (AutoGPTQ / GPTQModel / optimum layout) → W [N, K].

    qweight int32 [K * bits / 32, N]: input rows packed down the columns, row 32 / bits * i + j of W^T in field j
    of word i. qzeros int32 [G, N * bits / 32]: output columns packed along the row. scales [G, N].
    g_idx int32 [K]: the group of each input row (k // group_size, or a permutation's groups under desc_act).

        W^T[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n],   z = unpack(qzeros + 0x11111111) if v1

    v1 (checkpoint_format "gptq", the default) stores zero points minus one; see pack.gptq_v1_zeros.
    """
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = unpack(qweight, bits, axis=0).astype(np.int32)  # [K, N]
    z = unpack(gptq_v1_zeros(qzeros, bits) if v1 else qzeros, bits, axis=1, count=n).astype(np.int32)  # [G, N]
    g = np.asarray(g_idx, np.int64)
    assert q.shape == (k, n) and g.shape == (k,)
    s = to_float32(scales, scale_dtype)
    return np.ascontiguousarray(_scaled(q - z[g], s[g], scale_dtype).T)


def awq(qweight, qzeros, scales, group_size: int, scale_dtype: str, bits: int = 4) -> np.ndarray:
    """AWQ, AutoAWQ's GEMM layout → W [N, K].

    qweight int32 [K, N * bits / 32] and qzeros int32 [G, N * bits / 32]: output columns packed along each row in
    AWQ_ORDER (slot i of a word holds column 8c + AWQ_ORDER[i]); scales [G, N]; group(k) = k // group_size.

        W^T[k, n] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]
    """
    n = scales.shape[1]
    q = unpack(qweight, bits, axis=1, count=n, order=AWQ_ORDER).astype(np.int32)  # [K, N]
    z = unpack(qzeros, bits, axis=1, count=n, order=AWQ_ORDER).astype(np.int32)  # [G, N]
    g = np.arange(q.shape[0]) // group_size
    s = to_float32(scales, scale_dtype)
    return np.ascontiguousarray(_scaled(q - z[g], s[g], scale_dtype).T)


def expand(s: np.ndarray, shape: tuple[int, int], group: tuple[int, int]) -> np.ndarray:
    """Scales (or zero points) of blocks of `group` = (rows, cols) elements → one per element of `shape`:
    per-tensor (1, 1) blocks cover everything, per-channel (1, K), groups (1, g), FP8 blocks (128, 128); the last
    block of a dimension may be cut short."""
    n, k = shape
    s = np.asarray(s).reshape(-(-n // group[0]), -(-k // group[1]))  # the caller checked the count
    return np.repeat(np.repeat(s, group[0], axis=0)[:n], group[1], axis=1)[:, :k]


def fp8(weight, weight_dtype: str, scale, scale_dtype: str, block: tuple[int, int]) -> np.ndarray:
    """FP8 (transformers' "fp8" quant_method, and compressed-tensors' float-quantized) → W [N, K].

    weight: the F8_E4M3 / F8_E5M2 codes [N, K]; scale: one per block of `block` = (rows, cols) elements (transformers'
    `weight_scale_inv` [ceil(N / 128), ceil(K / 128)] with weight_block_size [128, 128]; [N, 1] per channel; one
    per tensor).   W[n, k] = fp8(weight[n, k]) * s[n // rows, k // cols]
    """
    x = fp8_to_float32(weight, weight_dtype)
    s = expand(to_float32(scale, scale_dtype), x.shape, block)
    return _scaled(x, s, scale_dtype)


def int_weight(q, scale, scale_dtype: str, zero=None, block=(1, 1), g_idx=None) -> np.ndarray:
    """Signed integers already unpacked ([N, K], e.g. compressed-tensors' int8 `weight` or its unpacked
    `weight_packed`) → W [N, K].   W[n, k] = (q[n, k] - z[n, group(k)]) * s[n, group(k)]

    block: (1, K) per channel, (1, g) per group, (N, K) per tensor; g_idx (compressed-tensors' `weight_g_idx`, from
    activation ordering) gives group(k) directly instead.
    """
    q = np.asarray(q, np.int32)
    s = to_float32(scale, scale_dtype)
    z = None if zero is None else np.asarray(zero, np.int32)
    if g_idx is not None:
        g = np.asarray(g_idx, np.int64)
        s = s.reshape(q.shape[0], -1)[:, g]
        z = None if z is None else z.reshape(q.shape[0], -1)[:, g]
    else:
        s = expand(s, q.shape, block)
        z = None if z is None else expand(z, q.shape, block)
    return _scaled(q if z is None else q - z, s, scale_dtype)


def ct_packed(packed, bits: int, shape: tuple[int, int]) -> np.ndarray:
    """compressed-tensors' pack-quantized `weight_packed` int32 [N, ceil(K * bits / 32)] → the signed integers
    [N, K]: values are packed along each row with 2**(bits - 1) added (pack_to_int32's offset)."""
    return unpack(packed, bits, axis=1, count=shape[1]).astype(np.int32) - (1 << (bits - 1))


def ct_packed_zero(packed, bits: int, rows: int) -> np.ndarray:
    """compressed-tensors' packed `weight_zero_point` int32 [ceil(N * bits / 32), G] (packed down the columns, with
    the same offset) → the signed zero points [N, G]."""
    return unpack(packed, bits, axis=0, count=rows).astype(np.int32) - (1 << (bits - 1))
