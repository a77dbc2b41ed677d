"""Quantized MoE experts on the GPU (issue 16): core/cuda/moe.py with stacked QTensor experts — moe_q.cu's grouped
GEMVs for a few tokens, each expert's slice through qlinear.py for more — against core.ops.moe over the reference
dequantization (core/quant/dequant.py), and quantized Qwen3-MoE / Mixtral checkpoints on device="cuda" against
device="cpu", their experts kept quantized.

The experts are quantcases.expert_cases' (every format, symmetric experts among asymmetric ones, widths on and off
the 16-byte chunk), stacked as loading stacks them (the layout is checked on the CPU, test_quant_moe.py). The router
is test_cuda_moe.py's exact one, so expert selection is decided by the op alone. A few tokens read the reference's
weights exactly (fp32 summation order is the only difference: 2 * EXACT, two products); more tokens put some experts'
weights through the GEMM in the backend's dtype (TOL[dtype]). The backend poisons fresh buffers, so an element a
kernel fails to write (h's padding included) shows.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import core
from core import ops, testing
from core.config import MoeRouting
from core.cuda import qlayout as L
from core.cuda.geometry import GEMV_MAX_T, qgemv_rounds
from core.cuda.moe import MOE_DECODE_T
from core.load import cuda_available
from core.testing import EXACT, TOL, rel_err, rng, upload_weight
from quantcases import ct_int_case, expert_cases, fp8_case, gptq_case, moe_quantized
from test_cuda_moe import exact_router

OK, WHY = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")]
WIDTHS = st.sampled_from([8, 24, 40, 64, 72, 96, 128, 136, 256])
ACTS = st.sampled_from(["silu", "gelu", "gelu_pytorch_tanh", "relu", "quick_gelu", "relu2"])


def stacked(be, cases):
    """(stacked QTensor on the device, float64 [E, N, K] of the reference weights, float64 [E, N, K] of the weights
    gemv_q.cu's GEMV multiplies by: the integer kinds' unrounded, geometry.qgemv_rounds) of one expert each case."""
    p = L.stack([c.packed for c in cases])
    assert p is not None
    return (be.upload_packed(p, "experts"), L.dense(p).astype(np.float64),
            L.dense(p, rounded=qgemv_rounds(p.kind)).astype(np.float64))


def per_expert(w, counts):
    """A (device, reference, GEMV reference) triple as the pair the per-expert path computes with: an expert given
    at most GEMV_MAX_T tokens goes through gemv_q.cu's GEMV, one given more through the dequantized GEMM."""
    if len(w) == 2 or w[0] is None:  # dense (upload_weight's pair) or no such weight
        return w[:2]
    return w[0], np.where((counts <= GEMV_MAX_T)[:, None, None], w[2], w[1])


def run(be, r, T, D, E, k, gate, up, down, bias, routing):
    """(GPU result, core.ops.moe's float64 result) for expert triples (device weight, float64 reference, float64
    GEMV reference; see stacked)."""
    x = r.normal(size=(T, D)).astype(np.float32)
    rw, rb = exact_router(r, E, D, x, False)
    if T <= MOE_DECODE_T:  # the grouped GEMVs (moe_q.cu): the reference's weights
        gate, up, down = (w[:2] for w in (gate, up, down))
    else:
        top, _ = ops.moe_route(x.astype(np.float64), rw.astype(np.float64), None, routing.top_k, routing.scoring,
                               routing.renormalize, routing.routed_scale)
        counts = np.bincount(top.ravel(), minlength=E)
        gate, up, down = (per_expert(w, counts) for w in (gate, up, down))
    I = up[1].shape[1]
    bs = [upload_weight(be, r.normal(size=s) * 0.5) if bias else (None, None) for s in ((E, I), (E, I), (E, D))]
    got = be.to_host(be.moe(be.from_host(x), upload_weight(be, rw)[0], None, gate[0], up[0], down[0], routing,
                            tuple(b[0] for b in bs)))
    want = ops.moe(x.astype(np.float64), rw.astype(np.float64), None, gate[1], up[1], down[1], routing.top_k,
                   routing.scoring, routing.renormalize, routing.activation, routing.routed_scale,
                   tuple(b[1] for b in bs))
    return got, want


