"""Property tests of the open vocabulary's kernels (issue 14) against core.ops (GPU machine only): scalar multiples,
clamps, sigmoid gates, results of pending products added, per-head norms of every kind, rope tables (partial,
interleaved, scaled) in the rope, cache-write and decode-attention kernels.

The harness is test_cuda_kernels.py's (strategies S, the poisoning backend, the rounding of K/V to the cache's dtype):
every output buffer and KV cache is NaN-filled before the kernel runs, references are computed in float64 from the
same rounded weights the GPU holds.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, strategies as st

from core import ops
from core.backend import NumpyBackend
from core.config import RopeConfig
from core.load import cuda_available
from core.rope import RopeTable
from core.testing import EXACT, TOL, rel_err, rng, upload_weight
from test_cuda_kernels import ACT_ATOL, ACT_RTOL, S, _round, backend

OK, WHY = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")]


@given(n=st.integers(1, 300_000), s=st.floats(1e-3, 64.0), seed=S.seed)
def test_scale(n, s, seed):
    """x * s with s rounded to float32, as the reference: one correctly rounded product, so bit for bit."""
    x = (rng(seed).normal(size=n) * 3).astype(np.float32)
    with backend("float32") as be:
        got = be.to_host(be.scale(be.from_host(x), s))
    np.testing.assert_array_equal(got, NumpyBackend("float32").scale(x, s))


@given(n=st.integers(1, 300_000), lo=st.floats(-8.0, 0.0), width=st.floats(1e-3, 16.0), special=st.booleans(),
       seed=S.seed)
def test_clamp(n, lo, width, special, seed):
    """x clamped to [lo, hi] (q, k and v under qkv_clip), the bounds rounded to float32 as the reference: bit for bit,
    a NaN left NaN and ±inf sent to the bounds, as np.clip (and torch.clamp) do."""
    r = rng(seed)
    x = (r.normal(size=n) * 4).astype(np.float32)
    if special:
        x[r.integers(0, n, 3)] = [np.nan, np.inf, -np.inf]
    with backend("float32") as be:
        got = be.to_host(be.clamp(be.from_host(x), lo, lo + width))
    np.testing.assert_array_equal(got, NumpyBackend("float32").clamp(x, lo, lo + width))


@given(dtype=S.dtype, D=S.dim, c=st.floats(0.05, 2.0), seed=S.seed)
def test_clamp_of_a_pending_norm(dtype, D, c, seed):
    """At one decode token a q/k norm over the whole projection (OLMoE) may be left pending for a GEMV to fold in (a
    Lazy); the clamp that reads it next computes it by the ordinary kernel first."""
    r = rng(seed)
    with backend(dtype) as be:
        g, gr = upload_weight(be, r.normal(size=D) * 0.3 + 1.0)
        z = r.normal(size=(1, D)).astype(np.float32)
        got = be.to_host(be.clamp(be.norm(be.from_host(z), g, None, 1e-6, "rmsnorm"), -c, c))
    want = np.clip(ops.rms_norm(z.astype(np.float64), gr, 1e-6), np.float32(-c), np.float32(c))
    assert rel_err(got, want) < EXACT


@given(T=st.integers(1, 300), N=S.dim, seed=S.seed)
def test_sigmoid_gate(T, N, seed):
    """y [T, N] * sigmoid(g [T, 1]): each row by its own token's gate."""
    r = rng(seed)
    y, g = r.normal(size=(T, N)).astype(np.float32), (r.normal(size=(T, 1)) * 4).astype(np.float32)
    with backend("float32") as be:
        got = be.to_host(be.sigmoid_gate(be.from_host(y), be.from_host(g)))
    np.testing.assert_allclose(got, y * ops.sigmoid(g.astype(np.float64)), rtol=ACT_RTOL, atol=ACT_ATOL)


@given(dtype=S.dtype, K=S.kdim, N=S.dim, bias=st.booleans(), which=st.sampled_from(["first", "second", "both", "norm"]),
       seed=S.seed)
