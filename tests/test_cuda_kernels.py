"""Property tests: every CUDA kernel against its numpy reference in core.ops (GPU machine only).

Inputs are fresh random values for every example; shapes include sizes that are not multiples of the
kernels' tiles (GEMM 128, GEMV 8-element vectors, attention 16 queries x 32 keys), every dtype, GQA
ratios and sequences of several thousand positions. The backend runs with poison=True: every output
buffer and KV cache is NaN-filled before the kernel runs, so an element a kernel forgets to write fails
the comparison. References are computed in float64 from the same rounded weights the GPU holds.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from core import ops, testing
from core.backend import NumpyBackend
from core.config import RopeConfig
from core.load import cuda_available
# The harness is core.testing's, shared with plugins' own ops: tolerances, strategies, the poisoning backend.
from core.testing import DTYPES, EXACT, TOL, rel_err, rng, upload_weight  # noqa: F401

OK, WHY = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")]


class S:
    """Strategies."""

    dtype = testing.dtypes()
    seed = testing.seeds()
    # Mostly awkward sizes, sometimes the aligned sizes real models use (vector paths).
    dim = testing.dims()
    # reduction widths: also those whose decode GEMV issues 3 or 4 chunks a thread before its wait (3000: the
    # last pass partial)
    kdim = st.one_of(dim, st.sampled_from([3000, 3072, 4096]))
    head_dim = st.sampled_from([32, 64, 128, 80, 37])  # common sizes, plus one odd
    gqa = st.sampled_from([1, 2, 4, 8])
    act = st.sampled_from(sorted(ops.ACT))


@contextlib.contextmanager
def backend(dtype):
    """A poisoning CudaBackend per dtype (core.testing.cuda_backend), its weights and caches released after each
    example: our own GEMM and SIMT prefill attention (the fallbacks); cuBLAS and the tensor-core attention are
    tested in test_cuda_cublas.py, skinny.cu's batched-decode products in test_cuda_skinny.py."""
    with testing.cuda_backend(dtype, gemm="own", attn="simt", skinny=False) as be:
        try:
            yield be
        finally:
            be.fold_ln = False


# --- embedding --------------------------------------------------------------------------------------------------
@given(dtype=S.dtype, V=st.integers(1, 5000), D=S.dim, T=st.integers(1, 600), scaled=st.booleans(), seed=S.seed)
def test_embed(dtype, V, D, T, scaled, seed):
    r = rng(seed)
    with backend(dtype) as be:
        table, ref = upload_weight(be, r.normal(size=(V, D)))
        ids = r.integers(0, V, T)
        scale = float(r.uniform(0.5, 40)) if scaled else None
        got = be.to_host(be.embed(table, ids, scale))
        np.testing.assert_array_equal(got, ops.embed(ref.astype(np.float32), ids, scale))


@given(dtype=S.dtype, P=st.integers(1, 4000), D=S.dim, T=st.integers(1, 300), seed=S.seed, data=st.data())
def test_add_positions(dtype, P, D, T, seed, data):
    assume(T <= P)
    start = data.draw(st.integers(0, P - T))
    r = rng(seed)
    with backend(dtype) as be:
        table, ref = upload_weight(be, r.normal(size=(P, D)))
        x = r.normal(size=(T, D)).astype(np.float32)
        got = be.to_host(be.add_positions(be.from_host(x), table, start))
        np.testing.assert_array_equal(got, x + ref.astype(np.float32)[start:start + T])


# --- elementwise ------------------------------------------------------------------------------------------------
@given(n=st.integers(1, 3_000_000), seed=S.seed)
def test_add(n, seed):
    r = rng(seed)
    a, b = r.normal(size=n).astype(np.float32), r.normal(size=n).astype(np.float32)
    with backend("float32") as be:
        np.testing.assert_array_equal(be.to_host(be.add(be.from_host(a), be.from_host(b))), a + b)


