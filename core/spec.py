"""ModelSpec: a model family described as data.

A plugin registers one frozen ModelSpec per family. The runtime reads only the spec and the
checkpoint; it never asks which family it is running.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from .custom_ops import validate_ops

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

    keys are alternatives, first present wins (GPT-2's "n_positions" vs older "n_ctx"); no keys means the
    field is fixed at `default` for the family (Mistral's biases are always off).
    A JSON null counts as absent (GPT-2 writes "n_inner": null meaning 4 * n_embd), unless
    null_is_value: then null is the value None, an explicit "off" (Mistral's "sliding_window": null),
    and only a missing key takes the default.
    transform: a small pure function applied to the value config.json gives (never to `default`, which is
    already in the field's terms): Granite's logits_scaling divides, so `transform=lambda v: 1 / v` maps it
    onto logit_multiplier; GPT-NeoX's use_parallel_residual maps a bool onto the block layout. A transform that
    returns None leaves the field None (num_kv_heads and head_dim then take the MHA / hidden-over-heads default).
    compute: for a value that depends on several keys, a small pure function given the whole config.json dict
    (instead of one value), called when any of `keys` (the keys it reads) is present; `default` applies when
    none is. Falcon's kv-head count: num_kv_heads, or 1 under multi_query, depending on
    new_decoder_architecture; a shared expert `moe_intermediate_size * moe_num_shared_experts` wide.
    """

    field: str
    keys: tuple[str, ...] = ()
    default: Any = REQUIRED
    null_is_value: bool = False
    transform: Any = None  # callable(value) -> value, or None
    compute: Any = None  # callable(config.json dict) -> value, or None (not with transform)


@attrs.frozen
class WeightRule:
    """One checkpoint tensor mapped to one or more canonical roles.

    patterns are alternatives (the first found wins); a per-layer tensor has "{layer}" in its patterns, and a
    per-expert tensor also "{expert}" (Mixtral's "...experts.{expert}.w1.weight": the experts are stacked on load
    into one [num_experts, ...] role). Roles named "experts.*" may instead come stacked in one tensor. Likewise a
    per-head tensor has "{head}" after "{layer}" (StableLM's "...q_layernorm.norms.{head}.weight"): one tensor per
    head, stacked on load into a per-head role's [heads, ...] (q_norm.* / k_norm.* under qk_norm "per_head").
    transpose: the checkpoint stores [in, out] (HF GPT-2 Conv1D); roles are always [out, in] (per expert).
    split: a fused tensor cut along its output dim (after transpose) into len(targets) parts whose sizes are the
    named ModelConfig fields ("q_dim", "kv_dim", "intermediate_size", ...).
    interleave: the fused output dim is not the parts one after another but `interleave` groups (a ModelConfig
    field, e.g. "num_kv_heads"), each holding its share of every part in turn: GPT-NeoX's query_key_value is
    [heads, (q, k, v), head_dim], which is split=("q_dim", "kv_dim", "kv_dim"), interleave="num_kv_heads".
    when: a boolean ModelConfig field ("!" negates) under which the tensor exists at all, or the layer
    predicate "sparse_layer" (the layer's MLP is a mixture of experts; "!sparse_layer": a dense layer), or an
    architecture flag equal to one of its values ("block=sequential": StableLM's post_attention_layernorm exists
    only outside the parallel block).
    ignore_when_false: when the condition is false the tensor may still be present and is ignored
    (tied checkpoints that carry a copy of the embedding as lm_head).
    """

    targets: tuple[str, ...]
    patterns: tuple[str, ...]
    transpose: bool = False
    split: tuple[str, ...] = ()
    when: str | None = None
    ignore_when_false: bool = False
    interleave: str | None = None

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.patterns[0]

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.patterns[0]

    @property
    def per_head(self) -> bool:
        return "{head}" in self.patterns[0]

    @property
    def stacked(self) -> bool:
        """One checkpoint tensor per expert or per head, stacked on load along the role's first axis."""
        return self.per_expert or self.per_head


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
MLPS = ("gated", "plain")  # gated: down(act(gate(x)) * up(x)); plain: down(act(up(x)))
POSITIONS = ("rope", "learned")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "quick_gelu", "silu", "swish", "relu", "relu2")
ROPE_STYLES = ("half", "interleaved")  # rotate_half pairs (i, i + d/2) (GPT-NeoX, Llama); interleaved (2i, 2i+1) (GPT-J)
# sequential: x += attn(norm1(x)); x += mlp(norm2(x)). parallel: x += attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX).
# parallel_shared_norm: h = norm1(x); x += attn(h) + mlp(h) (GPT-J, Phi-1/2, Cohere).
BLOCKS = ("sequential", "parallel", "parallel_shared_norm")
# pre: sublayers read a normed copy of the residual. post: they read the residual itself and their output is
# normed before it is added (OLMo2). sandwich: both (Gemma 2).
NORM_PLACEMENTS = ("pre", "post", "sandwich")
# head: one [head_dim] weight shared by every head (Qwen3, OLMo-style per head). per_head: a weight per head,
# [heads, head_dim] (Cohere, StableLM). projection: over the whole q / k projection, [q_dim] / [kv_dim] (OLMo2).
QK_NORMS = ("none", "head", "per_head", "projection")
ROUTER_SCORINGS = ("softmax", "sigmoid")
LAYER_PREDICATES = ("sparse_layer",)  # per-layer `when` conditions (see WeightRule)
HEAD_ROLES = ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")  # roles a "{head}" pattern may stack

