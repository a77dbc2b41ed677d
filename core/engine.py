"""The engine: many requests on one model at once, batched step by step over a paged KV cache.

Shared by `Model.generate` / `Model.stream` for a list of prompts and by `archkit serve`. Each `step()`:

1. schedules: requests already running first (one decode token each, or the next chunk of a prompt), then
   waiting requests in arrival order while the step's token budget, the running limit and free KV blocks
   allow (iteration-level batching: requests join and leave between any two steps). A prompt longer than
   the budget is prefilled in chunks, alongside other requests' decode tokens. A new request first looks its
   prompt up in the prefix cache (core/paged.py) and computes only what is not there.
2. runs one forward over every scheduled row (core.forward.forward with a core.paged.Batch);
3. samples one token for each request whose tokens are all computed, with that request's own parameters
   and random generator, so a request's tokens do not depend on what else ran beside it. Where the backend
   can, the ids are picked where the logits are (plain greedy rows by argmax_rows; sampled rows after their
   first token by sample_rows, as the solo run hands its sampling to the device), and only the rows sampled on
   the host are copied to it.

When a running request needs a block and none is free, the newest running request is preempted: its
blocks are released and it goes back to the head of the queue, to be recomputed (prompt and the tokens
generated so far; the prefix cache usually still holds most of it). Requests are never dropped.

Not thread-safe: one thread calls add/abort/step (core/serve.py runs it in its own thread).
"""

from __future__ import annotations

import collections
import itertools
import time
import numpy as np

from .errors import ContextOverflowError, GenerationError, NonFiniteLogitsError, QueueFullError, TokenizerError
from .forward import forward
from .paged import Batch, BlockPool, Segment, block_hash
from .engine_types import FINISH_REASONS, EngineConfig, Request, StepOutput  # noqa: F401  (core.engine's surface)
from .sampling import SamplingParams, check_finite, logprobs as token_logprobs, sample

def _plain_greedy(r: Request) -> bool:
    """Whether r's next token is the argmax of its raw logits (nothing else read from them)."""
    p = r.params
    return (p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and r.num_logprobs is None)


def _device_sampled(r: Request) -> bool:
    """Whether a backend's sample_rows may pick r's next token: sampled (not plain greedy) with only what the GPU
    sampler implements, no logprobs, and not r's first token, which the host samples with r.rng before handing
    over (the solo run's rule: core/model.py _generate, decode_ids)."""
    p = r.params
    return (bool(r.output) and p.processors_only_repetition and r.num_logprobs is None
            and not (p.greedy and p.repetition_penalty == 1.0))


def _finite_error(row: np.ndarray | None, step: int) -> NonFiniteLogitsError:
    """The NonFiniteLogitsError of a row found non-finite (check_finite's, with counts, where the row is here)."""
    if row is not None:
        try:
            check_finite(row, step)
        except NonFiniteLogitsError as e:
            return e
    return NonFiniteLogitsError(f"non-finite logits at generation step {step}: NaN or +inf among them, or all of them "
                                f"-inf; the weights or the activations overflowed", step)