# Activations are checked element by element, relative to each value: for x << 0 a gelu is tiny
# (gelu(-4) ~ 1e-4) and a norm-wise error would be decided by the few large elements. The absolute floor is
# the float64 reference's own error: 1 + tanh(u) and 1 + erf(z) cancel to within 1e-16 of 0.
ACT_RTOL, ACT_ATOL = 2e-5, 1e-14


@given(kind=S.act, n=st.integers(1, 200_000), seed=S.seed)
def test_act(kind, n, seed):
    x = (rng(seed).normal(size=n) * 4).astype(np.float32)
    with backend("float32") as be:
        got = be.to_host(be.act(be.from_host(x), kind))
    np.testing.assert_allclose(got, ops.ACT[kind](x.astype(np.float64)), rtol=ACT_RTOL, atol=ACT_ATOL)


@given(kind=S.act, n=st.integers(1, 200_000), seed=S.seed)
def test_gated_act(kind, n, seed):
    r = rng(seed)
    g, u = (r.normal(size=n) * 4).astype(np.float32), r.normal(size=n).astype(np.float32)
    with backend("float32") as be:
        got = be.to_host(be.gated_act(be.from_host(g), be.from_host(u), kind))
    np.testing.assert_allclose(got, ops.ACT[kind](g.astype(np.float64)) * u, rtol=ACT_RTOL, atol=ACT_ATOL)


@given(n=st.integers(1, 200_000), cap=st.floats(1.0, 60.0), seed=S.seed)
def test_soft_cap(n, cap, seed):
    x = (rng(seed).normal(size=n) * 30).astype(np.float32)
    with backend("float32") as be:
        assert rel_err(be.to_host(be.soft_cap(be.from_host(x), cap)), ops.soft_cap(x.astype(np.float64), cap)) < EXACT


# --- matrix products --------------------------------------------------------------------------------------------
@given(dtype=S.dtype, T=st.one_of(st.integers(1, 4), st.integers(5, 700), st.just(1100)), K=S.kdim, N=S.dim,
       bias=st.booleans(), view=st.booleans(), seed=S.seed)
def test_linear(dtype, T, K, N, bias, view, seed):
    """GEMV for T <= 4, tensor-core (or fp32) GEMM above; `view` feeds rows 1.. of a bigger buffer (unaligned)."""
    r = rng(seed)
    with backend(dtype) as be:
        w, wr = upload_weight(be, r.normal(size=(N, K)) / np.sqrt(K))
        b, br = upload_weight(be, r.normal(size=N)) if bias else (None, None)
        x = r.normal(size=(T + view, K)).astype(np.float32)
        xd = be.from_host(x)[1:] if view else be.from_host(x)
        x = x[1:] if view else x
        got = be.to_host(be.linear(xd, w, b))
        assert got.shape == (T, N)
        tol = TOL[dtype] if T > 4 else EXACT  # the GEMV keeps x in fp32; the GEMM rounds it to the dtype
        assert rel_err(got, ops.linear(x.astype(np.float64), wr, br)) < tol


@given(dtype=S.dtype, T=st.integers(1, 5), K=S.kdim, Ns=st.lists(S.dim, min_size=1, max_size=4),
       bias=st.booleans(), view=st.booleans(), seed=S.seed)
def test_linears(dtype, T, K, Ns, bias, view, seed):
    """Up to 3 products of one x per GEMV launch (q, k, v; a 4th goes to a second launch); T = 5 falls back."""
    r = rng(seed)
    with backend(dtype) as be:
        ws = [upload_weight(be, r.normal(size=(N, K)) / np.sqrt(K)) for N in Ns]
        bs = [upload_weight(be, r.normal(size=N)) if bias else (None, None) for N in Ns]
        x = r.normal(size=(T + view, K)).astype(np.float32)
        xd = be.from_host(x)[1:] if view else be.from_host(x)
        x = x[1:] if view else x
        got = be.linears(xd, [(w[0], b[0]) for w, b in zip(ws, bs)])
        assert len(got) == len(Ns)
        for g, (w, wr), (b, br) in zip(got, ws, bs):
            tol = TOL[dtype] if T > 4 else EXACT
            assert rel_err(be.to_host(g), ops.linear(x.astype(np.float64), wr, br)) < tol


