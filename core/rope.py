"""Rotary position embeddings: parameters read from config.json, and the tables the rope op applies.

RopeConfig holds what config.json says (theta, scaling type and its factors, partial rotary, pairing);
RopeConfig.table turns it into a RopeTable (inverse frequencies, cos/sin scale, pairing) for a given sequence
length, exactly as transformers 5's `ROPE_INIT_FUNCTIONS` and `dynamic_rope_update` do. Tables are computed in
float64 and rounded to float32 once, so they agree with transformers' float32 arithmetic to a few ulps; where
transformers' own float32 rounding is amplified (the YaRN ramp, dynamic NTK's grown base) it is reproduced.
"""

from __future__ import annotations

import functools
import math

import attrs
import numpy as np

from .errors import ConfigError, brief as _brief

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
_MAX_POSITIONS = 2 ** 31  # bound on the *_position_embeddings counts, so that arithmetic on them stays in float range
MAX_THETA = 1e15  # the largest real base is ~4e9 (Gradient's 4M-context Llama 3)
# Every other rope number (factors, betas, attention factor, mscales, longrope's per-frequency factors) lies in
# [-FACTOR_RANGE[1], FACTOR_RANGE[1]] and, where it must be > 0, in FACTOR_RANGE. Real ones are between 0.1 and 128;
# a factor of 1e-320 is 0 in float32 and turns the rope table, then the logits, into NaN without a word.
FACTOR_RANGE = (1e-6, 1e6)

# Keys of a rope dict (rope_parameters / rope_scaling), per rope type. transformers validates them per type
# (modeling_rope_utils' _validate_<type>_rope_parameters: required and optional keys) but only *warns* about others,
# and families then read keys of their own (HunYuan's "alpha", Phi-MoE's "short_mscale" / "long_mscale", Ministral 3's
# "llama_4_scaling_beta"): ignoring such a key gave silently wrong logits. So parse_rope sorts every key that is not
# null into
#   read: the type's keys archkit implements (transformers' required and optional keys, and the families' ones);
#   inert: keys no transformers 5 code reads for this type to compute the rotary embedding, found in real configs:
#       another type's parameters (transformers ignores them: a "factor" next to "default", HunYuan-A13B's yarn keys
#       beside "dynamic" + "alpha", an original_max_position_embeddings that dynamic NTK does not use) and metadata
#       (Ministral 3's max_position_embeddings copy, NousResearch YaRN's "finetuned", Qwen-VL's mrope_section /
#       mrope_interleaved, which only split the frequencies among 3 position streams that are equal for text);
#   refused, a ConfigError naming the key, the type and the rule: _FAMILY_KEYS for the types where a family gives
#       them a meaning archkit does not implement, and any key not known at all.
# Refusing unknown keys rather than warning: the two bugs above were keys that a newer family gave meaning to, and
# a warning scrolls by while the output is wrong; a real config that carries harmless junk fails loudly, with the
# key named, and the key is added to _INERT once checked.
# (Not the rope table's business, so not checked here: DeepSeek's mscale_all_dim also scales MLA's softmax, for any
# type but default, which an MLA family plugin must read itself.)
_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
_READ = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor", "alpha"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"}),
    "longrope": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                           "long_factor", "short_mscale", "long_mscale"}),
}
# key: (the types it changes the math of, though archkit does not implement it there; who reads it, and how)
_NOT_LONGROPE = ("linear", "dynamic", "llama3", "yarn")
_FAMILY_KEYS = {
    "short_mscale": (_NOT_LONGROPE, "Phi-MoE multiplies cos/sin by it up to original_max_position_embeddings for "
                                    "every rope type but default; archkit implements it for longrope only"),
    "long_mscale": (_NOT_LONGROPE, "Phi-MoE multiplies cos/sin by it past original_max_position_embeddings for "
                                   "every rope type but default; archkit implements it for longrope only"),
    "llama_4_scaling_beta": (ROPE_TYPES, "Ministral 3 / Mistral 4 multiply queries by 1 + beta * log(1 + "
                                         "floor(position / original_max_position_embeddings)), which archkit does "
                                         "not implement (0 or null: no effect)"),
}
_INERT = frozenset().union(*_READ.values()) | {
    "max_position_embeddings", "finetuned", "mrope_section", "mrope_interleaved"}