def test_add_of_pending_results(dtype, K, N, bias, which, seed):
    """The parallel blocks' add at one decode token (attention output + MLP output): an operand that is a pending
    GEMV runs with the other added in its epilogue; a pending norm is computed first. Same sums as the reference."""
    r = rng(seed)
    with backend(dtype) as be:
        (w1, w1r), (w2, w2r) = (upload_weight(be, r.normal(size=(N, K)) / np.sqrt(K)) for _ in range(2))
        b1, b1r = upload_weight(be, r.normal(size=N)) if bias else (None, None)
        g, gr = upload_weight(be, r.normal(size=N) * 0.3 + 1.0)
        x1, x2 = r.normal(size=(2, 1, K)).astype(np.float32)
        z = r.normal(size=(1, N)).astype(np.float32)
        p1, p2 = be.linear(be.from_host(x1), w1, b1), be.linear(be.from_host(x2), w2)
        want1, want2 = ops.linear(x1.astype(np.float64), w1r, b1r), ops.linear(x2.astype(np.float64), w2r, None)
        z64 = z.astype(np.float64)
        a, b, want = {"first": (p1, be.from_host(z), want1 + z64), "second": (be.from_host(z), p2, z64 + want2),
                      "both": (p1, p2, want1 + want2),
                      "norm": (be.norm(be.from_host(z), g, None, 1e-6, "rmsnorm"), p2,
                               ops.rms_norm(z64, gr, 1e-6) + want2)}[which]
        got = be.to_host(be.add(a, b))
    assert rel_err(got, want) < EXACT


@given(dtype=S.dtype, T=st.integers(1, 300), H=st.integers(1, 40), Dh=S.head_dim,
       kind=st.sampled_from(["rmsnorm", "layernorm"]), per_head=st.booleans(), bias=st.booleans(),
       offset=st.sampled_from([0.0, 1.0]), mean=st.sampled_from([0.0, 3.0]), seed=S.seed)
def test_head_norm_kinds(dtype, T, H, Dh, kind, per_head, bias, offset, mean, seed):
    """Per-head RMSNorm or LayerNorm over Dh, gain (and LayerNorm bias) shared [Dh] or per head [H, Dh] (Cohere,
    StableLM, Phi's q/k LayerNorm); arguments read as NumpyBackend.head_norm reads them (RMSNorm ignores a bias;
    both apply the offset)."""
    r = rng(seed)
    shape = (H, Dh) if per_head else (Dh,)
    with backend(dtype) as be:
        w, wr = upload_weight(be, r.normal(size=shape) * 0.5 + 1.0)
        b, br = upload_weight(be, r.normal(size=shape)) if bias else (None, None)
        x = (r.normal(size=(T, H, Dh)) * 2 + mean).astype(np.float32)
        got = be.to_host(be.head_norm(be.from_host(x), w, 1e-5, offset, b, kind))
    want = NumpyBackend("float32").head_norm(x.astype(np.float64), wr, 1e-5, offset, br, kind)
    assert rel_err(got, want) < EXACT