@given(dtype=S.dtype, kind=S.act, gated=st.booleans(), T=st.integers(1, 5), K=S.kdim, N=S.dim, bias=st.booleans(),
       view=st.booleans(), seed=S.seed)
def test_linear_act_and_gated_linear(dtype, kind, gated, T, K, N, bias, view, seed):
    """act(x wu^T + bu), or act(x wg^T + bg) * (x wu^T + bu): the activation as the GEMV's epilogue."""
    r = rng(seed)
    with backend(dtype) as be:
        wu, wur = upload_weight(be, r.normal(size=(N, K)) * 2 / np.sqrt(K))
        wg, wgr = upload_weight(be, r.normal(size=(N, K)) * 2 / np.sqrt(K))
        bu, bur = upload_weight(be, r.normal(size=N)) if bias else (None, None)
        bg, bgr = upload_weight(be, r.normal(size=N)) if bias else (None, None)
        x = r.normal(size=(T + view, K)).astype(np.float32)
        xd = be.from_host(x)[1:] if view else be.from_host(x)
        x64 = (x[1:] if view else x).astype(np.float64)
        up = ops.linear(x64, wur, bur)
        if gated:
            got, want = be.gated_linear(xd, wg, bg, wu, bu, kind), ops.ACT[kind](ops.linear(x64, wgr, bgr)) * up
        else:
            got, want = be.linear_act(xd, wu, bu, kind), ops.ACT[kind](up)
        assert rel_err(be.to_host(got), want) < (TOL[dtype] if T > 4 else EXACT)


@given(dtype=S.dtype, K=st.one_of(S.dim, st.sampled_from([2048, 3072, 4096])), N=S.dim, offset=st.sampled_from([0.0, 1.0]),
       eps=st.sampled_from([1e-5, 1e-6]), bias=st.booleans(), kind=S.act, seed=S.seed,
       norm=st.sampled_from(["rmsnorm", "layernorm"]), mean=st.sampled_from([0.0, 3.0]))
