"""Checkpoint tensor names → canonical roles, driven entirely by a spec's weight rules.

`plan()` matches every tensor name against the rules, checks every shape from the headers alone, and
reports all missing, unexpected and mismatched tensors in one WeightsError before any data is read.
`Plan.load()` then reads one tensor at a time, applies the rule's transforms and hands each role to a
sink (the backend's upload).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import attrs
import numpy as np

from .checkpoint import Checkpoint, TensorInfo, read_tensor, to_float32
from .config import ModelConfig
from .errors import WeightsError
from .spec import ModelSpec, WeightRule


def expected_shape(role: str, c: ModelConfig) -> tuple[int, ...]:
    """The canonical shape of a role ([out, in] for matrices)."""
    D, I = c.hidden_size, c.intermediate_size
    table = {
        "embed": (c.vocab_size, D), "pos_embed": (c.max_position_embeddings, D), "lm_head": (c.vocab_size, D),
        "q.weight": (c.q_dim, D), "k.weight": (c.kv_dim, D), "v.weight": (c.kv_dim, D), "o.weight": (D, c.q_dim),
        "q.bias": (c.q_dim,), "k.bias": (c.kv_dim,), "v.bias": (c.kv_dim,),
        "q_norm.weight": (c.head_dim,), "k_norm.weight": (c.head_dim,),
        "gate.weight": (I, D), "up.weight": (I, D), "down.weight": (D, I), "gate.bias": (I,), "up.bias": (I,),
    }
    return table.get(role, (D,))  # norms and the remaining biases are [hidden]


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{layer\}", r"(?P<layer>0|[1-9][0-9]*)") + "$")


def condition(rule_when: str | None, c: ModelConfig) -> bool:
    """Evaluate a rule's `when` against the config (None → always)."""
    if rule_when is None:
        return True
    neg = rule_when.startswith("!")
    return bool(getattr(c, rule_when.lstrip("!"))) != neg


@attrs.frozen
class Source:
    """One checkpoint tensor feeding one rule, at one layer (None for global)."""

    info: TensorInfo
    rule: WeightRule
    layer: int | None


@attrs.define
class Match:
    """Which tensor names the rules explain, and which they do not."""

    found: dict[tuple[int, int | None], list[tuple[int, TensorInfo]]]  # (rule index, layer) → [(alt, info)]
    unexplained: list[str]
    ignored: list[str]


def match_names(spec: ModelSpec, tensors: dict[str, TensorInfo]) -> Match:
    """Match every tensor name against the spec's rules and ignore patterns."""
    rules = [[_regex(p) for p in r.patterns] for r in spec.weights]
    ignores = [_regex(p) for p in spec.ignore]
    found: dict = {}
    unexplained, ignored = [], []
    for name, info in tensors.items():
        hit = None
        for ri, alts in enumerate(rules):
            for ai, rx in enumerate(alts):
                m = rx.match(name)
                if m:
                    hit = (ri, int(m["layer"]) if "layer" in rx.groupindex else None, ai)
                    break
            if hit:
                break
        if hit:
            found.setdefault(hit[:2], []).append((hit[2], info))
        elif any(rx.match(name) for rx in ignores):
            ignored.append(name)
        else:
            unexplained.append(name)
    return Match(found, sorted(unexplained), ignored)


@attrs.define
class Plan:
    """The checked mapping from checkpoint tensors to roles, ready to load."""

    config: ModelConfig
    sources: list[Source]

    def load(self, convert: Callable[[np.ndarray, str, str], object]) -> Iterator[tuple[str, int | None, object]]:
        """Yield (role, layer, converted tensor), reading one checkpoint tensor at a time.

        convert(float32 array or raw bits, stored dtype, role) → backend tensor. Transforms are
        applied in float32 unless the tensor needs none, in which case the raw bits are passed on.
        """
        for src in self.sources:
            # One sub-generator per tensor: its frame (and the arrays in it) is gone once the tensor is handed
            # over, so a failure at the next tensor cannot keep this one alive through the traceback.
            yield from self._one(src, convert)

    def _one(self, src: Source, convert) -> Iterator[tuple[str, int | None, object]]:
        bits = read_tensor(src.info)
        rule = src.rule
        if not rule.transpose and len(rule.targets) == 1:
            yield rule.targets[0], src.layer, convert(bits, src.info.dtype, rule.targets[0])
            return
        x = to_float32(bits, src.info.dtype)
        del bits
        if rule.transpose:
            x = np.ascontiguousarray(x.T)
        parts = [x] if len(rule.targets) == 1 else np.split(x, np.cumsum([getattr(self.config, s) for s in rule.split])[:-1])
        for role, part in zip(rule.targets, parts):
            yield role, src.layer, convert(np.ascontiguousarray(part), "F32", role)


def plan(spec: ModelSpec, config: ModelConfig, ckpt: Checkpoint) -> Plan:
    """Map and shape-check every tensor; raise one WeightsError listing every problem."""
    m = match_names(spec, ckpt.tensors)
    missing, unexpected, mismatched = [], list(m.unexplained), []
    sources: list[Source] = []
    layers = range(config.num_layers)
    for ri, rule in enumerate(spec.weights):
        wanted = condition(rule.when, config)
        for layer in (layers if rule.per_layer else [None]):
            hits = sorted(m.found.pop((ri, layer), []), key=lambda h: h[0])
            if not wanted:
                if not rule.ignore_when_false:
                    unexpected += [info.name for _, info in hits]
                continue
            if not hits:
                missing.append(rule.patterns[0].replace("{layer}", str(layer)))
                continue
            info = hits[0][1]
            unexpected += [h.name for _, h in hits[1:]]  # the same tensor under two alternative names
            bad = _shape_problem(rule, info, config)
            if bad:
                mismatched.append(bad)
            sources.append(Source(info, rule, layer))
    for (ri, layer), hits in m.found.items():  # layers beyond num_hidden_layers
        unexpected += [info.name for _, info in hits]
    if missing or unexpected or mismatched:
        raise WeightsError(ckpt.path, missing, sorted(unexpected), mismatched)
    return Plan(config, sources)


def _shape_problem(rule: WeightRule, info: TensorInfo, c: ModelConfig) -> str | None:
    shape = info.shape[::-1] if rule.transpose else info.shape
    if len(rule.targets) > 1:
        sizes = [getattr(c, s) for s in rule.split]
        want = (sum(sizes),) + expected_shape(rule.targets[0], c)[1:]
    else:
        want = expected_shape(rule.targets[0], c)
    if tuple(shape) != want:
        stored = tuple(want[::-1]) if rule.transpose else want
        return f"{info.name} is {list(info.shape)}, expected {list(stored)}"
    return None