def _table(Dh: int, frac: float, interleaved: bool, scale: float, theta: float = 1e4) -> RopeTable:
    """A RopeTable rotating frac of Dh (an even count, at least 2) with the given pairing and cos/sin scale."""
    R = max(2, int(Dh * frac) // 2 * 2)
    return RopeTable(RopeConfig(theta=theta).table(R).inv_freq, scale=scale, interleaved=interleaved)


FRAC = st.sampled_from([0.25, 0.5, 1.0])
ROPE_SCALE = st.sampled_from([1.0, 1.3416407864998738, 0.8])  # longrope's sqrt(1 + ln 16 / ln 32), a yarn-like < 1


@given(T=st.integers(1, 500), H=st.integers(1, 40), Dh=st.sampled_from([6, 16, 32, 64, 128, 80, 37]), frac=FRAC,
       interleaved=st.booleans(), scale=ROPE_SCALE, start=st.integers(0, 8000),
       theta=st.sampled_from([1e4, 5e5, 1e6]), seed=S.seed)
def test_rope_table(T, H, Dh, frac, interleaved, scale, start, theta, seed):
    """RoPE from a RopeTable: the first R dims rotate (rotate-half or interleaved pairs, cos/sin times the
    table's scale), the others pass through unchanged."""
    table = _table(Dh, frac, interleaved, scale, theta)
    x = rng(seed).normal(size=(T, H, Dh)).astype(np.float32)
    with backend("float32") as be:
        got = be.to_host(be.rope(be.from_host(x), start, table))
    assert rel_err(got, ops.rope(x.astype(np.float64), np.arange(start, start + T), table)) < EXACT
    np.testing.assert_array_equal(got[..., table.rotary_dim:], x[..., table.rotary_dim:])


@given(dtype=S.dtype, T=st.integers(1, 40), Hkv=st.integers(1, 5), g=S.gqa, Dh=st.sampled_from([16, 32, 64, 80, 37]),
       frac=FRAC, interleaved=st.booleans(), scale=ROPE_SCALE, start=st.integers(0, 5000), norm=st.booleans(),
       offset=st.sampled_from([0.0, 1.0]), seed=S.seed)
def test_rope_cache_write_tables(dtype, T, Hkv, g, Dh, frac, interleaved, scale, start, norm, offset, seed):
    """rope_cache_write with any table: plain ones take rope_kv, the others per-head norm, the rope kernel and a
    cache write (at one token held for attention; here flushed by the reads)."""
    r = rng(seed)
    H, S_ = Hkv * g, start + T + 3
    table = _table(Dh, frac, interleaved, scale)
    q, k, v = (r.normal(size=(T, h, Dh)).astype(np.float32) for h in (H, Hkv, Hkv))
    cfg = SimpleNamespace(num_layers=1, num_kv_heads=Hkv, head_dim=Dh, max_position_embeddings=S_)
    with backend(dtype) as be:
        qk, refs = None, None
        if norm:
            (qw, qwr), (kw, kwr) = upload_weight(be, r.normal(size=Dh)), upload_weight(be, r.normal(size=Dh))
            qk, refs = (qw, kw, 1e-6, offset), (qwr, kwr)
        cache = be.new_cache(cfg, S_)
        got = be.to_host(be.rope_cache_write(be.from_host(q), be.from_host(k), be.from_host(v), cache, 0, start, table,
                                             qk))
        kc, vc = be.to_host(cache.k[0]), be.to_host(cache.v[0])
    q64, k64, pos = q.astype(np.float64), k.astype(np.float64), np.arange(start, start + T)
    if norm:
        q64, k64 = ops.rms_norm(q64, refs[0], 1e-6, offset), ops.rms_norm(k64, refs[1], 1e-6, offset)
    assert rel_err(got, ops.rope(q64, pos, table)) < EXACT
    want_k = ops.rope(k64, pos, table).transpose(1, 0, 2)
    assert rel_err(kc[:, start:start + T], want_k) < max(EXACT, TOL[dtype] / 4)
    np.testing.assert_array_equal(vc[:, start:start + T], _round(dtype, v).transpose(1, 0, 2))
    for c in (kc, vc):
        assert np.isnan(c[:, :start]).all() and np.isnan(c[:, start + T:]).all(), "wrote outside its positions"


@given(dtype=S.dtype, start=st.one_of(st.integers(0, 300), st.integers(300, 5000)), Hkv=st.integers(1, 3), g=S.gqa,
       Dh=st.sampled_from([32, 64, 128, 80, 38]), frac=FRAC, interleaved=st.booleans(), scale=ROPE_SCALE,
       norm=st.booleans(), offset=st.sampled_from([0.0, 1.0]), window=st.one_of(st.none(), st.integers(1, 40)),
       other_use=st.booleans(), seed=S.seed)
def test_attention_decode_tables(dtype, start, Hkv, g, Dh, frac, interleaved, scale, norm, offset, window, other_use,
                                 seed):
    """One decode token as the model runs it with any rope table: rope_cache_write then attention. A table that
    is not plain is rotated by the rope kernel and its cache write folded into attn_decode_step without RoPE; a
    plain one (frac 1, rotate-half, scale 1) the fused way. Same results as the reference either way."""
    r = rng(seed)
    H, n = Hkv * g, start + 1
    table = _table(Dh, frac, interleaved, scale)
    k, v = r.normal(size=(2, n, Hkv, Dh)).astype(np.float32)
    q = r.normal(size=(1, H, Dh)).astype(np.float32)
    cfg = SimpleNamespace(num_layers=1, num_kv_heads=Hkv, head_dim=Dh, max_position_embeddings=n + 5)
    with backend(dtype) as be:
        qk, refs = None, None
        if norm:
            (qw, qwr), (kw, kwr) = upload_weight(be, r.normal(size=Dh)), upload_weight(be, r.normal(size=Dh))
            qk, refs = (qw, kw, 1e-6, offset), (qwr, kwr)
        cache = be.new_cache(cfg, n + 5)
        if start:
            be.cache_write(cache, 0, be.from_host(k[:start]), be.from_host(v[:start]), 0)
        qd = be.rope_cache_write(be.from_host(q), be.from_host(k[start:]), be.from_host(v[start:]), cache, 0, start,
                                 table, qk)
        seen_q = be.to_host(qd) if other_use else None
        out = be.to_host(be.attention(qd, cache, 0, start, 0.3, window=window))
        kc, vc = be.to_host(cache.k[0]), be.to_host(cache.v[0])
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    if norm:
        q64 = ops.rms_norm(q64, refs[0], 1e-6, offset)
        k64 = np.concatenate([k64[:start], ops.rms_norm(k64[start:], refs[1], 1e-6, offset)])
    q64 = ops.rope(q64, np.arange(start, n), table)
    k64 = np.concatenate([k64[:start], ops.rope(k64[start:], np.arange(start, n), table)])
    if other_use:
        assert rel_err(seen_q, q64) < EXACT
    kr, vr = _round(dtype, k64).transpose(1, 0, 2), _round(dtype, v).transpose(1, 0, 2)
    np.testing.assert_array_equal(kc[:, :start], kr[:, :start])
    assert rel_err(kc[:, start], kr[:, start]) < max(EXACT, TOL[dtype] / 4)
    np.testing.assert_array_equal(vc[:, :n], vr)
    assert np.isnan(kc[:, n:]).all() and np.isnan(vc[:, n:]).all(), "wrote past the new position"
    assert rel_err(out, ops.attention(q64, kr, vr, start, 0.3, window, None)) < TOL[dtype]


@given(dtype=S.dtype, Hkv=st.integers(1, 3), g=S.gqa, Dh=st.sampled_from([32, 64, 128]), frac=FRAC,
       start=st.integers(0, 600), seed=S.seed)
def test_bound_rope_table(dtype, Hkv, g, Dh, frac, start, seed):
    """bind_rope (decode steps of a model whose table changes with the length): kernels given the bound table
    read one persistent buffer, rebinding another table of that size rewrites it in stream order, and an unbound
    table keeps its own copy. Checked on the rope kernel and on a fused decode step (a plain table's frequencies
    are read inside attn_decode_step)."""
    r = rng(seed)
    H = Hkv * g
    a, b = _table(Dh, frac, False, 1.0, 1e4), _table(Dh, frac, False, 1.0, 7e3)
    x = r.normal(size=(3, H, Dh)).astype(np.float32)
    k, v = r.normal(size=(2, start + 2, Hkv, Dh)).astype(np.float32)
    q = r.normal(size=(2, H, Dh)).astype(np.float32)
    cfg = SimpleNamespace(num_layers=1, num_kv_heads=Hkv, head_dim=Dh, max_position_embeddings=start + 2)
    with backend(dtype) as be:
        xd = be.from_host(x)
        be.bind_rope(a)
        ya = be.rope(xd, start, a)
        be.bind_rope(b)
        yb, ya2 = be.rope(xd, start, b), be.rope(xd, start, a)  # b from the live buffer, a from its own copy
        cache = be.new_cache(cfg, start + 2)
        if start:
            be.cache_write(cache, 0, be.from_host(k[:start]), be.from_host(v[:start]), 0)
        outs = []
        for i, t in enumerate((a, b)):  # two decode steps, each with its own table bound first
            be.bind_rope(t)
            p = start + i
            qd = be.rope_cache_write(be.from_host(q[i:i + 1]), be.from_host(k[p:p + 1]), be.from_host(v[p:p + 1]),
                                     cache, 0, p, t)
            outs.append(be.attention(qd, cache, 0, p, 0.2))
        got = [be.to_host(t) for t in (ya, yb, ya2, *outs)]
        kc, vc = be.to_host(cache.k[0]), be.to_host(cache.v[0])
    pos = np.arange(start, start + 3)
    x64 = x.astype(np.float64)
    for gv, t in zip(got[:3], (a, b, a)):
        assert rel_err(gv, ops.rope(x64, pos, t)) < EXACT
    k64 = k.astype(np.float64).copy()
    for i, t in enumerate((a, b)):
        k64[start + i:start + i + 1] = ops.rope(k64[start + i:start + i + 1], np.array([start + i]), t)
    kr, vr = _round(dtype, k64).transpose(1, 0, 2), _round(dtype, v).transpose(1, 0, 2)
    assert rel_err(kc[:, :start + 2], kr) < max(EXACT, TOL[dtype] / 4)
    np.testing.assert_array_equal(vc[:, :start + 2], vr)
    for i, t in enumerate((a, b)):
        p = start + i
        qi = ops.rope(q[i:i + 1].astype(np.float64), np.array([p]), t)
        assert rel_err(got[3 + i], ops.attention(qi, kr[:, :p + 1], vr[:, :p + 1], p, 0.2, None, None)) < TOL[dtype]
