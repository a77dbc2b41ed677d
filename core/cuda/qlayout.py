"""The device layout of quantized weights (issue 16): what gemv_q.cu reads, made on the host at load with numpy from a
core.quant.QuantizedTensor's stored parts (never through the dense dequantization), and decoded back by `dense()`,
the layout's numpy reference.

One layout per kind, all of them rows of 32-bit words along K, so that a thread's 16-byte load is 4 words of one row:

    int4  words uint32 [N, Kp / 8]   code k of a row in word k // 8, bits 4 (k % 8) .. 4 (k % 8) + 3 (unsigned)
    int8  words uint32 [N, Kp / 4]   code k in byte k % 4 of word k // 4 (unsigned)
    fp8   words uint32 [N, Kp / 4]   the F8_E4M3 byte of element k in byte k % 4 of word k // 4

Kp is K rounded up to a whole 16-byte chunk (32 codes int4, 16 int8 / fp8); the codes past K are zero and meet x = 0
(the backend stages a zero-padded x). Beside the words:

    scales  [R, G] in the scales' stored dtype (F16, BF16 or F32): row n uses scale row n // srow (srow 1, an FP8
            block's 128 rows, or ALL_ROWS for one scale per tensor), element k uses column min(k >> lg, G - 1);
            G = 1 covers the whole row (per channel / per tensor). fp8 scales are stored times 256 (see gemv_q.cu:
            the kernel's e4m3 codes become fp16 values 2**-8 times too small, and 256 s is exact).
    zeros   uint8 [N, G] unsigned zero points, or None for 2**(bits - 1) everywhere (symmetric)
    perm    int32 [K] or None: packed column j is input column perm[j] (GPTQ desc_act, compressed-tensors actorder)

The integer codes are unsigned (GPTQ's and AWQ's as stored; compressed-tensors' signed q plus 2**(bits - 1), which is
how pack-quantized stores them), so every int format means W[n, k] = (u - uz) * s, rounded once to the scale dtype,
exactly as core/quant/dequant.py computes it: `dense()` of a repacked weight equals the reference bit for bit
(tests/test_cuda_quant.py). 4- and 8-bit integers and E4M3 are covered; a group of input columns must be a power of
two of at least one word's codes. An act-order g_idx must be a permutation of whole groups (as GPTQ writes it: every
group g columns), which becomes `perm`. Anything else — 2-bit codes, E5M2, other group sizes, a g_idx that is not
such a permutation, a zero point outside [0, 2**bits), an fp8 F16 scale over 255, transposed (Conv1D) weights —
returns None from `repack`, and the weight is loaded dense as before.

Mixture-of-experts roles (experts.gate / up / down, [E, out, in] once stacked) are one Packed with a leading expert
axis, the checkpoint's per-expert QuantizedTensors (a core.quant.QuantizedStack) repacked one by one and stacked:

    words   uint32 [E, N, Kp / per]     expert e's weight is words[e], scales[e], zeros[e] as above
    scales  [E, R, G]
    zeros   uint8 [E, N, G] or None     None only when no expert has zero points; a symmetric expert among
                                        asymmetric ones gets its 2**(bits - 1) written out
    perm    None                        always: a permutation per expert would need x staged per expert

so that expert e starts e * N * Kp / per words, e * R * G scales and e * N * G zero points in (moe_q.cu's strides,
QTensor.expert's views). Every expert must come out in one layout (kind, shape, scale dtype, group, scale rows and
columns) and without act-order (refused from the headers already, `covered`); otherwise the role is loaded dense.
"""

from __future__ import annotations

import math

import attrs
import numpy as np

from ..quant.base import QuantizedStack, QuantizedTensor, read_part
from ..quant.dequant import ct_packed_zero
from ..quant.pack import AWQ_ORDER, fp8_to_float32, gptq_v1_zeros, round_to, unpack
from ..safetensors_io import to_float32

KINDS = {"int4": 4, "int8": 8, "fp8": 8}  # kind -> bits of a code
CHUNK_BYTES = 16  # one thread's load
ALL_ROWS = 1 << 30  # srow of a per-tensor scale: every row uses scale row 0
WHOLE_ROW = 30  # lg when G == 1 (any value works there: the column is clamped to 0)
FP8_SCALE = 256.0  # fp8 scales are stored times this (see the module docstring)