@given(dtype=testing.dtypes(), T=st.one_of(st.integers(1, GEMV_MAX_T), st.sampled_from([17, 40])),
       E=st.integers(1, 12), D=WIDTHS, I=WIDTHS, gated=st.booleans(), bias=st.booleans(), act=ACTS,
       scoring=st.sampled_from(["softmax", "sigmoid"]), renorm=st.booleans(), seed=testing.seeds(), data=st.data())
def test_quantized_experts_match_the_reference(dtype, T, E, D, I, gated, bias, act, scoring, renorm, seed, data):
    """Gate and up in one layout (the fused moe_q_gate_up), down in its own, any format and scale dtype, any
    activation, biases, top_k up to 4: the decode kernels (T <= 4) and the per-expert products (T = 17, 40)."""
    k = data.draw(st.integers(1, min(E, 4)), label="top_k")
    pair = data.draw(expert_cases(I, D, 2 * E), label="gate and up")
    down = data.draw(expert_cases(D, I, E), label="down")
    with testing.cuda_backend(dtype, gemm=data.draw(st.sampled_from(["own", "auto"]))) as be:
        up = stacked(be, pair[E:])
        gate = stacked(be, pair[:E]) if gated else (None, None, None)
        got, want = run(be, rng(seed), T, D, E, k, gate, up, stacked(be, down), bias,
                        MoeRouting(k, scoring, renorm, act, 1.5, gated))
    assert got.shape == (T, D)
    assert rel_err(got, want) < (2 * EXACT if T <= GEMV_MAX_T else TOL[dtype])


PAIRS = {  # gate, up, down makers (seed, n, k) -> Case, or "dense"
    "two layouts": (lambda s, n, k: gptq_case(s, 4, n, k, 32, False, False, True, "F16"),
                    lambda s, n, k: ct_int_case(s, 8, n, k, "channel", None, True, False, True, "F16"),
                    lambda s, n, k: fp8_case(s, n, k, (128, 128), "BF16")),
    "gate dense": ("dense", lambda s, n, k: fp8_case(s, n, k, (1, k), "F32"),
                   lambda s, n, k: gptq_case(s, 8, n, k, -1, True, False, False, "F16")),
    "down dense": (lambda s, n, k: fp8_case(s, n, k, (16, 32), "F16"),
                   lambda s, n, k: fp8_case(s, n, k, (16, 32), "F16"), "dense"),
}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("why", sorted(PAIRS))
@pytest.mark.parametrize("T", [1, 3])
def test_mixed_experts(dtype, why, T):
    """What loading does not make from a checkpoint in one scheme, still right: gate and up in two layouts, or one
    of them dense (both dequantized for moe.cu's kernel, h staged to the quantized down's padded width: I = 72), or
    a dense down after the quantized pair."""
    E, I, D, k = 6, 72, 128, 2
    r = rng(7)
    with testing.cuda_backend(dtype) as be:
        made = []
        for make, (n, kk) in zip(PAIRS[why], ((I, D), (I, D), (D, I))):
            if make == "dense":
                made.append(upload_weight(be, r.normal(size=(E, n, kk)) / np.sqrt(kk)))
            else:
                made.append(stacked(be, [make(100 + e, n, kk) for e in range(E)]))
        got, want = run(be, r, T, D, E, k, *made, True, MoeRouting(k, renormalize=True))
    # a dequantized pair is rounded to the dtype (as a dense load would hold it)
    assert rel_err(got, want) < (2 * EXACT if why == "down dense" or dtype == "float32" else TOL[dtype])


# --- models ----------------------------------------------------------------------------------------------------------
MARGIN = 1e-4  # router scores lie in [0, 1]; fp32 products differ from numpy's by ~1e-7