@attrs.frozen(eq=False)
class RopeTable:
    """What the rope op applies at one sequence length.

    eq=False: tables compare and hash by identity, which the CUDA backend uses to key its device copies.
    """

    inv_freq: np.ndarray  # float32 [rotary_dim // 2]; dims past rotary_dim pass through unrotated
    scale: float = 1.0  # cos and sin are multiplied by it (transformers' `attention_scaling`)
    interleaved: bool = False  # False: pairs (i, i + rotary_dim/2) as GPT-NeoX/Llama; True: (2i, 2i+1) as GPT-J/Cohere

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head rotate."""
        return 2 * len(self.inv_freq)


@attrs.frozen(cache_hash=True)  # hashed on every table() call (the lru_cache key): compute the hash once
class RopeConfig:
    """Rotary embedding parameters (type in ROPE_TYPES; a type's fields are used only by it).

    parse_rope resolves every default transformers would fill in (original_max_position_embeddings, a yarn or
    longrope factor), so table() needs nothing but head_dim and the sequence length.
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0  # linear, dynamic, llama3, yarn; longrope: only for its default attention factor
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn, longrope: the pretraining context
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn: with mscale_all_dim, sets the default attention factor
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dims
    attention_factor: float | None = None  # yarn, longrope: the cos/sin scale; None = the type's default
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to original_max_position_embeddings
    long_factor: tuple[float, ...] = ()  # longrope: ... and beyond it
    partial_rotary_factor: float = 1.0
    rotary_dim: int | None = None  # an explicit rotary dim (GPT-J's rotary_dim) wins over partial_rotary_factor
    interleaved: bool = False
    max_position_embeddings: int | None = None  # the model's; dynamic NTK grows past it
    alpha: float | None = None  # dynamic: HunYuan's fixed NTK-alpha (a larger base, no growth); None = plain dynamic
    short_mscale: float | None = None  # longrope (Phi-MoE): the cos/sin scale up to original_max_position_embeddings
    long_mscale: float | None = None  # longrope: ... and beyond it; both or neither, they win over attention_factor

    @property
    def dynamic(self) -> bool:
        """True when the table depends on the sequence length (dynamic NTK without alpha, longrope)."""
        return self.type == "longrope" or (self.type == "dynamic" and self.alpha is None)

    def rotary_dims(self, head_dim: int, source: str = "config.json") -> int:
        """How many dims of a head_dim head rotate: rotary_dim, else int(head_dim * partial_rotary_factor) as
        transformers truncates it. Raises ConfigError unless it is even, in [2, head_dim], and fits the type."""
        if self.rotary_dim is not None:
            d, what = self.rotary_dim, f"rotary_dim={self.rotary_dim}"
        else:
            d = int(head_dim * self.partial_rotary_factor)
            what = f"head_dim {head_dim} x partial_rotary_factor {self.partial_rotary_factor:g}"
        if d % 2 or not 2 <= d <= head_dim:
            raise ConfigError(f"{source}: the rotary dim {d} ({what}) must be even and in [2, head_dim={head_dim}]")
        if self.type == "dynamic" and d == 2:  # its base exponent is d / (d - 2); transformers divides by zero too
            raise ConfigError(f"{source}: dynamic rope needs a rotary dim > 2, got {d} ({what})")
        for name in ("short_factor", "long_factor") if self.type == "longrope" else ():
            n = len(getattr(self, name))
            if n != d // 2:
                raise ConfigError(f"{source}: longrope {name} has {n} entries; it needs rotary_dim / 2 = {d // 2} ({what})")
        return d

    def table(self, head_dim: int, seq_len: int | None = None) -> RopeTable:
        """The RopeTable for a forward step whose positions end at seq_len - 1 (None: no growth, the initial table).

        Cached; for every type the same object is returned while the table does not change with seq_len.
        (transformers' dynamic module keeps a grown table until a sequence shorter than max_position_embeddings
        comes; a function of seq_len equals it whenever positions only grow within a generation.)
        """
        if self.type == "dynamic" and self.alpha is None and seq_len is not None and seq_len > self._max_positions():
            return _grown_table(self, head_dim, int(seq_len))
        # transformers picks long_factor when max(position_ids) + 1 > original_max_position_embeddings
        long = self.type == "longrope" and seq_len is not None and seq_len > self.original_max_position_embeddings
        return _table(self, head_dim, long)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """float32 [rotary_dim // 2]: the initial table's inverse frequencies."""
        return self.table(head_dim).inv_freq

    def attention_scaling(self, long: bool = False) -> float:
        """The cos/sin scale (transformers' `attention_scaling`): 1 except for yarn and longrope. long: longrope's
        table past original_max_position_embeddings (only its long_mscale differs)."""
        if self.type == "longrope" and self.short_mscale is not None:  # PhimoeRotaryEmbedding: wins over the rest
            return float(self.long_mscale if long else self.short_mscale)
        if self.attention_factor is not None or self.type not in ("yarn", "longrope"):
            return 1.0 if self.attention_factor is None else float(self.attention_factor)
        f = self.factor
        if self.type == "longrope":
            return 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(self.original_max_position_embeddings))
        if self.mscale and self.mscale_all_dim:  # DeepSeek: a ratio of the two, as transformers' truthiness test
            return float(_yarn_mscale(f, self.mscale) / _yarn_mscale(f, self.mscale_all_dim))
        return _yarn_mscale(f)

    def _max_positions(self) -> int:
        if self.max_position_embeddings is None:
            raise ConfigError("dynamic rope needs max_position_embeddings")
        return self.max_position_embeddings


