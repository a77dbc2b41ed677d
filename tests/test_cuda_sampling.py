"""GPU sampling (core/cuda/gpu_sampling.py, sample.cu's sample_pass) against core/sampling.py (GPU machine only).

- The warped logits the kernel computed equal warp(apply_repetition_penalty(...)): the kept set exactly
  (top-k with ties at the k-th value, top-p with the stable order, including cuts through tied values), the
  values to 1e-6. The one exemption: a token whose reference mass-before lies within 1e-9 of top_p (a
  rounding coin-flip for any implementation) is left out of the mask comparison; the inputs are random
  floats, so this almost never happens, and the test counts how often it did.
- Greedy (temperature 0) is numpy's argmax after the penalty.
- The draw is the Gumbel-max of a host replica of the kernel's Philox stream: same (seed, counter), same id.
- 4,000 draws over counters 0..3999 follow the reference probabilities (chi-square, reject at p < 1e-6);
  dropped tokens never appear.
- The seen mask gains each chosen id; a captured CUDA graph replays the uncaptured ids, with the counter read
  from device memory and parameters changed after capture.
- Many rows in one launch (row_sampler.py, the engine's sample_rows): each row, whatever its slot and the other
  rows' parameters, gets GpuSampler's id and warped logits; picks are marked in their own slots; slots are kept,
  evicted least recently used first and grown; non-finite rows are flagged one by one.

Run as a script for a timing of sample() at V = 151,936 (eager and as a CUDA graph, CUDA events).
"""

from __future__ import annotations

import ctypes
import math

import attrs
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from core.load import cuda_available
from core.sampling import SamplingParams, apply_repetition_penalty, warp

OK, WHY = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")]

_cache: dict = {}


def backend():
    from core.cuda.backend import CudaBackend

    return _cache.get("be") or _cache.setdefault("be", CudaBackend("float32"))


def sampler(V):
    from core.cuda.gpu_sampling import GpuSampler

    key = ("gs", V)
    return _cache.get(key) or _cache.setdefault(key, GpuSampler(backend(), V))


def make_logits(r, V, kind, ninf):
    if kind == "ties":  # few distinct values: ties at the top-k and top-p cuts
        x = r.integers(-6, 6, V) / 2.0
    elif kind == "wide":
        x = r.normal(0, 30, V)
    else:
        x = r.normal(0, 3, V)
    x = x.astype(np.float32)
    if ninf:
        x[r.random(V) < ninf] = -np.inf
        if not np.isfinite(x).any():
            x[r.integers(V)] = 1.5
    return x


def before_mass(x_after_topk):
    """The reference's normalised mass strictly before each token (token order), as warp computes it."""
    order = np.argsort(-x_after_topk, kind="stable")
    p = np.exp(x_after_topk[order] - x_after_topk[order[0]])
    p /= p.sum()
    before = np.empty_like(p)
    before[order] = np.cumsum(p) - p
    return before


def philox_x(i, counter, seed):
    """Host replica of sample.cu's philox_x(i, counter, 0, 0, seed_lo, seed_hi)."""
    M = np.uint64(0xFFFFFFFF)
    c0 = np.asarray(i, np.uint64)
    c1 = np.full_like(c0, counter & 0xFFFFFFFF)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & M, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & M
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M, (k1 + np.uint64(0xBB67AE85)) & M
    return c0


