"""gemv_qtc.cu's data movement modelled in numpy, on the CPU (CI): which code and which x each lane hands the tensor
core, product by product, as the kernel's qtc_stage_x and qtc_dot compute them from the layout's words; the
m16n8k16 product rebuilt from the lanes' registers by the PTX ISA's fragment layout (each element placed once); the
fold of zero points, scales, sigma and the hi / lo split. The sum must be the unrounded weight's product
(qlayout.dense(rounded=False), what test_cuda_quant.py holds the GPU to). A wrong mask, shift or slot in the kernel
is a wrong index here only if this model copies it, so the model is written from the fragment layout, not from the
kernel's index arithmetic: B's slots are filled from the codes A's registers actually hold.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from core.cuda import qlayout as L
from core.cuda.geometry import QTC_STEP
from core.safetensors_io import to_float32
from core.testing import rel_err, rng
from quantcases import S, ct_int_case, gptq_case


def halves(reg: int) -> tuple[float, float]:
    """The two fp16 values of a 32-bit register (low half first), subnormals exact."""
    h = np.array([reg & 0xFFFF, reg >> 16], np.uint16).view(np.float16)
    return float(h[0]), float(h[1])


def a_regs(kind: str, wg: int, wh: int, m: int) -> list[int]:
    """The kernel's A registers of product m for lane words wg (row g) and wh (row g + 8): its masks."""
    mask = 0x000F000F if kind == "int4" else 0x00FF00FF
    if kind == "int4" and m:
        mask <<= 4
    return [wg & mask, wh & mask, (wg >> 8) & mask, (wh >> 8) & mask]


def codes_in(kind: str, reg_shift: int, m: int) -> tuple[int, int]:
    """Which codes of a word (their index in it) the low and high half of A register a0 (shift 0) or a2 (shift 8)
    hold, and the power of two they carry (16 for int4's odd nibbles, masked in place)."""
    if kind == "int4":
        lo = m + (2 if reg_shift else 0)
        return lo, lo + 4
    return (1, 3) if reg_shift else (0, 2)


def model(p: L.Packed, x: np.ndarray) -> np.ndarray:
    """y [N] as gemv_qtc.cu computes it for one token x [Kp] (see the module docstring)."""
    kind, (n, _) = p.kind, p.shape
    per, step = (8 if kind == "int4" else 4), QTC_STEP[kind]
    kp = p.kp
    nsteps = -(-kp // step)
    words = np.zeros((-(-n // 16) * 16, nsteps * 16), np.int64)
    words[:n, :kp // per] = p.words.astype(np.int64)
    scales = to_float32(p.scales, p.sdtype).astype(np.float64)
    mx = np.abs(x).max()
    sigma = 2.0 ** (13 - np.frexp(mx)[1]) if mx > 0 else 1.0
    xp = np.zeros(nsteps * step)
    xp[:kp] = x.astype(np.float32) * np.float32(sigma)
    y = np.zeros(words.shape[0])
    mmas = 2 if kind == "int4" else 1  # products a word
    for r0 in range(0, words.shape[0], 16):
        acc = np.zeros(16)
        for s in range(nsteps):
            C = np.zeros((16, 8))
            xs = {0: 0.0, 1: 0.0}  # the step's sum of x as the tensor core sees it, hi and lo
            for i in range(4):
                for m in range(mmas):
                    A, B = np.full((16, 16), np.nan), np.full((16, 8), np.nan)
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        word = s * 16 + 4 * t + i
                        wg, wh = int(words[r0 + g, word]), int(words[r0 + g + 8, word])
                        regs = a_regs(kind, wg, wh, m)
                        slots = [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]
                        for reg, (row, k) in zip(regs, slots):
                            assert np.isnan(A[row, k]) and np.isnan(A[row, k + 1])
                            A[row, k], A[row, k + 1] = halves(reg)
                        if g:  # B's rows 2t.. are lane (0, t)'s to fill: column 0 hi, column 4 lo
                            continue
                        # slots 2t, 2t+1 and 2t+8, 2t+9: the x of the codes A holds there
                        for k, shift in ((2 * t, 0), (2 * t + 8, 8)):
                            for half, c in enumerate(codes_in(kind, shift, m)):
                                f = 16.0 if kind == "int4" and c % 2 else 1.0  # the code entered as 16 u
                                v = np.float32(xp[(s * 16 + 4 * t + i) * per + c] / f)
                                hi = np.float16(v)
                                lo = np.float16(v - np.float32(hi))
                                assert np.isnan(B[k + half]).all()
                                B[k + half, :] = 0.0
                                B[k + half, 0], B[k + half, 4] = float(hi), float(lo)
                                xs[0] += float(hi) * f
                                xs[1] += float(lo) * f
                    assert not np.isnan(A).any() and not np.isnan(B).any()
                    C += A @ B
            grp = min((s * step) >> p.lg, p.scales.shape[1] - 1)
            for rr in range(16):
                row = min(r0 + rr, n - 1)
                z = (1 << (p.bits - 1)) if p.zeros is None else int(p.zeros[row, grp])
                sc = scales[row // p.srow, grp]
                # the lanes' columns: 0 is hi, 4 is lo; each folded apart, then added
                acc[rr] += sum((C[rr, col] * 2.0 ** 24 - z * xs[h]) * sc for h, col in ((0, 0), (1, 4)))
        y[r0:r0 + 16] = acc / sigma
    return y[:n]


@given(data=st.data(), seed=S.seed)
def test_the_tensor_core_fragments_modelled_in_numpy(data, seed):
    """int4 with groups of 128 (or a whole row) and int8 per channel, any rows and K (a last step part padding)."""
    r = rng(seed)
    n = data.draw(st.integers(1, 40), label="rows")
    if data.draw(st.booleans(), label="int4"):
        k = data.draw(st.sampled_from([128, 256, 384]), label="K")
        case = gptq_case(seed, 4, n, k, data.draw(st.sampled_from([128, -1])), data.draw(st.booleans()), False,
                         True, data.draw(S.sdtype))
    else:
        k = data.draw(st.sampled_from([64, 96, 200]), label="K")
        case = ct_int_case(seed, 8, n, k, "channel", None, data.draw(st.booleans()), False, False,
                           data.draw(S.sdtype))
    p = case.packed
    x = r.normal(size=p.kp) * data.draw(st.sampled_from([1e-3, 1.0, 3e4]))
    x[p.shape[1]:] = 0.0
    want = L.dense(p, rounded=False).astype(np.float64) @ x[:p.shape[1]]
    assert rel_err(model(p, x), want) < 1e-5


def test_the_model_sees_a_wrong_slot():
    """The model is not vacuous: moving int4's odd nibbles into the even slots' x breaks it."""
    p = gptq_case(1, 4, 16, 128, 128, False, False, True, "F16").packed
    x = rng(2).normal(size=128)
    global codes_in
    right = codes_in
    try:
        codes_in = lambda kind, shift, m: right(kind, shift, 1 - m)  # noqa: E731
        assert rel_err(model(p, x), L.dense(p, rounded=False) @ x) > 0.1
    finally:
        codes_in = right