# Two caches so that a long dynamic-NTK generation (a new table per step past max_position_embeddings) can never
# evict a static table, whose identity the CUDA backend relies on.
@functools.lru_cache(maxsize=None)
def _table(r: RopeConfig, head_dim: int, long: bool) -> RopeTable:
    return _build(r, head_dim, None, long)


@functools.lru_cache(maxsize=256)
def _grown_table(r: RopeConfig, head_dim: int, seq_len: int) -> RopeTable:
    return _build(r, head_dim, seq_len, False)


def _build(r: RopeConfig, head_dim: int, seq_len: int | None, long: bool) -> RopeTable:
    d = r.rotary_dims(head_dim)
    exponent = np.arange(0, d, 2, dtype=np.float64) / d
    base = r.theta
    if r.type == "dynamic" and r.alpha is not None:
        # HunYuan (transformers' compute_ntk_alpha_rope_parameters, in Python floats): a fixed NTK-aware base,
        # theta * alpha ** (d / (d - 2)), whatever the sequence length; its factor is unused
        base = base * r.alpha ** (d / (d - 2))
    elif r.type == "dynamic":  # NTK-aware: a larger base once the sequence outgrows max_position_embeddings
        f, m = r.factor, r._max_positions()
        if seq_len is None:  # transformers' initial table, in Python floats
            base = base * ((f * m / m) - (f - 1)) ** (d / (d - 2))
        else:
            # transformers grows it from seq_len = max(position_ids) + 1, a tensor, so in float32; and since
            # f * s / m - (f - 1) cancels, that rounding shows in inv_freq: reproduce it
            f32 = np.float32
            grown = f32(f) * f32(seq_len) / f32(m) - f32(f - 1)
            base = float(f32(base) * grown ** f32(d / (d - 2)))
    if r.type == "longrope":
        ext = np.asarray(r.long_factor if long else r.short_factor, dtype=np.float64)
        inv = 1.0 / (ext * base ** exponent)
    else:
        inv = 1.0 / (base ** exponent)
    if r.type == "linear":
        inv = inv / r.factor
    elif r.type == "llama3":
        inv = _llama3_scale(inv, r)
    elif r.type == "yarn":
        inv = _yarn_blend(inv, r, d)
    inv = inv.astype(np.float32)
    inv.flags.writeable = False  # shared by every caller of the cache
    return RopeTable(inv, scale=r.attention_scaling(long), interleaved=r.interleaved)


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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN eq. 21 (transformers' yarn_get_mscale)
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_blend(inv: np.ndarray, r: RopeConfig, d: int) -> np.ndarray:
    # YaRN: frequencies that turn fewer than beta_slow times over the pretraining context are interpolated
    # (divided by factor), those turning more than beta_fast times kept, with a linear ramp between.
    def correction_dim(rotations: float) -> float:
        return d * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: avoid dividing by zero
    # The ramp in float32 exactly as transformers rounds it: the blend below multiplies its rounding error by up
    # to factor, so a float64 ramp would differ from transformers by more than a few ulps.
    f32 = np.float32
    ramp = np.clip((np.arange(d // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1))
    keep = (1 - ramp).astype(np.float64)  # transformers' inv_freq_extrapolation_factor
    return (inv / r.factor) * (1 - keep) + inv * keep


def parse_rope(raw: dict, source: str = "config.json", *, theta=None, partial_rotary_factor=None, rotary_dim=None,
               interleaved=False, max_position_embeddings=None, layer_type: str = "full_attention") -> RopeConfig:
    """Rope parameters from a config.json dict, validated; ConfigError names the key and the rule on bad values.

    Reads the transformers-5 form (`rope_parameters`) or the hub form (`rope_theta` + `rope_scaling`, where the
    type may be spelled `type`, and Phi-3's "su" / short-and-long-factor "yarn" mean longrope). The keyword
    arguments are what a family plugin mapped from its own keys (GPT-NeoX's rotary_emb_base and rotary_pct,
    GPT-J's rotary_dim) or its defaults. Precedence, as transformers: a value inside rope_parameters/rope_scaling,
    then the keyword argument, then the top-level key of raw, then the default (theta 10000, factor 1).
    A key of the rope dict that is neither read for its type nor known to be inert there is a ConfigError (see _READ).
    A rope dict nested per layer type (Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}) gives the
    entry of `layer_type`.
    """
    where, params = _rope_dict(raw, source, layer_type)
    got = lambda k: params.get(k)  # noqa: E731  (JSON null counts as absent, as transformers' setdefault leaves it)
    key = lambda k: f"{where}.{k}"  # noqa: E731

    th, th_key = _first((got("rope_theta"), key("rope_theta")), (theta, "rope_theta"), (raw.get("rope_theta"), "rope_theta"),
                        (10000.0, "rope_theta"))
    if not 1 < _finite(th, 0.0) <= MAX_THETA:
        raise ConfigError(f"{source}: {th_key}={_brief(th)} must be a finite number > 1 and at most {MAX_THETA:g}")
    prf, prf_key = _first((got("partial_rotary_factor"), key("partial_rotary_factor")),
                          (partial_rotary_factor, "partial_rotary_factor"),
                          (raw.get("partial_rotary_factor"), "partial_rotary_factor"), (1.0, "partial_rotary_factor"))
    if not 0 < _finite(prf, 0.0) <= 1:
        raise ConfigError(f"{source}: {prf_key}={_brief(prf)} must be a number in (0, 1]")
    if rotary_dim is not None:
        rotary_dim = _count(rotary_dim, "rotary_dim", source)
    if not isinstance(interleaved, bool):
        raise ConfigError(f"{source}: interleaved={_brief(interleaved)} must be true or false")
    mpe_given = raw.get("max_position_embeddings") if max_position_embeddings is None else max_position_embeddings
    try:  # checked where a type needs it: the model's own validation covers the rest
        mpe = _count(mpe_given, "max_position_embeddings", source)
    except ConfigError:
        mpe = None

    rtype = got("rope_type") or got("type") or "default"
    if rtype == "su" or (rtype == "yarn" and got("short_factor") is not None and got("long_factor") is not None):
        rtype = "longrope"  # Phi-3's old spellings, which transformers' Phi3Config converts
    if not isinstance(rtype, str) or rtype not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {_brief(rtype)} ({key('rope_type')}) is not supported "
                          f"(supported: {list(ROPE_TYPES)})")
    _check_keys(params, rtype, key, source)
    kw: dict = {"theta": float(th), "type": rtype, "partial_rotary_factor": float(prf), "rotary_dim": rotary_dim,
                "interleaved": interleaved, "max_position_embeddings": mpe}

    def number(k: str, required=False):
        v = got(k)
        if v is None and not required:
            return None
        if not _in_range(v):
            raise ConfigError(f"{source}: rope type {rtype!r} needs {key(k)} to be a finite number in "
                              f"[{FACTOR_RANGE[0]:g}, {FACTOR_RANGE[1]:g}], got {_brief(v)}")
        return float(v)

    def need_mpe(why: str) -> int:
        if mpe is None:
            raise ConfigError(f"{source}: rope type {rtype!r} needs max_position_embeddings (a positive integer) "
                              f"for {why}, got {_brief(mpe_given)}")
        return mpe

    if rtype in ("linear", "dynamic", "llama3"):
        kw["factor"] = number("factor", required=True)
    if rtype == "dynamic" and got("alpha") not in (None, 0):  # HunYuan: `.get("alpha")` truthy, as transformers
        kw["alpha"] = number("alpha")
    elif rtype == "dynamic":
        need_mpe("dynamic NTK scaling")
    if rtype in ("llama3", "yarn", "longrope"):
        # transformers prefers a top-level original_max_position_embeddings (Phi-3 keeps it there), then the one
        # in the rope dict, then max_position_embeddings
        top = raw.get("original_max_position_embeddings")
        orig, orig_key = (top, "original_max_position_embeddings") if top is not None else \
            (got("original_max_position_embeddings"), key("original_max_position_embeddings"))
        kw["original_max_position_embeddings"] = (need_mpe("original_max_position_embeddings") if orig is None
                                                  else _count(orig, orig_key, source))
    if rtype == "llama3":
        kw["low_freq_factor"] = number("low_freq_factor", required=True)
        kw["high_freq_factor"] = number("high_freq_factor", required=True)
        if kw["high_freq_factor"] <= kw["low_freq_factor"]:
            raise ConfigError(f"{source}: llama3 rope needs {key('high_freq_factor')} > {key('low_freq_factor')}")
    if rtype in ("yarn", "longrope"):
        # without a factor, transformers uses the context extension ratio
        factor = number("factor")
        kw["factor"] = factor if factor is not None else need_mpe("the default factor") / kw["original_max_position_embeddings"]
        kw["attention_factor"] = number("attention_factor")
    if rtype == "yarn":
        # transformers: `get("beta_fast") or 32`, so 0 means the default too
        kw["beta_fast"] = number("beta_fast") if got("beta_fast") else 32.0
        kw["beta_slow"] = number("beta_slow") if got("beta_slow") else 1.0
        for k in ("mscale", "mscale_all_dim"):  # any finite number; used only when both are non-zero
            if got(k) is not None and not abs(_finite(got(k), math.nan)) <= FACTOR_RANGE[1]:
                raise ConfigError(f"{source}: {key(k)}={_brief(got(k))} must be a finite number in "
                                  f"[-{FACTOR_RANGE[1]:g}, {FACTOR_RANGE[1]:g}]")
            kw[k] = None if got(k) is None else float(got(k))
        if not isinstance(params.get("truncate", True), (bool, type(None))):
            raise ConfigError(f"{source}: {key('truncate')}={_brief(params['truncate'])} must be true or false")
        kw["truncate"] = bool(params.get("truncate", True))  # null: falsy, no truncation, as transformers
    if rtype == "longrope":
        if kw["original_max_position_embeddings"] < 2 and kw["attention_factor"] is None and kw["factor"] > 1:
            raise ConfigError(f"{source}: longrope needs original_max_position_embeddings >= 2 (its log divides)")
        for k in ("short_factor", "long_factor"):
            v = got(k)
            if not (isinstance(v, list) and v and all(_in_range(x) for x in v)):
                raise ConfigError(f"{source}: longrope needs {key(k)} to be a list of finite numbers in "
                                  f"[{FACTOR_RANGE[0]:g}, {FACTOR_RANGE[1]:g}], got {_brief(v)}")
            kw[k] = tuple(float(x) for x in v)
        # Phi-MoE: cos/sin times short_mscale up to original_max_position_embeddings, long_mscale past it (its
        # PhimoeConfig requires both numbers); they replace attention_factor and the default scale
        mscales = [got(k) for k in ("short_mscale", "long_mscale")]
        if mscales != [None, None]:
            if None in mscales:
                raise ConfigError(f"{source}: longrope needs both {key('short_mscale')} and {key('long_mscale')} or "
                                  f"neither, got {_brief(mscales[0])} and {_brief(mscales[1])}")
            kw["short_mscale"], kw["long_mscale"] = number("short_mscale"), number("long_mscale")
    r = RopeConfig(**kw)
    try:
        scaling = min(r.attention_scaling(False), r.attention_scaling(True))
    except (ArithmeticError, ValueError):  # e.g. a yarn mscale_all_dim that zeroes the denominator
        scaling = math.nan
    if not 0 < _finite(scaling, 0.0):
        raise ConfigError(f"{source}: the {rtype} attention factor (from {key('attention_factor')}, factor, mscale, "
                          f"mscale_all_dim) is {scaling!r}; it must be a finite number > 0")
    return r


def _check_keys(params: dict, rtype: str, key, source: str) -> None:
    """ConfigError for the first key of the rope dict that parse_rope neither reads nor knows to be inert for rtype
    (see _READ): a family's key that changes the math, or an unknown one. Null values are absent."""
    for k in sorted(params, key=str):
        if params[k] is None or k in _COMMON_KEYS or k in _READ[rtype]:
            continue
        types, why = _FAMILY_KEYS.get(k, ((), ""))
        if rtype in types and not (k == "llama_4_scaling_beta" and params[k] == 0):
            raise ConfigError(f"{source}: {key(k)}={_brief(params[k])} is not supported with rope type {rtype!r}: "
                              f"{why}")
        if k not in _INERT and k not in _FAMILY_KEYS:
            reads = ", ".join(sorted(_READ[rtype])) or "only rope_theta and partial_rotary_factor"
            raise ConfigError(f"{source}: {key(k if len(k) <= 60 else k[:57] + '...')} is not a key of rope type "
                              f"{rtype!r} (it reads {reads}); an unknown rope key may change the output, so it is "
                              f"refused rather than ignored")


LAYER_TYPES = ("full_attention", "sliding_attention")  # the keys of a rope dict nested per layer type


def nested_rope(raw: dict) -> bool:
    """Whether config.json's rope dict holds one entry per layer type (Gemma 3 in transformers 5)."""
    name = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(name)
    return isinstance(params, dict) and any(isinstance(v, dict) for v in params.values())


def _rope_dict(raw: dict, source: str, layer_type: str = "full_attention") -> tuple[str, dict]:
    """(its key, the rope dict): rope_scaling when non-empty (transformers' `rope_scaling or rope_parameters`),
    else rope_parameters, else {}; of a dict nested per layer type, the entry of `layer_type`."""
    for name in ("rope_scaling", "rope_parameters"):
        v = raw.get(name)
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{source}: {name} must be an object or null, got {_brief(v)}")
    name = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(name) or {}
    nested = [k for k, v in params.items() if isinstance(v, dict)]
    if nested:
        odd = [k for k in params if k not in LAYER_TYPES or not isinstance(params[k], (dict, type(None)))]
        if odd:
            raise ConfigError(f"{source}: {name} nests {_brief(odd[0])}; a rope dict nested per layer type has "
                              f"only {list(LAYER_TYPES)} entries, each an object")
        return f"{name}.{layer_type}", params.get(layer_type) or {}
    return name, params


def _first(*candidates):
    """The first (value, key) whose value is not None."""
    return next((v, k) for v, k in candidates if v is not None)


def _count(v, key: str, source: str) -> int:
    """A positive integer (an integral float accepted) up to _MAX_POSITIONS, else ConfigError naming key."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _MAX_POSITIONS:
        raise ConfigError(f"{source}: {key}={_brief(v)} must be an integer in [1, {_MAX_POSITIONS}]")
    return v



def _in_range(x) -> bool:
    """x is a JSON number (not a bool) in FACTOR_RANGE."""
    return FACTOR_RANGE[0] <= _finite(x, 0.0) <= FACTOR_RANGE[1]


def _finite(x, otherwise: float) -> float:
    """float(x) for a finite JSON number (not a bool), else `otherwise`."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return otherwise
    try:
        f = float(x)
    except OverflowError:  # an integer beyond float range
        return otherwise
    return f if math.isfinite(f) else otherwise