class Engine:
    """Continuous batching of requests on a loaded Model (any backend with new_paged_cache: numpy, CUDA).

    >>> eng = Engine(model)                                          # doctest: +SKIP
    >>> r = eng.add([1, 2, 3], SamplingParams(), max_new_tokens=8)   # doctest: +SKIP
    >>> while eng.has_work(): eng.step()                             # doctest: +SKIP
    >>> r.output                                                     # doctest: +SKIP
    """

    def __init__(self, model, config: EngineConfig | None = None):
        self.model, self.config = model, (config or EngineConfig()).validate()
        be = model.backend
        if not hasattr(be, "new_paged_cache"):
            raise GenerationError(f"the {be.name} backend does not run batched generation (no paged KV cache); "
                                  f"load the model with device='cpu' for it")
        c = model.config
        # With a length-dependent rope (dynamic NTK, longrope) a position's cached key depends on the length of
        # the sequence when it was computed, so another request's blocks are not its own: no prefix caching.
        # (A preempted request is recomputed with the table of its current length, as transformers' dynamic
        # rope does on a fresh forward.)
        self.length_dependent_rope = c.rope is not None and c.rope.dynamic
        offer = getattr(be, "paged_kv_tokens", None)
        offered = offer(c, self.config.block_size) if offer is not None and self.config.num_blocks is None \
            and self.config.kv_tokens is None else None
        self.pool = BlockPool(self.config.blocks_for(c.context_limit, offered), self.config.block_size,
                              self.config.prefix_caching and not self.length_dependent_rope)
        self.cache = be.new_paged_cache(c, self.pool.num_blocks, self.config.block_size)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens_computed = 0
        self.preemptions = 0
        self._failed: list[Request] = []  # requests whose callback raised: aborted at the end of the step

    # -- requests ------------------------------------------------------------------------------------
    def add(self, prompt, params: SamplingParams, max_new_tokens: int, stops=(), stop_at_eos: bool = True,
            num_logprobs: int | None = None, callback=None, request_id: str | None = None,
            arrival: float | None = None) -> Request:
        """Queue a request (prompt: token ids; arrival: its time.monotonic() arrival, default now). Raises
        GenerationError / ContextOverflowError for what can never run (bad ids, too long for the context or for
        the whole KV pool) and QueueFullError when the queue is full.

        `callback(StepOutput)` runs on the engine's thread; if it raises, the request is aborted (its error
        kept in Request.error) and the engine goes on."""
        m = self.model
        ids = [int(t) for t in m._check_ids(prompt)]
        params = params.validate()
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        self.check(ids, max_new_tokens)
        if num_logprobs is not None and (not isinstance(num_logprobs, int) or isinstance(num_logprobs, bool)
                                         or not 0 <= num_logprobs <= 20):
            raise GenerationError(f"logprobs={num_logprobs!r} must be an integer in [0, 20]")
        stops = (stops,) if isinstance(stops, str) else tuple(stops or ())  # a str is one stop string
        if any(not isinstance(s, str) for s in stops):
            raise GenerationError(f"stop strings must be str, got {stops!r:.80}")
        stops = tuple(s for s in stops if s)
        if stops and m.tokenizer is None:
            raise TokenizerError(f"{m.path}: stop strings need tokenizer.json, which this checkpoint lacks")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the engine's queue is full ({self.config.max_waiting} requests waiting)")
        r = Request(request_id or f"req-{next(self._ids)}", ids, params, max_new_tokens, stops, stop_at_eos,
                    num_logprobs, callback)
        if arrival is not None:
            r.arrival = arrival
        r.rng = np.random.default_rng(params.seed)  # as a solo run: its own generator from its own seed
        r.decoder = m.tokenizer.stream() if stops else None
        if max_new_tokens == 0:
            self._finish(r, "length")
            return r
        self.waiting.append(r)
        return r

    def check(self, ids, max_new_tokens: int, what: str = "") -> None:
        """ContextOverflowError when a prompt of len(ids) plus max_new_tokens exceeds the model's context or the
        whole KV pool (so it could never run); `what` prefixes the message (which prompt)."""
        self.model._check_context(len(ids) + max_new_tokens,
                                  f"{what}a prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens}")
        need = -(-(len(ids) + max_new_tokens) // self.pool.block_size)
        if max_new_tokens and need > self.pool.num_blocks:
            raise ContextOverflowError(
                f"{what}a prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} needs {need} KV blocks of "
                f"{self.pool.block_size} positions; the engine's pool has {self.pool.num_blocks}")

    def abort(self, request: Request) -> None:
        """Cancel a request (waiting or running): its blocks are freed; its callback gets finish_reason 'abort'."""
        if request.finished:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        self._finish(request, "abort")

    def has_work(self) -> bool:
        """True while a request waits or runs."""
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedule, run one batched forward, sample; returns what each request produced this step."""
        scheduled = self._schedule()
        if not scheduled:
            return []
        groups, ids, row = [], [], 0
        for r, n in scheduled:
            segs = self._segments(r, n, row)
            groups.append(segs)
            ids.extend(r.token_slice(r.computed, r.computed + n))
            row += n
        batch = Batch([g for segs in groups for g in segs], self.pool.block_size)
        m = self.model
        with m.backend.session():
            ids = np.asarray(ids, dtype=np.int64)
            replay = getattr(m.backend, "batch_step", None)  # a backend's graphs of decode-only steps (CUDA)
            logits = replay(forward, m.weights, m.config, ids, self.cache, batch, m.config.rope) if replay else None
            if logits is None:
                logits = forward(m.backend, m.weights, m.config, ids, self.cache, batch, m.config.rope,
                                 all_logits=False, host=False)
            picks, host = self._pick(logits, [r for (r, _), segs in zip(scheduled, groups) if segs[-1].logits])
        self.steps += 1
        outputs, k = [], 0
        for (r, n), segs in zip(scheduled, groups):
            wants = segs[-1].logits
            if r.finished:  # aborted during this step (by another request's callback): nothing of it is kept
                k += wants
                continue
            if r.computed < len(r.prompt):
                self.prompt_tokens_computed += min(n, len(r.prompt) - r.computed)
            r.computed += n
            self._remember_full_blocks(r)
            if wants:
                outputs.append(self._sample(r, host[k]) if picks[k] is None else self._picked(r, *picks[k], host[k]))
                k += 1
        failed, self._failed = self._failed, []
        for r in failed:
            r.callback = None  # it already failed once: the abort is not reported to it again
            self.abort(r)
        return outputs

    def _segments(self, r: Request, n: int, row: int) -> list[Segment]:
        """The batch segments of r's n tokens this step (logits on the last, if it completes r's tokens).

        One segment, except when a request with a length-dependent rope is recomputed after preemption: its
        solo run computed the prompt with the prompt-length table and each generated position with the table of
        its own length, so the recompute is cut the same way (a segment for the prompt, one per generated
        token; each segment's table follows its own end) and gives the solo run's keys and logits back."""
        done = r.computed + n == r.length
        if not self.length_dependent_rope or r.computed >= len(r.prompt) or n <= len(r.prompt) - r.computed:
            return [Segment(row, n, r.computed, r.blocks, logits=done)]
        head = len(r.prompt) - r.computed
        segs = [Segment(row, head, r.computed, r.blocks, logits=False)]
        segs += [Segment(row + head + j, 1, len(r.prompt) + j, r.blocks, logits=False) for j in range(n - head)]
        segs[-1].logits = done
        return segs

    def _pick(self, logits, rows: list[Request]) -> tuple[list, list]:
        """For the rows that want a token (in logits order): per row (id, non-finite?) when picked where the logits
        are, else None (sampled on the host); and per row its logits on the host, or None where they stayed put.

        Plain greedy rows: backend.argmax_rows (on the GPU only 8 bytes a row come back), unless the backend has no
        sample_rows and other rows need the host anyway (numpy: one copy, as before). Rows _device_sampled allows:
        the backend's sample_rows, all in one call, where it has one and does not decline. Every other row on the
        host: only those rows are copied."""
        be, n = self.model.backend, len(rows)
        picks, host = [None] * n, [None] * n
        device = hasattr(be, "sample_rows")
        dev = [k for k, r in enumerate(rows) if _device_sampled(r)] if device else []
        got = self._device_picks(logits, [rows[k] for k in dev], dev, n) if dev else None
        for k, p in zip(dev, got or ()):
            picks[k] = p
        greedy = [k for k, r in enumerate(rows) if _plain_greedy(r)]
        rest = [k for k in range(n) if picks[k] is None and not _plain_greedy(rows[k])]
        if greedy and (device or not rest):
            ids, bad = be.argmax_rows(logits)
            for k in greedy:
                picks[k] = (int(ids[k]), bool(bad[k]))
        else:
            rest = [k for k in range(n) if picks[k] is None]
        if rest or not n:  # all rows in one copy, else just the host's; with none, to_host still waits for the step
            for k, row in zip(rest, be.to_host(logits if len(rest) == n else be.rows(logits, rest))):
                host[k] = row
        if isinstance(logits, np.ndarray):  # already on the host: the rows name their counts in an error
            host = [logits[k] if h is None else h for k, h in enumerate(host)]
        return picks, host

    def _device_picks(self, logits, rows: list[Request], idx: list[int], n: int) -> list | None:
        """[(id, non-finite?)] of the requests `rows` (logits rows idx of n) from backend.sample_rows, or None when
        it declines. A request's device seed is the next draw of r.rng after its first token (drawn here, at its
        first device pick, which is the step right after), as the solo run draws it when it hands sampling over; on
        a decline the generators are put back, so the host goes on with the draws a solo run on the host makes."""
        be = self.model.backend
        fresh = [r for r in rows if r.device_seed is None]
        saved = [r.rng.bit_generator.state for r in fresh]
        for r in fresh:
            r.device_seed = int(r.rng.integers(2**63))
        # (key: the request itself, which the backend's slots may hold until reused; params; seed; counter: the
        # position of the token fed this step; every token seen so far)
        specs = [(r, r.params, r.device_seed, r.length - 1, r.tokens) for r in rows]
        got = be.sample_rows(logits if len(idx) == n else be.rows(logits, idx), specs, self.model.config.rope)
        if got is None:
            for r, state in zip(fresh, saved):
                r.rng.bit_generator.state = state
                r.device_seed = None
            return None
        return list(zip(got[0].tolist(), got[1].tolist()))

    def _picked(self, r: Request, tok: int, bad: bool, row: np.ndarray | None) -> StepOutput:
        """_sample for a row whose id was picked where the logits are (_pick); `row`: its logits when they are on the
        host (for the error's counts)."""
        if bad:
            step = len(r.output)
            r.error = _finite_error(row, step)
            self.running.remove(r)
            return self._finish(r, "error")
        return self._sample(r, None, tok)

    def _sample(self, r: Request, logits: np.ndarray | None, tok: int | None = None) -> StepOutput:
        step = len(r.output)
        if tok is None:
            try:
                tok = sample(logits, r.params, r.rng, np.asarray(r.tokens), r.output, step=step)
            except NonFiniteLogitsError as e:
                r.error = e
                self.running.remove(r)
                return self._finish(r, "error")
        lp = token_logprobs(logits, tok, r.num_logprobs) if r.num_logprobs is not None else None
        r.output.append(tok)
        if lp is not None:
            r.logprobs.append(lp)
        if r.first_token_time is None:
            r.first_token_time = time.monotonic()
        self.tokens_generated += 1
        reason = None
        if r.stop_at_eos and tok in self.model.eos_token_ids:
            reason = "stop"
        elif r.decoder is not None:
            delta = r.decoder.push(tok)
            r.text += delta
            # as the solo loop: a new match ends inside the delta, however long the delta
            if delta and any(s in r.text[-(len(s) - 1 + len(delta)):] for s in r.stops):
                reason = "stop"
        if reason is None and len(r.output) >= r.max_new_tokens:
            reason = "length"
        if reason is not None:
            self.running.remove(r)
            return self._finish(r, reason, tok, lp)
        out = StepOutput(r, tok, lp)
        self._emit(r, out)
        return out

    def _finish(self, r: Request, reason: str, tok=None, lp=None) -> StepOutput:
        self.pool.release(r.blocks)
        r.blocks, r.keys = [], []
        r.finish_reason, r.finish_time = reason, time.monotonic()
        out = StepOutput(r, tok, lp, reason)
        self._emit(r, out)
        return out

    def _emit(self, r: Request, out: StepOutput) -> None:
        """Hand `out` to the request's callback; a callback that raises aborts its request (after this step),
        never the engine."""
        if r.callback is None:
            return
        try:
            r.callback(out)
        except Exception as e:  # noqa: BLE001 - a consumer's bug must not stop every other request
            r.error = r.error or e
            if not r.finished:
                self._failed.append(r)

    # -- scheduling ----------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Request, int]]:
        budget, out = self.config.max_batch_tokens, []
        bs = self.pool.block_size
        whole = self.length_dependent_rope
        gone = set()  # ids of requests preempted in this loop (a set: `in self.running` would be O(running))
        for r in sorted(self.running, key=lambda q: q.arrival):  # oldest first; the newest is preempted first
            if id(r) in gone:
                continue  # preempted below for an older request
            n = self._chunk(r, budget, whole, bool(out))
            if n == 0:
                continue
            need = -(-(r.computed + n) // bs) - len(r.blocks)
            while need > self.pool.num_free:
                others = [v for v in self.running if v is not r and all(v is not s for s, _ in out)]
                victim = max(others, key=lambda v: v.arrival) if others else r
                self._preempt(victim)
                gone.add(id(victim))
                if victim is r:
                    break
            if r.finished or id(r) in gone:
                continue
            r.blocks += self.pool.allocate(need)
            out.append((r, n))
            budget -= n
        # Keys of the next block each prompt in prefill is computing: a waiting request whose first uncached block
        # is one of them (the n choices of one prompt, many users of one system prompt arriving together) waits
        # for it to be cached instead of computing the same block again beside it.
        filling = {self._next_key(q) for q in self.running if q.computed < len(q.prompt)} - {None}
        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            r = self.waiting[0]
            if not r.blocks:
                r.blocks, r.keys = self.pool.match(r.tokens, count=False)
                r.computed = len(r.blocks) * bs
            key = self._next_key(r)
            if key is not None and key in filling:
                self._unmatch(r)
                skipped.append(self.waiting.popleft())
                continue
            n = self._chunk(r, budget, whole, bool(out))
            need = -(-(r.computed + n) // bs) - len(r.blocks)
            if n == 0 or need > self.pool.num_free:
                self._unmatch(r)  # give the matched blocks back (they stay cached) rather than hold them waiting
                break
            self.waiting.popleft()
            r.cached_tokens = min(r.computed, len(r.prompt))
            self.pool.queries += (len(r.tokens) - 1) // bs if self.pool.prefix_caching else 0
            self.pool.hits += len(r.blocks)
            r.blocks += self.pool.allocate(need)
            self.running.append(r)
            out.append((r, n))
            budget -= n
            if key is not None and r.computed < len(r.prompt):
                filling.add(key)
        self.waiting.extendleft(reversed(skipped))  # back at the head, in their order
        return out

    def _unmatch(self, r: Request) -> None:
        """Give back the prefix-cache blocks a waiting request had matched (they stay cached)."""
        self.pool.release(r.blocks)
        r.blocks, r.keys, r.computed = [], [], 0

    def _next_key(self, r: Request) -> bytes | None:
        """Content key of r's next full block not yet in the cache (None when none lies before its last token)."""
        bs, j = self.pool.block_size, len(r.keys)
        if not self.pool.prefix_caching or (j + 1) * bs > r.length - 1:
            return None
        return block_hash(r.keys[-1] if r.keys else None, r.token_slice(j * bs, (j + 1) * bs))

    @staticmethod
    def _chunk(r: Request, budget: int, whole: bool, others: bool) -> int:
        """Tokens of r to compute this step: what is left, cut to the budget. With a length-dependent rope
        (dynamic NTK) a prompt is never cut, so its table is the one a solo run uses; it then runs alone if it
        exceeds the budget."""
        left = r.length - r.computed
        if not whole or left <= budget:
            return min(left, budget)
        return 0 if others else left

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self.pool.release(r.blocks)
        r.blocks, r.keys, r.computed = [], [], 0
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def _remember_full_blocks(self, r: Request) -> None:
        bs, toks = self.pool.block_size, None
        while (len(r.keys) + 1) * bs <= r.computed:
            j = len(r.keys)
            toks = r.tokens if toks is None else toks
            key = block_hash(r.keys[-1] if r.keys else None, toks[j * bs:(j + 1) * bs])
            self.pool.remember(r.blocks[j], key)
            r.keys.append(key)

    # -- introspection -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters for /metrics: queue depth, running, KV blocks, tokens, preemptions, prefix-cache hits."""
        p = self.pool
        return {"waiting": len(self.waiting), "running": len(self.running), "kv_blocks_total": p.num_blocks,
                "kv_blocks_used": p.num_used, "kv_blocks_cached": p.num_cached, "steps": self.steps,
                "tokens_generated": self.tokens_generated, "prompt_tokens_computed": self.prompt_tokens_computed,
                "preemptions": self.preemptions, "prefix_cache_queries": p.queries, "prefix_cache_hits": p.hits}


__all__ = ["Engine", "EngineConfig", "Request", "StepOutput", "QueueFullError", "FINISH_REASONS"]
