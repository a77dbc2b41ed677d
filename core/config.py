"""ModelConfig: config.json read through a spec's key map, validated before anything is allocated."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .errors import ConfigError
from .spec import REQUIRED, ACTIVATIONS, Derived, ModelSpec

ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # values of config.json's layer_types

# Sanity bounds: a config outside them is rejected before any allocation (10^9 layers, ...).
LIMITS = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 17, "num_layers": 4096, "num_heads": 4096,
    "num_kv_heads": 4096, "head_dim": 4096, "intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 24,
}


@attrs.frozen
class RopeConfig:
    """Rotary embedding parameters (rope_type in ROPE_TYPES; factors only where the type uses them)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """float32 [head_dim // 2]: the (scaled) inverse frequencies, computed in float64."""
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        if self.type == "linear":
            inv = inv / self.factor
        elif self.type == "llama3":
            inv = _llama3_scale(inv, self)
        return inv.astype(np.float32)


def _llama3_scale(inv: np.ndarray, r: RopeConfig) -> np.ndarray:
    # Llama 3.1 "rope_type: llama3": long wavelengths divided by factor, short kept, a smooth ramp between.
    low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
    high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / r.factor, inv)
    smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


@attrs.frozen
class ModelConfig:
    """Everything the runtime needs to know about one model: sizes, flags, token ids."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    activation: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # a query sees only the last sliding_window positions, itself included
    layer_types: tuple[str, ...] | None = None  # one of LAYER_TYPES per layer; None: sliding_window on every layer
    attn_softcap: float | None = None  # attention scores s → cap·tanh(s / cap) before the mask (Gemma 2)
    logit_softcap: float | None = None  # the same on the final logits
    attn_scalar: float | None = None  # scores scaled by attn_scalar**-0.5, not head_dim**-0.5 (query_pre_attn_scalar)
    rope: RopeConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # copied from the spec
    norm: str = "rmsnorm"
    norm_offset: float = 0.0
    mlp: str = "gated"
    positions: str = "rope"
    qk_norm: bool = False
    scale_embeddings: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window(self, layer: int) -> int | None:
        """How many positions (itself included) a query of `layer` attends to; None for all before it."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def attn_scale(self) -> float:
        """What q·k is multiplied by: 1/sqrt(head_dim), or 1/sqrt(attn_scalar) where the config sets one."""
        return 1.0 / math.sqrt(self.attn_scalar or self.head_dim)

    @property
    def embed_scale(self) -> float | None:
        """What token embeddings are multiplied by (sqrt(hidden_size) for specs that scale them), or None."""
        return self.hidden_size ** 0.5 if self.scale_embeddings else None

    @classmethod
    def from_hf(cls, spec: ModelSpec, raw: dict, source: str = "config.json") -> "ModelConfig":
        """Read a config.json dict through `spec`'s key map; raises ConfigError naming the key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        for key, ok in spec.rejects:
            if key in raw and raw[key] not in ok:
                raise ConfigError(f"{source}: {key}={raw[key]!r} is not supported by plugin {spec.name!r} (supported: {list(ok)})")
        values: dict[str, Any] = {}
        derived: dict[str, Derived] = {}
        stated: set[str] = set()  # fields config.json gives (the others come from the spec's defaults)
        keys: dict[str, str] = {}  # field → the config.json key that gave it (or would have): errors name it
        for ck in spec.config:
            present = [k for k in ck.keys if raw.get(k) is not None or (ck.null_is_value and k in raw)]
            keys[ck.field] = (present or ck.keys or (ck.field,))[0]
            if present:
                values[ck.field] = raw[present[0]]
                stated.add(ck.field)
            elif isinstance(ck.default, Derived):
                derived[ck.field] = ck.default
            elif ck.default is REQUIRED:
                raise ConfigError(f"{source}: required key {ck.keys[0]!r} is missing (plugin {spec.name!r})")
            else:
                values[ck.field] = ck.default
        # Conventions shared by every HF config: no kv-head count means MHA, no head_dim means hidden/heads.
        for name, rule in (("num_kv_heads", Derived("num_heads")), ("head_dim", Derived("hidden_size", div="num_heads"))):
            if values.get(name) is None:
                values.pop(name, None)
                derived.setdefault(name, rule)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            if name in values and name not in derived:
                values[name] = _int(values[name], keys.get(name, name), source)
        for name, d in derived.items():
            if d.field not in values:
                raise ConfigError(f"{source}: cannot derive {name}: {d.field} is missing")
            v = values[d.field] * d.mul
            if d.div is not None:
                div = values.get(d.div)
                if not div:
                    raise ConfigError(f"{source}: cannot derive {name}: {d.div} is missing or zero")
                v = v // div
            values[name] = v
        if values.get("layer_types") is not None:
            values["layer_types"] = _layer_types(values["layer_types"], values.get("num_layers"), "layer_types" in stated, source)
        values["eos_token_ids"] = _ids(values.get("eos_token_ids", ()), "eos_token_id", source)
        for name in ("bos_token_id", "pad_token_id"):
            v = values.get(name)
            values[name] = v if isinstance(v, int) and not isinstance(v, bool) else None
        if spec.positions == "rope":
            values["rope"] = parse_rope(raw, source)
        else:
            values["rope"] = None
        values.update(norm=spec.norm, norm_offset=spec.norm_offset, mlp=spec.mlp, positions=spec.positions, qk_norm=spec.qk_norm,
                      scale_embeddings=spec.scale_embeddings)
        try:
            cfg = cls(**values)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        cfg.validate(source, keys)
        return cfg

    def validate(self, source: str = "config.json", keys: dict[str, str] | None = None) -> None:
        """Raise ConfigError for sizes that are not positive, out of bounds, or inconsistent.

        keys: field → config.json key, so that messages name what the user wrote (num_hidden_layers, n_layer).
        """
        k = (keys or {}).get
        for name, limit in LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v > limit:
                raise ConfigError(f"{source}: {k(name, name)}={v!r} must be an integer in [1, {limit}]")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{source}: {k('num_heads', 'num_heads')}={self.num_heads} is not a multiple of "
                              f"{k('num_kv_heads', 'num_kv_heads')}={self.num_kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim={self.head_dim} must be even for rotary embeddings")
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            raise ConfigError(f"{source}: sliding_window={w!r} must be a positive integer or null")
        for name in ("attn_softcap", "logit_softcap", "attn_scalar"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ConfigError(f"{source}: {name}={v!r} must be a positive number or null")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise ConfigError(f"{source}: norm epsilon {self.norm_eps!r} must be in (0, 1)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{source}: activation {self.activation!r} is not supported (supported: {list(ACTIVATIONS)})")
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{source}: {name}={getattr(self, name)!r} must be true or false")
        specials = [("eos_token_ids", t) for t in self.eos_token_ids] + [("bos_token_id", self.bos_token_id)] * (self.bos_token_id is not None)
        for name, t in specials:
            if not 0 <= t < self.vocab_size:
                raise ConfigError(f"{source}: {k(name, name)} {t} is outside the vocabulary [0, {self.vocab_size})")

    def summary(self) -> dict:
        """A flat dict for `archkit inspect`."""
        d = attrs.asdict(self, recurse=False)
        d["rope"] = attrs.asdict(self.rope) if self.rope else None
        return d


def _int(v, name, source):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ConfigError(f"{source}: {name}={v!r} must be an integer")
    return int(v)


def _finite(x, otherwise: float) -> float:
    """float(x) for a finite JSON number (not a bool), else `otherwise`."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return otherwise
    try:
        f = float(x)
    except OverflowError:  # an integer beyond float range
        return otherwise
    return f if math.isfinite(f) else otherwise