def host_scores(x_pen, params, seed, counter):
    """float32 Gumbel scores of the kept tokens (-inf elsewhere), as the kernel forms them."""
    kept = np.isfinite(warp(x_pen, params))
    y = (x_pen.astype(np.float64) / params.temperature).astype(np.float32)
    bits = philox_x(np.arange(x_pen.size), counter, seed)
    u = ((bits >> np.uint64(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)
    assert (u > 0).all() and (u < 1).all()
    g = -np.log(-np.log(u))
    return np.where(kept, y + g, np.float32(-np.inf)).astype(np.float32)


def chi2_sf(x, df):
    """P(chi-square with df degrees of freedom >= x): Q(df/2, x/2) by its closed-form recurrence."""
    y = x / 2.0
    a, q = (0.5, math.erfc(math.sqrt(y))) if df % 2 else (1.0, math.exp(-y))
    while a < df / 2.0:
        q += math.exp(a * math.log(y) - y - math.lgamma(a + 1)) if y > 0 else 0.0
        a += 1.0
    return q


top_k_mode = st.sampled_from(["none", "zero", "one", "small", "V-1", "V", "V+3", "any"])
top_p_st = st.one_of(st.none(), st.just(1.0), st.floats(0.01, 0.999))


def pick_top_k(mode, V, r):
    return {"none": None, "zero": 0, "one": 1, "small": int(r.integers(1, 60)), "V-1": max(V - 1, 0) or None,
            "V": V, "V+3": V + 3, "any": int(r.integers(1, V + 1))}[mode]


# --- (1) the warped logits --------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(V=st.one_of(st.sampled_from([1, 2, 3, 1000, 151936]), st.integers(1, 5000)),
       kind=st.sampled_from(["normal", "ties", "wide"]), ninf=st.sampled_from([0.0, 0.01, 0.5]),
       T=st.one_of(st.sampled_from([0.05, 0.7, 1.0, 2.5]), st.floats(0.01, 10.0)), kmode=top_k_mode,
       top_p=top_p_st, penalty=st.one_of(st.just(1.0), st.floats(0.3, 3.0)), seen_frac=st.sampled_from([0, 0.1, 0.7]),
       seed=st.integers(0, 2**32 - 1))
def test_warped_matches_reference(V, kind, ninf, T, kmode, top_p, penalty, seen_frac, seed):
    r = np.random.default_rng(seed)
    x = make_logits(r, V, kind, ninf)
    seen = np.flatnonzero(r.random(V) < seen_frac)
    params = SamplingParams(temperature=T, top_k=pick_top_k(kmode, V, r), top_p=top_p, repetition_penalty=penalty)
    be, gs = backend(), sampler(V)
    gs.set_params(params, seed)
    gs.set_seen(seen)
    got = gs.debug_warped(be.from_host(x), counter=seed & 0xFFFF)
    chosen = gs.read_id()

    pen = apply_repetition_penalty(x, seen, penalty)
    ref = warp(pen, params)
    check, near = np.ones(V, bool), np.zeros(V, bool)
    if top_p is not None and top_p < 1.0:  # tokens on the top-p boundary (rounding decides) are not compared
        near = np.abs(before_mass(warp(pen, attrs.evolve(params, top_p=None))) - top_p) < 1e-9
        check &= ~near
        _cache["near"] = _cache.get("near", 0) + int(near.sum())
    dropped_ref, dropped_gpu = ref == -np.inf, got == -np.inf
    kept_ref = ~dropped_ref | (pen == -np.inf)  # a kept -inf logit is -inf in both: compare only finite ones
    bad = np.flatnonzero(check & (np.isfinite(ref) != np.isfinite(got)))
    assert bad.size == 0, (f"kept sets differ at {bad[:10]} (of {bad.size}): ref {ref[bad[:5]]}, gpu {got[bad[:5]]}; "
                           f"{params}, {np.isfinite(ref).sum()} kept by the reference, {np.isfinite(got).sum()} by the GPU")
    fin = np.isfinite(ref) & np.isfinite(got)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-6, atol=1e-30)
    assert not np.isnan(got).any()
    # the draw made alongside is a kept token (a finite one whenever any kept token is finite)
    assert 0 <= chosen < V and kept_ref[chosen]
    if np.isfinite(ref).any() and not near.any():
        assert np.isfinite(ref[chosen]), f"chose {chosen}, dropped by the reference"
    assert not dropped_gpu.all()


# --- (2) greedy -------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(V=st.one_of(st.sampled_from([1, 2, 151936]), st.integers(1, 5000)), kind=st.sampled_from(["normal", "ties"]),
       ninf=st.sampled_from([0.0, 0.3]), penalty=st.one_of(st.just(1.0), st.floats(0.3, 3.0)),
       seen_frac=st.sampled_from([0, 0.2, 0.9]), seed=st.integers(0, 2**32 - 1))
