"""The engine's routing of rows to a backend's sample_rows (core/engine.py _pick, _device_picks), on the CPU.

RowsBackend is NumpyBackend plus a sample_rows in numpy: the GPU sampler's processing (repetition penalty over every
token seen, temperature, top-k, top-p) and a draw that depends only on (seed, counter), as sample.cu's Philox draw does.
The oracle is the solo run's hand-over (core/model.py _generate with decode_ids): the first token sampled on the
host with the request's own generator, the device seed the next draw of that generator, then each token drawn by the
device rule at counter = the position of the token fed in. Checked: the tokens, the seeds, counters and histories
sample_rows is given, which rows are copied to the host (only those sampled there), non-finite flags ending the
request with an error, plain greedy rows going by argmax_rows, and a backend that declines leaving the host's draws
exactly those of a solo host run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import core
from core.backend import NumpyBackend
from core.demo import demo_checkpoint
from core.errors import NonFiniteLogitsError
from core.sampling import SamplingParams, apply_repetition_penalty, sample, warp

NEW = 10


def device_rule(x: np.ndarray, params: SamplingParams, seed: int, counter: int, tokens) -> tuple[int, bool]:
    """(id, non-finite?) as the GPU sampler picks it, with numpy's Gumbel noise keyed by (seed, counter)."""
    x = np.asarray(x, np.float32)
    if np.isnan(x).any() or x.max() == np.inf or x.max() == -np.inf:
        return 0, True
    x = apply_repetition_penalty(x, np.asarray(tokens, np.int64), params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(x)), False
    g = np.random.default_rng([seed, counter]).gumbel(size=x.size)
    return int(np.argmax(warp(x, params) + g)), False


class RowsBackend(NumpyBackend):
    """NumpyBackend with a sample_rows (device_rule per row) that records what it is given, and counters of the
    rows copied to the host and of argmax_rows calls. `decline`: sample_rows returns None; `poison`: (request id,
    len(output)) pairs whose pick is flagged non-finite."""

    def __init__(self, decline: bool = False, poison=()):
        super().__init__("float32")
        self.decline, self.poison = decline, set(poison)
        self.calls: list = []      # per sample_rows call: [(request, seed, counter, tokens)], or None when declined
        self.copied: list = []     # rows of each to_host call
        self.argmax_calls = 0

    def to_host(self, x):
        self.copied.append(int(np.shape(x)[0]))
        return super().to_host(x)

    def argmax_rows(self, x):
        self.argmax_calls += 1
        return super().argmax_rows(x)

    def sample_rows(self, logits, rows, rope):
        if self.decline:
            self.calls.append(None)
            return None
        logits = np.asarray(logits)
        assert logits.shape[0] == len(rows)
        ids, bad, record = [], [], []
        for x, (key, params, seed, counter, tokens) in zip(logits, rows):
            record.append((key, seed, counter, list(tokens)))
            tok, b = device_rule(x, params, seed, counter, tokens)
            ids.append(tok)
            bad.append(b or (key.id, len(key.output)) in self.poison)
        self.calls.append(record)
        return np.asarray(ids, np.int64), np.asarray(bad, bool)


@pytest.fixture(scope="module")
def base():
    return core.load(demo_checkpoint("llama"), device="cpu")


def with_backend(model, be):
    """The model on backend `be` (same weights: numpy arrays either way)."""
    m = copy.copy(model)
    m.backend = be
    return m


def handed_over(model, prompt, params: SamplingParams, n: int) -> tuple[list, int]:
    """The solo run's tokens when the backend samples after the first token, and the device seed it draws."""
    rng = np.random.default_rng(params.seed)
    out = [sample(model.logits(prompt)[-1], params, rng, np.asarray(prompt), [], step=0)]
    seed = int(rng.integers(2**63))
    while len(out) < n:
        toks = prompt + out
        out.append(device_rule(model.logits(toks)[-1], params, seed, len(toks) - 1, toks)[0])
    return out, seed


SAMPLED = [SamplingParams(temperature=0.9, seed=1), SamplingParams(temperature=0.7, top_k=5, seed=2),
           SamplingParams(temperature=1.2, top_p=0.8, seed=3),
           SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.4, seed=4),
           SamplingParams(temperature=0.0, repetition_penalty=2.0, seed=5)]  # greedy with a penalty: device too


def prompts_for(model, count: int) -> list:
    """`count` short prompts of the demo's tokenizer."""
    texts = ["Return the number of", "def fib(n):", "Hello there", "The quick brown fox", "import numpy as np",
             "Once upon a time"]
    return [model.tokenizer.encode(t) for t in texts[:count]]


def test_sampled_rows_go_to_the_device_after_a_host_first_token(base):
    be = RowsBackend()
    model = with_backend(base, be)
    eng = model.engine()
    ps = prompts_for(model, len(SAMPLED))
    reqs = [eng.add(p, params, NEW, stop_at_eos=False) for p, params in zip(ps, SAMPLED)]
    while eng.has_work():
        eng.step()
    for p, params, r in zip(ps, SAMPLED, reqs):
        want, seed = handed_over(base, p, params, NEW)
        assert r.output == want and r.finish_reason == "length", params
        assert r.device_seed == seed
        seen = [(s, c, t) for call in be.calls for key, s, c, t in call if key is r]
        assert len(seen) == NEW - 1  # every token but the first
        for j, (s, c, toks) in enumerate(seen):
            assert s == seed and toks == p + r.output[:j + 1] and c == len(toks) - 1 == len(p) + j
    # one step of first tokens: every row copied once; after it, nothing comes to the host
    assert be.copied == [len(SAMPLED)] and be.argmax_calls == 0