# The architecture flags: spec attributes that fix a value for the family, and ModelConfig fields that a
# ConfigKey may map from config.json instead (GPT-NeoX's block layout from use_parallel_residual). A spec that
# sets one and also maps it with a ConfigKey is invalid: which one wins would be a guess.
FLAGS = {"norm": NORMS, "mlp": MLPS, "positions": POSITIONS, "rope_style": ROPE_STYLES, "block": BLOCKS,
         "norm_placement": NORM_PLACEMENTS, "qk_norm": QK_NORMS}

# Canonical tensor roles the runtime knows. Global roles, then per-layer roles. Matrices are [out, in];
# expert roles are stacked over experts, [num_experts, out, in].
GLOBAL_ROLES = ("embed", "pos_embed", "final_norm.weight", "final_norm.bias", "lm_head", "lm_head.bias")
LAYER_ROLES = (
    "attn_norm.weight", "attn_norm.bias",
    "q.weight", "k.weight", "v.weight", "q.bias", "k.bias", "v.bias",
    "o.weight", "o.bias", "q_norm.weight", "k_norm.weight", "q_norm.bias", "k_norm.bias",
    "mlp_norm.weight", "mlp_norm.bias",
    # a sublayer's output normed before the residual add (Gemma 2 sandwich, OLMo2 post-norm)
    "post_attn_norm.weight", "post_attn_norm.bias", "post_mlp_norm.weight", "post_mlp_norm.bias",
    "gate.weight", "up.weight", "down.weight", "gate.bias", "up.bias", "down.bias",
    # mixture of experts: the router [E, hidden], the experts stacked [E, ...], the shared expert(s) and their
    # sigmoid gate [1, hidden] (Qwen2-MoE); router.select_bias [E] is added to the scores that choose the experts,
    # not to their weights (DeepSeek-V3 / GLM-4.5 e_score_correction_bias)
    "router.weight", "router.bias", "router.select_bias",
    "experts.gate.weight", "experts.up.weight", "experts.down.weight",
    "experts.gate.bias", "experts.up.bias", "experts.down.bias",
    "shared.gate.weight", "shared.up.weight", "shared.down.weight", "shared.gate.bias", "shared.up.bias",
    "shared.down.bias", "shared_gate.weight",
)

# Roles every backend keeps in float32 whatever its dtype, as transformers keeps e_score_correction_bias
# (_keep_in_fp32_modules_strict): it decides which experts run, and in bf16 (steps of 2^-8 near 1) it would pick
# other experts than the checkpoint's model does.
FLOAT32_ROLES = frozenset({"router.select_bias"})


def _qk_norm(v):
    # API 1 specs wrote qk_norm=True for Qwen3's per-head norm
    return {True: "head", False: None}.get(v, v) if isinstance(v, bool) else v


@attrs.frozen
class ExtraRole:
    """A tensor role that only a plugin's own layer function reads (see ModelSpec.attention_block).

    shape: ints and ModelConfig field names ("hidden_size", "num_heads", ...), [out, in] for matrices.
    """

    name: str
    shape: tuple
    per_layer: bool = True