def test_greedy_is_argmax_after_penalty(V, kind, ninf, penalty, seen_frac, seed):
    r = np.random.default_rng(seed)
    x = make_logits(r, V, kind, ninf)
    seen = np.flatnonzero(r.random(V) < seen_frac)
    gs = sampler(V)
    gs.set_params(SamplingParams(temperature=0.0, top_k=5, top_p=0.5, repetition_penalty=penalty), seed)
    gs.set_seen(seen)
    gs.sample(backend().from_host(x), counter=7)
    assert gs.read_id() == int(np.argmax(apply_repetition_penalty(x, seen, penalty)))


# --- (3) the draw is the Gumbel-max of the Philox stream -----------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(V=st.sampled_from([2, 50, 1000, 151936]), kind=st.sampled_from(["normal", "ties"]), kmode=top_k_mode,
       top_p=top_p_st, seed=st.integers(0, 2**64 - 1))
def test_draw_is_gumbel_max_of_seeded_stream(V, kind, kmode, top_p, seed):
    r = np.random.default_rng(seed % 2**32)
    x = make_logits(r, V, kind, 0.0)
    params = SamplingParams(temperature=0.8, top_k=pick_top_k(kmode, V, r), top_p=top_p)
    be, gs = backend(), sampler(V)
    gs.set_params(params, seed)
    gs.set_seen([])
    d = be.from_host(x)
    ids = []
    for counter in range(12):
        gs.sample(d, counter=counter)
        ids.append(gs.read_id())
        gs.sample(d, counter=counter)
        assert gs.read_id() == ids[-1], "same (seed, counter), different id"
        s = host_scores(x, params, seed, counter)
        if top_p is not None and top_p < 1:  # a token on the top-p boundary may go either way: skip the step
            near = np.abs(before_mass(warp(x, attrs.evolve(params, top_p=None))) - top_p) < 1e-9
            if near.any():
                continue
        best = np.max(s)
        assert s[ids[-1]] >= best - 1e-5 * (1 + abs(best)), f"counter {counter}: chose {ids[-1]}, host {np.argmax(s)}"
    w = warp(x, params)
    pmax = 1.0 / np.exp(w - w.max()).sum()
    if pmax < 0.25:  # no token that likely: 12 counters choosing one id would be a 1e-7 event
        assert len(set(ids)) > 1, f"12 counters all chose {ids[0]} (largest probability {pmax:.3f})"


def test_seed_changes_the_draw():
    V = 4096
    x = np.zeros(V, np.float32)  # uniform: any fixed id is a bug
    be, gs = backend(), sampler(V)
    d = be.from_host(x)
    ids = []
    for seed in range(8):
        gs.set_params(SamplingParams(temperature=1.0), seed)
        gs.sample(d, counter=3)
        ids.append(gs.read_id())
    assert len(set(ids)) >= 6, ids


