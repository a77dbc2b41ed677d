"""ModelSpec: a model family described as data.

A plugin registers one frozen ModelSpec per family. The runtime reads only the spec and the
checkpoint; it never asks which family it is running.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

API_VERSION = 1  # bump when a spec field changes meaning; the host rejects specs of another version

REQUIRED = attrs.make_class("Required", [], repr=False)()  # sentinel: config key has no default


@attrs.frozen
class Derived:
    """A config default computed from another field: value(field) * mul // value(div)."""

    field: str
    mul: int = 1
    div: str | None = None


@attrs.frozen
class ConfigKey:
    """Where one ModelConfig field comes from in config.json.

    keys are alternatives, first present wins (GPT-2's "n_positions" vs older "n_ctx").
    A JSON null counts as absent (GPT-2 writes "n_inner": null meaning 4 * n_embd), unless
    null_is_value: then null is the value None, an explicit "off" (Mistral's "sliding_window": null),
    and only a missing key takes the default.
    """

    field: str
    keys: tuple[str, ...] = ()
    default: Any = REQUIRED
    null_is_value: bool = False


@attrs.frozen
class WeightRule:
    """One checkpoint tensor mapped to one or more canonical roles.

    patterns are alternatives (the first found wins); a per-layer tensor has "{layer}" in its patterns.
    transpose: the checkpoint stores [in, out] (HF GPT-2 Conv1D); roles are always [out, in].
    split: a fused tensor cut along dim 0 (after transpose) into len(targets) parts whose sizes are the
    named ModelConfig fields ("q_dim", "kv_dim", "intermediate_size", ...).
    when: a boolean ModelConfig field ("!" negates) under which the tensor exists at all.
    ignore_when_false: when the condition is false the tensor may still be present and is ignored
    (tied checkpoints that carry a copy of the embedding as lm_head).
    """

    targets: tuple[str, ...]
    patterns: tuple[str, ...]
    transpose: bool = False
    split: tuple[str, ...] = ()
    when: str | None = None
    ignore_when_false: bool = False

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.patterns[0]


