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
from .errors import ConfigError, WeightsError
from .quant import QuantizedStack, QuantizedTensor
from .spec import FLAGS, GLOBAL_ROLES, LAYER_PREDICATES, LAYER_ROLES, REQUIRED, Derived, ModelSpec, WeightRule


# The config field giving each role's first (output) dim, for shape checks and fused splits.
ROWS = {
    "embed": "vocab_size", "lm_head": "vocab_size", "lm_head.bias": "vocab_size", "pos_embed": "max_position_embeddings",
    "q.weight": "q_dim", "q.bias": "q_dim", "k.weight": "kv_dim", "k.bias": "kv_dim", "v.weight": "kv_dim",
    "v.bias": "kv_dim", "o.weight": "hidden_size", "o.bias": "hidden_size",
    "gate.weight": "intermediate_size", "gate.bias": "intermediate_size", "up.weight": "intermediate_size",
    "up.bias": "intermediate_size", "down.weight": "hidden_size", "down.bias": "hidden_size",
    "router.weight": "num_experts", "router.bias": "num_experts", "router.select_bias": "num_experts",
    "experts.gate.weight": "expert_dim", "experts.gate.bias": "expert_dim", "experts.up.weight": "expert_dim",
    "experts.up.bias": "expert_dim", "experts.down.weight": "hidden_size", "experts.down.bias": "hidden_size",
    "shared.gate.weight": "shared_expert_intermediate_size", "shared.gate.bias": "shared_expert_intermediate_size",
    "shared.up.weight": "shared_expert_intermediate_size", "shared.up.bias": "shared_expert_intermediate_size",
    "shared.down.weight": "hidden_size", "shared.down.bias": "hidden_size",
}
# The norms' gains: each (norm_offset + w). A family whose norms have none (norm_weight false) loads none of them;
# the forward reads ones in their place (Plan.fill).
NORM_WEIGHTS = ("final_norm.weight", "attn_norm.weight", "mlp_norm.weight", "post_attn_norm.weight",
                "post_mlp_norm.weight", "q_norm.weight", "k_norm.weight")
_INPUTS = {"o.weight": "q_dim", "down.weight": "intermediate_size", "experts.down.weight": "expert_dim",
           "shared.down.weight": "shared_expert_intermediate_size"}  # matrices not reading the hidden state


def expected_shape(role: str, c: ModelConfig, spec: ModelSpec | None = None) -> tuple[int, ...]:
    """The canonical shape of a role ([out, in] for matrices, [num_experts, out, in] for experts.*)."""
    if spec is not None:
        for r in spec.extra_roles:
            if r.name == role:
                return tuple(s if isinstance(s, int) else getattr(c, s) for s in r.shape)
    if role in ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"):
        heads = c.num_heads if role[0] == "q" else c.num_kv_heads
        return {"per_head": (heads, c.head_dim), "projection": (heads * c.head_dim,)}.get(c.qk_norm, (c.head_dim,))
    if role == "shared_gate.weight":
        return (1, c.hidden_size)
    rows = ROWS.get(role)
    if rows is None:
        return (c.hidden_size,)  # norms
    shape = (getattr(c, rows),)
    if role.endswith(".weight") or role in ("embed", "lm_head", "pos_embed"):
        shape += (getattr(c, _INPUTS.get(role, "hidden_size")),)
    return (c.num_experts,) + shape if role.startswith("experts.") else shape


def _regex(pattern: str) -> re.Pattern:
    """A pattern as a regex: groups "layer" and "index" (the {expert} or {head} number)."""
    return re.compile("^" + re.escape(pattern).replace(r"\{layer\}", r"(?P<layer>0|[1-9][0-9]*)")
                      .replace(r"\{expert\}", r"(?P<index>0|[1-9][0-9]*)")
                      .replace(r"\{head\}", r"(?P<index>0|[1-9][0-9]*)") + "$")