# --- (4) the distribution ---------------------------------------------------------------------------------------
CASES = [  # probabilities, params, seen (penalised) ids
    ([0.3, 0.25, 0.2, 0.12, 0.08, 0.05], SamplingParams(temperature=1.0), []),
    ([0.3, 0.25, 0.2, 0.12, 0.08, 0.05], SamplingParams(temperature=0.7, top_k=3), []),
    ([0.3, 0.25, 0.2, 0.12, 0.08, 0.05], SamplingParams(temperature=1.0, top_p=0.6), []),
    ([0.3, 0.25, 0.2, 0.12, 0.08, 0.05], SamplingParams(temperature=1.3, top_k=4, top_p=0.7,
                                                          repetition_penalty=1.8), [0, 4]),
    ([0.2, 0.2, 0.2, 0.2, 0.1, 0.1], SamplingParams(temperature=1.0, top_p=0.5), []),  # cuts 4 tied tokens
    ([0.1, 0.2, 0.2, 0.1, 0.2, 0.2], SamplingParams(temperature=1.0, top_k=2), []),  # ties at the k-th kept
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_distribution_chi_square(case):
    probs, params, seen = CASES[case]
    x = np.log(np.asarray(probs, np.float64)).astype(np.float32)
    ref = warp(apply_repetition_penalty(x, np.asarray(seen, np.int64), params.repetition_penalty), params)
    expect = np.exp(ref - ref.max())
    expect /= expect.sum()
    be, gs = backend(), sampler(len(probs))
    gs.set_params(params, seed=1234 + case)
    d = be.from_host(x)
    n = 4000
    counts = np.zeros(len(probs), np.int64)
    for counter in range(n):
        gs.set_seen(seen)  # each draw marks its id: reset so every draw sees the same penalty
        gs.sample(d, counter=counter)
        counts[gs.read_id()] += 1
    assert counts[expect == 0].sum() == 0, f"dropped tokens drawn: {counts} for {expect}"
    live = expect > 0
    chi2 = float((((counts - n * expect) ** 2)[live] / (n * expect[live])).sum())
    p = chi2_sf(chi2, int(live.sum()) - 1)
    assert p > 1e-6, f"counts {counts} vs expected {np.round(n * expect, 1)}: chi2 {chi2:.1f}, p {p:.2e}"


def test_chi2_sf_reference_values():  # the p-value above is only as good as this
    assert abs(chi2_sf(3.841458820694124, 1) - 0.05) < 1e-9
    assert abs(chi2_sf(9.487729036781154, 4) - 0.05) < 1e-9
    assert abs(chi2_sf(11.070497693516351, 5) - 0.05) < 1e-9


# --- (5) the seen mask --------------------------------------------------------------------------------------------
def test_seen_mask_gains_each_choice():
    V = 3000
    r = np.random.default_rng(5)
    x = r.normal(0, 1, V).astype(np.float32)
    be, gs = backend(), sampler(V)
    prompt = [3, 17, 2999]
    gs.set_params(SamplingParams(temperature=1.0, top_p=0.9), 11)
    gs.set_seen(prompt)
    d = be.from_host(x)
    want = set(prompt)
    for counter in range(5):
        gs.sample(d, counter=counter)
        want.add(gs.read_id())
        assert set(np.flatnonzero(gs.seen_mask())) == want
    gs.set_seen([])
    assert not gs.seen_mask().any()


def test_penalty_follows_generated_tokens():
    """Greedy with a huge penalty and the mask kept on the GPU: each step's pick is penalised the next step."""
    V = 64
    x = np.linspace(10, 1, V).astype(np.float32)  # descending, all positive
    be, gs = backend(), sampler(V)
    gs.set_params(SamplingParams(temperature=0.0, repetition_penalty=100.0), 0)
    gs.set_seen([])
    d = be.from_host(x)
    ids = []
    for _ in range(6):
        gs.sample(d)
        ids.append(gs.read_id())
    assert ids == [0, 1, 2, 3, 4, 5]


# --- (6) CUDA graph capture ---------------------------------------------------------------------------------------
def capture(gs, d, ctr_ptr):
    """Instantiated graph of one gs.sample(d) whose counter is read from ctr_ptr (as the decode graph does)."""
    from core.cuda.graph import CAPTURE_MODE_RELAXED, Capture, _call, _cuda

    be = gs.be
    be.synchronize("capture")
    stream = ctypes.c_void_p(be.stream.handle)
    graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
    _call("cuStreamBeginCapture_v2", stream, CAPTURE_MODE_RELAXED)
    be.capture = Capture(ids=None, start_ptr=ctr_ptr)
    try:
        out = gs.sample(d, counter_ptr=be.start_dev())
    finally:
        be.capture = None
        rc = _cuda().cuStreamEndCapture(stream, ctypes.byref(graph))
    assert rc == 0
    _call("cuGraphInstantiateWithFlags", ctypes.byref(exe), graph, 0)
    return graph, exe, out


def test_graph_replays_match_eager():
    from core.cuda.graph import _call, _cuda

    V = 151936
    r = np.random.default_rng(9)
    x = r.normal(0, 2, V).astype(np.float32)
    be, gs = backend(), sampler(V)
    drv = be.drv
    d = be.from_host(x)
    prompt = list(range(0, 400, 7))
    configs = [SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3),
               SamplingParams(temperature=1.0, top_p=0.95),
               SamplingParams(temperature=0.0, repetition_penalty=5.0)]
    steps = range(100, 130)

    def eager(params):
        gs.set_params(params, 42)
        gs.set_seen(prompt)
        ids = []
        for c in steps:
            gs.sample(d, counter=c)
            ids.append(gs.read_id())
        return ids, gs.seen_mask()

    want = [eager(p) for p in configs]
    ctr = drv.mem_alloc(4)
    host = drv.pagelocked_empty(1, np.int32)
    gs.set_params(configs[0], 42)  # captured under the first parameters; replayed under each
    graph, exe, out = capture(gs, d, int(ctr))
    assert out.ptr == gs.out.ptr
    try:
        for params, (ids_want, mask_want) in zip(configs, want):
            gs.set_params(params, 42)
            gs.set_seen(prompt)
            ids = []
            for c in steps:
                host[0] = c
                drv.memcpy_htod_async(int(ctr), host, be.stream)
                _call("cuGraphLaunch", exe, ctypes.c_void_p(be.stream.handle))
                ids.append(gs.read_id())
            assert ids == ids_want, f"{params}: graph {ids[:8]} eager {ids_want[:8]}"
            assert (gs.seen_mask() == mask_want).all()
        assert len(set(want[1][0])) > 5  # the counter does vary the draw
    finally:
        _cuda().cuGraphExecDestroy(exe)
        _cuda().cuGraphDestroy(graph)


