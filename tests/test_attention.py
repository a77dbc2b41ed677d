"""The CPU attention (core.ops.attention) in blocks of queries: the same results as the whole [T, T] score matrix,
in memory O(T x block) (issue 17: a 20k-token prompt needed GBs)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from core import ops


def whole_matrix(q, k, v, start, scale, window=None, softcap=None):
    """The unblocked formula, as ops.attention computed it before: every score of the [T, start+T] matrix at once."""
    T, H, Dh = q.shape
    n, Hkv = start + T, k.shape[0]
    qh = q.reshape(T, Hkv, H // Hkv, Dh).transpose(1, 2, 0, 3)
    s = (qh @ k[:, None, :n].transpose(0, 1, 3, 2)) * scale
    if softcap is not None:
        s = ops.soft_cap(s, softcap)
    qpos, kpos = (start + np.arange(T))[:, None], np.arange(n)[None, :]
    allowed = kpos <= qpos if window is None else (kpos <= qpos) & (kpos > qpos - window)
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v[:, None, :n]).transpose(2, 0, 1, 3).reshape(T, H, Dh)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), start=st.integers(0, 20), hkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 3]),
       dh=st.sampled_from([4, 8]), extra=st.integers(0, 5), window=st.none() | st.integers(1, 30),
       softcap=st.none() | st.sampled_from([5.0, 50.0]), block=st.sampled_from([1, 7, 64, 500, 1 << 24]),
       seed=st.integers(0, 2 ** 16))
def test_blocks_equal_the_whole_matrix(monkeypatch, T, start, hkv, g, dh, extra, window, softcap, block, seed):
    rng = np.random.default_rng(seed)
    S = start + T + extra  # a cache longer than what is attended to
    q = rng.standard_normal((T, hkv * g, dh), dtype=np.float32) * 2
    k = rng.standard_normal((hkv, S, dh), dtype=np.float32) * 2
    v = rng.standard_normal((hkv, S, dh), dtype=np.float32)
    want = whole_matrix(q, k, v, start, 0.5, window, softcap)
    monkeypatch.setattr(ops, "ATTN_BLOCK", block)
    got = ops.attention(q, k, v, start, 0.5, window, softcap)
    assert got.shape == want.shape and got.dtype == np.float32
    # fp32 rounding: outputs are sums of up to ~70 terms of magnitude ~3 that can cancel, summed in another order
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_long_prompt_memory_is_linear_in_its_length(monkeypatch):
    """A 4096-token prompt with blocks of 2**16 scores: peak memory a few MB, not the 4096 x 4096 matrix (64 MB per
    temporary in float32, several of them)."""
    T, H, Dh = 4096, 1, 4
    rng = np.random.default_rng(0)
    q = rng.standard_normal((T, H, Dh), dtype=np.float32)
    k = rng.standard_normal((H, T, Dh), dtype=np.float32)
    v = rng.standard_normal((H, T, Dh), dtype=np.float32)
    monkeypatch.setattr(ops, "ATTN_BLOCK", 1 << 16, raising=False)
    tracemalloc.start()
    try:
        out = ops.attention(q, k, v, 0, 0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2 ** 20:.0f} MiB for a {T}-token prompt"
    np.testing.assert_allclose(out[-3:], whole_matrix(q[-3:], k, v, T - 3, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 16])
def test_decode_step_is_one_block(window):
    """One query over a long cache: a single block, the same numbers."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 8), dtype=np.float32)
    k = rng.standard_normal((2, 300, 8), dtype=np.float32)
    v = rng.standard_normal((2, 300, 8), dtype=np.float32)
    np.testing.assert_allclose(ops.attention(q, k, v, 250, 0.3, window), whole_matrix(q, k, v, 250, 0.3, window),
                               rtol=1e-5, atol=1e-6)