def condition(rule_when: str | None, c: ModelConfig, layer: int | None = None) -> bool:
    """Evaluate a rule's `when` against the config (None → always); "sparse_layer" asks about `layer`,
    "flag=value" compares an architecture flag."""
    if rule_when is None:
        return True
    neg = rule_when.startswith("!")
    name = rule_when.lstrip("!")
    flag, eq, want = name.partition("=")
    if eq:
        return (getattr(c, flag) == want) != neg
    value = c.sparse_layer(layer) if name in LAYER_PREDICATES else getattr(c, name)
    return (value != "none" if isinstance(value, str) else bool(value)) != neg


@attrs.frozen
class Source:
    """The checkpoint tensor(s) feeding one rule at one layer (None for global): one, or one per expert / head."""

    infos: tuple[TensorInfo, ...]
    rule: WeightRule
    layer: int | None

    @property
    def info(self) -> TensorInfo:
        return self.infos[-1]

    @property
    def numel(self) -> int:
        return sum(i.numel for i in self.infos)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos)

    @property
    def quantized(self) -> bool:
        """Whether this is a quantized weight a backend may take as it is stored (core.load's convert_quantized):
        one role, no transform, and one tensor or one per expert, every one quantized (per-head stacks, fused
        splits and Conv1D transposes need the dense weight)."""
        r = self.rule
        if r.transpose or len(r.targets) != 1 or (r.stacked and not r.per_expert):
            return False
        return all(isinstance(i, QuantizedTensor) and not i.transposed for i in self.infos)

    @property
    def stored(self) -> QuantizedTensor | QuantizedStack:
        """What a backend is handed for a `quantized` source: its QuantizedTensor, or the experts' as a
        QuantizedStack (the role's [num_experts, out, in])."""
        return QuantizedStack(self.infos) if self.rule.per_expert else self.info


@attrs.define
class Match:
    """Which tensor names the rules explain, and which they do not."""

    # (rule index, layer) → [(alternative, info, expert / head or None)]
    found: dict[tuple[int, int | None], list[tuple[int, TensorInfo, int | None]]]
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
                    g = m.groupdict()
                    hit = (ri, int(g["layer"]) if "layer" in g else None, ai,
                           int(g["index"]) if "index" in g else None)
                    break
            if hit:
                break
        if hit:
            found.setdefault(hit[:2], []).append((hit[2], info, hit[3]))
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
    fills: list[tuple[str, int | None, tuple[int, ...], float]] = attrs.Factory(list)  # see weightless_norms

    @property
    def fill_numel(self) -> int:
        return sum(int(np.prod(shape)) for _, _, shape, _ in self.fills)

    def fill(self, convert: Callable[[np.ndarray, str, str], object]) -> Iterator[tuple[str, int | None, object]]:
        """Yield (role, layer, converted tensor) for each weight no checkpoint holds but the forward reads: the gains
        of weightless norms, a constant array handed to the backend's convert like a checkpoint tensor."""
        for role, layer, shape, value in self.fills:
            yield role, layer, convert(np.full(shape, value, np.float32), "F32", role)

    def load(self, convert: Callable[[np.ndarray, str, str], object],
             quantized: Callable[[Source], object] | None = None) -> Iterator[tuple[str, int | None, object]]:
        """Yield (role, layer, converted tensor), reading one checkpoint tensor (or one layer's experts or heads)
        at a time.

        convert(float32 array or raw bits, stored dtype, role) → backend tensor. Transforms are
        applied in float32 unless the tensor needs none, in which case the raw bits are passed on.
        quantized(source) → backend tensor or None, asked first for each Source.quantized: the weight as stored
        (Source.stored: a QuantizedTensor, or a QuantizedStack of an expert role's; not dequantized), or None to
        convert the dense weight after all.
        """
        for src in self.sources:
            # One sub-generator per tensor: its frame (and the arrays in it) is gone once the tensor is handed
            # over, so a failure at the next tensor cannot keep this one alive through the traceback.
            yield from self._one(src, convert, quantized)

    def _one(self, src: Source, convert, quantized=None) -> Iterator[tuple[str, int | None, object]]:
        rule = src.rule
        if quantized is not None and src.quantized:
            t = quantized(src)
            if t is not None:
                yield rule.targets[0], src.layer, t
                return
        dtypes = {i.dtype for i in src.infos}
        if len(dtypes) == 1:  # the experts' (heads') slices are stacked as stored (raw bits), one dtype
            bits = np.stack([read_tensor(i) for i in src.infos]) if rule.stacked else read_tensor(src.info)
            role = rule.targets[0]
            if not rule.stacked and bits.ndim > 1 and padded_vector(bits.shape, bits.shape[-1:]) and \
                    role in CANONICAL and len(expected_shape(role, self.config)) == 1:
                bits = bits.reshape(-1)  # (see padded_vector)
            if not rule.transpose and len(rule.targets) == 1:
                yield rule.targets[0], src.layer, convert(bits, src.info.dtype, rule.targets[0])
                return
            x = to_float32(bits, src.info.dtype)
            del bits
        else:  # experts (heads) stored in different dtypes: meet in float32
            x = np.stack([to_float32(read_tensor(i), i.dtype) for i in src.infos])
        stacked = rule.per_expert or rule.targets[0].startswith("experts.")
        if rule.transpose:
            x = np.ascontiguousarray(np.swapaxes(x, -1, -2) if x.ndim > 1 else x)
        if len(rule.targets) == 1:
            parts = [x]
        else:
            sizes = [getattr(self.config, s) for s in rule.split]
            groups = getattr(self.config, rule.interleave) if rule.interleave else 1
            parts = split_fused(x, sizes, groups, axis=1 if stacked else 0)
        for role, part in zip(rule.targets, parts):
            yield role, src.layer, convert(np.ascontiguousarray(part), "F32", role)


