"""Sampling: logits of the last position → next token id (numpy reference, float32/64 on the host).

Order as in transformers: repetition penalty, temperature, top-k, top-p. temperature == 0 is greedy.
"""

from __future__ import annotations

import math

import attrs
import numpy as np

from .errors import GenerationError


@attrs.frozen
class SamplingParams:
    """How to pick each token; `validate()` raises GenerationError for values out of range."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        """Return self, or raise GenerationError naming the parameter and its valid range."""
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not _num(t) or t < 0 or not math.isfinite(t):
            raise GenerationError(f"temperature={t!r} must be a finite number >= 0 (0 = greedy)")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise GenerationError(f"top_k={k!r} must be an integer >= 0 (0 or None = off)")
        if p is not None and (not _num(p) or not 0 < p <= 1):
            raise GenerationError(f"top_p={p!r} must be in (0, 1]")
        if not _num(r) or r <= 0 or not math.isfinite(r):
            raise GenerationError(f"repetition_penalty={r!r} must be a finite number > 0 (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise GenerationError(f"seed={self.seed!r} must be a non-negative integer")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
    """Temperature, then top-k, then top-p: float64 logits with the dropped tokens at -inf."""
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
    return x


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray) -> int:
    """Pick the next token id from logits [V] given the ids seen so far (prompt + generated)."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    x = warp(logits, params)
    p = np.exp(x - x.max())
    p /= p.sum()
    return int(rng.choice(p.size, p=p))