def test_folded_norm_and_residual(dtype, K, N, offset, eps, bias, kind, seed, norm, mean):
    """One decode token: add_norm(x, linear(a)) runs the product with the residual add in its epilogue and
    leaves the RMSNorm / LayerNorm (gain and bias; rows with a mean far from 0 too) to the GEMVs that read it (q/k/v, gate/up, up + act, a later linear), which fold it
    into their reduction; the results equal the unfolded reference, and reading the lazy norm directly
    computes it with the norm kernel."""
    r = rng(seed)
    with backend(dtype) as be:
        wo, wor = upload_weight(be, r.normal(size=(K, N)) / np.sqrt(N))
        be.fold_ln = True  # (off by default: slower for GPT-2; the folded path is tested all the same)
        g, gr = upload_weight(be, r.normal(size=K) * 0.3 + (0.0 if offset else 1.0))
        nb, nbr = upload_weight(be, r.normal(size=K)) if norm == "layernorm" and bias else (None, None)
        ws = [upload_weight(be, r.normal(size=(n, K)) / np.sqrt(K)) for n in (N, max(1, N // 2), 7)]
        bs = [upload_weight(be, r.normal(size=n)) if bias else (None, None) for n in (N, max(1, N // 2), 7)]
        x0, a = (r.normal(size=(1, K)) * 2 + mean).astype(np.float32), r.normal(size=(1, N)).astype(np.float32)
        s, h = be.add_norm(be.from_host(x0), be.linear(be.from_host(a), wo), g, nb, eps, norm, offset)
        if K % 4 == 0:  # (the vector path; other widths run the norm kernel)
            assert getattr(h, "pending", False), "the norm was not left to the GEMVs"
        qkv = be.linears(h, [(w, b) for (w, _), (b, _) in zip(ws, bs)])
        gated = be.gated_linear(h, ws[0][0], bs[0][0], ws[0][0], bs[0][0], kind)
        up = be.linear_act(h, ws[1][0], bs[1][0], kind)
        lin = be.linear(h, ws[2][0], bs[2][0])
        got = [be.to_host(t) for t in (s, *qkv, gated, up, lin, h)]
    sw = x0.astype(np.float64) + ops.linear(a.astype(np.float64), wor, None)
    hw = ops.rms_norm(sw, gr, eps, offset) if norm == "rmsnorm" else ops.layer_norm(sw, gr, nbr, eps, offset)
    want = [sw] + [ops.linear(hw, wr, br) for (_, wr), (_, br) in zip(ws, bs)]
    l0 = ops.linear(hw, ws[0][1], bs[0][1])
    want += [ops.ACT[kind](l0) * l0, ops.ACT[kind](ops.linear(hw, ws[1][1], bs[1][1])),
             ops.linear(hw, ws[2][1], bs[2][1]), hw]
    for i, (gv, wv) in enumerate(zip(got, want)):
        assert rel_err(gv, wv) < 2 * EXACT, f"output {i}"


# --- norms ------------------------------------------------------------------------------------------------------
@given(dtype=S.dtype, kind=st.sampled_from(["layernorm", "rmsnorm"]), R=st.integers(1, 300),
       D=st.one_of(S.dim, st.sampled_from([4096, 8192, 8196])),  # register path up to 8192, then two-pass
       offset=st.sampled_from([0.0, 1.0]), bias=st.booleans(), eps=st.sampled_from([1e-5, 1e-6]), seed=S.seed)
def test_norm_and_add_norm(dtype, kind, R, D, offset, bias, eps, seed):
    r = rng(seed)
    with backend(dtype) as be:
        w, wr = upload_weight(be, r.normal(size=D))
        b, br = upload_weight(be, r.normal(size=D)) if bias and kind == "layernorm" else (None, None)
        x, d = (r.normal(size=(R, D)) * 3 + 1).astype(np.float32), r.normal(size=(R, D)).astype(np.float32)
        ref = NumpyBackend("float32")
        want = ref.norm(x.astype(np.float64), wr, br, eps, kind, offset)
        assert rel_err(be.to_host(be.norm(be.from_host(x), w, b, eps, kind, offset)), want) < EXACT
        s, y = be.add_norm(be.from_host(x), be.from_host(d), w, b, eps, kind, offset)
        ws, wy = ref.add_norm(x.astype(np.float64), d.astype(np.float64), wr, br, eps, kind, offset)
        assert rel_err(be.to_host(s), ws) < EXACT
        assert rel_err(be.to_host(y), wy) < EXACT


@given(dtype=S.dtype, T=st.integers(1, 300), H=st.integers(1, 40), Dh=S.head_dim, offset=st.sampled_from([0.0, 1.0]),
       seed=S.seed)
def test_head_norm(dtype, T, H, Dh, offset, seed):
    r = rng(seed)
    with backend(dtype) as be:
        w, wr = upload_weight(be, r.normal(size=Dh))
        x = (r.normal(size=(T, H, Dh)) * 2).astype(np.float32)
        got = be.to_host(be.head_norm(be.from_host(x), w, 1e-6, offset))
        assert rel_err(got, ops.rms_norm(x.astype(np.float64), wr, 1e-6, offset)) < EXACT


# --- rotary embedding -------------------------------------------------------------------------------------------
@given(T=st.integers(1, 500), H=st.integers(1, 40), half=st.integers(1, 128), start=st.integers(0, 8000),
       theta=st.sampled_from([1e4, 5e5, 1e6]), rtype=st.sampled_from(["default", "linear", "llama3"]), seed=S.seed)
def test_rope(T, H, half, start, theta, rtype, seed):
    Dh = 2 * half
    rope = RopeConfig(theta=theta, type=rtype, factor=8.0 if rtype != "default" else 1.0)
    inv = rope.inv_freq(Dh)
    x = rng(seed).normal(size=(T, H, Dh)).astype(np.float32)
    with backend("float32") as be:
        got = be.to_host(be.rope(be.from_host(x), start, inv))
    assert rel_err(got, ops.rope(x.astype(np.float64), np.arange(start, start + T), inv)) < EXACT


@given(dtype=S.dtype, T=st.integers(1, 40), Hkv=st.integers(1, 5), g=S.gqa, half=st.integers(1, 80),
       start=st.integers(0, 5000), norm=st.booleans(), offset=st.sampled_from([0.0, 1.0]), seed=S.seed)
def test_rope_cache_write(dtype, T, Hkv, g, half, start, norm, offset, seed):
    """(per-head RMSNorm,) RoPE on q and k, k and v stored in the cache: one kernel; q returned rotated."""
    r = rng(seed)
    Dh, H, S_ = 2 * half, Hkv * g, start + T + 3
    inv = RopeConfig(theta=1e4).inv_freq(Dh)
    q, k, v = (r.normal(size=(T, h, Dh)).astype(np.float32) for h in (H, Hkv, Hkv))
    cfg = SimpleNamespace(num_layers=1, num_kv_heads=Hkv, head_dim=Dh, max_position_embeddings=S_)
    with backend(dtype) as be:
        qk, refs = None, None
        if norm:
            (qw, qwr), (kw, kwr) = upload_weight(be, r.normal(size=Dh)), upload_weight(be, r.normal(size=Dh))
            qk, refs = (qw, kw, 1e-6, offset), (qwr, kwr)
        cache = be.new_cache(cfg, S_)
        got = be.to_host(be.rope_cache_write(be.from_host(q), be.from_host(k), be.from_host(v), cache, 0, start, inv, qk))
        kc, vc = be.to_host(cache.k[0]), be.to_host(cache.v[0])
    q64, k64, pos = q.astype(np.float64), k.astype(np.float64), np.arange(start, start + T)
    if norm:
        q64, k64 = ops.rms_norm(q64, refs[0], 1e-6, offset), ops.rms_norm(k64, refs[1], 1e-6, offset)
    assert rel_err(got, ops.rope(q64, pos, inv)) < EXACT
    want_k = ops.rope(k64, pos, inv).transpose(1, 0, 2)
    assert rel_err(kc[:, start:start + T], want_k) < max(EXACT, TOL[dtype] / 4)  # GPU rounds its fp32 result
    np.testing.assert_array_equal(vc[:, start:start + T], _round(dtype, v).transpose(1, 0, 2))
    for c in (kc, vc):
        assert np.isnan(c[:, :start]).all() and np.isnan(c[:, start + T:]).all(), "wrote outside its positions"


# --- greedy sampling --------------------------------------------------------------------------------------------
@given(n=st.one_of(st.integers(1, 3000), st.integers(3000, 300_000)), levels=st.sampled_from([2, 5, 0]),
       seed=S.seed)
def test_argmax(n, levels, seed):
    """The GPU argmax (decode graphs end in it) is numpy's: the first index of the largest value, ties included
    (levels > 0 draws from a few values, so ties are common; -0.0 and +0.0 compare equal)."""
    r = rng(seed)
    x = (r.integers(-levels, levels + 1, n) * 0.5 if levels else r.normal(size=n) * 10).astype(np.float32)
    x[x == 0] = r.choice(np.array([0.0, -0.0], np.float32), size=int((x == 0).sum()))
    with backend("float32") as be:
        key = be.argmax_key(be.from_host(x))
        be.synchronize()
        raw = np.empty(2, np.int32)
        be.drv.memcpy_dtoh(raw, key.ptr)
    assert be.key_to_id(raw) == int(np.argmax(x))


# --- KV cache and attention -------------------------------------------------------------------------------------
def _round(dtype, x):
    return NumpyBackend(dtype).convert(np.asarray(x, np.float32), "F32", "kv").astype(np.float64)


def _attention_case(dtype, T, start, Hkv, g, Dh, window, softcap, seed, spare, fused=True, attn="simt"):
    """Fill a poisoned cache with `start` old positions and T new ones; compare the cache and attention.
    fused=False: the previous two-kernel decode path (attn_decode + attn_combine) instead of attn_decode_step;
    attn: the prefill attention ("simt" or "tc"), set here because entering backend() resets the switches."""
    r = rng(seed)
    H, n = Hkv * g, start + T
    k, v = r.normal(size=(2, n, Hkv, Dh)).astype(np.float32)
    q = r.normal(size=(T, H, Dh)).astype(np.float32)
    scale = 1.0 / np.sqrt(Dh)
    cfg = SimpleNamespace(num_layers=1, num_kv_heads=Hkv, head_dim=Dh, max_position_embeddings=n + spare)
    with backend(dtype) as be:
        cache = be.new_cache(cfg, n + spare)
        if start:
            be.cache_write(cache, 0, be.from_host(k[:start]), be.from_host(v[:start]), 0)
        be.cache_write(cache, 0, be.from_host(k[start:]), be.from_host(v[start:]), start)
        kc, vc = be.to_host(cache.k[0]), be.to_host(cache.v[0])
        be.fused, be.attn = fused, attn
        try:
            out = be.to_host(be.attention(be.from_host(q), cache, 0, start, scale, window=window, softcap=softcap))
        finally:
            be.fused = True
    kr, vr = _round(dtype, k).transpose(1, 0, 2), _round(dtype, v).transpose(1, 0, 2)  # [Hkv, n, Dh]
    np.testing.assert_array_equal(kc[:, :n], kr)
    np.testing.assert_array_equal(vc[:, :n], vr)
    assert np.isnan(kc[:, n:]).all() and np.isnan(vc[:, n:]).all(), "cache_write wrote past its positions"
    want = ops.attention(q.astype(np.float64), kr, vr, start, scale, window, softcap)
    assert rel_err(out, want) < TOL[dtype]


@given(dtype=S.dtype, start=st.integers(0, 8000), Hkv=st.integers(1, 4), g=S.gqa, Dh=S.head_dim,
       window=st.one_of(st.none(), st.integers(1, 40), st.integers(1, 3000)), softcap=st.one_of(st.none(), st.floats(5.0, 50.0)),
       seed=S.seed, fused=st.booleans())
def test_attention_decode(dtype, start, Hkv, g, Dh, window, softcap, seed, fused):
    """One query against up to 8000 cached positions: the one-launch GQA split-KV kernel (its last block
    merges the slices) and the previous two-kernel path."""
    _attention_case(dtype, 1, start, Hkv, g, Dh, window, softcap, seed, spare=7, fused=fused)


@given(dtype=S.dtype, start=st.one_of(st.integers(0, 300), st.integers(300, 5000)), Hkv=st.integers(1, 3), g=S.gqa,
       Dh=st.sampled_from([32, 64, 128, 80, 38]), rope=st.booleans(), norm=st.booleans(),
       offset=st.sampled_from([0.0, 1.0]), window=st.one_of(st.none(), st.integers(1, 40), st.integers(1, 3000)),
       softcap=st.one_of(st.none(), st.floats(5.0, 50.0)), other_use=st.booleans(), seed=S.seed)
def test_attention_decode_folded(dtype, start, Hkv, g, Dh, rope, norm, offset, window, softcap, other_use, seed):
    """One decode token as the model runs it: rope_cache_write (or, without RoPE, head norm + cache_write)
    then attention. attn_decode_step takes the deferred write over: it norms and rotates q and the new key,
    stores the new key and value in the cache, and attends. other_use reads q first, which must run the
    separate kernels instead (same results)."""
    r = rng(seed)
    H, n = Hkv * g, start + 1
    inv = RopeConfig(theta=1e4).inv_freq(Dh)
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
        qd, kd, vd = be.from_host(q), be.from_host(k[start:]), be.from_host(v[start:])
        if rope:
            qd = be.rope_cache_write(qd, kd, vd, cache, 0, start, inv, qk)
        else:
            if norm:
                qd, kd = be.head_norm(qd, qw, 1e-6, offset), be.head_norm(kd, kw, 1e-6, offset)
            be.cache_write(cache, 0, kd, vd, start)
        seen_q = be.to_host(qd) if other_use else None
        out = be.to_host(be.attention(qd, cache, 0, start, 0.3, window=window, softcap=softcap))
        kc, vc = be.to_host(cache.k[0]), be.to_host(cache.v[0])
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    if norm:
        q64, k64 = ops.rms_norm(q64, refs[0], 1e-6, offset), ops.rms_norm(k64[start:], refs[1], 1e-6, offset)
        k64 = np.concatenate([k.astype(np.float64)[:start], k64])
    if rope:
        q64 = ops.rope(q64, np.arange(start, n), inv)
        k64 = np.concatenate([k64[:start], ops.rope(k64[start:], np.arange(start, n), inv)])
    if other_use:
        assert rel_err(seen_q, q64) < EXACT
    kr, vr = _round(dtype, k64).transpose(1, 0, 2), _round(dtype, v).transpose(1, 0, 2)  # [Hkv, n, Dh]
    np.testing.assert_array_equal(kc[:, :start], kr[:, :start])
    assert rel_err(kc[:, start], kr[:, start]) < max(EXACT, TOL[dtype] / 4)  # the GPU rounds its fp32 result
    np.testing.assert_array_equal(vc[:, :n], vr)
    assert np.isnan(kc[:, n:]).all() and np.isnan(vc[:, n:]).all(), "wrote past the new position"
    want = ops.attention(q64, kr, vr, start, 0.3, window, softcap)
    assert rel_err(out, want) < TOL[dtype]


@given(dtype=S.dtype, Hkv=st.integers(1, 4), g=S.gqa, Dh=S.head_dim, seed=S.seed, data=st.data())
def test_attention_decode_repeated_launches(dtype, Hkv, g, Dh, seed, data):
    """The block counters attn_decode_step counts in are left at zero: launches back to back at growing
    positions (as graph replays do) each merge their own slices."""
    r = rng(seed)
    n = data.draw(st.integers(2, 3000))
    H = Hkv * g
    k, v = r.normal(size=(2, n, Hkv, Dh)).astype(np.float32)
    q = r.normal(size=(n, H, Dh)).astype(np.float32)
    cfg = SimpleNamespace(num_layers=1, num_kv_heads=Hkv, head_dim=Dh, max_position_embeddings=n)
    positions = sorted(set(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=6))))
    with backend(dtype) as be:
        cache = be.new_cache(cfg, n)
        be.cache_write(cache, 0, be.from_host(k), be.from_host(v), 0)
        outs = [be.attention(be.from_host(q[p:p + 1]), cache, 0, p, 0.125) for p in positions]
        got = [be.to_host(o) for o in outs]
    kr, vr = _round(dtype, k).transpose(1, 0, 2), _round(dtype, v).transpose(1, 0, 2)
    for p, out in zip(positions, got):
        want = ops.attention(q[p:p + 1].astype(np.float64), kr[:, :p + 1], vr[:, :p + 1], p, 0.125, None, None)
        assert rel_err(out, want) < TOL[dtype], f"position {p}"


@given(dtype=S.dtype, T=st.integers(2, 3000), Hkv=st.integers(1, 2), g=S.gqa, Dh=S.head_dim,
       window=st.one_of(st.none(), st.integers(1, 40), st.integers(1, 1000)), softcap=st.one_of(st.none(), st.floats(5.0, 50.0)),
       seed=S.seed)
def test_attention_prefill(dtype, T, Hkv, g, Dh, window, softcap, seed):
    """A prompt of up to 3000 tokens from position 0."""
    assume(Hkv * g * T * T <= 20_000_000)  # keeps the float64 reference's score matrix small
    _attention_case(dtype, T, 0, Hkv, g, Dh, window, softcap, seed, spare=5)


@given(dtype=S.dtype, T=st.integers(2, 200), start=st.integers(1, 1500), Hkv=st.integers(1, 3), g=S.gqa,
       Dh=S.head_dim, window=st.one_of(st.none(), st.integers(1, 600)), seed=S.seed)
def test_attention_chunk(dtype, T, start, Hkv, g, Dh, window, seed):
    """Several new tokens after a cached prefix (causal mask offset by start)."""
    _attention_case(dtype, T, start, Hkv, g, Dh, window, None, seed, spare=3)
