"""skinny.cu's data movement modelled in numpy, on the CPU (CI): which weights and which x each lane hands the tensor
core, sub-step by sub-step, as the kernel loads them (a lane's 16 bytes of weight rows g and g + 8 from column 8 t,
its 16 bytes of each staged x row from the same column), the m16n8k16 products rebuilt from those registers by the
PTX ISA's fragment layout, and the epilogue's scatter of the accumulators (and, split over K, the slices' partial
sums added in order). The result must be x @ w.T. The model follows the fragment layout, not the kernel's index
arithmetic: a register's two values are placed where the ISA says that register's halves go.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from core.cuda.geometry import skinny_geometry


def mma(acc, a_regs, b_regs):
    """acc [32 lanes][4] += A B for one m16n8k16 product, A and B rebuilt from each lane's registers (two values a
    register, low half first) by the PTX ISA's layout for 16-bit operands (lane = 4 g + t)."""
    A, B = np.full((16, 16), np.nan), np.full((16, 8), np.nan)
    for lane in range(32):
        g, t = divmod(lane, 4)
        a = a_regs[lane]
        for half in range(2):
            A[g, 2 * t + half] = a[0][half]
            A[g + 8, 2 * t + half] = a[1][half]
            A[g, 2 * t + 8 + half] = a[2][half]
            A[g + 8, 2 * t + 8 + half] = a[3][half]
            B[2 * t + half, g] = b_regs[lane][0][half]
            B[2 * t + 8 + half, g] = b_regs[lane][1][half]
    assert not np.isnan(A).any() and not np.isnan(B).any()  # every element placed
    C = A @ B
    for lane in range(32):
        g, t = divmod(lane, 4)
        acc[lane] += [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]


def words(v8):
    """A 16-byte load of 8 values as its four 32-bit registers: (v0, v1), (v2, v3), ..."""
    return [(v8[2 * i], v8[2 * i + 1]) for i in range(4)]


def warp_tile(x, w, row0, k0, kl, nt):
    """The accumulators of the warp owning weight rows row0 .. row0 + 15 over columns [k0, k0 + kl): [32][nt][4]."""
    N, K = w.shape
    xs = np.zeros((8 * nt, K + 256))  # staged x (rows past M, columns past the slice zero)
    xs[:x.shape[0], :K] = x
    acc = np.zeros((32, nt, 4))
    for k in range(0, kl, 32):  # sub-steps (the batching of SK_SUB of them changes no arithmetic)
        a_of, b_of = [], {}
        for lane in range(32):
            g, t = divmod(lane, 4)
            c = k + 8 * t
            def load(r):
                return w[r, k0 + c:k0 + c + 8] if r < N and c < kl else np.zeros(8)
            a_of.append((words(load(row0 + g)), words(load(row0 + g + 8))))
            for j in range(nt):  # the staged x of row 8 j + g from the same column (zero past the slice: c >= kl)
                b_of[lane, j] = words(xs[8 * j + g, k0 + c:k0 + c + 8] if c < kl else np.zeros(8))
        for j in range(nt):
            for p in range(2):  # words 2p, 2p + 1 of each load feed product p
                a_regs = [[a[0][2 * p], a[1][2 * p], a[0][2 * p + 1], a[1][2 * p + 1]] for a in a_of]
                b_regs = [[b_of[lane, j][2 * p], b_of[lane, j][2 * p + 1]] for lane in range(32)]
                sub = np.zeros((32, 4))
                mma(sub, a_regs, b_regs)
                acc[:, j] += sub
    return acc


def model(x, w, kslice, slices, nt):
    """y [M, N] as the kernel's grid computes it: every warp's 16 rows, the epilogue's scatter, slices added in
    order."""
    M, K = x.shape
    N = w.shape[0]
    parts = np.zeros((slices, M, N))
    for s in range(slices):
        k0 = s * kslice
        kl = min(kslice, K - k0)
        for row0 in range(0, N, 16):
            acc = warp_tile(x, w, row0, k0, kl, nt)
            for lane in range(32):
                g, t = divmod(lane, 4)
                for j in range(nt):
                    for e in range(2):
                        m = 8 * j + 2 * t + e
                        if m < M:
                            if row0 + g < N:
                                parts[s, m, row0 + g] = acc[lane, j, e]
                            if row0 + g + 8 < N:
                                parts[s, m, row0 + g + 8] = acc[lane, j, 2 + e]
    y = np.zeros((M, N))
    for s in range(slices):
        y += parts[s]
    return y


@given(M=st.integers(5, 24), K=st.integers(1, 40).map(lambda k: 8 * k), N=st.integers(1, 40), seed=st.integers(0, 99))
def test_the_kernels_fragments_compute_x_times_w_transposed(M, K, N, seed):
    r = np.random.default_rng(seed)
    x, w = r.normal(size=(M, K)), r.normal(size=(N, K))
    nt, _, kslice, slices, _ = skinny_geometry(M, K, [N], 132)
    assert 8 * nt >= M
    y = model(x, w, kslice, slices, nt)
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-10, atol=1e-10)
    # and split finer than the geometry would (the slices' sums, in order)
    y2 = model(x, w, 64, -(-K // 64), nt)
    np.testing.assert_allclose(y2, x @ w.T, rtol=1e-10, atol=1e-10)
