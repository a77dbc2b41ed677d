"""Property tests of the optional vendor paths for prefill (GPU machine only): the cuBLAS matrix product
(core/cuda/cublas.py, through ctypes) and the tensor-core prefill attention (attention_tc.cu), each
against its numpy reference in core.ops, on a poisoning backend (outputs start as NaN).

One test needs no GPU: the row-major to column-major argument mapping of cublasGemmEx, checked against a
numpy emulation of its column-major contract. Shapes are mostly off the tile sizes (GEMM: T > 4 rows of any
length; attention: 64 x 64 tiles). Each GPU test checks that the path it means to test really ran (the op
names the backend recorded), so a silent fallback to another kernel fails. The cuBLAS tests skip, with the
reason, where no libcublas is found.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from core import ops
from test_cuda_kernels import OK, TOL, EXACT, WHY, S, _attention_case, backend, rel_err, rng, upload_weight

gpu = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")]


def on_gpu(f):
    for m in gpu:
        f = m(f)
    return f


def _cublas_or_skip():
    from core.cuda import cublas

    ok, why = cublas.available()
    if not ok:
        pytest.skip(f"cuBLAS not found: {why}")


class Recorder:
    """Names of the cuBLAS calls and kernel launches a backend makes while active."""

    def __init__(self, be):
        self.be, self.ops = be, []

    def __enter__(self):
        be, launch, cub = self.be, self.be.launch, self.be.cublas_op
        be.launch = lambda op, *a, **kw: (self.ops.append(op), launch(op, *a, **kw))[1]
        be.cublas_op = lambda op, call: (self.ops.append(op), cub(op, call))[1]
        return self

    def __exit__(self, *exc):
        del self.be.launch, self.be.cublas_op


@on_gpu
@given(dtype=S.dtype, T=st.one_of(st.integers(5, 700), st.just(1100)), K=S.dim, N=S.dim, bias=st.booleans(),
       view=st.booleans(), seed=S.seed)
def test_cublas_linear(dtype, T, K, N, bias, view, seed):
    """T > 4 rows through cublasGemmEx; `view` feeds rows 1.. of a bigger buffer (an unaligned x)."""
    _cublas_or_skip()
    r = rng(seed)
    with backend(dtype) as be:
        be.gemm, be.skinny = "cublas", False  # (skinny.cu would take T <= 64: test_cuda_skinny.py)
        w, wr = upload_weight(be, r.normal(size=(N, K)) / np.sqrt(K))
        b, br = upload_weight(be, r.normal(size=N)) if bias else (None, None)
        x = r.normal(size=(T + view, K)).astype(np.float32)
        xd = be.from_host(x)[1:] if view else be.from_host(x)
        x = x[1:] if view else x
        with Recorder(be) as rec:
            got = be.to_host(be.linear(xd, w, b))
        assert rec.ops.count("linear(cublas)") == 1, rec.ops
        assert ("linear(cublas:bias)" in rec.ops) == bias
        assert got.shape == (T, N)
        tol = TOL[dtype]  # half types: x rounded to the weight type, as our GEMM does; fp32: SGEMM, no TF32
        assert rel_err(got, ops.linear(x.astype(np.float64), wr, br)) < (EXACT if dtype == "float32" else tol)


@on_gpu
@given(dtype=S.dtype, T=st.integers(5, 400), K=S.dim, Ns=st.lists(S.dim, min_size=1, max_size=3), bias=st.booleans(),
       gated=st.booleans(), kind=S.act, seed=S.seed)
def test_cublas_linears_and_gated(dtype, T, K, Ns, bias, gated, kind, seed):
    """linears (q, k, v) and gated_linear (gate, up) round x once and run one cuBLAS product per weight."""
    _cublas_or_skip()
    r = rng(seed)
    if gated:
        Ns = [Ns[0], Ns[0]]
    with backend(dtype) as be:
        be.gemm, be.skinny = "cublas", False  # (skinny.cu would take T <= 64: test_cuda_skinny.py)
        ws = [upload_weight(be, r.normal(size=(N, K)) / np.sqrt(K)) for N in Ns]
        bs = [upload_weight(be, r.normal(size=N)) if bias else (None, None) for N in Ns]
        x = r.normal(size=(T, K)).astype(np.float32)
        x64 = x.astype(np.float64)
        refs = [ops.linear(x64, wr, br) for (_, wr), (_, br) in zip(ws, bs)]
        with Recorder(be) as rec:
            if gated:
                got = [be.to_host(be.gated_linear(be.from_host(x), ws[0][0], bs[0][0], ws[1][0], bs[1][0], kind))]
                refs = [ops.ACT[kind](refs[0]) * refs[1]]
            else:
                got = [be.to_host(g) for g in be.linears(be.from_host(x), [(w, b) for (w, _), (b, _) in zip(ws, bs)])]
        assert rec.ops.count("linear(cublas)") == len(Ns), rec.ops
        assert rec.ops.count("linear(cublas:round)") == (0 if dtype == "float32" else 1), rec.ops
        for g, want in zip(got, refs):
            assert rel_err(g, want) < (EXACT if dtype == "float32" else 2 * TOL[dtype])


HALF = st.sampled_from(["float16", "bfloat16"])
TC_DH = st.sampled_from([32, 48, 64, 80, 128])


@on_gpu
@given(dtype=HALF, T=st.integers(2, 2500), Hkv=st.integers(1, 2), g=S.gqa, Dh=TC_DH,
       window=st.one_of(st.none(), st.integers(1, 40), st.integers(1, 1000)), softcap=st.one_of(st.none(), st.floats(5.0, 50.0)),
       seed=S.seed)
def test_attention_prefill_tc(dtype, T, Hkv, g, Dh, window, softcap, seed):
    """The tensor-core prefill from position 0: windows, soft-capping, GQA, T off the 64-query tiles."""
    assume(Hkv * g * T * T <= 20_000_000)
    with backend(dtype) as be, Recorder(be) as rec:
        _attention_case(dtype, T, 0, Hkv, g, Dh, window, softcap, seed, spare=5, attn="tc")
    assert "attention(prefill_tc)" in rec.ops, rec.ops


@on_gpu
@given(dtype=HALF, T=st.integers(2, 200), start=st.integers(1, 1500), Hkv=st.integers(1, 3), g=S.gqa, Dh=TC_DH,
       window=st.one_of(st.none(), st.integers(1, 600)), seed=S.seed)
def test_attention_chunk_tc(dtype, T, start, Hkv, g, Dh, window, seed):
    """The tensor-core prefill after a cached prefix (causal mask offset by start)."""
    with backend(dtype) as be, Recorder(be) as rec:
        _attention_case(dtype, T, start, Hkv, g, Dh, window, None, seed, spare=3, attn="tc")
    assert "attention(prefill_tc)" in rec.ops, rec.ops


# --- no GPU needed: the row-major -> column-major argument mapping, against a numpy cublasGemmEx ---------------
class FakeCublasLib:
    """cublasGemmEx's column-major contract in numpy, reading and writing host memory by address."""

    NP = {0: np.float32, 2: np.float16}

    def __init__(self):
        ok = lambda *a: 0  # noqa: E731
        for name in ("cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasSetMathMode",
                     "cublasGetVersion_v2"):
            setattr(self, name, _Fn(ok))
        self.cublasGemmEx = _Fn(self._gemm)

    @staticmethod
    def _mat(ptr, dtype, rows, cols, ld):
        """A column-major rows x cols matrix with leading dimension ld at address ptr (a strided view)."""
        n = ld * (cols - 1) + rows
        flat = np.frombuffer((ctypes.c_char * (n * np.dtype(dtype).itemsize)).from_address(ptr), dtype, n)
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (flat.itemsize, ld * flat.itemsize))

    def _gemm(self, h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, compute, algo):
        assert compute == 68 and ct == 0 and at == bt
        a = self._mat(A.value, self.NP[at], *((k, m) if ta else (m, k)), lda).astype(np.float64)
        b = self._mat(B.value, self.NP[bt], *((n, k) if tb else (k, n)), ldb).astype(np.float64)
        a, b = (a.T if ta else a), (b.T if tb else b)
        c = self._mat(C.value, np.float32, m, n, ldc)
        al, be_ = alpha._obj.value, beta._obj.value
        c[...] = al * (a @ b) + (be_ * c if be_ else 0)
        return 0


class _Fn:
    def __init__(self, f):
        self.f = f

    def __call__(self, *a):
        return self.f(*a)



@given(dtype=st.sampled_from(["float32", "float16"]), M=st.integers(1, 40), N=st.integers(1, 40),
       K=st.integers(1, 40), seed=S.seed)
def test_cublas_argument_mapping(dtype, M, N, K, seed):
    """Cublas.linear's GemmEx arguments give y = x @ w.T for row-major x [M, K], w [N, K], y [M, N]."""
    from core.cuda.cublas import Cublas

    r = rng(seed)
    npd = np.float32 if dtype == "float32" else np.float16
    x = r.normal(size=(M, K)).astype(npd)
    w = r.normal(size=(N, K)).astype(npd)
    y = np.full((M, N), np.nan, np.float32)
    lib = Cublas(FakeCublasLib(), "fake")
    lib.linear(lib.create(0)[0], y.ctypes.data, x.ctypes.data, w.ctypes.data, M, N, K, dtype)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-5, atol=1e-5)
