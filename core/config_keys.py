"""Reading config.json through a spec's key map (core.config.ModelConfig.from_hf): the rejects, the ConfigKeys
(transform, compute, defaults), and the values that need more than one key (layer lists, special ids, the
sliding-window layers' RoPE)."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError, brief as _brief
from .log import warn_once
from .rope import RopeConfig, nested_rope, parse_rope
from .spec import REQUIRED, Derived, ModelSpec

LAYER_TYPES = ("full_attention", "sliding_attention")  # values of config.json's layer_types

# Sanity bounds: a config outside them is rejected before any allocation (10^9 layers, ...).
LIMITS = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 17, "num_layers": 4096, "num_heads": 4096,
    "num_kv_heads": 4096, "head_dim": 4096, "intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 24,
}
INT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
              "max_position_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "decoder_sparse_step", "first_dense_layers", "rotary_dim",
              "moe_groups", "moe_topk_groups", "unused_layers")


def sliding_rope_of(raw: dict, source: str, values: dict, kw: dict) -> RopeConfig | None:
    """The sliding layers' own RoPE (see ModelConfig.sliding_rope), or None where they use the model's."""
    if nested_rope(raw):
        r = parse_rope(raw, source, theta=values.get("sliding_rope_theta"), layer_type="sliding_attention", **kw)
    elif values.get("sliding_rope_theta") is not None:  # a default rope with that base, the rest as the model's
        plain = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
        main = values["rope"]  # its rotated part, wherever config.json gave it (inside the rope dict too)
        r = parse_rope(plain, source, theta=values["sliding_rope_theta"],
                       **{**kw, "partial_rotary_factor": main.partial_rotary_factor, "rotary_dim": main.rotary_dim})
    else:
        return None
    if r == values["rope"]:
        return None
    if r.dynamic or values["rope"].dynamic:  # one table per step is bound for a length-dependent RoPE
        raise ConfigError(f"{source}: sliding-window layers with a RoPE of their own are supported only when neither "
                          f"table depends on the sequence length (got {values['rope'].type!r} and {r.type!r})")
    return r


def check_rejects(spec: ModelSpec, raw: dict, source: str) -> None:
    """Every config value the spec cannot honour, in one ConfigError (an absent key means its stated default)."""
    bad = []
    for rule in spec.rejects:
        key, ok = rule[0], rule[1]
        if key in raw:
            value = raw[key]
        elif len(rule) == 3:
            value = rule[2]
        else:
            continue
        if value not in ok:
            absent = "" if key in raw else " (absent, which means that)"
            bad.append(f"{key}={_brief(value)}{absent} is not supported by plugin {spec.name!r} (supported: {list(ok)})")
    if bad:
        raise ConfigError(f"{source}: " + "; ".join(bad))


def read_keys(spec: ModelSpec, raw: dict, source: str):
    """(values, derived defaults, fields config.json stated, field → key) from the spec's ConfigKeys."""
    values: dict[str, Any] = {}
    derived: dict[str, Derived] = {}
    stated: set[str] = set()  # fields config.json gives (the others come from the spec's defaults)
    keys: dict[str, str] = {}  # field → the config.json key that gave it (or would have): errors name it
    for ck in spec.config:
        present = [k for k in ck.keys if raw.get(k) is not None or (ck.null_is_value and k in raw)]
        keys[ck.field] = (present or ck.keys or (ck.field,))[0]
        if present:
            value = raw[present[0]]
            fn = ck.compute or ck.transform
            if fn is not None:
                try:
                    value = fn(dict(raw) if ck.compute else value)  # a copy: the function cannot edit what others read
                except Exception as e:  # a plugin's function on untrusted JSON: any failure is the value's fault
                    what = ", ".join(f"{k}={_brief(raw[k])}" for k in present) if ck.compute else \
                        f"{present[0]}={_brief(value)}"
                    raise ConfigError(f"{source}: {what} cannot be read by plugin {spec.name!r} "
                                      f"({type(e).__name__}: {str(e)[:200]})") from None
            values[ck.field] = value
            stated.add(ck.field)
        elif isinstance(ck.default, Derived):
            derived[ck.field] = ck.default
        elif ck.default is REQUIRED:
            raise ConfigError(f"{source}: required key {ck.keys[0]!r} is missing (plugin {spec.name!r})")
        else:
            values[ck.field] = ck.default
    return values, derived, stated, keys


def to_int(v, name, source):
    """v as an int (an integral float accepted); ConfigError naming `name` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ConfigError(f"{source}: {name}={_brief(v)} must be an integer")
    return int(v)


def layer_types_of(v, num_layers, stated: bool, source) -> tuple[str, ...]:
    """One attention kind per layer. config.json must list every layer; a spec default is a pattern that
    repeats over the layers (Gemma 2's: sliding, full, sliding, full, ...)."""
    if not isinstance(v, (list, tuple)) or not v or any(t not in LAYER_TYPES for t in v):
        raise ConfigError(f"{source}: layer_types={_brief(v)} is not supported (a list of {list(LAYER_TYPES)})")
    if stated and len(v) != num_layers:
        raise ConfigError(f"{source}: layer_types has {len(v)} entries for num_hidden_layers={num_layers}")
    if not isinstance(num_layers, int) or not 0 < num_layers <= LIMITS["num_layers"]:
        return tuple(v)  # validate() reports the layer count
    return tuple(v[i % len(v)] for i in range(num_layers))


def drop_ids_outside_vocab(values: dict, keys: dict, source: str) -> None:
    """Drop special token ids outside [0, vocab_size), warning once.

    transformers loads such a config (GPT2Config's default 50256 on a small vocabulary, as in many tiny test
    models) and never emits the id, so generation just does not stop on it; refusing the checkpoint would be worse.
    """
    vocab = values.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        return  # validate() reports the vocabulary size itself
    outside = [f"{keys.get('eos_token_ids', 'eos_token_id')} {t}" for t in values["eos_token_ids"] if not 0 <= t < vocab]
    values["eos_token_ids"] = tuple(t for t in values["eos_token_ids"] if 0 <= t < vocab)
    for name in ("bos_token_id", "pad_token_id"):
        t = values[name]
        if t is not None and not 0 <= t < vocab:
            outside.append(f"{keys.get(name, name)} {t}")
            values[name] = None
    if outside:
        warn_once(f"{source}: {', '.join(outside)} outside the vocabulary [0, {vocab}): ignored, as transformers "
                  "never emits it")


def ids_of(v, name, source) -> tuple[int, ...]:
    """Token ids from an int, a list of ints or null; ConfigError naming `name` otherwise."""
    if v is None:
        return ()
    v = v if isinstance(v, (list, tuple)) else [v]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ConfigError(f"{source}: {name}={_brief(v)} must be an integer or a list of integers")
    return tuple(v)