@attrs.frozen
class ModelSpec:
    """A model family, as data: names, flags, config keys and detection rule.

    The architecture flags (norm, mlp, positions, rope_style, block, norm_placement, qk_norm, norm_offset,
    scale_embeddings) left at None are not fixed by the family: a ConfigKey may map them, else the core
    default applies (rmsnorm, gated, rope, half, sequential, pre, none, 0.0, False).
    """

    name: str
    weights: tuple[WeightRule, ...]
    config: tuple[ConfigKey, ...]
    detection: Detection
    api_version: int = API_VERSION
    ignore: tuple[str, ...] = ()  # checkpoint tensors that are not weights (causal-mask buffers, ...)
    # Config values archkit cannot honour: (key, accepted values) or (key, accepted values, the value an absent
    # key means). Any other value is a ConfigError; every offending key is reported at once.
    rejects: tuple[tuple, ...] = ()
    norm: str | None = None
    norm_offset: float | None = None  # weight is applied as (offset + w); Gemma uses 1.0
    mlp: str | None = None
    positions: str | None = None
    rope_style: str | None = None
    qk_norm: str | None = attrs.field(default=None, converter=_qk_norm)
    scale_embeddings: bool | None = None  # token embeddings multiplied by sqrt(hidden_size) (Gemma)
    block: str | None = None
    norm_placement: str | None = None
    # The escape hatch: a layer function composed from the backend operations (core.backend_api.Backend)
    # replaces the attention or the MLP sublayer: fn(step, L, layer, h) -> [T, hidden] (see core.model.Step).
    attention_block: Any = None
    mlp_block: Any = None
    extra_roles: tuple[ExtraRole, ...] = ()  # tensors only those functions read
    ops: tuple = ()  # core.custom_ops.CustomOp records this family's layer functions call
    description: str = ""
    reference: str = ""  # the modeling file or paper this spec follows


_NAME = r"[A-Za-z0-9_.\-]*"
_PATTERN_OK = re.compile(rf"^{_NAME}(\{{layer\}}{_NAME}(\{{(expert|head)\}}{_NAME})?)?$")


def validate_spec(spec: Any, config_fields: frozenset[str], bool_fields: frozenset[str]) -> list[str]:
    """Every way `spec` breaks the contract on its own, as messages (empty when it is valid).

    What needs the config's defaults (roles the forward needs, flags fixed twice) is core.weights.check_spec.
    """
    if not isinstance(spec, ModelSpec):
        return [f"expected a core.spec.ModelSpec, got {type(spec).__name__}"]
    bad = _structure(spec)
    if bad:  # the checks below (and detection) assume these types
        return bad
    if spec.api_version != API_VERSION:
        bad.append(f"api_version {spec.api_version!r} is not supported (this archkit speaks {API_VERSION})")
    if not re.fullmatch(r"[a-z][a-z0-9_\-]*", spec.name or ""):
        bad.append(f"name {spec.name!r} must be lowercase letters, digits, '_' or '-'")
    for flag, allowed in FLAGS.items():
        value = getattr(spec, flag)
        if value is not None and value not in allowed:
            bad.append(f"{flag}={value!r} is not one of {allowed}")
    extra = {r.name: r for r in spec.extra_roles}
    for name in extra:
        if name in GLOBAL_ROLES or name in LAYER_ROLES:
            bad.append(f"extra role {name!r} is a canonical role already")
    for rule in spec.weights:
        bad += _rule_problems(rule, extra, config_fields, bool_fields)
    for key in spec.config:
        if not isinstance(key, ConfigKey) or key.field not in config_fields:
            bad.append(f"config key {key!r} maps to an unknown field")
        elif key.transform is not None and not callable(key.transform):
            bad.append(f"config key {key.field!r}: transform {key.transform!r} is not callable")
        elif key.compute is not None and (not callable(key.compute) or key.transform is not None or not key.keys):
            bad.append(f"config key {key.field!r}: compute must be callable, name the keys it reads, and come "
                       f"without a transform")
    for p in spec.ignore:
        if not _PATTERN_OK.match(p):
            bad.append(f"ignore pattern {p!r} is malformed")
    for what in ("attention_block", "mlp_block"):
        fn = getattr(spec, what)
        if fn is not None and not callable(fn):
            bad.append(f"{what} {fn!r} is not callable")
    bad += validate_ops(spec.ops)
    return bad


