"""Property tests of skinny.cu (GPU machine only): the tensor-core product a batched decode step's rows take
(GEMV_MAX_T < M <= SKINNY_MAX_M, half-precision weights), against core.ops.linear in float64 on a poisoning backend.

Shapes are mostly off its tiles (8 rows of x, 64 / 128 weight rows, 128-column sub-step batches, the chunks of
staged x); the products of one x go up to three a launch (q, k, v; gate, up). Each test checks that skinny.cu really
ran (the op names the backend recorded), so a silent fallback to cuBLAS or our GEMM fails; and that where it must
not run (a width off 8 columns, more rows, float32 weights) it does not.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from core import ops, testing
from core.cuda.geometry import SKINNY_MAX_M
from test_cuda_cublas import Recorder, on_gpu
from test_cuda_kernels import TOL, S, rel_err, rng, upload_weight

HALF = st.sampled_from(["float16", "bfloat16"])
ROWS = st.one_of(st.integers(5, SKINNY_MAX_M), st.sampled_from([8, 16, 32, 64]))  # the graph buckets, often
# widths: multiples of 8 (16-byte weight rows), off the 128-column batches and the staging chunks, and real ones
KS = st.one_of(st.integers(1, 700).map(lambda k: 8 * k), st.sampled_from([2048, 4096, 5632, 12288]))
NS = st.one_of(st.integers(1, 700), st.sampled_from([64, 128, 256, 2048]))


def _skinny(dtype):
    return testing.cuda_backend(dtype, gemm="own", attn="simt", skinny=True)


@on_gpu
@given(dtype=HALF, M=ROWS, K=KS, Ns=st.lists(NS, min_size=1, max_size=4), bias=st.booleans(), view=st.booleans(),
       seed=S.seed)
def test_skinny_linears(dtype, M, K, Ns, bias, view, seed):
    """linears: up to three products a launch (a fourth takes a second one), x rounded to the weight type (as B is
    built);
    `view` feeds rows 1.. of a bigger buffer. Run twice: bit-equal (the split-K sum does not depend on timing, and
    the tile counters are left at zero for the next launch)."""
    r = rng(seed)
    with _skinny(dtype) as be:
        ws = [upload_weight(be, r.normal(size=(N, K)) / np.sqrt(K)) for N in Ns]
        bs = [upload_weight(be, r.normal(size=N)) if bias else (None, None) for N in Ns]
        x = r.normal(size=(M + view, K)).astype(np.float32)
        xd = be.from_host(x)[1:] if view else be.from_host(x)
        x64 = x[1:].astype(np.float64) if view else x.astype(np.float64)
        pairs = [(w, b) for (w, _), (b, _) in zip(ws, bs)]
        with Recorder(be) as rec:
            got = [be.to_host(y) for y in be.linears(xd, pairs)]
        assert rec.ops == ["linear(skinny)"] * (1 if len(Ns) <= 3 else 2), rec.ops
        again = [be.to_host(y) for y in be.linears(xd, pairs)]
        for g, a, (_, wr), (_, br) in zip(got, again, ws, bs):
            assert g.shape == (M, wr.shape[0])
            assert rel_err(g, ops.linear(x64, wr, br)) < TOL[dtype]
            np.testing.assert_array_equal(g, a)


@on_gpu
@given(dtype=HALF, M=ROWS, K=KS, N=NS, kind=S.act, seed=S.seed)
def test_skinny_linear_and_gated(dtype, M, K, N, kind, seed):
    """linear (one product) and gated_linear (gate and up in one launch, then the gated activation)."""
    r = rng(seed)
    with _skinny(dtype) as be:
        (wg, wgr), (wu, wur) = (upload_weight(be, r.normal(size=(N, K)) / np.sqrt(K)) for _ in range(2))
        x = r.normal(size=(M, K)).astype(np.float32)
        x64 = x.astype(np.float64)
        with Recorder(be) as rec:
            one = be.to_host(be.linear(be.from_host(x), wg))
            gated = be.to_host(be.gated_linear(be.from_host(x), wg, None, wu, None, kind))
        assert rec.ops.count("linear(skinny)") == 2, rec.ops
        assert rel_err(one, ops.linear(x64, wgr)) < TOL[dtype]
        assert rel_err(gated, ops.ACT[kind](ops.linear(x64, wgr)) * ops.linear(x64, wur)) < 2 * TOL[dtype]


@on_gpu
@pytest.mark.parametrize("dtype,M,K", [("float16", 4, 64), ("float16", SKINNY_MAX_M + 1, 64), ("float16", 16, 60),
                                       ("float32", 16, 64)])
def test_skinny_is_not_taken_outside_its_shapes(dtype, M, K):
    """A GEMV's few tokens, more rows than a launch takes, a width off 8 columns, float32 weights: other kernels,
    still right."""
    r = rng(0)
    with testing.cuda_backend(dtype, gemm="own", attn="simt", skinny=True) as be:
        w, wr = upload_weight(be, r.normal(size=(40, K)) / np.sqrt(K))
        x = r.normal(size=(M, K)).astype(np.float32)
        with Recorder(be) as rec:
            got = be.to_host(be.linear(be.from_host(x), w))
        assert "linear(skinny)" not in rec.ops, rec.ops
        assert rel_err(got, ops.linear(x.astype(np.float64), wr)) < TOL[dtype]