@settings(max_examples=30, deadline=None)
@given(V=st.one_of(st.sampled_from([1, 2, 1000, 151936]), st.integers(1, 5000)),
       bad=st.sampled_from(["nan", "-nan", "inf", "all -inf"]), greedy=st.booleans(),
       penalty=st.sampled_from([1.0, 1.3]), seed=st.integers(0, 2**32 - 1))
def test_non_finite_logits_set_the_flag_and_leave_a_valid_id(V, bad, greedy, penalty, seed):
    """Issue 17: a NaN (either sign) or +inf anywhere, or every logit -inf, sets out[1]; read_id raises; the id
    left for the graph's next step is in [0, V) and is not marked seen. The next call on finite logits is clean
    (the state's flag was cleared)."""
    from core.errors import NonFiniteLogitsError

    r = np.random.default_rng(seed)
    x = make_logits(r, V, "normal", 0.0)
    if bad == "all -inf":
        x[:] = -np.inf
    else:
        x[r.integers(V)] = {"nan": np.nan, "-nan": -np.float32(np.nan), "inf": np.inf}[bad]
    params = SamplingParams(temperature=0.0 if greedy else 0.9, top_k=None if greedy else 20, repetition_penalty=penalty)
    be, gs = backend(), sampler(V)
    gs.set_params(params, seed)
    gs.set_seen([])
    gs.sample(be.from_host(x))
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
        gs.read_id()
    raw = np.empty(2, np.int32)
    be.drv.memcpy_dtoh(raw, gs.out.ptr)
    assert 0 <= raw[0] < V and raw[1] == 1
    assert not gs.seen_mask().any(), "a pick from non-finite logits was marked seen"
    clean = make_logits(r, V, "normal", 0.01)
    gs.set_params(SamplingParams(), 0)
    gs.sample(be.from_host(clean))
    assert gs.read_id() == int(np.argmax(clean))


def test_the_argmax_key_puts_every_nan_on_top():
    """argmax_key: the lowest-index NaN wins whatever its sign (numpy's argmax returns the first NaN), and its
    key decodes to NonFiniteLogitsError."""
    from core.errors import NonFiniteLogitsError

    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    x[[4000, 900, 2500]] = [np.nan, -np.float32(np.nan), np.inf]
    be = backend()
    key = be.argmax_key(be.from_host(x))
    raw = np.empty(2, np.int32)
    be.synchronize()
    be.drv.memcpy_dtoh(raw, key.ptr)
    assert 0xFFFFFFFF - int(raw.view(np.uint32)[0]) == int(np.argmax(x)) == 900
    with pytest.raises(NonFiniteLogitsError):
        be.key_to_id(raw)


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 70), V=st.one_of(st.integers(1, 5000), st.sampled_from([32000, 151936])),
       levels=st.sampled_from([0, 2]), bad=st.sampled_from(["none", "nan", "-nan", "inf", "all -inf"]),
       seed=st.integers(0, 2**32 - 1))