@attrs.frozen
class Packed:
    """One weight [N, K], or the experts' weights stacked [E, N, K], in the device layout (see the module docstring);
    numpy arrays, uploaded as they are."""

    kind: str  # "int4", "int8" or "fp8"
    shape: tuple[int, ...]  # (N, K), or (E, N, K) stacked
    words: np.ndarray  # uint32 [(E,) N, Kp / (32 / bits)]
    scales: np.ndarray  # [(E,) R, G] stored bits: float16 (F16), uint16 (BF16) or float32 (F32)
    sdtype: str  # the scales' safetensors dtype, which is the dequantized weight's: "F16", "BF16" or "F32"
    lg: int  # log2 of the input columns sharing a scale (WHOLE_ROW when G == 1)
    srow: int = 1  # output rows sharing a scale row
    zeros: np.ndarray | None = None  # uint8 [(E,) N, G]; None: 2**(bits - 1)
    perm: np.ndarray | None = None  # int32 [K]; never stacked

    @property
    def bits(self) -> int:
        """Bits of a code."""
        return KINDS[self.kind]

    @property
    def kp(self) -> int:
        """K padded to whole 16-byte chunks."""
        return self.words.shape[-1] * (32 // self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes on the device: words, scales, zeros and perm."""
        return sum(a.nbytes for a in (self.words, self.scales, self.zeros, self.perm) if a is not None)

    @property
    def experts(self) -> int | None:
        """E of a stack, None for one weight."""
        return self.shape[0] if len(self.shape) == 3 else None

    def expert(self, e: int) -> Packed:
        """Expert e of a stack as one weight [N, K] (views of the stacked arrays)."""
        return Packed(self.kind, self.shape[1:], self.words[e], self.scales[e], self.sdtype, self.lg, self.srow,
                      None if self.zeros is None else self.zeros[e])


def chunk_codes(kind: str) -> int:
    """Codes in one 16-byte chunk: 32 (int4), 16 (int8, fp8)."""
    return CHUNK_BYTES * 8 // KINDS[kind]


def padded_k(kind: str, k: int) -> int:
    """K rounded up to whole chunks."""
    c = chunk_codes(kind)
    return -(-k // c) * c


def group_log2(kind: str, k: int, groups: int) -> int | None:
    """lg for `groups` equal groups along K (WHOLE_ROW for one), or None when the group is not a power of two of at
    least one word's codes (the kernels read one scale per word at the finest)."""
    if groups == 1:
        return WHOLE_ROW
    g = k // groups
    if g * groups != k or g & (g - 1) or g < 32 // KINDS[kind]:
        return None
    return g.bit_length() - 1


def pack_rows(codes: np.ndarray, bits: int, kp: int) -> np.ndarray:
    """Unsigned codes [N, K] (each < 2**bits) → words uint32 [N, kp * bits / 32], code k of a row at bits
    (k % per) * bits of word k // per, zero past K."""
    n, k = codes.shape
    per = 32 // bits
    c = np.zeros((n, kp), np.uint32)
    c[:, :k] = codes
    c = c.reshape(n, kp // per, per)
    words = np.zeros((n, kp // per), np.uint32)
    for i in range(per):
        words |= c[:, :, i] << np.uint32(bits * i)
    return words


def pad_words(words: np.ndarray, kind: str, k: int) -> np.ndarray:
    """Words [N, ceil(K / per)] already in the layout's order → [N, Kp / per], zero words appended."""
    w = np.ascontiguousarray(words).view(np.uint32)
    want = padded_k(kind, k) * KINDS[kind] // 32
    if w.shape[1] == want:
        return w
    out = np.zeros((w.shape[0], want), np.uint32)
    out[:, :w.shape[1]] = w
    return out


def act_order(g_idx, k: int, groups: int) -> tuple[np.ndarray | None, bool]:
    """(perm or None, usable): the column order that makes each group contiguous; usable is False when g_idx is not
    a permutation of whole groups (then the weight stays dense)."""
    if g_idx is None:
        return None, True
    g = np.asarray(g_idx, np.int64).reshape(-1)
    size = k // groups
    natural = np.arange(k) // size
    if np.array_equal(g, natural):
        return None, True
    perm = np.argsort(g, kind="stable")
    if not np.array_equal(g[perm], natural):
        return None, False
    return perm.astype(np.int32), True


def zeros_u8(z, bits: int, shape) -> np.ndarray | None:
    """Unsigned zero points [N, G] as uint8, or None when one falls outside [0, 2**bits) (the kernels' range) —
    or when every one is 2**(bits - 1), which the kernels assume when there are none (symmetric)."""
    z = np.broadcast_to(np.asarray(z, np.int64), shape)
    if z.size and (z.min() < 0 or z.max() >= 1 << bits):
        raise _Dense
    if not z.size or (z == 1 << (bits - 1)).all():
        return None
    return np.ascontiguousarray(z, np.uint8)


class _Dense(Exception):
    """This weight's data does not fit the layout: load it dense (repack returns None)."""


# -- each format's parts → Packed ---------------------------------------------------------------------------------

def from_gptq(qweight, qzeros, scales, g_idx, bits: int, v1: bool, sdtype: str) -> Packed | None:
    """GPTQ (qweight int32 [K * bits / 32, N] packed down the columns, qzeros, scales [G, N], g_idx [K] or None;
    core.quant.dequant.gptq) → the layout. Without act-order the words are qweight transposed, as they are."""
    if bits not in (4, 8):
        return None
    kind = f"int{bits}"
    n, groups = qweight.shape[1], scales.shape[0]
    k = qweight.shape[0] * 32 // bits
    lg = group_log2(kind, k, groups)
    perm, ok = act_order(g_idx, k, groups)
    if lg is None or not ok:
        return None
    z = unpack(gptq_v1_zeros(qzeros, bits) if v1 else qzeros, bits, axis=1, count=n).T  # [N, G]
    if perm is None:
        words = pad_words(np.asarray(qweight).T, kind, k)
    else:
        codes = unpack(qweight, bits, axis=0)[perm].T  # [N, K], columns in group order
        words = pack_rows(codes, bits, padded_k(kind, k))
    return _checked(kind, (n, k), words, np.ascontiguousarray(scales.T), sdtype, lg, 1, z, perm)


def from_awq(qweight, qzeros, scales, sdtype: str) -> Packed | None:
    """AWQ's GEMM layout (qweight int32 [K, N / 8] packed along the rows in AWQ_ORDER; core.quant.dequant.awq)."""
    k, n, groups = qweight.shape[0], scales.shape[1], scales.shape[0]
    lg = group_log2("int4", k, groups)
    if lg is None:
        return None
    codes = unpack(qweight, 4, axis=1, count=n, order=AWQ_ORDER).T  # [N, K]
    z = unpack(qzeros, 4, axis=1, count=n, order=AWQ_ORDER).T
    words = pack_rows(codes, 4, padded_k("int4", k))
    return _checked("int4", (n, k), words, np.ascontiguousarray(scales.T), sdtype, lg, 1, z, None)


def from_int(values, bits: int, shape, scale, sdtype: str, zero, block: tuple[int, int], g_idx=None,
             packed: bool = False) -> Packed | None:
    """compressed-tensors' integers (core.quant.dequant.int_weight): `values` the pack-quantized words [N, ceil(K *
    bits / 32)] (unsigned, 2**(bits - 1) added: the layout's own order) when `packed`, else signed int8 [N, K];
    scale one per `block` = (rows, cols) of elements; zero signed, one per scale, or None."""
    if bits not in (4, 8):
        return None
    kind, (n, k) = f"int{bits}", shape
    br, bc = block
    groups = -(-k // bc)
    lg = group_log2(kind, k, groups)
    perm, ok = act_order(g_idx, k, groups)
    if lg is None or not ok:
        return None
    off = 1 << (bits - 1)
    if packed and perm is None:
        words = pad_words(values, kind, k)
    else:
        codes = unpack(values, bits, axis=1, count=k) if packed else np.asarray(values, np.int16) + off
        if not packed and codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
            return None  # an I8 value outside the scheme's bits
        codes = np.asarray(codes, np.uint8)
        words = pack_rows(codes if perm is None else codes[:, perm], bits, padded_k(kind, k))
    s = np.asarray(scale).reshape(-(-n // br), groups)
    srow = 1 if br == 1 else ALL_ROWS if br >= n else br
    z = None
    if zero is not None:
        z = np.asarray(zero, np.int64).reshape(-(-n // br), groups)
        z = np.repeat(z, br, axis=0)[:n] + off  # one zero point per scale: spread over its rows
    return _checked(kind, (n, k), words, s, sdtype, lg, srow, z, perm)


def from_fp8(codes, scale, sdtype: str, block: tuple[int, int]) -> Packed | None:
    """E4M3 codes uint8 [N, K] with one scale per `block` = (rows, cols) of elements (core.quant.dequant.fp8)."""
    n, k = codes.shape
    br, bc = block
    groups = -(-k // bc)
    lg = WHOLE_ROW if groups == 1 else (bc.bit_length() - 1 if bc & (bc - 1) == 0 and bc >= 4 else None)
    if lg is None:
        return None
    s = to_float32(np.asarray(scale).reshape(-(-n // br), groups), sdtype) * np.float32(FP8_SCALE)
    with np.errstate(over="ignore"):
        bits = round_to(s, sdtype)  # exact (a power of two) unless it overflows, which only F16 can
    if not np.array_equal(to_float32(bits, sdtype), s):
        return None
    codes = np.asarray(codes, np.uint8)
    if ((codes & 0x7F) == 0x7F).any():
        return None  # a NaN code: the kernels' e4m3 decoding has no NaN (see gemv_q.cu)
    words = pack_rows(codes, 8, padded_k("fp8", k))
    srow = 1 if br == 1 else ALL_ROWS if br >= n else br
    return Packed("fp8", (n, k), words, np.ascontiguousarray(bits), sdtype, lg, srow)


def _checked(kind, shape, words, scales, sdtype, lg, srow, z, perm) -> Packed | None:
    """The Packed, or None when its zero points do not fit the kernels' range."""
    try:
        zeros = None if z is None else zeros_u8(z, KINDS[kind], (shape[0], scales.shape[1]))
    except _Dense:
        return None
    return Packed(kind, tuple(shape), words, np.ascontiguousarray(scales), sdtype, lg, srow, zeros, perm)


# -- a QuantizedTensor → Packed -----------------------------------------------------------------------------------

def covered(q: QuantizedTensor | QuantizedStack) -> str | None:
    """The layout kind a QuantizedTensor would get, judged from its headers (None: it loads dense). `repack` may still
    return None for what only the data shows (a g_idx that is not a permutation of groups, zero points out of range).
    A QuantizedStack is covered when every expert is, in one kind and shape, without act-order."""
    if isinstance(q, QuantizedStack):
        kinds = {covered(e) for e in q.experts}
        if len(kinds) != 1 or None in kinds or len({(e.shape, e.dtype) for e in q.experts}) != 1:
            return None
        return None if any(e.scheme.act_order for e in q.experts) else kinds.pop()
    s = q.scheme
    if s is None or q.transposed or len(q.shape) != 2 or s.layout == "dense":
        return None
    if s.kind == "float":
        w = q.part("weight")
        return "fp8" if w is not None and w.dtype == "F8_E4M3" else None
    return f"int{s.bits}" if s.bits in (4, 8) else None


def device_nbytes(q: QuantizedTensor | QuantizedStack) -> int | None:
    """The bytes `repack(q)` puts on the device at most (from the headers; None when it is not covered): words,
    scales, zero points and the act-order permutation; of a QuantizedStack, its experts' (zero points for every
    expert when one has them)."""
    kind = covered(q)
    if kind is None:
        return None
    if isinstance(q, QuantizedStack):
        zeros = any(_zero_part(e) is not None for e in q.experts)
        return sum(_estimate(e, kind, zeros) for e in q.experts)
    return _estimate(q, kind, _zero_part(q) is not None) + (4 * q.shape[1] if q.scheme.act_order else 0)


def _zero_part(q: QuantizedTensor):
    """The stored part holding q's zero points (GPTQ / AWQ qzeros, compressed-tensors weight_zero_point), or None."""
    return q.part("qzeros") or q.part("weight_zero_point")


def _estimate(q: QuantizedTensor, kind: str, zeros: bool) -> int:
    """Words, scales and (if `zeros`) uint8 zero points [N, G] of one weight, from its headers."""
    n, k = q.shape
    scales = [i for name, i in q.parts if name in ("scales", "weight_scale", "weight_scale_inv")]
    extra = n * max(1, sum(i.numel for i in scales) // n) if zeros else 0
    return n * padded_k(kind, k) * KINDS[kind] // 8 + sum(i.nbytes for i in scales) + extra


def repack(q: QuantizedTensor | QuantizedStack) -> Packed | None:
    """The device layout of `q`, from its stored parts (see the module docstring), or None: load it dense. A
    QuantizedStack is repacked expert by expert and stacked (`stack`)."""
    kind = covered(q)
    if kind is None:
        return None
    if isinstance(q, QuantizedStack):
        packs = []
        for e in q.experts:
            packs.append(repack(e))
            if packs[-1] is None or packs[-1].perm is not None:
                return None  # this expert's data does not fit: the whole role goes dense
        return stack(packs)
    s = q.scheme
    n, k = q.shape
    if s.method == "gptq":
        return from_gptq(read_part(q, "qweight"), read_part(q, "qzeros"), read_part(q, "scales"),
                         read_part(q, "g_idx"), s.bits, s.layout == "gptq", q.dtype)
    if s.method == "awq":
        return from_awq(read_part(q, "qweight"), read_part(q, "qzeros"), read_part(q, "scales"), q.dtype)
    name = next(x for x in ("weight_scale_inv", "weight_scale") if q.part(x) is not None)
    block = {"tensor": (n, k), "channel": (1, k), "group": (1, s.group_size or k)}.get(s.strategy, s.block)
    if s.kind == "float":
        return from_fp8(read_part(q, "weight"), read_part(q, name), q.dtype, block)
    zero = read_part(q, "weight_zero_point")
    if zero is not None and zero.dtype == np.int32:  # packed down the columns (pack-quantized group / channel)
        zero = ct_packed_zero(zero, s.bits, n)
    packed = s.layout == "pack-quantized"
    values = read_part(q, "weight_packed" if packed else "weight")
    return from_int(values, s.bits, (n, k), read_part(q, name), q.dtype, zero, block, read_part(q, "weight_g_idx"),
                    packed)


def stack(packs: list[Packed | None]) -> Packed | None:
    """The experts' weights as one stacked Packed [E, N, K] (see the module docstring), or None when one is missing,
    permuted or stacked already, or they disagree in layout (kind, shape, scale dtype and geometry)."""
    if not packs or any(p is None or p.perm is not None or p.experts is not None for p in packs):
        return None
    p0 = packs[0]

    def layout(p):
        return p.kind, p.shape, p.sdtype, p.lg, p.srow, p.words.shape, p.scales.shape, p.scales.dtype

    if any(layout(p) != layout(p0) for p in packs):
        return None
    zeros = None
    if any(p.zeros is not None for p in packs):
        sym = np.full((p0.shape[0], p0.scales.shape[1]), 1 << (p0.bits - 1), np.uint8)
        zeros = np.stack([sym if p.zeros is None else p.zeros for p in packs])
    return Packed(p0.kind, (len(packs),) + tuple(p0.shape), np.stack([p.words for p in packs]),
                  np.stack([p.scales for p in packs]), p0.sdtype, p0.lg, p0.srow, zeros)


# -- the layout's numpy reference -----------------------------------------------------------------------------------

def codes_of(p: Packed) -> np.ndarray:
    """The unsigned codes [N, Kp] of the words."""
    return unpack(p.words.view(np.int32), p.bits, axis=1).astype(np.int64)


def dense(p: Packed, rounded: bool = True) -> np.ndarray:
    """The weight float32 [N, K] (a stack: [E, N, K]) the layout means, rounded to the scale dtype as the reference
    rounds it: what moe_q.cu's kernels, the dequantized GEMM and the fp8 GEMV multiply x by. rounded=False: integer
    kinds' (u - z) s unrounded, float64 (exact), what gemv_q.cu's integer GEMVs multiply by (geometry.QFOLD)."""
    if p.experts is not None:
        return np.stack([dense(p.expert(e), rounded) for e in range(p.experts)])
    n, k = p.shape
    kp = p.kp
    col = np.minimum(np.arange(kp) >> p.lg, p.scales.shape[1] - 1)
    s = to_float32(p.scales, p.sdtype)[np.arange(n) // p.srow][:, col]
    u = codes_of(p)
    if p.kind == "fp8":
        exact = fp8_to_float32(u.astype(np.uint8), "F8_E4M3").astype(np.float64) * (s.astype(np.float64) / FP8_SCALE)
        w = to_float32(round_to(exact.astype(np.float32), p.sdtype), p.sdtype)
    else:
        z = (1 << (p.bits - 1)) if p.zeros is None else p.zeros.astype(np.int64)[:, col]
        w = (u - z) * s.astype(np.float64) if not rounded else to_float32(
            round_to((u - z).astype(np.float32) * s, p.sdtype), p.sdtype)
    w = w[:, :k]
    if p.perm is None:
        return np.ascontiguousarray(w)
    out = np.empty_like(w)
    out[:, p.perm] = w
    return out


def packed_shape_ok(p: Packed) -> bool:
    """The invariants the kernels rely on: whole chunks per row, a scale row for every output row; of a stack, every
    expert's, and no permutation."""
    if p.experts is not None:
        lead = {a.shape[0] for a in (p.words, p.scales, p.zeros) if a is not None}
        return p.perm is None and lead == {p.experts} and all(packed_shape_ok(p.expert(e)) for e in range(p.experts))
    n, k = p.shape
    return (p.words.shape[0] == n and p.kp == padded_k(p.kind, k) and p.scales.shape[0] == math.ceil(
        n / min(p.srow, n)) and (p.zeros is None or p.zeros.shape == (n, p.scales.shape[1])))
