"""The engine's sampled rows on the GPU (CudaBackend.sample_rows, core/cuda/row_sampler.py) against each request's
solo CUDA run (GPU machine only).

A solo run samples its first token on the host with its own generator and then hands sampling to the GPU
(decode_ids: GpuSampler, seeded with the generator's next draw, counter = the position fed in). The engine does the
same per request while the requests share steps, so a batch of requests with different temperatures, top-k, top-p,
repetition penalties and seeds gets each request's solo tokens, in float32 on the trained demo models. With graphs
off, both sample on the host, and still agree.

CPU tests run RowSampler's bookkeeping (slots, least-recently-used eviction, growth, which uploads a call makes, the
slots-then-counters array) against FakeGpu: the driver calls it makes on a flat memory, with sample_pass emulated by
the numpy rule of tests/test_engine_row_sampling.py reading the same bytes the kernel reads (parameters by slot,
the slot's seen mask, the row's counter) and marking the pick in the slot's mask as the kernel does.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import core
from core.cuda.gpu_sampling import PARAMS_DTYPE, STATE_BYTES
from core.cuda.row_sampler import RowSampler
from core.cuda.tensors import DTensor
from core.demo import demo_checkpoint
from core.load import cuda_available
from core.sampling import SamplingParams

from test_engine_row_sampling import device_rule

OK, WHY = cuda_available()


def on_gpu(test):
    """Mark a test gpu and skip it, saying why, without PyCUDA and a GPU (this file also has CPU tests)."""
    return pytest.mark.gpu(pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")(test))

NEW = 20
KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
REQUESTS = [  # (prompt length, parameters)
    (1, dict(temperature=0.9, seed=1)),
    (4, dict(temperature=0.7, top_k=5, seed=2)),
    (9, dict(temperature=1.2, top_p=0.8, seed=3)),
    (17, dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.4, seed=4)),
    (30, dict(temperature=0.0, repetition_penalty=2.0, seed=5)),  # greedy with a penalty: sampled on the GPU too
    (5, dict(temperature=0.0, seed=6)),  # plain greedy beside them: argmax_rows
    (12, dict(temperature=1.0, top_p=0.95, repetition_penalty=0.8, seed=2**64 - 1)),
    (3, dict(temperature=0.6, top_k=1, seed=8)),
]


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen3"])
def model(request):
    if not OK:
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {WHY}")
    m = core.load(demo_checkpoint(request.param), device="cuda", dtype="float32", quiet=True)
    yield m
    m.backend.release(m.weights)


def run_both(model):
    """(solo tokens, batched tokens, rows given to sample_rows per call) for REQUESTS."""
    V = model.config.vocab_size
    r = np.random.default_rng(11)
    prompts = [r.integers(0, V, n).tolist() for n, _ in REQUESTS]
    solo = [model.generate(p, max_new_tokens=NEW, stop_at_eos=False, **kw) for p, (_, kw) in zip(prompts, REQUESTS)]
    be, calls = model.backend, []
    real = be.sample_rows

    def counted(logits, rows, rope):
        calls.append(len(rows))
        return real(logits, rows, rope)

    be.sample_rows = counted  # the instance's attribute: what the engine looks up
    try:
        per = {k: [kw.get(k) for _, kw in REQUESTS] for k in KEYS}
        batched = model.generate(prompts, max_new_tokens=NEW, stop_at_eos=False, engine=model.engine(block_size=16),
                                 **per)
    finally:
        del be.sample_rows
    return solo, batched, calls


@on_gpu
def test_batched_sampling_equals_solo(model):
    solo, batched, calls = run_both(model)
    for i, (s, b) in enumerate(zip(solo, batched)):
        assert b == s, f"request {i} {REQUESTS[i][1]}: batched {b} solo {s}"
    assert calls and max(calls) >= 6, f"the sampled requests did not share steps on the GPU: {calls}"


@on_gpu
def test_with_graphs_off_both_sample_on_the_host(model):
    be = model.backend
    saved = be.graphs
    be.graphs = False
    try:
        solo, batched, calls = run_both(model)
    finally:
        be.graphs = saved
    assert batched == solo
    assert calls  # asked, and declined


# --- CPU: RowSampler's bookkeeping on a fake device ------------------------------------------------------------------
class FakeAlloc:
    """A FakeGpu allocation: its address as int(), free() logged."""

    def __init__(self, dev, addr: int, n: int):
        self.dev, self.addr, self.n = dev, addr, n

    def __int__(self):
        return self.addr

    def free(self):
        self.dev.freed.append(self.addr)


class FakeGpu:
    """The backend and driver calls RowSampler makes, on the CPU (see the module docstring). Logs host -> device
    copies (address, bytes) and the launches' grids."""

    Error = RuntimeError

    def __init__(self, sms: int = 3):
        self.mem = bytearray(256)  # address 0 stays null
        self.capture, self.freed, self.copies, self.grids = None, [], [], []
        self.drv, self.stream = self, SimpleNamespace(synchronize=lambda: None)
        self.device = SimpleNamespace(get_attribute=lambda attr: sms)
        self.device_attribute = SimpleNamespace(MULTIPROCESSOR_COUNT="sms")

    # the backend's
    def kernel(self, file, name, fmt):
        assert (file, name) == ("sample.cu", "sample_pass") and len(fmt) == 13
        return name

    def mem_alloc(self, n: int, what: str):
        addr = len(self.mem)
        self.mem += bytes(-(-max(n, 16) // 256) * 256)
        return FakeAlloc(self, addr, n)

    def alloc(self, shape, dtype="float32"):
        buf = self.mem_alloc(4 * int(np.prod(shape)), "activation")
        return DTensor(buf, int(buf), shape, dtype)

    def from_host(self, x):
        x = np.ascontiguousarray(x, np.float32)
        t = self.alloc(x.shape)
        self.mem[t.ptr:t.ptr + x.nbytes] = x.tobytes()
        return t

    def to_host(self, t):
        return self.read(t.ptr, np.float32, t.size).reshape(t.shape)

    def check(self, fn, op):
        return fn()

    def synchronize(self, what=""):
        pass

    # the driver's
    def memset_d8_async(self, ptr, value, n, stream):
        self.mem[ptr:ptr + n] = bytes([value]) * n

    def memcpy_htod_async(self, ptr, host, stream):
        b = np.ascontiguousarray(host).tobytes()
        self.copies.append((int(ptr), len(b)))
        self.mem[ptr:ptr + len(b)] = b

    def memcpy_dtoh(self, host, ptr):
        host[...] = self.read(int(ptr), host.dtype, host.size).reshape(host.shape)

    def read(self, ptr, dtype, count):
        return np.frombuffer(self.mem, dtype, count, ptr).copy()

    # sample.cu's sample_pass, at its last pass (the others only hand state on)
    def launch(self, op, fn, grid, block, prm, st_, keys, seen, logits, out, warped, counters, slots, counter, V, p,
               mark):
        self.grids.append(grid)
        if p != 8:
            return
        R = grid[1]
        rows = self.read(slots, np.int32, R) if slots else np.arange(R)
        assert len(set(rows.tolist())) == R, "two rows of a launch share a slot"
        for y, s in enumerate(rows.tolist()):
            rec = self.read(prm + 32 * s, PARAMS_DTYPE, 1)[0]
            assert not any(self.mem[st_ + s * STATE_BYTES:st_ + (s + 1) * STATE_BYTES]), "the state was not zeroed"
            mask = self.read(seen + s * V, np.uint8, V)
            params = SamplingParams(temperature=float(rec["temperature"]), top_k=int(rec["top_k"]) or None,
                                    top_p=float(rec["top_p"]) if rec["top_p"] < 1 else None,
                                    repetition_penalty=float(rec["penalty"]))
            c = int(self.read(counters + 4 * y, np.int32, 1)[0]) if counters else counter
            x = self.read(logits + 4 * V * y, np.float32, V)
            tok, bad = device_rule(x, params, int(rec["seed_lo"]) | int(rec["seed_hi"]) << 32, c, np.flatnonzero(mask))
            self.mem[out + 8 * y:out + 8 * y + 8] = np.asarray([tok, int(bad)], np.int32).tobytes()
            if mark and not bad:
                self.mem[seen + s * V + tok] = 1


def fake_params(r) -> SamplingParams:
    """One of four kinds (greedy with a penalty, top-k, top-p with a penalty, temperature alone), drawn from r."""
    kind = int(r.integers(4))
    T, pen = float(r.uniform(0.5, 1.5)), float(np.float32(r.uniform(0.5, 2.0)))  # the kernel holds the penalty in fp32
    return [SamplingParams(repetition_penalty=pen), SamplingParams(temperature=T, top_k=int(r.integers(1, 9))),
            SamplingParams(temperature=T, top_p=float(r.uniform(0.2, 0.9)), repetition_penalty=pen),
            SamplingParams(temperature=T)][kind]


@settings(max_examples=25, deadline=None)
@given(requests=st.integers(1, 12), calls=st.integers(1, 25), V=st.integers(2, 60), seed=st.integers(0, 2**32 - 1))
def test_row_sampler_bookkeeping_on_a_fake_device(requests, calls, V, seed):
    """Calls over a changing subset of requests (in any order, some joining late, some changing parameters, some
    gaining a token behind the sampler's back, as a host-sampled token would) pick what the numpy rule picks from
    each request's own parameters, seed, counter and whole history; every slot's mask is its request's history; a
    call whose requests all kept their slots and parameters and appended their last picks copies only the
    slots-and-counters array; growing frees the old buffers."""
    r = np.random.default_rng(seed)
    gpu = FakeGpu()
    rs = RowSampler(gpu, V)
    reqs = [dict(key=object(), params=fake_params(r), seed=int(r.integers(0, 2**63)), clean=False,
                 hist=r.integers(0, V, int(r.integers(1, 6))).tolist()) for _ in range(requests)]
    for _ in range(calls):
        pick = r.permutation(requests)[:int(r.integers(1, requests + 1))].tolist()
        for i in pick:
            q = reqs[i]
            if r.random() < 0.1:
                q["params"], q["clean"] = fake_params(r), False
            if r.random() < 0.1:
                q["hist"], q["clean"] = q["hist"] + [int(r.integers(V))], False
        rows = [(reqs[i]["key"], reqs[i]["params"], reqs[i]["seed"], len(reqs[i]["hist"]) - 1, reqs[i]["hist"])
                for i in pick]
        steady = len(pick) <= rs.S and all(reqs[i]["clean"] and rs.slot(reqs[i]["key"]) is not None for i in pick)
        S, n_copies, n_freed = rs.S, len(gpu.copies), len(gpu.freed)
        x = r.normal(0, 2, (len(pick), V)).astype(np.float32)
        ids, bad = rs.sample(gpu.from_host(x), rows)
        assert not bad.any()
        for j, i in enumerate(pick):
            q = reqs[i]
            assert ids[j] == device_rule(x[j], q["params"], q["seed"], len(q["hist"]) - 1, q["hist"])[0]
            q["hist"], q["clean"] = q["hist"] + [int(ids[j])], True
        for q in reqs:
            s_ = rs.slot(q["key"])
            if s_ is not None and q["clean"]:
                assert set(np.flatnonzero(rs.seen_mask(s_))) == set(q["hist"])
        if steady:
            assert gpu.copies[n_copies:] == [(gpu.copies[-1][0], 8 * len(pick))]
        assert gpu.grids[-1] == (rs.gx, len(pick), 1) and rs.S >= len(pick) and rs.S & (rs.S - 1) == 0
        assert len(gpu.freed) - n_freed == (6 if S and rs.S != S else 0)  # the six buffers of the old slots
        pos = [rs.slot(reqs[i]["key"]) for i in pick]
        assert len(set(pos)) == len(pick) and None not in pos
    rs.free()
    assert rs.S == 0 and rs.slot(reqs[0]["key"]) is None


def test_row_sampler_refuses_what_it_cannot_take():
    from core.errors import DeviceError, GenerationError

    gpu = FakeGpu()
    rs = RowSampler(gpu, 10)
    k = object()
    with pytest.raises(DeviceError, match="same request"):
        rs.sample(gpu.from_host(np.zeros((2, 10))), [(k, SamplingParams(), 0, 0, [1])] * 2)
    with pytest.raises(DeviceError, match="float32 logits of 1 rows of 10"):
        rs.sample(gpu.from_host(np.zeros((1, 11))), [(k, SamplingParams(), 0, 0, [1])])
    with pytest.raises(GenerationError, match="token ids must be in"):
        rs.sample(gpu.from_host(np.zeros((1, 10))), [(k, SamplingParams(), 0, 0, [10])])
    with pytest.raises(GenerationError, match="seed"):
        rs.sample(gpu.from_host(np.zeros((1, 10))), [(k, SamplingParams(), -1, 0, [1])])
    gpu.capture = object()
    with pytest.raises(DeviceError, match="graph capture"):
        rs.sample(gpu.from_host(np.zeros((1, 10))), [(k, SamplingParams(), 0, 0, [1])])
