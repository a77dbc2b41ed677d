"""The `moe` op on the GPU (core/cuda/moe.py, moe.cu) against core.ops.moe, and MoE models decoding through CUDA
graphs; plus, on the CPU, what the bench counts for MoE shapes (active bytes, random-weight shapes).

GPU tests (marked gpu) run every example on a poisoning backend (every fresh buffer NaN-filled, so an element a
kernel forgets to write fails). The router's logits are made exact in every dtype and on every product path (each
router row picks one input column with a small integer gain, the inputs it reads and the bias lie on a 1/4 grid),
so expert selection is decided by the op alone: distinct logits are at least 1/4 apart and equal ones are exact
ties, which both sides must give to the lower expert id. One test also draws a fully random router (float32, where
the logits are exact to ~1e-6). References run in float64 from the weights as the GPU holds them. Tolerances are
core.testing's: a few tokens take the grouped GEMVs (x and the expert activations stay float32: two fp32 products,
2 * EXACT); more tokens go through the GEMMs, which round their inputs to the weight type (TOL[dtype]).

The selection bias (router.select_bias: added to the scores that choose, not to the weights) and group-limited
routing: bias values of -1, 0 or 1 on those exact logits keep every order exact (scores lie in (0, 1) and distinct
ones differ by far more than fp32 rounds score + bias), so ties still go to the lower id; random float biases and
groups are drawn where the float64 reference's margin at every boundary routing decides (route_margin) is wide.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from core import ops, testing
from core.backend import Weights
from core.config import MoeRouting
from core.load import cuda_available
from core.testing import EXACT, TOL, rel_err, rng, upload_weight

OK, WHY = cuda_available()


def on_gpu(test):
    """Mark a test gpu and skip it, saying why, without PyCUDA and a GPU (this file also has CPU tests)."""
    return pytest.mark.gpu(pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")(test))


CUDA = Path(__file__).resolve().parents[1] / "core" / "cuda"

# expert widths: multiples of 8 (the fp16 / bf16 vector path), odd multiples of 8, and others (the scalar path)
WIDTH = st.one_of(st.sampled_from([8, 24, 40, 56, 64, 72, 128, 136, 256, 768]), st.integers(1, 70))


def _acts():
    from core.cuda.elementwise import ACT_CODES

    return st.sampled_from(sorted(ACT_CODES))


def exact_router(r, E: int, D: int, x: np.ndarray, bias: bool):
    """(router weight [E, D], bias [E] or None), x's router columns overwritten in place: expert e reads column
    e % D with a gain in {-2, -1, 1, 2}; those columns of x and the bias are multiples of 1/4 in [-2, 2], so every
    logit is a multiple of 1/4 computed exactly (in fp32, and after rounding x to fp16 / bf16 for a GEMM)."""
    w = np.zeros((E, D), np.float32)
    w[np.arange(E), np.arange(E) % D] = r.choice([-2.0, -1.0, 1.0, 2.0], size=E)
    cols = np.arange(min(E, D))
    x[:, cols] = r.integers(-8, 9, size=(x.shape[0], cols.size)) / 4
    b = (r.integers(-4, 5, size=E) / 4).astype(np.float32) if bias else None
    return w, b


def experts(be, r, E, I, D, gated, bias):
    """Uploaded expert weights and biases, and the float64 copies the GPU holds: (dev, ref) pairs."""
    up = upload_weight(be, r.normal(size=(E, I, D)) * 2 / np.sqrt(D))
    gate = upload_weight(be, r.normal(size=(E, I, D)) * 2 / np.sqrt(D)) if gated else (None, None)
    down = upload_weight(be, r.normal(size=(E, D, I)) / np.sqrt(I))
    bs = [upload_weight(be, r.normal(size=s) * 0.5) if bias else (None, None) for s in ((E, I), (E, I), (E, D))]
    return gate, up, down, bs


def route_margin(choice: np.ndarray, groups: int = 1, kept: int = 1, k: int = 1) -> float:
    """The narrowest gap, per token, at the boundaries routing decides on choice [T, E] (scores + selection bias, in
    float64): the kept groups' last group score against the next group's, and the k-th eligible choice against the
    next. fp32 products and scores cannot flip a wider one."""
    T, E = choice.shape
    g = -np.sort(-choice.reshape(T, groups, -1), axis=-1)
    gs = g[..., 0] + g[..., 1] if g.shape[-1] > 1 else g[..., 0]
    order = np.argsort(-gs, axis=-1, kind="stable")
    gaps = [np.take_along_axis(gs, order[:, kept - 1:kept + 1], -1) @ [1, -1]] if kept < groups else []
    keep = np.zeros((T, groups), bool)
    np.put_along_axis(keep, order[:, :kept], True, -1)
    c = -np.sort(-np.where(np.repeat(keep, E // groups, axis=-1), choice, -np.inf), axis=-1)
    if k < E:
        gaps.append(c[:, k - 1] - c[:, k])
    return float(np.min(gaps)) if gaps else np.inf


def scores64(logits: np.ndarray, scoring: str) -> np.ndarray:
    """The router's scores in float64 (core.ops.moe_route's)."""
    l64 = np.asarray(logits, np.float64)
    if scoring == "softmax":
        e = np.exp(l64 - l64.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return 1 / (1 + np.exp(-l64))


def run_moe(be, x, rw, rb, gate, up, down, bs, routing, view=False):
    """(GPU result, float64 reference) of one moe call; `view` feeds x as rows 1.. of a bigger buffer (unaligned
    unless D is a multiple of 4)."""
    xd = be.from_host(np.concatenate([x[:1], x]))[1:] if view else be.from_host(x)
    got = be.to_host(be.moe(xd, rw[0], rb[0], gate[0], up[0], down[0], routing, tuple(b[0] for b in bs)))
    want = ops.moe(x.astype(np.float64), rw[1], rb[1], gate[1], up[1], down[1], routing.top_k, routing.scoring,
                   routing.renormalize, routing.activation, routing.routed_scale, tuple(b[1] for b in bs))
    return got, want


# --- the op --------------------------------------------------------------------------------------------------------
@on_gpu
@given(dtype=testing.dtypes(), T=st.sampled_from([1, 2, 3, 17, 64]), E=st.integers(2, 64), D=WIDTH, I=WIDTH,
       scoring=st.sampled_from(["softmax", "sigmoid"]), renorm=st.booleans(), gated=st.booleans(), kind=_acts(),
       bias=st.booleans(), router_bias=st.booleans(), scale=st.sampled_from([1.0, 2.5]),
       gemm=st.sampled_from(["own", "auto"]), view=st.booleans(), seed=testing.seeds(), data=st.data())
def test_moe_matches_reference(dtype, T, E, D, I, scoring, renorm, gated, kind, bias, router_bias, scale, gemm, view,
                               seed, data):
    """Grouped GEMVs (T <= 4) and the per-expert GEMM path (T = 17, 64) against core.ops.moe: any top_k, softmax
    or sigmoid, renormalised or not, gated or plain experts, every activation, expert biases, router bias."""
    k = data.draw(st.integers(1, min(E, 8)), label="top_k")
    r = rng(seed)
    x = r.normal(size=(T, D)).astype(np.float32)
    w, b = exact_router(r, E, D, x, router_bias)
    routing = MoeRouting(k, scoring, renorm, kind, scale, gated)
    with testing.cuda_backend(dtype, gemm=gemm, attn="simt") as be:
        rw, rb = upload_weight(be, w), upload_weight(be, b) if router_bias else (None, None)
        gate, up, down, bs = experts(be, r, E, I, D, gated, bias)
        got, want = run_moe(be, x, rw, rb, gate, up, down, bs, routing, view)
    assert got.shape == (T, D)
    assert rel_err(got, want) < (2 * EXACT if T <= 4 else TOL[dtype])


@on_gpu
@given(T=st.sampled_from([1, 3, 17]), E=st.integers(2, 64), D=WIDTH, I=WIDTH, scoring=st.sampled_from(["softmax", "sigmoid"]),
       renorm=st.booleans(), seed=testing.seeds(), data=st.data())
def test_moe_random_router(T, E, D, I, scoring, renorm, seed, data):
    """A dense random router (float32 weights: logits exact to ~1e-6, far below the gaps between experts)."""
    k = data.draw(st.integers(1, min(E, 8)), label="top_k")
    r = rng(seed)
    x = r.normal(size=(T, D)).astype(np.float32)
    with testing.cuda_backend("float32", gemm="own", attn="simt") as be:
        rw, rb = upload_weight(be, r.normal(size=(E, D)) * 3 / np.sqrt(D)), upload_weight(be, r.normal(size=E))
        gate, up, down, bs = experts(be, r, E, I, D, True, False)
        got, want = run_moe(be, x, rw, rb, gate, up, down, bs, MoeRouting(k, scoring, renorm, "silu"))
    assert rel_err(got, want) < (2 * EXACT if T <= 4 else TOL["float32"])


@on_gpu
@given(T=st.integers(1, 300), E=st.integers(1, 300), scoring=st.sampled_from(["softmax", "sigmoid"]),
       renorm=st.booleans(), scale=st.sampled_from([1.0, 2.5]), seed=testing.seeds(), data=st.data())
def test_routing_picks_and_ties(T, E, scoring, renorm, scale, seed, data):
    """moe_route alone on logits with many exact ties (multiples of 1/4 in [-2, 2]; E up to 300: more experts than
    a warp has lanes, several per lane): the ids are the reference's stable argsort (ties to the lower id), the
    weights its scores, renormalised, times the scale. k up to E."""
    k = data.draw(st.one_of(st.integers(1, min(E, 8)), st.integers(1, E)), label="top_k")
    logits = (rng(seed).integers(-8, 9, size=(T, E)) / 4).astype(np.float32)
    logits[0] = 0.5  # one row all tied: experts 0..k-1
    with testing.cuda_backend("float32") as be:
        ids, wts = be.moe_route(be.from_host(logits), MoeRouting(k, scoring, renorm, "silu", scale))
        ids, wts = be.to_host(ids).astype(np.int64), be.to_host(wts)
    l64 = logits.astype(np.float64)
    if scoring == "softmax":
        e = np.exp(l64 - l64.max(-1, keepdims=True))
        sc = e / e.sum(-1, keepdims=True)
    else:
        sc = 1 / (1 + np.exp(-l64))
    top = np.argsort(-sc, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, top)
    np.testing.assert_array_equal(ids[0], np.arange(k))
    w = np.take_along_axis(sc, top, -1)
    w = (w / w.sum(-1, keepdims=True) if renorm else w) * np.float32(scale)
    np.testing.assert_allclose(wts, w, rtol=1e-5)  # fp32 sums of up to 300 scores


@on_gpu
@given(T=st.integers(1, 300), E=st.integers(1, 300), scoring=st.sampled_from(["softmax", "sigmoid"]),
       renorm=st.booleans(), scale=st.sampled_from([1.0, 2.5]), seed=testing.seeds(), data=st.data())
def test_routing_with_a_selection_bias_picks_and_ties(T, E, scoring, renorm, scale, seed, data):
    """moe_route with a selection bias of -1, 0 or 1 per expert on the tie-heavy logits above (E up to 300: the
    register path and the memory path): the ids are the reference's stable argsort of score + bias (ties to the
    lower id), the weights the scores without the bias, renormalised, times the scale. Row 0 ties every score, so
    its picks are the bias classes in turn, each by id."""
    k = data.draw(st.one_of(st.integers(1, min(E, 8)), st.integers(1, E)), label="top_k")
    r = rng(seed)
    logits = (r.integers(-8, 9, size=(T, E)) / 4).astype(np.float32)
    logits[0] = 0.5
    bias = r.integers(-1, 2, size=E).astype(np.float32)
    with testing.cuda_backend("float32") as be:
        ids, wts = be.moe_route(be.from_host(logits), MoeRouting(k, scoring, renorm, "silu", scale), be.from_host(bias))
        ids, wts = be.to_host(ids).astype(np.int64), be.to_host(wts)
    top, w = ops.moe_route(logits.astype(np.float64), np.eye(E), None, k, scoring, renorm, scale,
                           bias.astype(np.float64))
    np.testing.assert_array_equal(ids, top)
    np.testing.assert_array_equal(ids[0], np.argsort(-bias, kind="stable")[:k])
    np.testing.assert_allclose(wts, w, rtol=1e-5)  # fp32 sums of up to 300 scores


def _groups(E: int):
    """Group counts moe_route takes for E experts: dividing E into groups of at least 2, at most ROUTE_MAX_GROUPS."""
    from core.cuda.geometry import ROUTE_MAX_GROUPS

    return [g for g in range(1, ROUTE_MAX_GROUPS + 1) if E % g == 0 and E // g >= 2] or [1]


@on_gpu
@given(T=st.integers(1, 64), E=st.integers(1, 300), scoring=st.sampled_from(["softmax", "sigmoid"]),
       renorm=st.booleans(), scale=st.sampled_from([1.0, 2.5]), bias=st.booleans(), seed=testing.seeds(),
       data=st.data())
def test_group_limited_routing(T, E, scoring, renorm, scale, bias, seed, data):
    """moe_route with n_group / topk_group (groups scored by their two best choice values, up to 32 groups, E up to
    300) and a random float selection bias or none, on random logits whose reference margins are wide: the
    reference's ids in its order and weights. Then every logit tied and no bias: groups 0.. kept, experts 0..k-1."""
    G = data.draw(st.sampled_from(_groups(E)), label="groups")
    kept = data.draw(st.integers(1, G), label="topk_groups")
    k = data.draw(st.integers(1, min(8, kept * (E // G))), label="top_k")
    r = rng(seed)
    logits = (r.normal(size=(T, E)) * 2).astype(np.float32)
    b = (r.normal(size=E) * 0.5).astype(np.float32) if bias else None
    assume(route_margin(scores64(logits, scoring) + (0 if b is None else b), G, kept, k) > 1e-5)
    routing = MoeRouting(k, scoring, renorm, "silu", scale, True, G, kept)
    tied = np.full((3, E), 0.5, np.float32)
    with testing.cuda_backend("float32") as be:
        ids, wts = be.moe_route(be.from_host(logits), routing, None if b is None else be.from_host(b))
        ids, wts = be.to_host(ids).astype(np.int64), be.to_host(wts)
        tied_ids = be.to_host(be.moe_route(be.from_host(tied), routing)[0]).astype(np.int64)
    top, w = ops.moe_route(logits.astype(np.float64), np.eye(E), None, k, scoring, renorm, scale,
                           None if b is None else b.astype(np.float64), G, kept)
    np.testing.assert_array_equal(ids, top)
    np.testing.assert_allclose(wts, w, rtol=1e-5)
    np.testing.assert_array_equal(tied_ids, np.tile(np.arange(k), (3, 1)))


@on_gpu
@given(T=st.sampled_from([1, 3, 17]), E=st.sampled_from([4, 6, 8, 16, 64]), D=WIDTH, I=WIDTH,
       scoring=st.sampled_from(["softmax", "sigmoid"]), renorm=st.booleans(), seed=testing.seeds(), data=st.data())
def test_moe_with_a_selection_bias_and_groups(T, E, D, I, scoring, renorm, seed, data):
    """The whole op (grouped GEMVs for T <= 4, per-expert GEMMs for 17) with select_bias and group-limited routing
    against core.ops.moe: a random float32 router (logits exact to ~1e-6) where the reference's margins are wide."""
    G = data.draw(st.sampled_from(_groups(E)), label="groups")
    kept = data.draw(st.integers(1, G), label="topk_groups")
    k = data.draw(st.integers(1, min(8, kept * (E // G))), label="top_k")
    r = rng(seed)
    x = r.normal(size=(T, D)).astype(np.float32)
    routing = MoeRouting(k, scoring, renorm, "silu", 2.5, True, G, kept)
    with testing.cuda_backend("float32", gemm="own", attn="simt") as be:
        rw = upload_weight(be, r.normal(size=(E, D)) * 3 / np.sqrt(D))
        b = (r.normal(size=E) * 0.5).astype(np.float32)
        assume(route_margin(scores64(x.astype(np.float64) @ rw[1].T, scoring) + b, G, kept, k) > 1e-4)
        gate, up, down, bs = experts(be, r, E, I, D, True, False)
        got = be.to_host(be.moe(be.from_host(x), rw[0], None, gate[0], up[0], down[0], routing,
                                tuple(t[0] for t in bs), be.from_host(b)))
    want = ops.moe(x.astype(np.float64), rw[1], None, gate[1], up[1], down[1], k, scoring, renorm, "silu", 2.5,
                   tuple(t[1] for t in bs), b.astype(np.float64), G, kept)
    assert rel_err(got, want) < (2 * EXACT if T <= 4 else TOL["float32"])


@on_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_moe_reads_a_pending_norm(dtype):
    """At one decode token the MLP input is a norm left for the next GEMV (a Lazy, as add_norm leaves it after the
    attention's o projection): moe computes it once and both the router and the experts read it."""
    r = rng(5)
    E, I, D, k, N = 16, 72, 256, 4, 96
    with testing.cuda_backend(dtype) as be:
        g, gr = upload_weight(be, r.normal(size=D) * 0.3 + 1)
        wo, wor = upload_weight(be, r.normal(size=(D, N)) / np.sqrt(N))
        x0, a = r.normal(size=(1, D)).astype(np.float32), r.normal(size=(1, N)).astype(np.float32)
        _, h = be.add_norm(be.from_host(x0), be.linear(be.from_host(a), wo), g, None, 1e-6, "rmsnorm")
        assert getattr(h, "pending", False), "the norm was not left to the next GEMV"
        rw = upload_weight(be, r.normal(size=(E, D)) * 3 / np.sqrt(D))
        gate, up, down, bs = experts(be, r, E, I, D, True, True)
        got = be.to_host(be.moe(h, rw[0], None, gate[0], up[0], down[0], MoeRouting(k, renormalize=True),
                                tuple(b[0] for b in bs)))
    hw = ops.rms_norm(x0.astype(np.float64) + ops.linear(a.astype(np.float64), wor), gr, 1e-6)
    want = ops.moe(hw, rw[1], None, gate[1], up[1], down[1], k, renormalize=True, biases=tuple(b[1] for b in bs))
    assert rel_err(got, want) < 2 * EXACT


@on_gpu
def test_moe_refuses_what_it_cannot_run():
    from core.errors import DeviceError

    r = rng(1)
    with testing.cuda_backend("float16") as be:
        x = be.from_host(r.normal(size=(2, 16)).astype(np.float32))
        rw = upload_weight(be, r.normal(size=(4, 16)))[0]
        up, down = upload_weight(be, r.normal(size=(4, 8, 16)))[0], upload_weight(be, r.normal(size=(4, 16, 8)))[0]
        with pytest.raises(DeviceError, match=r"top_k=5 must be in \[1, 4\]"):
            be.moe(x, rw, None, None, up, down, MoeRouting(5))
        with pytest.raises(DeviceError, match=r"router scoring 'sparsemax'"):
            be.moe(x, rw, None, None, up, down, MoeRouting(2, "sparsemax"))
        with pytest.raises(DeviceError, match=r"experts\.down\.weight is \[4, 8, 16\] \(expected \[4, 16, 8\]\)"):
            be.moe(x, rw, None, None, up, up, MoeRouting(2))
        bad_bias = upload_weight(be, r.normal(size=(4, 9)))[0]
        with pytest.raises(DeviceError, match=r"experts\.up\.bias is \[4, 9\]"):
            be.moe(x, rw, None, None, up, down, MoeRouting(2), (None, bad_bias, None))
        half = upload_weight(be, r.normal(size=4))[0]  # a selection bias in the weights' dtype, not float32
        with pytest.raises(DeviceError, match=r"router\.select_bias is float16 \[4\] \(expected float32 \[4\]"):
            be.moe(x, rw, None, None, up, down, MoeRouting(2), select_bias=half)
        with pytest.raises(DeviceError, match=r"groups=3, topk_groups=1 must split the 4 experts"):
            be.moe(x, rw, None, None, up, down, MoeRouting(2, groups=3))
        with pytest.raises(DeviceError, match=r"keep at least top_k=3"):
            be.moe(x, rw, None, None, up, down, MoeRouting(3, groups=2, topk_groups=1))
        # loading keeps the role in float32 (core.spec.FLOAT32_ROLES) on a half backend, and moe takes it
        sb = be.convert(r.normal(size=4).astype(np.float32), "F32", "router.select_bias")
        assert sb.dtype == "float32" and np.isfinite(be.to_host(be.moe(x, rw, None, None, up, down, MoeRouting(2),
                                                                        select_bias=sb))).all()
        rw, up, down = (upload_weight(be, r.normal(size=s))[0] for s in ((128, 16), (128, 8, 16), (128, 16, 8)))
        with pytest.raises(DeviceError, match=r"group-limited routing over 64 groups has no CUDA kernel"):
            be.moe(x, rw, None, None, up, down, MoeRouting(2, groups=64, topk_groups=1))


# --- models ----------------------------------------------------------------------------------------------------------
COMMON = dict(layers=3, hidden=128, heads=4, intermediate=200, vocab=320, max_pos=512, kv_heads=2)
MOE_FAMILIES = {  # expert widths: 44 (fp16 scalar path, fp32 vector path) and 200 (an odd multiple of 8)
    "qwen3_moe": dict(head_dim=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=44, norm_topk_prob=False),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
GREEDY = 20


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def moe_ckpt(request, tmp_path_factory):
    if not OK:
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {WHY}")
    from conftest import HAVE_TORCH

    if not HAVE_TORCH:
        pytest.skip("torch + transformers (to write the random checkpoints) are not installed")
    import hfmodels as hf

    family = request.param
    return family, hf.save_model(family, tmp_path_factory.mktemp(family) / "ckpt", seed=3, **COMMON,
                                 **MOE_FAMILIES[family])


def _release(model):
    model.backend.release(model.weights)


MARGIN = 1e-4  # router scores lie in [0, 1]; fp32 products differ from numpy's by ~1e-7


def _prompt(path, n: int, run) -> list[int]:
    """A prompt of n ids whose numpy run (`run(model, prompt)`) routes every token with a gap of at least MARGIN
    between its top_k-th and next router score, so fp32 rounding on the GPU cannot flip an expert choice (over
    hundreds of routing decisions a near-tie would otherwise turn up now and then)."""
    import core

    for seed in range(11, 61):
        model = core.load(path, device="cpu", quiet=True)
        gaps, real = [], model.backend.moe

        def moe(x, router_w, router_b, gate, up, down, routing, biases=(None, None, None), select_bias=None):
            sc = scores64(ops.linear(np.asarray(x, np.float64), router_w, router_b), routing.scoring)
            choice = sc if select_bias is None else sc + np.asarray(select_bias, np.float64)
            gaps.append(route_margin(choice, routing.groups, routing.topk_groups, routing.top_k))
            return real(x, router_w, router_b, gate, up, down, routing, biases, select_bias)

        model.backend.moe = moe
        prompt = np.random.default_rng(seed).integers(0, COMMON["vocab"], n).tolist()
        run(model, prompt)
        if min(gaps, default=1.0) >= MARGIN:
            return prompt
    raise AssertionError(f"no prompt of {n} ids routes every token with a margin of {MARGIN}")


@on_gpu
@pytest.mark.parametrize("prompt_len", [37, 3])  # prefill per expert (GEMMs), or by the grouped GEMVs
def test_moe_model_greedy_with_graphs_matches_numpy(moe_ckpt, prompt_len):
    """A tiny random Qwen3-MoE / Mixtral checkpoint (transformers) generating greedily on device="cuda" in fp32:
    run-ahead decode graphs, graphs replayed one step at a time, and launched kernels all give the numpy
    backend's tokens (each step's routing is read from device memory inside the replayed graph)."""
    import core

    family, path = moe_ckpt
    greedy = lambda m, p: m.generate(p, max_new_tokens=GREEDY, stop_at_eos=False)  # noqa: E731
    prompt = _prompt(path, prompt_len, greedy)
    cpu = greedy(core.load(path, device="cpu", quiet=True), prompt)
    model = core.load(path, device="cuda", dtype="float32", quiet=True)
    be = model.backend
    try:
        assert be.graphs
        ahead = model.generate(prompt, max_new_tokens=GREEDY, stop_at_eos=False)
        be.decode_ids = lambda *a, **k: None  # instance attribute: one graph replay per step
        stepwise = model.generate(prompt, max_new_tokens=GREEDY, stop_at_eos=False)
        del be.decode_ids
        be.graphs = False
        eager = model.generate(prompt, max_new_tokens=GREEDY, stop_at_eos=False)
    finally:
        _release(model)
    assert eager == cpu, f"{family}: CUDA fp32 greedy {eager} vs numpy fp32 {cpu}"
    assert stepwise == cpu, f"{family}: CUDA-graph decode {stepwise} vs numpy {cpu}"
    assert ahead == cpu, f"{family}: run-ahead graph decode {ahead} vs numpy {cpu}"


@on_gpu
def test_moe_model_logits_match_numpy(moe_ckpt):
    """Prefill logits of 300 tokens (every expert gets tokens; cuBLAS or our GEMM) against the numpy backend."""
    import core

    family, path = moe_ckpt
    ids = _prompt(path, 300, lambda m, p: m.logits(p))
    want = core.load(path, device="cpu", quiet=True).logits(ids)
    model = core.load(path, device="cuda", dtype="float32", quiet=True)
    try:
        got = model.logits(ids)
    finally:
        _release(model)
    assert rel_err(got, want) < 1e-4, family


@on_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_moe_half_decode_graph_matches_eager(moe_ckpt, dtype):
    """Decode logits from a replayed graph equal, bit for bit, those of the same step launched kernel by kernel."""
    import core
    from core.model import forward

    family, path = moe_ckpt
    model = core.load(path, device="cuda", dtype=dtype, quiet=True)
    be, W, c = model.backend, model.weights, model.config
    try:
        ids = np.arange(1, 30) % COMMON["vocab"]
        cache = be.new_cache(c, 64)
        forward(be, W, c, ids, cache, 0, model.inv_freq, all_logits=False)
        steps = []
        for use_graph in (False, True, True, True):  # graph: eager warm-up step, capture + replay, replay
            be.graphs = use_graph
            steps.append(be.decode(forward, W, c, 5, cache, len(ids), model.inv_freq))
    finally:
        _release(model)
    for s in steps[1:]:
        np.testing.assert_array_equal(s, steps[0])


# --- CPU: build and bench bookkeeping ---------------------------------------------------------------------------------
def cu_defines(name: str) -> dict[str, int]:
    text = (CUDA / name).read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define (\w+) \(?(\d+)\)?\b", text, re.M)}


def test_moe_kernels_are_built_by_ci_and_match_the_geometry():
    from core.cuda import geometry as g
    from core.cuda.modules import DTYPE_CODES, kernel_files, variants

    assert "moe.cu" in kernel_files()
    assert {v["WDTYPE"] for v in variants("moe.cu")} == set(DTYPE_CODES.values())  # (the runtime adds no -D)
    d = cu_defines("moe.cu")
    assert (g.MOE_ROWS, g.MOE_THREADS, g.ROUTE_WARPS) == (d["MOE_ROWS"], d["MOE_THREADS"], d["ROUTE_WARPS"])
    assert g.ROUTE_MAX_GROUPS == d["ROUTE_MAX_GROUPS"] == 32  # one group a lane
    from core.cuda.backend import CudaBackend
    from core.cuda.moe import MoeMixin

    assert MoeMixin in CudaBackend.__mro__


def _fake_model(name: str, dtype: str = "float16"):
    """A Model-like object of a named bench shape whose weights have sizes only (nothing allocated)."""
    from core.bench_shapes import named_config
    from core.cuda.bench import weight_shapes

    spec, c = named_config(name)
    W = Weights(layers=[{} for _ in range(c.num_layers)])
    for role, layer, shape in weight_shapes(spec, c):
        (W.globals if layer is None else W.layers[layer])[role] = SimpleNamespace(size=math.prod(shape))
    return SimpleNamespace(weights=W, config=c, dtype=dtype)


@pytest.mark.parametrize("name,total_gb,active_gb", [("qwen3-30b-a3b", 61.06, 6.09), ("mixtral-8x7b", 93.41, 25.50)])
def test_moe_bench_shapes_count_active_bytes(name, total_gb, active_gb):
    """The bench makes each weight of a MoE shape once (dense and sparse layers asked per layer; the expert layouts
    are alternatives, not extra weights), as many bytes as the checkpoint it writes; bytes_per_token counts
    attention, norms, router and lm_head whole and top_k of num_experts experts."""
    from core.bench_shapes import bytes_per_token, named_config
    from core.synth import checkpoint_tensors, stored_shape

    model = _fake_model(name)
    spec, c = named_config(name)
    total = 2 * sum(t.size for L in model.weights.layers for t in L.values()) + 2 * sum(
        t.size for t in model.weights.globals.values())
    written = 2 * sum(math.prod(stored_shape(rule, c, spec)) for _, rule, _ in checkpoint_tensors(spec, c))
    assert total == written and abs(total / 1e9 - total_gb) < 0.01
    experts = 2 * sum(t.size for L in model.weights.layers for r, t in L.items() if r.startswith("experts."))
    embed = 2 * model.weights.globals["embed"].size  # untied in both: a step reads one row of it
    assert bytes_per_token(model) == total - embed - experts + experts * c.num_experts_per_tok // c.num_experts
    assert abs(bytes_per_token(model) / 1e9 - active_gb) < 0.01


def test_dense_bytes_per_token_unchanged():
    from core.bench_shapes import bytes_per_token

    model = _fake_model("qwen3-8b")
    W = model.weights
    every = sum(t.size for L in W.layers for t in L.values()) + sum(t.size for r, t in W.globals.items() if r != "embed")
    assert bytes_per_token(model) == 2 * every