def split_fused(x: np.ndarray, sizes: list[int], groups: int = 1, axis: int = 0) -> list[np.ndarray]:
    """Cut a fused tensor along `axis` into parts of `sizes`; with groups > 1 the axis holds `groups` blocks,
    each carrying size / groups rows of every part in turn (GPT-NeoX's [heads, (q, k, v), head_dim])."""
    if groups == 1:
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    shape = x.shape
    g = x.reshape(shape[:axis] + (groups, sum(sizes) // groups) + shape[axis + 1:])
    per = [s // groups for s in sizes]
    return [p.reshape(shape[:axis] + (s,) + shape[axis + 1:])
            for p, s in zip(np.split(g, np.cumsum(per)[:-1], axis=axis + 1), sizes)]


def plan(spec: ModelSpec, config: ModelConfig, ckpt: Checkpoint) -> Plan:
    """Map and shape-check every tensor; raise one WeightsError listing every problem (a ConfigError first when
    the spec has no rule for a role the forward needs under this config)."""
    _check_roles(spec, config, ckpt.path)
    m = match_names(spec, ckpt.tensors)
    # the tensors of layers the checkpoint carries but the model does not run (config.unused_layers), matched or not
    skip = range(config.num_layers, config.num_layers + config.unused_layers)
    prefixes = {p.split("{layer}")[0] for r in spec.weights for p in r.patterns if "{layer}" in p}
    heads = tuple(f"{p}{i}." for i in skip for p in prefixes)
    missing, unexpected, mismatched = [], [n for n in m.unexplained if not n.startswith(heads)], []
    sources: list[Source] = []
    layers = range(config.num_layers)
    present = set(m.found)
    # Rules sharing a role are alternative layouts of it (experts one tensor each, or stacked): at each layer the
    # first one present is used, the others must be absent.
    alts = {ri: [rj for rj, other in enumerate(spec.weights) if rj != ri and set(other.targets) & set(rule.targets)]
            for ri, rule in enumerate(spec.weights)}
    for ri, rule in enumerate(spec.weights):
        for layer in (layers if rule.per_layer else [None]):
            hits = sorted(m.found.pop((ri, layer), []), key=lambda h: (h[0], -1 if h[2] is None else h[2]))
            other = [rj for rj in alts[ri] if (rj, layer) in present]
            off = not config.norm_weight and any(t in NORM_WEIGHTS for t in rule.targets)  # weightless norms
            if off or not condition(rule.when, config, layer) or (other and (not hits or min(other) < ri)):
                if not rule.ignore_when_false or other:
                    unexpected += [info.name for _, info, _ in hits]
                continue
            name = rule.patterns[0].replace("{layer}", str(layer))
            if rule.stacked:
                infos, extra = _experts(hits, stack_count(rule, config, spec))
                unexpected += extra
                gone = [name.replace("{expert}", str(e)).replace("{head}", str(e)) for e, i in enumerate(infos)
                        if i is None]
                missing += gone
                if gone:
                    continue
                infos = tuple(infos)
            elif not hits:
                missing.append(name)
                continue
            else:
                infos = (hits[0][1],)
                unexpected += [h.name for _, h, _ in hits[1:]]  # the same tensor under two alternative names
            if rule.transpose:  # a quantized weight is stored [out, in]; this family's plain one [in, out]
                infos = tuple(i.as_transposed() if isinstance(i, QuantizedTensor) else i for i in infos)
            bad = _shape_problem(rule, infos, config, spec)
            if bad:
                mismatched.append(bad)
            sources.append(Source(infos, rule, layer))
    for (ri, layer), hits in m.found.items():  # layers beyond num_hidden_layers
        if layer in skip:
            continue
        unexpected += [info.name for _, info, _ in hits]
    if missing or unexpected or mismatched:
        raise WeightsError(ckpt.path, missing, sorted(unexpected), mismatched)
    return Plan(config, sources, weightless_norms(spec, config))


def weightless_norms(spec: ModelSpec, c: ModelConfig) -> list[tuple[str, int | None, tuple[int, ...], float]]:
    """(role, layer, shape, value) of every norm gain the forward reads when the norms have no weights
    (norm_weight false: OLMo 1's LayerNorm): 1 - norm_offset, so that (norm_offset + w) is exactly 1."""
    if c.norm_weight:
        return []
    roles = sorted(norm_roles(attrs.asdict(c, recurse=False)))
    return [(r, layer, expected_shape(r, c, spec), 1.0 - c.norm_offset) for r in roles
            for layer in ([None] if r in GLOBAL_ROLES else range(c.num_layers))]


def _check_roles(spec: ModelSpec, config: ModelConfig, path) -> None:
    """Registration checks the roles the forward needs under the family's defaults; a config.json can switch a
    rule's `when` off (or turn on a capability the defaults leave off). Whatever this config needs that no rule
    supplies here is the spec's fault, found before any tensor is read, not a KeyError at the first token."""
    need = needed_roles(attrs.asdict(config, recurse=False), spec)
    dense, sparse_only = {"up.weight", "down.weight", "gate.weight"}, ("experts.", "router.", "shared.", "shared_gate.")
    missing = []
    for layer in [None, *range(config.num_layers)]:
        if layer is None:
            want = need & set(GLOBAL_ROLES)
        elif config.sparse_layer(layer):
            want = need - set(GLOBAL_ROLES) - dense
        else:
            want = {r for r in need - set(GLOBAL_ROLES) if not r.startswith(sparse_only)}
        have = {t for r in spec.weights if r.per_layer == (layer is not None) and condition(r.when, config, layer)
                for t in r.targets}
        missing += [f"{r}" + ("" if layer is None else f" (layer {layer})") for r in sorted(want - have)]
    if missing:
        raise ConfigError(f"{path}: plugin {spec.name!r} has no weight rule for {', '.join(missing[:6])}"
                          f"{' ...' if len(missing) > 6 else ''} under this config.json, which the forward needs "
                          f"(a rule's `when` is false here, or the config turns on what the family's defaults leave off)")


def stack_count(rule: WeightRule, c: ModelConfig, spec: ModelSpec) -> int:
    """How many tensors a {expert} or {head} rule stacks: the experts, or the role's leading (head) axis."""
    if rule.per_expert:
        return c.num_experts
    shape = expected_shape(rule.targets[0], c, spec)
    return shape[0] if len(shape) > 1 else 0  # a role without a per-head axis: _shape_problem says why


def _experts(hits, n: int) -> tuple[list, list[str]]:
    """One tensor per expert (or head) 0..n-1 (the first alternative found), and the names left over."""
    infos: list = [None] * n
    extra = []
    for _, info, e in hits:
        if e < n and infos[e] is None:
            infos[e] = info
        else:
            extra.append(info.name)
    return infos, extra


def _shape_problem(rule: WeightRule, infos: tuple[TensorInfo, ...], c: ModelConfig, spec: ModelSpec) -> str | None:
    want = expected_shape(rule.targets[0], c, spec)
    stacked = rule.targets[0].startswith("experts.")
    if len(rule.targets) > 1:
        axis = 1 if stacked else 0
        groups = getattr(c, rule.interleave) if rule.interleave else 1
        if any(getattr(c, s) % groups for s in rule.split):
            return (f"{infos[0].name} cannot be split into {list(rule.split)} interleaved over {rule.interleave}="
                    f"{groups}: {[getattr(c, s) for s in rule.split]} are not all multiples of it")
        want = want[:axis] + (sum(getattr(c, s) for s in rule.split),) + want[axis + 1:]
    if rule.per_head and len(want) < 2:
        return (f"{infos[0].name if infos else rule.patterns[0]} is stored one tensor per head, but role "
                f"{rule.targets[0]!r} has no per-head axis under qk_norm={c.qk_norm!r} (it is {list(want)})")
    if rule.stacked:
        want = want[1:]  # each tensor is one expert's (head's) slice
    stored = tuple(want[:-2]) + tuple(want[-2:][::-1]) if rule.transpose and len(want) > 1 else want
    for info in infos:
        if tuple(info.shape) != stored and not (rule.targets[0] in CANONICAL and padded_vector(info.shape, stored)):
            return f"{info.name} is {list(info.shape)}, expected {list(stored)}"
    return None


CANONICAL = frozenset(GLOBAL_ROLES) | frozenset(LAYER_ROLES)  # (extra roles' shapes need the spec: left as stored)


def padded_vector(shape, want) -> bool:
    """A 1-D role stored with leading axes of size 1 (ERNIE 4.5 MoE's e_score_correction_bias is [1, experts]:
    a parameter of shape (groups=1, experts)); it loads as the vector."""
    return len(want) == 1 and len(shape) > 1 and tuple(shape[-1:]) == tuple(want) and all(d == 1 for d in shape[:-1])


# -- registration-time checks that need the config's defaults ---------------------------------------------------------

def family_defaults(spec: ModelSpec) -> dict:
    """The value of every ModelConfig field when config.json says nothing: the spec's fixed flags, its
    ConfigKey defaults, then the core defaults (sizes the family requires stay absent)."""
    values = {f.name: f.default for f in attrs.fields(ModelConfig) if f.default is not attrs.NOTHING}
    for key in spec.config:
        if key.default is not REQUIRED and not isinstance(key.default, Derived):
            values[key.field] = key.default
    for flag in (*FLAGS, "norm_offset", "scale_embeddings"):
        if getattr(spec, flag) is not None:
            values[flag] = getattr(spec, flag)
    return values


def norm_roles(d: dict) -> set[str]:
    """The norm gains the standard forward reads under config values `d`: the final norm, the placement's, the
    q/k norms."""
    need = {"final_norm.weight"}
    if d["qk_norm"] != "none":
        need |= {"q_norm.weight", "k_norm.weight"}
    if d["norm_placement"] in ("pre", "sandwich"):
        need.add("attn_norm.weight")
        if d["block"] != "parallel_shared_norm":
            need.add("mlp_norm.weight")
    if d["norm_placement"] in ("post", "sandwich"):
        need |= {"post_attn_norm.weight", "post_mlp_norm.weight"}
    return need


def needed_roles(d: dict, spec: ModelSpec) -> set[str]:
    """The roles the forward reads under config values `d` (see core.model); the norm gains only when the norms
    have weights (norm_weight: otherwise Plan.fill supplies them)."""
    need = {"embed"}
    if d.get("norm_weight", True):
        need |= norm_roles(d) - ({"q_norm.weight", "k_norm.weight"} if spec.attention_block is not None else set())
    if spec.attention_block is None:
        need |= {"q.weight", "k.weight", "v.weight", "o.weight"}
    if not d.get("tie_word_embeddings"):
        need.add("lm_head")
    if d["positions"] == "learned":
        need.add("pos_embed")
    if spec.mlp_block is None:
        gate = {"gate.weight"} if d["mlp"] == "gated" else set()
        moe = isinstance(d.get("num_experts"), int) and d["num_experts"] > 0
        if not moe or d.get("mlp_only_layers") or d.get("first_dense_layers") or d.get("decoder_sparse_step", 1) > 1:
            need |= {"up.weight", "down.weight"} | gate
        if moe:
            need |= {"router.weight", "experts.up.weight", "experts.down.weight"} | {"experts." + g for g in gate}
            if d.get("shared_expert_intermediate_size"):
                need |= {"shared.up.weight", "shared.down.weight"} | {"shared." + g for g in gate}
    return need


def check_spec(spec: ModelSpec) -> list[str]:
    """What makes a (structurally valid) spec unusable, found at registration rather than at the first token:
    a role the forward needs under the family's defaults that no rule provides, a flag both fixed and mapped,
    a fused split whose parts cannot be shape-checked."""
    bad = []
    for key in spec.config:
        if key.field in (*FLAGS, "norm_offset", "scale_embeddings") and getattr(spec, key.field) is not None:
            bad.append(f"config key {key.field!r} maps onto a flag the spec fixes ({key.field}="
                       f"{getattr(spec, key.field)!r}); fix it in one place")
    d = family_defaults(spec)
    mapped = {key.field for key in spec.config}
    unmapped = [f.name for f in attrs.fields(ModelConfig) if f.default is attrs.NOTHING
                and f.name not in mapped and f.name not in ("num_kv_heads", "head_dim")]  # those two have conventions
    if unmapped:
        bad.append(f"no config key maps {unmapped}, which every model needs")
    if d["norm"] == "rmsnorm" and any(t.endswith("norm.bias") for r in spec.weights for t in r.targets):
        bad.append("a norm bias role under norm='rmsnorm', which has no bias (use norm='layernorm')")
    provided = {t for r in spec.weights for t in r.targets}
    missing = sorted(needed_roles(d, spec) - provided)
    if missing:
        bad.append(f"no weight rule provides {missing}, which the forward needs under the family's defaults")
    extra = {r.name: r for r in spec.extra_roles}
    for rule in spec.weights:
        for role, size in zip(rule.targets, rule.split):
            rows = extra[role].shape[0] if role in extra else ROWS.get(role)
            if role.endswith(("norm.weight", "norm.bias")) or rows is None:
                bad.append(f"fused split of {rule.patterns[0]!r}: role {role!r} has no checkable size")
            elif rows != size:
                bad.append(f"fused split of {rule.patterns[0]!r}: role {role!r} has {rows} rows, not {size!r}")
    return bad