def W(targets: str | tuple[str, ...], *patterns: str, **kw) -> WeightRule:
    """Shorthand for WeightRule: W("o.weight", "model.layers.{layer}.self_attn.o_proj.weight")."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    return WeightRule(targets=targets, patterns=tuple(patterns), **kw)


@attrs.frozen
class Detection:
    """How a plugin recognises a checkpoint.

    From config.json: an `architectures` entry scores 2, `model_type` scores 1. Without config.json
    the tensor names are scored against the spec's weight rules (see core.detect).
    """

    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()


NORMS = ("layernorm", "rmsnorm")
MLPS = ("gated", "plain")
POSITIONS = ("rope", "learned")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "silu", "relu")
ROPE_STYLES = ("half",)  # rotate_half (GPT-NeoX / HF Llama); interleaved (GPT-J) is not implemented

# Canonical tensor roles the runtime knows. Global roles, then per-layer roles.
GLOBAL_ROLES = ("embed", "pos_embed", "final_norm.weight", "final_norm.bias", "lm_head")
LAYER_ROLES = (
    "attn_norm.weight", "attn_norm.bias",
    "q.weight", "k.weight", "v.weight", "q.bias", "k.bias", "v.bias",
    "o.weight", "o.bias", "q_norm.weight", "k_norm.weight",
    "mlp_norm.weight", "mlp_norm.bias",
    "post_attn_norm.weight", "post_mlp_norm.weight",  # a sublayer's output normed before the residual add (Gemma 2)
    "gate.weight", "up.weight", "down.weight", "gate.bias", "up.bias", "down.bias",
)


@attrs.frozen
class ModelSpec:
    """A model family, as data: names, flags, config keys and detection rule."""

    name: str
    weights: tuple[WeightRule, ...]
    config: tuple[ConfigKey, ...]
    detection: Detection
    api_version: int = API_VERSION
    ignore: tuple[str, ...] = ()  # checkpoint tensors that are not weights (causal-mask buffers, ...)
    # Config values archkit cannot honour: (key, accepted values). Any other value is a ConfigError.
    rejects: tuple[tuple[str, tuple], ...] = ()
    norm: str = "rmsnorm"
    norm_offset: float = 0.0  # weight is applied as (offset + w); Gemma uses 1.0
    mlp: str = "gated"  # gated: down(act(gate(x)) * up(x)); plain: down(act(up(x)))
    positions: str = "rope"
    rope_style: str = "half"
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    scale_embeddings: bool = False  # token embeddings multiplied by sqrt(hidden_size) (Gemma)
    description: str = ""
    reference: str = ""  # the modeling file or paper this spec follows


_PATTERN_OK = re.compile(r"^[A-Za-z0-9_.\-]*(\{layer\}[A-Za-z0-9_.\-]*)?$")


def validate_spec(spec: Any, config_fields: frozenset[str], bool_fields: frozenset[str]) -> list[str]:
    """Every way `spec` breaks the contract, as messages (empty when it is valid)."""
    if not isinstance(spec, ModelSpec):
        return [f"expected a core.spec.ModelSpec, got {type(spec).__name__}"]
    bad = _structure(spec)
    if bad:  # the checks below (and detection) assume these types
        return bad
    if spec.api_version != API_VERSION:
        bad.append(f"api_version {spec.api_version!r} is not supported (this archkit speaks {API_VERSION})")
    if not re.fullmatch(r"[a-z][a-z0-9_\-]*", spec.name or ""):
        bad.append(f"name {spec.name!r} must be lowercase letters, digits, '_' or '-'")
    for flag, value, allowed in (("norm", spec.norm, NORMS), ("mlp", spec.mlp, MLPS),
                                 ("positions", spec.positions, POSITIONS), ("rope_style", spec.rope_style, ROPE_STYLES)):
        if value not in allowed:
            bad.append(f"{flag}={value!r} is not one of {allowed}")
    known_roles = set(GLOBAL_ROLES) | set(LAYER_ROLES)
    for rule in spec.weights:
        if not isinstance(rule, WeightRule) or not rule.patterns or not rule.targets:
            bad.append(f"weight rule {rule!r} needs targets and at least one pattern")
            continue
        for p in rule.patterns:
            if not _PATTERN_OK.match(p) or ("{layer}" in p) != rule.per_layer:
                bad.append(f"pattern {p!r} is malformed (names, dots and at most one {{layer}}, same for every alternative)")
        for t in rule.targets:
            if t not in known_roles:
                bad.append(f"role {t!r} is not a canonical role")
            elif (t in LAYER_ROLES) != rule.per_layer:
                bad.append(f"role {t!r} and pattern {rule.patterns[0]!r} disagree on being per-layer")
        if len(rule.targets) > 1 and len(rule.split) != len(rule.targets):
            bad.append(f"rule for {rule.targets} needs one split size per target")
        for s in rule.split:
            if s not in config_fields:
                bad.append(f"split size {s!r} is not a config field")
        if rule.when is not None and rule.when.lstrip("!") not in bool_fields:
            bad.append(f"condition {rule.when!r} is not a boolean config field")
    for key in spec.config:
        if not isinstance(key, ConfigKey) or key.field not in config_fields:
            bad.append(f"config key {key!r} maps to an unknown field")
    for p in spec.ignore:
        if not _PATTERN_OK.match(p):
            bad.append(f"ignore pattern {p!r} is malformed")
    return bad


def _strs(x, nonempty: bool = False) -> bool:
    # Plain str only: a str subclass can define __eq__ to match every name (and so claim every checkpoint).
    return type(x) is tuple and all(type(s) is str and (s or not nonempty) for s in x)


def _structure(spec: ModelSpec) -> list[str]:
    """Type problems: every field a plain tuple / str / bool of the documented records, nothing duck-typed."""
    bad = []
    if type(spec.api_version) is not int:
        bad.append(f"api_version must be an int, got {spec.api_version!r}")
    for flag in ("name", "norm", "mlp", "positions", "rope_style"):
        if type(getattr(spec, flag)) is not str:
            bad.append(f"{flag} must be a str, got {getattr(spec, flag)!r}")
    if type(spec.weights) is not tuple or not all(type(r) is WeightRule for r in spec.weights):
        bad.append("weights must be a tuple of core.spec.WeightRule")
    else:
        for r in spec.weights:
            if not (_strs(r.targets) and _strs(r.patterns) and _strs(r.split) and type(r.transpose) is bool
                    and type(r.ignore_when_false) is bool and (r.when is None or type(r.when) is str)):
                bad.append(f"weight rule {r!r}: targets, patterns and split must be tuples of str, when a str or None")
    if type(spec.config) is not tuple or not all(type(k) is ConfigKey and type(k.field) is str and _strs(k.keys, True)
                                                   for k in spec.config):
        bad.append("config must be a tuple of core.spec.ConfigKey, each with a str field and a tuple of str keys")
    else:
        bad += [f"config field {k.field!r} is required but names no config.json key" for k in spec.config
                if k.default is REQUIRED and not k.keys]
    if not _strs(spec.ignore):
        bad.append("ignore must be a tuple of str")
    if type(spec.rejects) is not tuple or not all(type(r) is tuple and len(r) == 2 and type(r[0]) is str
                                                    and type(r[1]) is tuple for r in spec.rejects):
        bad.append("rejects must be a tuple of (config key, tuple of accepted values) pairs")
    d = spec.detection
    if type(d) is not Detection or not _strs(d.architectures, True) or not _strs(d.model_types, True):
        bad.append(f"detection {d!r} must be a core.spec.Detection of tuples of non-empty str (exact names: "
                   f"a rule that matches anything would claim every checkpoint)")
    return bad
