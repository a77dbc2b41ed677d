"""The engine's data: EngineConfig (its limits), Request (one request and its engine state) and StepOutput (what a
step produced for a request). core/engine.py runs them; core.engine re-exports all three.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs
import numpy as np

from .errors import GenerationError
from .sampling import SamplingParams

FINISH_REASONS = ("length", "stop", "abort", "error")


@attrs.frozen
class EngineConfig:
    """Sizes of the engine: KV blocks (`num_blocks` of `block_size` positions; None = enough for
    `kv_tokens` positions), the token budget of one step, how many requests run at once, and how many may
    wait (add() raises QueueFullError beyond it)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_tokens: int | None = None  # None: 4 x the model's context, at least 8,192 positions
    max_batch_tokens: int = 512
    max_running: int = 64
    max_waiting: int = 1024
    prefix_caching: bool = True

    def blocks_for(self, context: int, backend_tokens: int | None = None) -> int:
        """num_blocks, or the blocks that hold kv_tokens positions; by default what the backend offers
        (`backend_tokens`: the CUDA backend sizes it to the free GPU memory), else 4 contexts, at least 8,192."""
        if self.num_blocks is not None:
            return self.num_blocks
        tokens = self.kv_tokens
        if tokens is None:
            tokens = backend_tokens if backend_tokens is not None else max(4 * context, 8192)
        return -(-tokens // self.block_size)

    def validate(self) -> "EngineConfig":
        """Return self, or raise GenerationError naming the field that is out of range."""
        for name in ("block_size", "max_batch_tokens", "max_running", "max_waiting"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GenerationError(f"engine {name}={v!r} must be an integer >= 1")
        for name in ("num_blocks", "kv_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise GenerationError(f"engine {name}={v!r} must be an integer >= 1 (or None)")
        return self


@attrs.define(eq=False)
class Request:
    """One generation: its prompt ids, parameters, and — as the engine runs it — its tokens and state.

    `output` is the generated ids; `logprobs` one core.sampling.TokenLogprob per output token when asked for.
    `finish_reason` is None while it runs, then "length" (max_new_tokens), "stop" (EOS id or stop string),
    "abort" (cancelled) or "error" (`error` holds the exception).
    """

    id: str
    prompt: list
    params: SamplingParams
    max_new_tokens: int
    stops: tuple = ()
    stop_at_eos: bool = True
    num_logprobs: int | None = None
    callback: Callable | None = None  # called (on the engine's thread) with each StepOutput of this request
    arrival: float = attrs.field(factory=time.monotonic)
    output: list = attrs.field(factory=list)
    logprobs: list = attrs.field(factory=list)
    finish_reason: str | None = None
    error: Exception | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (at the last admission)
    preemptions: int = 0
    # engine state
    blocks: list = attrs.field(factory=list)
    keys: list = attrs.field(factory=list)  # content keys of the leading full blocks
    computed: int = 0  # tokens whose keys and values are in the cache
    rng: np.random.Generator | None = None
    device_seed: int | None = None  # keys the backend's draws (sample_rows) after the first token; drawn from rng
    text: str = ""
    decoder: object = None

    @property
    def tokens(self) -> list:
        """Prompt then output ids (what the cache holds, plus the last token, not yet computed)."""
        return self.prompt + self.output

    @property
    def length(self) -> int:
        """len(tokens), without building the list (the scheduler asks every step for every request)."""
        return len(self.prompt) + len(self.output)

    def token_slice(self, a: int, b: int) -> list:
        """tokens[a:b] (0 <= a <= b), without building the whole list: a decode step needs one id."""
        P = len(self.prompt)
        if a >= P:
            return self.output[a - P:b - P]
        return self.prompt[a:b] + (self.output[:b - P] if b > P else [])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@attrs.frozen
class StepOutput:
    """What one step produced for one request: a new token (None when it ended without one: abort, error)
    and, on its last output, the finish reason."""

    request: Request
    token: int | None
    logprob: object = None
    finish_reason: str | None = None
