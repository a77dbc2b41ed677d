"""Which family a checkpoint belongs to, scored across every registered plugin.

With config.json: each plugin scores 2 for a matching `architectures` entry and 1 for a matching
`model_type`. Without it: the tensor names are matched against each spec's weight rules; a spec that
misses a required layer-0 or global tensor scores 0, otherwise it earns 1 per tensor it explains under
its default config, 0.5 per tensor that only a non-default flag would explain (a Llama spec explaining
q/k/v biases via attention_bias=true), and -1 per tensor it cannot explain.
The highest score wins; no positive score or a tie is an error that lists the candidates.
"""

from __future__ import annotations

import attrs

from .checkpoint import Checkpoint
from .errors import AmbiguousArchitectureError, UnknownArchitectureError
from .registry import Registry
from .spec import ConfigKey, ModelSpec
from .weights import match_names


@attrs.frozen
class Detected:
    """The winning family, its score, how it was scored, and every plugin's score."""

    name: str
    score: float
    method: str  # "config.json" or "tensor names"
    scores: dict


def score_config(spec: ModelSpec, config: dict) -> float:
    """2 for a matching architectures entry, 1 for a matching model_type."""
    archs = config.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    return 2.0 * any(a in spec.detection.architectures for a in archs) + 1.0 * (config.get("model_type") in spec.detection.model_types)


def score_tensors(spec: ModelSpec, tensors: dict) -> float:
    """Score tensor names alone against the spec's weight rules (see the module docstring)."""
    m = match_names(spec, {n: t for n, t in tensors.items()})
    defaults = {k.field: k.default for k in spec.config if isinstance(k, ConfigKey)}
    score = -float(len(m.unexplained))
    for ri, rule in enumerate(spec.weights):
        hit = (ri, 0 if rule.per_layer else None)
        present = hit in m.found
        flag_default = True
        if rule.when is not None:
            v = defaults.get(rule.when.lstrip("!"), False)
            flag_default = bool(v is True) != rule.when.startswith("!")
        if not present:
            alternative = any(set(other.targets) & set(rule.targets) for other in spec.weights if other is not rule)
            if rule.when is None and not alternative:
                return 0.0  # a tensor this family always has is absent (not merely laid out another way)
            continue
        score += 1.0 if flag_default or rule.ignore_when_false else 0.5
    return max(score, 0.0)


def detect(ckpt: Checkpoint, registry: Registry) -> Detected:
    """Pick the family for `ckpt`; raises UnknownArchitectureError or AmbiguousArchitectureError."""
    if ckpt.config is not None:
        method = "config.json"
        scores = {name: score_config(registry[name].spec, ckpt.config) for name in registry}
        what = f"architectures={ckpt.config.get('architectures')!r}, model_type={ckpt.config.get('model_type')!r}"
    else:
        method = "tensor names"
        scores = {name: score_tensors(registry[name].spec, ckpt.tensors) for name in registry}
        what = f"{len(ckpt.tensors)} tensor names"
    best = max(scores.values(), default=0.0)
    winners = sorted(n for n, s in scores.items() if s == best and s > 0)
    ranked = ", ".join(f"{n}={s:g}" for n, s in sorted(scores.items(), key=lambda kv: -kv[1]))
    broken = registry.broken_hint()
    if not winners:
        raise UnknownArchitectureError(
            f"{ckpt.path}: no registered architecture matches ({what}, by {method}); candidates: {ranked or 'none'}{broken}")
    if len(winners) > 1:
        raise AmbiguousArchitectureError(
            f"{ckpt.path}: ambiguous architecture, {' and '.join(winners)} match equally ({what}, by {method}; "
            f"scores: {ranked}); pass arch= to choose{broken}")
    return Detected(winners[0], best, method, scores)