def test_argmax_rows_is_numpys_argmax_per_row(R, V, levels, bad, seed):
    """backend.argmax_rows (the engine's greedy rows): numpy's argmax of each row (first index of the largest,
    ties common with levels > 0), and the non-finite flag of gpu_sampling.pick's rule, row by row."""
    from core.cuda.gpu_sampling import pick
    from core.errors import NonFiniteLogitsError

    r = np.random.default_rng(seed)
    x = (r.integers(-levels, levels + 1, (R, V)) * 0.5 if levels else r.normal(0, 5, (R, V))).astype(np.float32)
    hit = r.random(R) < 0.3
    for i in np.flatnonzero(hit) if bad != "none" else ():
        if bad == "all -inf":
            x[i] = -np.inf
        else:
            x[i, r.integers(V)] = {"nan": np.nan, "-nan": -np.float32(np.nan), "inf": np.inf}[bad]
    be = backend()
    ids, flags = be.argmax_rows(be.from_host(x))
    for i in range(R):
        try:
            want, want_bad = pick(x[i]), False
        except NonFiniteLogitsError:
            want, want_bad = None, True
        assert bool(flags[i]) == want_bad, f"row {i}"
        if not want_bad:
            assert ids[i] == want, f"row {i}"


def test_rejects_bad_input():
    from core.errors import DeviceError, GenerationError

    be, gs = backend(), sampler(10)
    with pytest.raises(DeviceError):
        gs.sample(be.from_host(np.zeros(11, np.float32)))
    with pytest.raises(GenerationError):
        gs.set_seen([10])


# --- (7) many rows in one launch (core/cuda/row_sampler.py: the engine's sample_rows) ------------------------------
ROW_KINDS = ["greedy", "greedy+penalty", "temperature", "top_k", "top_p", "all"]


def row_params(kind, V, r):
    """SamplingParams of one kind, the numbers drawn from r."""
    T, pen = float(r.uniform(0.3, 2.5)), float(r.uniform(0.4, 2.5))
    k, p = int(r.integers(1, V + 3)), float(r.uniform(0.05, 0.99))
    return {"greedy": SamplingParams(), "greedy+penalty": SamplingParams(repetition_penalty=pen),
            "temperature": SamplingParams(temperature=T), "top_k": SamplingParams(temperature=T, top_k=k),
            "top_p": SamplingParams(temperature=T, top_p=p),
            "all": SamplingParams(temperature=T, top_k=k, top_p=p, repetition_penalty=pen)}[kind]


def on_top_p_boundary(x, params, seen) -> bool:
    """Whether a token's reference mass-before lies within 1e-9 of top_p: rounding decides it, in any two runs."""
    if params.greedy or params.top_p is None or params.top_p >= 1.0:
        return False
    pen = apply_repetition_penalty(x, np.asarray(seen, np.int64), params.repetition_penalty)
    return bool((np.abs(before_mass(warp(pen, attrs.evolve(params, top_p=None))) - params.top_p) < 1e-9).any())


def row_sampler(V):
    from core.cuda.row_sampler import RowSampler

    return RowSampler(backend(), V)


def single(gs, x, params, seed, counter, seen, warped=False):
    """The single-row sampler's (id, warped logits or None) for one row; leaves its seen mask alone."""
    be = backend()
    gs.set_params(params, seed)
    gs.set_seen(seen)
    if warped:
        w = gs.debug_warped(be.from_host(x), counter=counter)
        return gs.read_id(), w
    gs.sample(be.from_host(x), counter=counter)
    return gs.read_id(), None


@settings(max_examples=30, deadline=None)
@given(V=st.one_of(st.sampled_from([1, 2, 1000, 32000]), st.integers(1, 5000)),
       kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=9), fillers=st.integers(1, 4),
       logit_kind=st.sampled_from(["normal", "ties", "wide"]), seed=st.integers(0, 2**32 - 1))