def test_only_host_rows_are_copied_and_greedy_rows_stay_on_argmax(base):
    """Requests joining while others are device-sampled: their first tokens (and a min_p request, which the device
    does not implement, every token) are the only rows copied; a plain greedy request goes by argmax_rows and gets its
    solo tokens."""
    be = RowsBackend()
    model = with_backend(base, be)
    eng = model.engine()
    ps = prompts_for(model, 4)
    early = [eng.add(ps[0], SAMPLED[0], NEW, stop_at_eos=False), eng.add(ps[1], SAMPLED[3], NEW, stop_at_eos=False)]
    for _ in range(3):
        eng.step()
    assert be.copied == [2]
    greedy = eng.add(ps[2], SamplingParams(), NEW, stop_at_eos=False)
    min_p = SamplingParams(temperature=0.9, min_p=0.05, seed=9)
    host = eng.add(ps[3], min_p, NEW, stop_at_eos=False)
    copied_before = len(be.copied)
    eng.step()  # the newcomers' prefill beside two device rows: only the min_p row is copied
    assert be.copied[copied_before:] == [1] and be.argmax_calls == 1
    while eng.has_work():
        eng.step()
    assert be.copied[copied_before:] == [1] * NEW  # the min_p request, each of its tokens; never the greedy row
    for p, params, r in zip(ps, (SAMPLED[0], SAMPLED[3]), early):
        assert r.output == handed_over(base, p, params, NEW)[0]
    assert greedy.output == base.generate(ps[2], max_new_tokens=NEW, stop_at_eos=False)
    assert host.output == base.generate(ps[3], max_new_tokens=NEW, stop_at_eos=False, temperature=0.9, min_p=0.05,
                                        seed=9)
    assert greedy.device_seed is None and host.device_seed is None
    assert all(key not in (greedy, host) for call in be.calls for key, *_ in call)


def test_logprobs_rows_stay_on_the_host(base):
    be = RowsBackend()
    model = with_backend(base, be)
    eng = model.engine()
    p = prompts_for(model, 1)[0]
    r = eng.add(p, SAMPLED[1], NEW, stop_at_eos=False, num_logprobs=2)
    while eng.has_work():
        eng.step()
    assert not be.calls and r.device_seed is None
    assert [lp.token for lp in r.logprobs] == r.output == base.generate(p, max_new_tokens=NEW, stop_at_eos=False,
                                                                        temperature=0.7, top_k=5, seed=2)


def test_a_declining_backend_leaves_the_host_draws_of_a_solo_run(base):
    """sample_rows returning None (CUDA with graphs or fused kernels off): the rows are sampled on the host, and the
    seed drawn for the device is put back, so each request gets exactly its solo numpy tokens."""
    be = RowsBackend(decline=True)
    model = with_backend(base, be)
    ps = prompts_for(model, len(SAMPLED))
    got = model.generate(ps, max_new_tokens=NEW, stop_at_eos=False, temperature=[p.temperature for p in SAMPLED],
                         top_k=[p.top_k for p in SAMPLED], top_p=[p.top_p for p in SAMPLED],
                         repetition_penalty=[p.repetition_penalty for p in SAMPLED], seed=[p.seed for p in SAMPLED])
    want = [base.generate(p, max_new_tokens=NEW, stop_at_eos=False, temperature=q.temperature, top_k=q.top_k,
                          top_p=q.top_p, repetition_penalty=q.repetition_penalty, seed=q.seed)
            for p, q in zip(ps, SAMPLED)]
    assert got == want
    assert be.calls and all(c is None for c in be.calls)


def test_a_non_finite_flag_ends_its_request_with_an_error(base):
    be = RowsBackend()
    model = with_backend(base, be)
    eng = model.engine()
    ps = prompts_for(model, 3)
    reqs = [eng.add(p, params, NEW, stop_at_eos=False, request_id=f"r{i}")
            for i, (p, params) in enumerate(zip(ps, SAMPLED))]
    be.poison = {("r1", 3)}  # r1's fourth token (generation step 3) comes back flagged
    finals = []
    while eng.has_work():
        finals += [o for o in eng.step() if o.finish_reason is not None]
    bad = reqs[1]
    assert bad.finish_reason == "error" and isinstance(bad.error, NonFiniteLogitsError) and bad.error.step == 3
    assert "generation step 3" in str(bad.error) and len(bad.output) == 3
    assert bad.output == handed_over(base, ps[1], SAMPLED[1], 3)[0]
    assert [o.request.id for o in finals if o.finish_reason == "error"] == ["r1"]
    assert [o.token for o in finals if o.request is bad] == [None]
    for i in (0, 2):
        assert reqs[i].output == handed_over(base, ps[i], SAMPLED[i], NEW)[0] and reqs[i].finish_reason == "length"
    assert eng.pool.num_used == 0
