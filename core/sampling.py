"""Sampling: logits of the last position → next token id (numpy reference, float32/64 on the host).

Order as in transformers: repetition penalty (then presence / frequency penalty), temperature, top-k, top-p,
min-p. temperature == 0 is greedy.
"""

from __future__ import annotations

import math

import attrs
import numpy as np

from .errors import GenerationError, NonFiniteLogitsError, brief


# Bounds that keep every division and exponent finite in float64 (a temperature of 1e-320 divides logits into
# inf; a penalty of 1e-300 does the same), with room to spare on both sides of any value anyone uses.
TEMPERATURE_RANGE = (1e-4, 1e4)
PENALTY_RANGE = (1e-2, 1e2)


@attrs.frozen
class SamplingParams:
    """How to pick each token; `validate()` raises GenerationError for values out of range.

    Order as in transformers: repetition penalty, presence / frequency penalty (OpenAI's, over the generated
    tokens), temperature, top-k, top-p, min-p. temperature == 0 is greedy (the penalties still apply).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> "SamplingParams":
        """Return self, or raise GenerationError naming the parameter and its valid range."""
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        lo, hi = TEMPERATURE_RANGE
        if not _num(t) or not (t == 0 or lo <= _float(t) <= hi):
            raise GenerationError(f"temperature={brief(t, 40)} must be 0 (greedy) or a number in [{lo:g}, {hi:g}]")
        if k is not None and (not _int(k) or k < 0):
            raise GenerationError(f"top_k={brief(k, 40)} must be an integer >= 0 (0 or None = off)")
        if p is not None and (not _num(p) or not 0 < _float(p) <= 1):
            raise GenerationError(f"top_p={brief(p, 40)} must be in (0, 1]")
        if self.min_p is not None and (not _num(self.min_p) or not 0 <= _float(self.min_p) <= 1):
            raise GenerationError(f"min_p={brief(self.min_p, 40)} must be in [0, 1] (0 or None = off)")
        lo, hi = PENALTY_RANGE
        if not _num(r) or not lo <= _float(r) <= hi:
            raise GenerationError(f"repetition_penalty={brief(r, 40)} must be a number in [{lo:g}, {hi:g}] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _num(v) or not -2 <= _float(v) <= 2:
                raise GenerationError(f"{name}={brief(v, 40)} must be a number in [-2, 2] (0 = off), as in OpenAI's API")
        if self.seed is not None and (not _int(self.seed) or not 0 <= self.seed < 2 ** 64):
            raise GenerationError(f"seed={brief(self.seed, 40)} must be an integer in [0, 2**64)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processors_only_repetition(self) -> bool:
        """True when nothing beyond what the GPU sampler implements is asked (temperature, top-k, top-p, the
        repetition penalty): no min-p, no presence or frequency penalty."""
        return (self.min_p in (None, 0)) and self.presence_penalty == 0 and self.frequency_penalty == 0


@attrs.frozen
class TokenLogprob:
    """A generated token with its log-probability and the `top` most likely alternatives ((id, logprob) pairs,
    most likely first) under the model's distribution at that step (log-softmax of the raw logits, before any
    penalty, temperature or filtering — what vLLM returns by default)."""

    token: int
    logprob: float
    top: tuple = ()


def _num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _float(x) -> float:
    """x as a float; an int too large for a float is inf (so that a range check refuses it, not OverflowError)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def check_finite(logits: np.ndarray, step: int | None = None) -> None:
    """Raise NonFiniteLogitsError when logits hold NaN or ±inf (overflowed or corrupt weights): otherwise greedy
    would silently pick token 0 and sampling would fail inside numpy."""
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).sum())
        nan = int(np.isnan(logits).sum())
        where = f" at generation step {step}" if step is not None else ""
        raise NonFiniteLogitsError(f"non-finite logits{where}: {bad} of {logits.size} entries are NaN or inf "
                                   f"({nan} NaN); the weights or the activations overflowed", step)


def logprobs(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The TokenLogprob of `token` with the k most likely alternatives, from raw logits [V] (float64 log-softmax)."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    top = ()
    if k:
        k = min(k, x.size)
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.lexsort((idx, -x[idx]))]  # most likely first, ties by id
        top = tuple((int(i), float(x[i] - lse)) for i in idx)
    return TokenLogprob(int(token), float(x[token] - lse), top)


def apply_penalties(logits: np.ndarray, params: SamplingParams, seen: np.ndarray, generated=None) -> np.ndarray:
    """Repetition penalty over `seen` (prompt + generated), then OpenAI's presence and frequency penalties over
    `generated` (the new tokens only, as vLLM applies them)."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated is not None and len(generated):
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        logits = logits.astype(np.float32, copy=True)
        logits[ids] -= np.float32(params.presence_penalty) + np.float32(params.frequency_penalty) * counts
    return logits


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' rule: for each seen token, logit / penalty if positive else logit * penalty."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    idx = np.unique(seen)
    sel = out[idx]
    out[idx] = np.where(sel > 0, sel / penalty, sel * penalty)
    return out


def warp(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p: float64 logits with the dropped tokens at -inf."""
    x = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    if params.top_p is not None and params.top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        before = np.cumsum(p) - p  # mass strictly before each token; keep while that is < top_p
        drop = order[before >= params.top_p]
        x[drop] = -np.inf
    if params.min_p:  # transformers' MinPLogitsWarper: drop tokens below min_p times the top token's probability
        x = np.where(x - x.max() < math.log(params.min_p), -np.inf, x)
    return x


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray,
           generated=None, step: int | None = None) -> int:
    """Pick the next token id from logits [V] given the ids seen so far (prompt + generated) and the generated
    ones alone (for the presence / frequency penalties). Raises NonFiniteLogitsError naming `step` on NaN/inf."""
    check_finite(logits, step)
    logits = apply_penalties(logits, params, seen, generated)
    if params.greedy:
        return int(np.argmax(logits))
    x = warp(logits, params)
    p = np.exp(x - x.max())
    p /= p.sum()
    return int(rng.choice(p.size, p=p))