def test_row_kernel_equals_the_single_row_sampler(V, kinds, fillers, logit_kind, seed):
    """Rows of different parameters in one launch, each in a slot that is not its row index: per row the same id
    and the same warped logits (bit for bit) as GpuSampler with the same parameters, seed, counter and seen ids;
    the picks are marked in their own slots (other requests' masks untouched); the next call, whose histories
    gained the picks, keeps the masks on the device and still agrees."""
    r = np.random.default_rng(seed)
    R = len(kinds)
    be, gs, rs = backend(), sampler(V), row_sampler(V)
    try:
        keys, fill = [object() for _ in kinds], [object() for _ in range(fillers)]
        fill_tokens = [r.integers(0, V, 5).tolist() for _ in fill]
        warm = [(k, SamplingParams(temperature=1.0), 1, 0, t) for k, t in zip(fill, fill_tokens)]
        warm += [(k, SamplingParams(), 1, 0, [0]) for k in keys[::-1]]  # the fillers first, the rows reversed
        rs.debug_warped(be.from_host(r.normal(0, 1, (len(warm), V)).astype(np.float32)), warm)
        x = np.stack([make_logits(r, V, logit_kind, 0.0) for _ in kinds])
        params = [row_params(k, V, r) for k in kinds]
        seeds = [int(r.integers(0, 2**63)) for _ in kinds]
        counters = [int(r.integers(0, 2**31 - 1)) for _ in kinds]
        tokens = [r.integers(0, V, int(r.integers(1, 40))).tolist() for _ in kinds]
        rows = list(zip(keys, params, seeds, counters, tokens))
        d = be.from_host(x)
        ids, bad, warped = rs.debug_warped(d, rows)
        slots = [rs.slot(k) for k in keys]
        assert len(set(slots)) == R and slots != list(range(R)) and rs.S >= R + fillers
        unstable = [on_top_p_boundary(x[i], params[i], tokens[i]) for i in range(R)]
        assert not bad.any()
        for i in range(R):
            want_id, want_w = single(gs, x[i], params[i], seeds[i], counters[i], tokens[i], warped=True)
            if not unstable[i]:
                assert ids[i] == want_id, f"row {i} ({kinds[i]}, slot {slots[i]}): {ids[i]} vs single {want_id}"
                assert np.array_equal(warped[i], want_w), f"row {i} ({kinds[i]}): warped logits differ"
        picked, bad = rs.sample(d, rows)
        assert not bad.any()
        for i in range(R):
            if not unstable[i]:
                assert picked[i] == ids[i]
            assert set(np.flatnonzero(rs.seen_mask(slots[i]))) == set(tokens[i]) | {int(picked[i])}
        for k, t in zip(fill, fill_tokens):
            assert set(np.flatnonzero(rs.seen_mask(rs.slot(k)))) == set(t)
        nxt = [(k, p, s_, c + 1, t + [int(i)]) for (k, p, s_, c, t), i in zip(rows, picked.tolist())]
        again, bad = rs.sample(d, nxt)
        assert not bad.any() and [rs.slot(k) for k in keys] == slots
        for i, (_, p, s_, c, t) in enumerate(nxt):
            if not on_top_p_boundary(x[i], p, t):
                assert again[i] == single(gs, x[i], p, s_, c, t)[0], f"row {i} ({kinds[i]}) at its next step"
    finally:
        rs.free()


def test_row_slots_are_kept_evicted_reassigned_and_grown():
    """Greedy with a huge penalty over descending logits picks the lowest id not seen, so each id shows which mask
    its slot held: a key keeps its slot; a new key takes a free slot, else the least recently used key's (whose
    mask it replaces); an evicted key coming back gets its mask uploaded again; more rows than slots grow them."""
    V = 300
    x1 = np.linspace(10, 1, V).astype(np.float32)
    be, rs = backend(), row_sampler(V)
    greedy = SamplingParams(repetition_penalty=100.0)

    def call(named):  # named: [(key, seen ids)] -> picks; the picks join their histories, as the engine does
        rows = [(k, greedy, 0, len(hist[k]), hist[k]) for k in named]
        ids, bad = rs.sample(be.from_host(np.tile(x1, (len(rows), 1))), rows)
        assert not bad.any()
        for k, i in zip(named, ids.tolist()):
            assert i == min(set(range(V)) - set(hist[k])), f"{k}: picked {i} with history {hist[k]}"
            hist[k] = hist[k] + [i]
        return ids

    hist = {"a": [0, 1], "b": [0], "c": [5], "d": [0, 1, 2, 3], "e": [], "f": [0, 2], "g": [1], "h": [3, 0]}
    try:
        call(["a", "b", "c"])
        assert rs.S == 4 and [rs.slot(k) for k in "abc"] == [0, 1, 2]
        call(["b", "a"])  # kept slots; marks carried on the device
        call(["d", "e"])  # d: the free slot 3; e: c's, the least recently used
        assert rs.slot("d") == 3 and rs.slot("e") == 2 and rs.slot("c") is None
        call(["c"])  # back: b's slot now (b and a were used before d and e), its mask uploaded from its history
        assert rs.slot("c") == 1 and rs.slot("b") is None
        call(["a", "b", "c", "d", "e", "f", "g", "h"][::-1])  # more rows than slots: S grows, every mask re-uploaded
        assert rs.S == 8
        call(["h", "a"])
    finally:
        rs.free()
    assert rs.S == 0