def routed_prompt(path, n: int, run_model, dtype="float32") -> list[int]:
    """A prompt of n ids whose CPU run routes every token with a gap of at least MARGIN between its top_k-th and next
    router score, so rounding on the GPU cannot flip an expert choice (as test_cuda_moe.py picks its prompts)."""
    for seed in range(11, 61):
        model = core.load(path, device="cpu", quiet=True, dtype=dtype)
        gaps, real = [], model.backend.moe

        def moe(x, router_w, router_b, gate, up, down, routing, biases=(None, None, None), select_bias=None):
            _, w = ops.moe_route(np.asarray(x, np.float64), router_w, router_b, routing.top_k + 1, routing.scoring)
            if routing.top_k < router_w.shape[0]:
                gaps.append(float((w[:, -2] - w[:, -1]).min()))
            return real(x, router_w, router_b, gate, up, down, routing, biases, select_bias)

        model.backend.moe = moe
        prompt = np.random.default_rng(seed).integers(0, model.config.vocab_size, n).tolist()
        run_model(model, prompt)
        if min(gaps, default=1.0) >= MARGIN:
            return prompt
    raise AssertionError(f"no prompt of {n} ids routes every token with a margin of {MARGIN}")


def expert_count(model) -> int:
    from core.cuda.tensors import QTensor

    return sum(isinstance(t, QTensor) and t.ndim == 3 for L_ in model.weights.layers for r, t in L_.items()
               if r.startswith("experts."))


HOWS = ["gptq", "w4a16-g32-asym", "w8a16", "fp8"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("how", HOWS)
def test_quantized_moe_checkpoint_on_the_gpu(tmp_path, family, how):
    """A quantized MoE checkpoint on device="cuda" in float32, its experts kept quantized (every expert role of every
    sparse layer a stacked QTensor): prefill logits (experts' slices through the quantized products) close to the
    CPU's, and greedy decoding (moe_q.cu's kernels, replayed in CUDA graphs, then launched) the CPU's tokens."""
    path = moe_quantized(tmp_path, how, family)
    greedy = lambda m, p: m.generate(p, max_new_tokens=12, stop_at_eos=False)  # noqa: E731
    prompt = routed_prompt(path, 10, lambda m, p: (m.logits(p), greedy(m, p)))
    cpu = core.load(path, device="cpu", quiet=True)
    gpu = core.load(path, device="cuda", quiet=True, dtype="float32")
    try:
        c = gpu.config
        assert expert_count(gpu) == 3 * sum(c.sparse_layer(i) for i in range(c.num_layers))
        assert rel_err(gpu.logits(prompt), cpu.logits(prompt)) < 1e-4
        want = greedy(cpu, prompt)
        assert greedy(gpu, prompt) == want
        gpu.backend.graphs = False
        assert greedy(gpu, prompt) == want
    finally:
        gpu.backend.release(gpu.weights)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("how", ["w4a16-g32-asym", "fp8"])
def test_quantized_moe_half_decode(tmp_path, dtype, how):
    """In half precision: prefill logits within the dtype's tolerance of the CPU's, and a decode step replayed from a
    graph equal, bit for bit, to the same step launched kernel by kernel."""
    from core.model import forward

    path = moe_quantized(tmp_path, how)
    ids = routed_prompt(path, 10, lambda m, p: m.logits(p), dtype)
    gpu = core.load(path, device="cuda", quiet=True, dtype=dtype)
    be, W, c = gpu.backend, gpu.weights, gpu.config
    try:
        assert expert_count(gpu) == 6
        err = rel_err(gpu.logits(ids), core.load(path, device="cpu", quiet=True, dtype=dtype).logits(ids))
        assert err < 2e-2, err
        cache = be.new_cache(c, 64)
        forward(be, W, c, np.asarray(ids), cache, 0, gpu.inv_freq, all_logits=False)
        steps = []
        for use_graph in (False, True, True, True):  # graph: eager warm-up step, capture + replay, replay
            be.graphs = use_graph
            steps.append(be.decode(forward, W, c, 5, cache, len(ids), gpu.inv_freq))
    finally:
        be.release(W)
    for s in steps[1:]:
        np.testing.assert_array_equal(s, steps[0])
