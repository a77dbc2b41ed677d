"""Batched steps on the GPU (core/cuda/paged.py, paged.cu, paged_attn.cu): every kernel against the numpy backend's
core.paged.Batch ops, and the engine on CUDA against each prompt's solo CUDA run.

Kernel tests (marked gpu) draw a step layout: a few sequences, each with `start` positions already in the cache
(written by a "history" step through the same backend op) and n rows in this step — one row (a decode token, the
split-K decode kernel) or several (a prompt chunk, the prefill kernel) — for block sizes from 1 to 32, with block
tables drawn from a shuffled pool so that sequences' blocks interleave and a few blocks stay unused. The numpy
backend runs the same ops on a core.paged.PagedCache in float64 (the oracle). The GPU backend poisons: the pools
and every fresh buffer start as NaN, so an element a kernel forgets to write fails, and the slots no row owns must
still be NaN afterwards. Keys and values are rounded to the dtype first wherever the test compares attention, so
both sides attend over the same numbers and the GPU is held to fp32 accuracy (EXACT) in every dtype.

CPU tests check the host side: the arrays uploaded per step (paged.step_arrays), the launch geometry against the
kernel's own macros (nvcc), and which models batched steps refuse.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, strategies as st

from core import testing
from core.backend import NumpyBackend
from core.config import RopeConfig
from core.errors import DeviceError, DeviceMemoryError
from core.load import cuda_available
from core.paged import Batch, PagedCache, Segment
from core.rope import RopeTable
from core.testing import EXACT, TOL, rel_err, rng, upload_weight

OK, WHY = cuda_available()


def on_gpu(test):
    """Mark a test gpu and skip it, saying why, without PyCUDA and a GPU (this file also has CPU tests)."""
    return pytest.mark.gpu(pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")(test))


class S:
    """Strategies."""

    dtype = testing.dtypes()
    seed = testing.seeds()
    head_dim = st.sampled_from([32, 64, 128, 80, 37, 256])  # common sizes, Gemma 2's, an odd one
    gqa = st.sampled_from([1, 2, 4, 8, 16, 20])  # 20: a group cut into two decode blocks of 10 heads
    window = st.one_of(st.none(), st.integers(1, 40), st.integers(1, 3000))
    softcap = st.one_of(st.none(), st.floats(5.0, 50.0))
    frac = st.sampled_from([0.25, 0.5, 1.0])
    rope_scale = st.sampled_from([1.0, 1.3416407864998738, 0.8])

    @staticmethod
    @st.composite
    def layout(draw, max_seqs: int = 5, max_start: int = 2500):
        """(block size, [(start, n), ...]): per sequence, positions already cached and rows in this step (mostly
        one, as decode steps; contexts both short and a few thousand long, so decode splits its keys)."""
        bs = draw(st.sampled_from([1, 3, 8, 16, 32]))
        start = st.one_of(st.integers(0, 70), st.integers(0, max_start))
        n = st.one_of(st.just(1), st.integers(1, 40))
        return bs, draw(st.lists(st.tuples(start, n), min_size=1, max_size=max_seqs))


def steps(bs: int, seqs, r):
    """(history Batch or None, step Batch, blocks in the pool) for a layout: each sequence's table drawn from a
    shuffled pool (so sequences' blocks interleave), 0-3 blocks left over."""
    need = [-(-(s + n) // bs) for s, n in seqs]
    nb = sum(need) + int(r.integers(0, 4))
    perm, tables, off = r.permutation(nb).tolist(), [], 0
    for k in need:
        tables.append(perm[off:off + k])
        off += k
    hist, step, hr, sr = [], [], 0, 0
    for (s, n), t in zip(seqs, tables):
        if s:
            hist.append(Segment(hr, s, 0, t))
            hr += s
        step.append(Segment(sr, n, s, t))
        sr += n
    return (Batch(hist, bs) if hist else None), Batch(step, bs), nb


def cfg(H: int, Hkv: int, Dh: int, layers: int = 1):
    """The ModelConfig fields new_paged_cache reads."""
    return SimpleNamespace(num_layers=layers, num_heads=H, num_kv_heads=Hkv, head_dim=Dh)


def ref_cache(nb: int, bs: int, Hkv: int, Dh: int) -> PagedCache:
    """The numpy backend's pools in float64 (zeros: only written slots are compared)."""
    return PagedCache([np.zeros((nb * bs, Hkv, Dh))], [np.zeros((nb * bs, Hkv, Dh))], bs, nb)


def slots_of(be, pool) -> np.ndarray:
    """A GPU pool [num_blocks, Hkv, bs, Dh] read back in the numpy layout [num_blocks * bs, Hkv, Dh]."""
    x = be.to_host(pool)
    nb, Hkv, bs, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(nb * bs, Hkv, Dh)


def written(nb: int, bs: int, *batches) -> np.ndarray:
    """bool [nb * bs]: the slots the batches' rows write."""
    w = np.zeros(nb * bs, bool)
    for b in batches:
        if b is not None:
            for g in b.segments:
                w[b.slots(g)] = True
    return w


def _round(dtype, x):
    """x as the dtype holds it (float64)."""
    return NumpyBackend(dtype).convert(np.asarray(x, np.float32), "F32", "kv").astype(np.float64)


def _table(Dh: int, frac: float, interleaved: bool, scale: float, theta: float = 1e4) -> RopeTable:
    """A RopeTable rotating frac of Dh (an even count, at least 2) with the given pairing and cos/sin scale."""
    R = max(2, int(Dh * frac) // 2 * 2)
    return RopeTable(RopeConfig(theta=theta).table(R).inv_freq, scale=scale, interleaved=interleaved)


def backend(dtype):
    """A poisoning CudaBackend (core.testing.cuda_backend), released after each example."""
    return testing.cuda_backend(dtype, gemm="own", attn="simt")


# --- kernels ---------------------------------------------------------------------------------------------------
@on_gpu
@given(dtype=S.dtype, layout=S.layout(), Hkv=st.integers(1, 3), g=S.gqa, Dh=S.head_dim, window=S.window,
       softcap=S.softcap, seed=S.seed)
def test_cache_write_and_attention(dtype, layout, Hkv, g, Dh, window, softcap, seed):
    """cache_write of a history step and of this step through the block tables, then attention of this step's rows
    (decode rows split over their keys and merged; prompt chunks causal within the chunk)."""
    bs, seqs = layout
    r = rng(seed)
    H = Hkv * g
    hist, step, nb = steps(bs, seqs, r)
    Th, T = (hist.num_tokens if hist else 0), step.num_tokens
    kh, vh = _round(dtype, r.normal(size=(2, Th, Hkv, Dh)))
    ks, vs = _round(dtype, r.normal(size=(2, T, Hkv, Dh)))
    q = r.normal(size=(T, H, Dh)).astype(np.float32)
    scale = 1.0 / math.sqrt(Dh)
    ref, rc = NumpyBackend(), ref_cache(nb, bs, Hkv, Dh)
    if hist:
        ref.cache_write(rc, 0, kh, vh, hist)
    ref.cache_write(rc, 0, ks, vs, step)
    want = ref.attention(q.astype(np.float64), rc, 0, step, scale, window, softcap)
    with backend(dtype) as be:
        cache = be.new_paged_cache(cfg(H, Hkv, Dh), nb, bs)
        if hist:
            be.cache_write(cache, 0, be.from_host(kh), be.from_host(vh), hist)
        be.cache_write(cache, 0, be.from_host(ks), be.from_host(vs), step)
        got = be.to_host(be.attention(be.from_host(q), cache, 0, step, scale, window=window, softcap=softcap))
        kc, vc = slots_of(be, cache.k[0]), slots_of(be, cache.v[0])
    w = written(nb, bs, hist, step)
    np.testing.assert_array_equal(kc[w], rc.k[0][w])
    np.testing.assert_array_equal(vc[w], rc.v[0][w])
    assert np.isnan(kc[~w]).all() and np.isnan(vc[~w]).all(), "wrote a slot no row owns"
    assert rel_err(got, want) < EXACT


@on_gpu
@given(dtype=S.dtype, layout=S.layout(max_seqs=4), Hkv=st.integers(1, 3), g=st.sampled_from([1, 2, 4, 8]),
       Dh=st.sampled_from([32, 64, 128, 80, 38, 256]), frac=S.frac, interleaved=st.booleans(), scale=S.rope_scale,
       norm=st.sampled_from([None, "shared", "per_head"]), offset=st.sampled_from([0.0, 1.0]),
       per_seq=st.booleans(), seed=S.seed)
def test_rope_cache_write(dtype, layout, Hkv, g, Dh, frac, interleaved, scale, norm, offset, per_seq, seed):
    """rope_cache_write at per-row positions (any table: partial, interleaved, scaled; one per sequence when the
    rope depends on the length), after the q/k RMSNorm (a gain shared by the heads: fused; per head: head_norm
    first): q returned rotated, k rotated and v stored at each row's slot. And rope() alone on the same rows."""
    bs, seqs = layout
    r = rng(seed)
    H = Hkv * g
    _, step, nb = steps(bs, seqs, r)
    T = step.num_tokens
    table = _table(Dh, frac, interleaved, scale)
    if per_seq:
        step.tables = [_table(Dh, frac, interleaved, scale, float(r.uniform(5e3, 5e4))) for _ in step.segments]
    q, k, v = (r.normal(size=(T, h, Dh)).astype(np.float32) for h in (H, Hkv, Hkv))
    x = r.normal(size=(T, 3, Dh)).astype(np.float32)
    with backend(dtype) as be:
        qk = qk_ref = None
        if norm:
            (qw, qwr), (kw, kwr) = (upload_weight(be, r.normal(size=(h, Dh) if norm == "per_head" else Dh))
                                    for h in (H, Hkv))
            qk, qk_ref = (qw, kw, 1e-6, offset), (qwr, kwr, 1e-6, offset)
        cache = be.new_paged_cache(cfg(H, Hkv, Dh), nb, bs)
        got_q = be.to_host(be.rope_cache_write(be.from_host(q), be.from_host(k), be.from_host(v), cache, 0, step,
                                               table, qk))
        got_x = be.to_host(be.rope(be.from_host(x), step, table))
        kc, vc = slots_of(be, cache.k[0]), slots_of(be, cache.v[0])
    ref, rc = NumpyBackend(), ref_cache(nb, bs, Hkv, Dh)
    want_q = ref.rope_cache_write(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), rc, 0, step,
                                  table, qk_ref)
    assert rel_err(got_q, want_q) < EXACT
    assert rel_err(got_x, ref.rope(x.astype(np.float64), step, table)) < EXACT
    w = written(nb, bs, step)
    assert rel_err(kc[w], rc.k[0][w]) < max(EXACT, TOL[dtype] / 4)  # the pool rounds the fp32 rotation
    np.testing.assert_array_equal(vc[w], _round(dtype, rc.v[0][w]))
    assert np.isnan(kc[~w]).all() and np.isnan(vc[~w]).all(), "wrote a slot no row owns"


@on_gpu
@given(dtype=S.dtype, layout=S.layout(max_start=500), D=testing.dims(), seed=S.seed)
def test_add_positions(dtype, layout, D, seed):
    """Learned positions at each row's own position: x + table[pos], one fp32 add, so bit for bit."""
    bs, seqs = layout
    r = rng(seed)
    _, step, _ = steps(bs, seqs, r)
    P = step.max_len + int(r.integers(0, 3))
    x = r.normal(size=(step.num_tokens, D)).astype(np.float32)
    with backend(dtype) as be:
        table, ref = upload_weight(be, r.normal(size=(P, D)))
        got = be.to_host(be.add_positions(be.from_host(x), table, step))
    np.testing.assert_array_equal(got, NumpyBackend().add_positions(x, ref.astype(np.float32), step))


@on_gpu
@given(T=st.integers(1, 300), N=testing.dims(), view=st.booleans(), seed=S.seed, data=st.data())
def test_rows(T, N, view, seed, data):
    """rows(x, idx): the logits rows of a step, any rows in any order (repeats too), from an aligned buffer or an
    unaligned row view; all rows in order return x itself."""
    x = rng(seed).normal(size=(T, N)).astype(np.float32)
    idx = data.draw(st.lists(st.integers(0, T - 1), max_size=20))
    with backend("float32") as be:
        xd = be.from_host(np.concatenate([x[:1], x]))[1:] if view else be.from_host(x)
        got = be.to_host(be.rows(xd, idx))
        assert be.rows(xd, np.arange(T)) is xd
    np.testing.assert_array_equal(got, x[np.asarray(idx, dtype=np.int64)].reshape(len(idx), N))


@on_gpu
def test_refusals_are_clear():
    """A paged cache that cannot be made, or a step it cannot take, is a typed error before any kernel runs."""
    with backend("float16") as be:
        with pytest.raises(DeviceError, match="heads of 512 dims"):
            be.new_paged_cache(cfg(4, 2, 512), 8, 16)
        with pytest.raises(DeviceMemoryError, match="paged KV cache"):
            be.new_paged_cache(cfg(64, 64, 256, layers=80), 1 << 20, 16)
        cache = be.new_paged_cache(cfg(4, 2, 32), 4, 8)
        k = be.from_host(np.zeros((3, 2, 32), np.float32))
        with pytest.raises(DeviceError, match="does not give them"):  # 3 rows from position 30 need 5 blocks of 8
            be.cache_write(cache, 0, k, k, Batch([Segment(0, 3, 30, [0, 1, 2, 3])], 8))
        with pytest.raises(DeviceError, match="do not fit the paged cache"):  # block 9 of 4
            be.cache_write(cache, 0, k, k, Batch([Segment(0, 3, 0, [9])], 8))
        with pytest.raises(DeviceError, match="needs the cache new_paged_cache made"):
            be.cache_write(be.new_cache(cfg(4, 2, 32), 8), 0, k, k, Batch([Segment(0, 3, 0, [0])], 8))


# --- the engine on CUDA against solo runs ----------------------------------------------------------------------
NEW = 24
PROMPT_LENGTHS = (1, 3, 9, 26, 61, 120)  # one-token prompts, and prompts chunked by the step budget below
# Tie margins: two logits closer than TIE_ULPS rounding steps of the dtype at the logits' magnitude count as tied
# (mantissa bits, steps). fp16: rounding the inputs of every product to fp16 (what the GEMM does to the batched rows,
# not the solo decode's GEMV) moved the top-2 gap of these six models by at most 5 such steps, 1 for most, in a numpy
# emulation over every position of the prompts below; 16 leaves a 3x margin. fp32: summation order only (~1e-6).
TIE_ULPS = {"float16": (10, 16), "float32": (23, 256)}


def _synth(family: str, path, **extra):
    """A 3-layer random checkpoint of `family` written with numpy (core.synth), wide init so that greedy
    decoding is not noise."""
    from core.registry import default_registry
    from core.synth import make_config, write_checkpoint

    spec = default_registry()[family].spec
    sizes = dict(vocab_size=512, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                 intermediate_size=256, max_position_embeddings=512)
    return write_checkpoint(spec, make_config(spec, **dict(sizes, **extra)), path, std=0.15)


# name -> checkpoint maker (tmp_path_factory -> path): the trained demos (learned positions + LayerNorm; RoPE with
# GQA; fused q/k norm) and random models for the rest of what the paged kernels do differently
MODELS = {
    "gpt2": lambda tmp: _demo("gpt2"),
    "llama": lambda tmp: _demo("llama"),
    "qwen3": lambda tmp: _demo("qwen3"),
    "gemma2": lambda tmp: _synth("gemma2", tmp.mktemp("gemma2"), sliding_window=8),  # windows, soft-caps
    "phi": lambda tmp: _synth("phi", tmp.mktemp("phi")),  # half of each head rotated, parallel block
    # a table per sequence: prompts run past the 64 positions where dynamic NTK starts to grow the base
    "llama-dynamic": lambda tmp: _synth("llama", tmp.mktemp("dyn"), max_position_embeddings=64,
                                        rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
}


def _demo(arch: str):
    from core.demo import demo_checkpoint

    return demo_checkpoint(arch)


@pytest.fixture(scope="module", params=sorted(MODELS))
def e2e_ckpt(request, tmp_path_factory):
    if not OK:
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {WHY}")
    return request.param, MODELS[request.param](tmp_path_factory)


def tie_margin(dtype: str, logits: np.ndarray) -> float:
    """The gap under which a solo run's top two logits count as tied: TIE_ULPS rounding steps of `dtype` at the
    magnitude of the logits (the largest |logit| of the prompt's own forward pass)."""
    bits, steps_ = TIE_ULPS[dtype]
    return steps_ * 2.0 ** (math.floor(math.log2(float(np.abs(logits).max()))) - bits)


def first_difference(solo, batched: list, margin: float):
    """Compare a batched run's tokens with the solo run's (core.sampling.TokenLogprob with the top 2): returns the
    number of positions compared. A token may differ only where the solo run's top two logits lie within `margin`
    of each other; from there on the two runs continue from different prefixes, so comparison stops."""
    assert len(batched) == len(solo)
    for i, (lp, tok) in enumerate(zip(solo, batched)):
        if tok != lp.token:
            gap = lp.top[0][1] - lp.top[1][1]
            assert gap <= margin, (f"position {i}: batched {tok}, solo {lp.token}, whose top-2 gap {gap:.3g} is "
                                   f"over the tie margin {margin:.3g}")
            return i
    return len(batched)


@on_gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_engine_greedy_equals_solo(e2e_ckpt, dtype, block_size):
    """model.generate over several prompts on CUDA (the engine: chunked prefill mixed with decode rows, paged
    attention split over the keys) gives each prompt's solo CUDA greedy tokens, twice through one engine (the
    second time from the prefix cache).

    Where the solo run's top two logits are within fp16 rounding of each other (tie_margin: TIE_ULPS rounding
    steps at the logits' magnitude; the batched rows round the GEMM inputs to the weight type where the solo
    decode keeps them in fp32 in its GEMV, and sum in another order), the batched run may pick the other token;
    from that position on the two runs continue from different prefixes, so that prompt is compared only up to
    it. Such partings are rare (in the emulation behind TIE_ULPS, 3 of 36 prompts parted, at tokens 7, 22 and 23),
    and the test asserts that at least half of all positions were compared, so it cannot pass by parting early."""
    import core

    name, path = e2e_ckpt
    model = core.load(path, device="cuda", dtype=dtype, quiet=True)
    try:
        V = model.config.vocab_size
        r = np.random.default_rng(7)
        prompts = [r.integers(0, V, n).tolist() for n in PROMPT_LENGTHS]
        margins = [tie_margin(dtype, model.logits(p)) for p in prompts]
        solo = [model.generate(p, max_new_tokens=NEW, stop_at_eos=False, logprobs=2) for p in prompts]
        eng = model.engine(block_size=block_size, max_batch_tokens=32)
        runs = [model.generate(prompts, max_new_tokens=NEW, stop_at_eos=False, engine=eng) for _ in range(2)]
        assert eng.pool.num_used == 0
        hits = eng.stats()["prefix_cache_hits"]
        stats = model.backend.batch_graph_stats()
    finally:
        model.backend.release(model.weights)
    if model.config.rope is None or not model.config.rope.dynamic:  # (a length-dependent rope steps eagerly)
        assert stats["replays"] > 0 and stats["failed"] == 0, f"decode steps did not replay graphs: {stats}"
    compared = [first_difference(s, b, m) for run in runs for s, b, m in zip(solo, run, margins)]
    assert sum(compared) >= 0.5 * NEW * len(compared), f"{name} {dtype}: only {compared} of {NEW} compared per prompt"
    rope = model.config.rope
    if rope is None or not rope.dynamic:  # (the engine does not share blocks under a length-dependent rope)
        assert hits > 0, "the second pass found nothing in the prefix cache"


# --- CPU: the host side --------------------------------------------------------------------------------------------
@given(layout=S.layout(max_start=200), seed=S.seed)
def test_step_arrays(layout, seed):
    """What a step uploads: each row's position and slot (as Batch.slots), its segment, the tables cut to the blocks
    the step reaches, the rows of segments of up to 16 rows for the decode kernel and 16-query tiles covering every
    longer one."""
    from core.cuda.paged import step_arrays

    bs, seqs = layout
    _, step, nb = steps(bs, seqs, rng(seed))
    st_ = step_arrays(step)
    np.testing.assert_array_equal(st_.pos, step.positions)
    np.testing.assert_array_equal(st_.slot, np.concatenate([step.slots(g) for g in step.segments]))
    for i, g in enumerate(step.segments):
        row, n, start, off = st_.seg[i]
        assert (row, n, start) == (g.row, g.n, g.start) and (st_.row_seg[row:row + n] == i).all()
        nblk = -(-(g.start + g.n) // bs)
        np.testing.assert_array_equal(st_.tables[off:off + nblk], g.table[:nblk])
        tiles = st_.tiles[st_.tiles[:, 0] == i, 1]
        assert sorted(tiles) == (list(range(0, g.n, 16)) if g.n > 16 else [])
    # the decode kernel's entries: one-row segments, and each row of a segment of 2..16 rows as its own entry
    # (row, 1, position, the segment's table), appended after the segments
    want = sorted((g.row + j, g.start + j, int(st_.seg[i][3])) for i, g in enumerate(step.segments)
                  if g.n <= 16 for j in range(g.n))
    got = sorted((int(st_.seg[e][0]), int(st_.seg[e][2]), int(st_.seg[e][3])) for e in st_.dec)
    assert got == want and all(st_.seg[e][1] == 1 for e in st_.dec)
    assert len(st_.seg) == len(step.segments) + sum(g.n for g in step.segments if 1 < g.n <= 16)
    assert st_.max_dec == max([g.start + g.n for g in step.segments if g.n <= 16], default=0)
    assert st_.max_block == max(max(g.table[:-(-(g.start + g.n) // bs)]) for g in step.segments) < nb


def test_step_arrays_refuse_what_the_kernels_cannot_take():
    from core.cuda.paged import step_arrays

    with pytest.raises(DeviceError, match="segments in row order"):
        step_arrays(Batch([Segment(0, 2, 0, [0]), Segment(3, 1, 0, [1])], 4))
    with pytest.raises(DeviceError, match="does not give them"):
        step_arrays(Batch([Segment(0, 2, 7, [0, 1])], 4))
    with pytest.raises(DeviceError, match="does not give them"):
        step_arrays(Batch([Segment(0, 1, 0, [-1])], 4))


def test_missing_paged():
    from core.cuda.capabilities import missing_paged
    from core.cuda.geometry import PAGED_MAX_DH, PAGED_SMEM_LIMIT, paged_decode_geometry, paged_prefill_smem

    assert missing_paged(cfg(32, 4, 64)) == [] and missing_paged(cfg(8, 4, 256)) == []
    assert missing_paged(cfg(8, 4, 512)) == ["heads of 512 dims (the paged attention takes up to 256)"]
    assert "not a whole group" in missing_paged(cfg(6, 4, 64))[0]
    for Dh in range(1, PAGED_MAX_DH + 1):  # why no shared-memory limit is checked per model
        assert paged_prefill_smem(Dh) <= PAGED_SMEM_LIMIT
        assert all(paged_decode_geometry(Dh, g)[3] <= PAGED_SMEM_LIMIT for g in (1, 7, 16, 17, 64, 128))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")
@pytest.mark.parametrize("Dh,g", [(64, 8), (37, 3), (256, 20), (128, 128)])
def test_paged_geometry_matches_the_kernel(Dh, g, tmp_path):
    """geometry.py's threads and shared memory for paged_attn.cu are the kernel's: the .cu static_asserts them."""
    from core.cuda.geometry import PAGED_NQ, paged_decode_geometry, paged_prefill_smem

    group, _, threads, smem = paged_decode_geometry(Dh, g)
    defines = {"WDTYPE": 1, "HEAD_DIM": Dh, "GROUP": group, "EXPECT_DECODE_SMEM": smem,
               "EXPECT_DECODE_THREADS": threads, "EXPECT_PREFILL_SMEM": paged_prefill_smem(Dh),
               "EXPECT_PREFILL_NQ": PAGED_NQ}

    def build(d):
        cmd = testing.nvcc_command(shutil.which("nvcc"), "paged_attn.cu", d, "sm_90", tmp_path / "o.cubin")
        return subprocess.run(cmd, capture_output=True, text=True)
    r = build(defines)
    assert r.returncode == 0, r.stderr
    r = build(dict(defines, EXPECT_DECODE_SMEM=smem + 4))  # the check itself bites
    assert r.returncode != 0 and "differ from paged_attn.cu" in r.stderr


@given(bs=st.sampled_from([1, 4, 16]), starts=st.lists(st.integers(0, 300), min_size=1, max_size=20),
       extra=st.integers(0, 13), seed=S.seed)
def test_batch_graph_fill_matches_step_arrays(bs, starts, extra, seed):
    """A batch graph's per-step fill (batch_graph.py fill_decode, vectorised) writes what step_arrays gives for
    the batch padded with spare-block rows (fill), for any decode rows, block size and padding."""
    from core.cuda.batch_graph import BatchGraph, bucket

    r = rng(seed)
    nb = 4096
    segs = [Segment(i, 1, s, r.permutation(nb)[:s // bs + 1 + int(r.integers(0, 3))].tolist(), True)
            for i, s in enumerate(starts)]
    B = bucket(len(segs) + extra)
    cache = SimpleNamespace(block_size=bs, spare=nb)
    ids = r.integers(0, 1000, len(segs)).tolist()

    def graph():
        g = BatchGraph.__new__(BatchGraph)
        g.B, g.copied = B, None
        g.width = B * -(-(max(starts) + 1) // bs) + 1
        sizes = {"ids": B, "pos": B, "slot": B, "row_seg": B, "seg": 4 * B, "dec": B, "tables": g.width}
        g.offsets, off = {}, 0
        for name in ("ids", "pos", "slot", "row_seg", "seg", "dec", "tables"):
            g.offsets[name], off = (off, sizes[name]), off + sizes[name]
        g.host = np.full(off, -7, np.int32)
        return g

    a, b = graph(), graph()
    a.fill(BatchGraph.padded_batch(cache, B, segs), cache, ids + [0] * (B - len(segs)))
    b.fill_decode(Batch(segs, bs), cache, ids)
    np.testing.assert_array_equal(a.host, b.host)