def test_row_flags_are_per_row():
    """A NaN, +inf or all -inf row is flagged, its id valid and not marked; the other rows sample as usual."""
    V = 777
    r = np.random.default_rng(4)
    x = r.normal(0, 2, (4, V)).astype(np.float32)
    x[1, 5] = np.nan
    x[2, :] = -np.inf
    x[3, 9] = np.inf
    be, rs = backend(), row_sampler(V)
    rows = [(i, SamplingParams(temperature=0.8, top_k=50), 7, 11, [1, 2]) for i in range(4)]
    try:
        ids, bad = rs.sample(be.from_host(x), rows)
        assert bad.tolist() == [False, True, True, True]
        assert ((0 <= ids) & (ids < V)).all()
        assert ids[0] == single(sampler(V), x[0], rows[0][1], 7, 11, [1, 2])[0]
        for i in range(4):
            assert set(np.flatnonzero(rs.seen_mask(rs.slot(i)))) == {1, 2} | ({int(ids[i])} if i == 0 else set())
    finally:
        rs.free()


def test_sample_rows_declines_where_decode_ids_does():
    """None with graphs or fused kernels off, or a rope table that changes with the length (decode_ids's rule)."""
    from types import SimpleNamespace

    be = backend()
    x = be.from_host(np.zeros((1, 8), np.float32))
    rows = [("k", SamplingParams(temperature=1.0), 0, 0, [1])]
    saved = be.graphs, be.fused
    try:
        for graphs, fused in ((False, True), (True, False)):
            be.graphs, be.fused = graphs, fused
            assert be.sample_rows(x, rows, None) is None
        be.graphs, be.fused = True, True
        assert be.sample_rows(x, rows, SimpleNamespace(dynamic=True)) is None
        ids, bad = be.sample_rows(x, rows, SimpleNamespace(dynamic=False))
        assert 0 <= ids[0] < 8 and not bad[0]
    finally:
        be.graphs, be.fused = saved
        be.drop_row_sampler()


# --- timing (python3 tests/test_cuda_sampling.py) -----------------------------------------------------------------
def bench(V=151936, reps=200):
    from core.cuda.graph import _call, _cuda

    be, gs = backend(), sampler(V)
    drv = be.drv
    r = np.random.default_rng(0)
    d = be.from_host(r.normal(0, 3, V).astype(np.float32))
    ctr = drv.mem_alloc(4)
    drv.memcpy_htod(ctr, np.zeros(1, np.int32))
    gs.set_seen(range(0, 2000, 3))
    rows = []
    for name, params in [("greedy", SamplingParams()),
                         ("T=0.7 k=20 p=0.8 pen=1.1", SamplingParams(0.7, 20, 0.8, 1.1)),
                         ("T=1 (no filter)", SamplingParams(1.0)),
                         ("T=1 p=0.95", SamplingParams(1.0, None, 0.95)),
                         ("T=0.6 k=50000 p=0.999", SamplingParams(0.6, 50000, 0.999))]:
        gs.set_params(params, 1)
        gs.sample(d)
        graph, exe, _ = capture(gs, d, int(ctr))
        a, b = drv.Event(), drv.Event()
        for mode in ("eager", "graph"):
            a.record(be.stream)
            for _ in range(reps):
                if mode == "eager":
                    gs.sample(d)
                else:
                    _call("cuGraphLaunch", exe, ctypes.c_void_p(be.stream.handle))
            b.record(be.stream)
            b.synchronize()
            rows.append((name, mode, b.time_since(a) * 1000 / reps))
        _cuda().cuGraphExecDestroy(exe)
        _cuda().cuGraphDestroy(graph)
    print(f"sample() at V={V} on {be.device.name()}, grid {gs.grid[0]} x 512, {reps} reps, CUDA events:")
    for name, mode, us in rows:
        print(f"  {name:28s} {mode:5s} {us:7.1f} us")


if __name__ == "__main__":
    bench()
