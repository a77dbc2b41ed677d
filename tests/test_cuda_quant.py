"""Quantized weights on the GPU (issue 16): every kernel of core/cuda/gemv_q.cu against the reference dequantization
(core/quant/dequant.py) times x, and quantized checkpoints loaded with device="cuda" against device="cpu".

The weights are quantcases.py's: each format's parts drawn at random and repacked as loading repacks them (their
layout is checked on the CPU, test_quant_layout.py). Shapes put K off the 16-byte chunk (x staged), groups down to one
word, zero points or none, every scale dtype against every weight dtype, and token counts from 1 to GEMV_MAX_T (the
GEMV, whose weights are the reference's exactly: fp32 summation order is the only difference, held to EXACT) and past
it (the weight dequantized into the backend's dtype for the GEMM, held to the dtype's TOL). The integer kinds' GEMVs
multiply by (u - z) s unrounded (gemv_q.cu's QFOLD), so their reference is qlayout.dense(rounded=False) at EXACT; fp8's
is the reference's weight itself. The backend poisons fresh buffers, so an output element a kernel fails to write
shows.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import core
from core import ops
from core.backend import NumpyBackend
from core.cuda import qlayout as L
from core.cuda.geometry import GEMV_MAX_T, qgemv_rounds
from core.load import cuda_available
from core.testing import EXACT, TOL, cuda_backend, rel_err, rng, upload_weight
from quantcases import S, cases, ct_checkpoint, ct_int_case, fp8_case, gptq_case, gptq_checkpoint, tiny_config

OK, WHY = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")]


def weight_of(be, case):
    return be.upload_packed(case.packed, "test")


def gemv_ref(case) -> np.ndarray:
    """float64 [N, K]: the weight gemv_q.cu's GEMV multiplies x by (geometry.qgemv_rounds)."""
    p = case.packed
    return L.dense(p, rounded=qgemv_rounds(p.kind)).astype(np.float64)


def rounded(be, ref_f32):
    """The dense weight as the backend's dtype holds it (the GEMM path rounds the dequantized weight to it)."""
    return NumpyBackend(be.dtype).convert(ref_f32, "F32", "test").astype(np.float64)


@given(case=cases(), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       T=st.one_of(st.integers(1, GEMV_MAX_T), st.integers(GEMV_MAX_T + 1, 80)), bias=st.booleans(),
       view=st.booleans(), seed=S.seed)
def test_linear(case, dtype, T, bias, view, seed):
    """One product: the GEMV for T <= GEMV_MAX_T (exact weights: fp32 summation order only), the dequantized GEMM
    above (the weight rounded to the dtype as a dense load rounds it, x rounded by the GEMM)."""
    r = rng(seed)
    N, K = case.packed.shape
    with cuda_backend(dtype) as be:
        w = weight_of(be, case)
        b, br = upload_weight(be, r.normal(size=N)) if bias else (None, None)
        x = r.normal(size=(T + view, K)).astype(np.float32)
        xd = be.from_host(x)[1:] if view else be.from_host(x)  # rows 1..: unaligned when K % 4
        x = x[1:] if view else x
        got = be.to_host(be.linear(xd, w, b))
    assert got.shape == (T, N)
    small = T <= GEMV_MAX_T
    wref = gemv_ref(case) if small else case.ref.astype(np.float64) if dtype == "float32" else rounded(be, case.ref)
    assert rel_err(got, ops.linear(x.astype(np.float64), wref, br)) < (EXACT if small else TOL[dtype])


@given(kind=st.sampled_from(["gptq", "gptq-row", "ct", "fp8"]), dtype=st.sampled_from(["float16", "bfloat16"]),
       T=st.integers(1, GEMV_MAX_T), act=st.sampled_from(sorted(ops.ACT)), qtc=st.booleans(), seed=S.seed,
       data=st.data())
def test_linears_gated_and_act(kind, dtype, T, act, qtc, seed, data):
    """q, k, v of one layout in one launch beside a dense weight; act(x wg) * (x wu); act(x w) in the epilogue. qtc:
    the gated product of one token of int4 / int8 on tensor cores (gemv_qtc.cu, the qtc switch)."""
    r = rng(seed)
    K = data.draw(st.sampled_from([128, 256, 96]))
    sd = data.draw(S.sdtype)
    make = {"gptq": lambda s, n: gptq_case(s, 4, n, K, 32, False, False, True, sd),
            "gptq-row": lambda s, n: gptq_case(s, 4, n, K, -1, True, False, True, sd),  # gated: tensor cores
            "ct": lambda s, n: ct_int_case(s, 8, n, K, "channel", None, False, False, True, sd),
            "fp8": lambda s, n: fp8_case(s, n, K, (128, 128), sd)}[kind]
    cs = [make(seed + i, n) for i, n in enumerate([64, 16, 16, 48, 48])]
    x = r.normal(size=(T, K)).astype(np.float32)
    xd = x.astype(np.float64)
    with cuda_backend(dtype) as be:
        be.qtc = qtc
        ws = [weight_of(be, c) for c in cs]
        dense, dref = upload_weight(be, r.normal(size=(24, K)) / np.sqrt(K))
        xg = be.from_host(x)
        q, k, v, extra = be.linears(xg, [(ws[0], None), (ws[1], None), (ws[2], None), (dense, None)])
        gated = be.gated_linear(xg, ws[3], None, ws[4], None, act)
        one = be.linear_act(xg, ws[3], None, act)
        got = [be.to_host(t) for t in (q, k, v, extra, gated, one)]
    wr = [gemv_ref(c) for c in cs]
    want = [xd @ w.T for w in wr[:3]] + [xd @ dref.T]
    want += [ops.ACT[act](xd @ wr[3].T) * (xd @ wr[4].T), ops.ACT[act](xd @ wr[3].T)]
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-5  # activations in fp32 (test_cuda_kernels' ACT_RTOL is per element)


END_TO_END = {
    "ct-w4a16-g32-asym": lambda t: ct_checkpoint(t, "w4a16", 32, False, tiny_config()),
    "ct-w8a16-f16": lambda t: ct_checkpoint(t, "w8a16", None, True, tiny_config(), np.float16),
    "ct-fp8": lambda t: ct_checkpoint(t, "fp8", None, True, tiny_config()),
    "gptq-desc-act": lambda t: gptq_checkpoint(t / "g", tiny_config(), group=32),
}


@pytest.mark.parametrize("name", sorted(END_TO_END))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_quantized_checkpoint_on_the_gpu(tmp_path, name, dtype):
    """A quantized checkpoint on device="cuda", its weights kept quantized, against device="cpu": logits close
    (float32: the GEMV's exact weights; float16: the dtype's tolerance) and greedy tokens equal."""
    from core.cuda.tensors import QTensor

    path = END_TO_END[name](tmp_path)
    cpu = core.load(path, device="cpu", quiet=True, dtype=dtype)
    gpu = core.load(path, device="cuda", quiet=True, dtype=dtype)
    try:
        assert sum(isinstance(t, QTensor) for L_ in gpu.weights.layers for t in L_.values()) == 14
        ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
        err = rel_err(gpu.logits(ids), cpu.logits(ids))
        assert err < (1e-4 if dtype == "float32" else 2e-2), err
        if dtype == "float32":
            assert gpu.generate(ids, max_new_tokens=12, stop_at_eos=False) == \
                cpu.generate(ids, max_new_tokens=12, stop_at_eos=False)
    finally:
        gpu.backend.release(gpu.weights)