def _layer_types(v, num_layers, stated: bool, source) -> tuple[str, ...]:
    """One attention kind per layer. config.json must list every layer; a spec default is a pattern that
    repeats over the layers (Gemma 2's: sliding, full, sliding, full, ...)."""
    if not isinstance(v, (list, tuple)) or not v or any(t not in LAYER_TYPES for t in v):
        raise ConfigError(f"{source}: layer_types={v!r} is not supported (a list of {list(LAYER_TYPES)})")
    if stated and len(v) != num_layers:
        raise ConfigError(f"{source}: layer_types has {len(v)} entries for num_hidden_layers={num_layers}")
    if not isinstance(num_layers, int) or not 0 < num_layers <= LIMITS["num_layers"]:
        return tuple(v)  # validate() reports the layer count
    return tuple(v[i % len(v)] for i in range(num_layers))


def _ids(v, name, source) -> tuple[int, ...]:
    if v is None:
        return ()
    v = v if isinstance(v, (list, tuple)) else [v]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ConfigError(f"{source}: {name}={v!r} must be an integer or a list of integers")
    return tuple(v)


def parse_rope(raw: dict, source: str = "config.json") -> RopeConfig:
    """Rope parameters from the transformers-5 form (rope_parameters) or the hub form (rope_theta, rope_scaling)."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        scaling = dict(params)
        theta = scaling.pop("rope_theta", raw.get("rope_theta", 10000.0))
    elif params is not None:
        raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
    else:
        scaling = raw.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
        theta = raw.get("rope_theta", 10000.0)
    if not 1 < _finite(theta, 0.0):
        raise ConfigError(f"{source}: rope_theta={theta!r} must be a finite number > 1")
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rtype!r} is not supported (supported: {list(ROPE_TYPES)})")
    prf = raw.get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={prf!r} is not supported (only 1.0)")
    kw: dict[str, Any] = {"theta": float(theta), "type": rtype}
    needed = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[rtype]
    for k in needed:
        if not 0 < _finite(scaling.get(k), 0.0):
            raise ConfigError(f"{source}: rope type {rtype!r} needs a finite positive number {k!r}, got {scaling.get(k)!r}")
        kw[k] = scaling[k]
    if rtype == "llama3" and kw["high_freq_factor"] <= kw["low_freq_factor"]:
        raise ConfigError(f"{source}: llama3 rope needs high_freq_factor > low_freq_factor")
    if "original_max_position_embeddings" in kw:
        kw["original_max_position_embeddings"] = int(kw["original_max_position_embeddings"])
    return RopeConfig(**kw)


def read_json(path: Path, what: str, error: type[Exception] = ConfigError) -> dict:
    """Parse a JSON object from `path`; `error` naming the file otherwise."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read
            raise error(f"{path}: {what} is not a regular file")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: "[[[[..."
        raise error(f"{path}: {what} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


CONFIG_FIELDS = frozenset(f.name for f in attrs.fields(ModelConfig)) | {"q_dim", "kv_dim"}
BOOL_FIELDS = frozenset(f.name for f in attrs.fields(ModelConfig) if f.type in ("bool", bool))