def _rule_problems(rule: WeightRule, extra: dict, config_fields, bool_fields) -> list[str]:
    if not rule.patterns or not rule.targets:
        return [f"weight rule {rule!r} needs targets and at least one pattern"]
    bad = []
    for p in rule.patterns:
        if (not _PATTERN_OK.match(p) or ("{layer}" in p) != rule.per_layer or ("{expert}" in p) != rule.per_expert
                or ("{head}" in p) != rule.per_head):
            bad.append(f"pattern {p!r} is malformed (names, dots, then at most one {{layer}} and after it at most "
                       f"one {{expert}} or {{head}}, the same for every alternative)")
    for t in rule.targets:
        if t in extra:
            if extra[t].per_layer != rule.per_layer:
                bad.append(f"extra role {t!r} and pattern {rule.patterns[0]!r} disagree on being per-layer")
        elif t not in GLOBAL_ROLES and t not in LAYER_ROLES:
            bad.append(f"role {t!r} is not a canonical role (nor one of the spec's extra_roles)")
        elif (t in LAYER_ROLES) != rule.per_layer:
            bad.append(f"role {t!r} and pattern {rule.patterns[0]!r} disagree on being per-layer")
        if rule.per_expert and not t.startswith("experts."):
            bad.append(f"pattern {rule.patterns[0]!r} has {{expert}} but role {t!r} is not an experts.* role")
        if rule.per_head and t not in HEAD_ROLES:
            bad.append(f"pattern {rule.patterns[0]!r} has {{head}} but role {t!r} is not one of {HEAD_ROLES}")
    if len(rule.targets) > 1 and len(rule.split) != len(rule.targets):
        bad.append(f"rule for {rule.targets} needs one split size per target")
    for s in rule.split + ((rule.interleave,) if rule.interleave else ()):
        if s not in config_fields:
            bad.append(f"split size {s!r} is not a config field")
    if rule.interleave and not rule.split:
        bad.append(f"rule for {rule.targets}: interleave needs a split")
    if rule.per_head and rule.split:
        bad.append(f"rule for {rule.targets}: a {{head}} pattern stacks whole roles and cannot be split")
    if rule.when is not None:
        name = rule.when.lstrip("!")
        flag, _, value = name.partition("=")
        if name in LAYER_PREDICATES:
            if not rule.per_layer:
                bad.append(f"condition {rule.when!r} is per layer but {rule.patterns[0]!r} is global")
        elif "=" in name:
            if flag not in FLAGS:
                bad.append(f"condition {rule.when!r}: {flag!r} is not an architecture flag ({', '.join(FLAGS)})")
            elif value not in FLAGS[flag]:
                bad.append(f"condition {rule.when!r}: {value!r} is not a value of {flag} {FLAGS[flag]}")
        elif name not in bool_fields:
            bad.append(f"condition {rule.when!r} is not a boolean config field, a flag=value test or one of "
                       f"{LAYER_PREDICATES}")
    return bad


def _strs(x, nonempty: bool = False) -> bool:
    # Plain str only: a str subclass can define __eq__ to match every name (and so claim every checkpoint).
    return type(x) is tuple and all(type(s) is str and (s or not nonempty) for s in x)


def _structure(spec: ModelSpec) -> list[str]:
    """Type problems: every field a plain tuple / str / bool of the documented records, nothing duck-typed."""
    bad = []
    if type(spec.api_version) is not int:
        bad.append(f"api_version must be an int, got {spec.api_version!r}")
    if type(spec.name) is not str:
        bad.append(f"name must be a str, got {spec.name!r}")
    for flag in FLAGS:
        if getattr(spec, flag) is not None and type(getattr(spec, flag)) is not str:
            bad.append(f"{flag} must be a str or None, got {getattr(spec, flag)!r}")
    if type(spec.weights) is not tuple or not all(type(r) is WeightRule for r in spec.weights):
        bad.append("weights must be a tuple of core.spec.WeightRule")
    else:
        for r in spec.weights:
            if not (_strs(r.targets) and _strs(r.patterns) and _strs(r.split) and type(r.transpose) is bool
                    and type(r.ignore_when_false) is bool and (r.when is None or type(r.when) is str)
                    and (r.interleave is None or type(r.interleave) is str)):
                bad.append(f"weight rule {r!r}: targets, patterns and split must be tuples of str, when and "
                           f"interleave a str or None")
    if type(spec.config) is not tuple or not all(type(k) is ConfigKey and type(k.field) is str and _strs(k.keys, True)
                                                   for k in spec.config):
        bad.append("config must be a tuple of core.spec.ConfigKey, each with a str field and a tuple of str keys")
    else:
        bad += [f"config field {k.field!r} is required but names no config.json key" for k in spec.config
                if k.default is REQUIRED and not k.keys]
    if not _strs(spec.ignore):
        bad.append("ignore must be a tuple of str")
    if type(spec.rejects) is not tuple or not all(type(r) is tuple and len(r) in (2, 3) and type(r[0]) is str
                                                    and type(r[1]) is tuple for r in spec.rejects):
        bad.append("rejects must be a tuple of (config key, tuple of accepted values[, value when absent]) tuples")
    if type(spec.extra_roles) is not tuple or not all(
            type(r) is ExtraRole and type(r.name) is str and type(r.shape) is tuple
            and all(type(s) in (int, str) for s in r.shape) for r in spec.extra_roles):
        bad.append("extra_roles must be a tuple of core.spec.ExtraRole with a shape of ints and config field names")
    d = spec.detection
    if type(d) is not Detection or not _strs(d.architectures, True) or not _strs(d.model_types, True):
        bad.append(f"detection {d!r} must be a core.spec.Detection of tuples of non-empty str (exact names: "
                   f"a rule that matches anything would claim every checkpoint)")
    return bad
