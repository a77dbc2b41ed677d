"""ModelConfig: config.json read through a spec's key map, validated before anything is allocated."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import Any

import attrs

from .config_keys import (INT_FIELDS, LIMITS, check_rejects, drop_ids_outside_vocab, ids_of, layer_types_of, read_keys,
                          sliding_rope_of, to_int)
from .errors import ConfigError, brief as _brief
# ROPE_TYPES is re-exported: older imports name core.config
from .rope import ROPE_TYPES, RopeConfig, parse_rope  # noqa: F401
from .spec import ACTIVATIONS, FLAGS, ROUTER_SCORINGS, Derived, ModelSpec


MAX_WINDOW = 1 << 31  # sliding_window: a window past any context means none, and 2**63 overflows numpy's int64
# Config numbers the forward multiplies or divides by, and the range each must lie in. Real values sit far inside
# (Gemma 2's soft-caps 30 and 50, Granite's multipliers 1/128 to 12, DeepSeek's routed scale 2.5); outside it a
# value turns into 0 or inf in float32 (1e-320 is 0) and the logits into NaN without a word.
FLOAT_RANGES = {name: (1e-6, 1e6) for name in ("attn_softcap", "logit_softcap", "attn_scalar", "embed_multiplier",
                                                "residual_multiplier", "attention_multiplier", "logit_multiplier",
                                                "moe_routed_scale", "qkv_clip")}
NORM_EPS_RANGE = (1e-20, 1.0)  # [lo, hi): an epsilon that is 0 in float32 lets an all-zero row divide by zero


@attrs.frozen
class MoeRouting:
    """The `moe` op's parameters: top_k experts by softmax or sigmoid scores (plus the op's select_bias, if given,
    for choosing only), their weights renormalised to sum 1 or not and times routed_scale; each expert a gated (or
    plain) MLP with `activation`. Group-limited (groups > topk_groups): the experts are `groups` contiguous groups,
    each scored by the sum of its two best choosing scores, and only the best topk_groups groups' experts compete."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    activation: str = "silu"
    routed_scale: float = 1.0
    gated: bool = True
    groups: int = 1
    topk_groups: int = 1


@attrs.frozen
class ModelConfig:
    """Everything the runtime needs to know about one model: sizes, flags, token ids.

    Each field comes from config.json through the spec's ConfigKeys (with the family's default when the key
    is absent), or from the spec's architecture flags, or is the core default below.
    """

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
    lm_head_bias: bool = False  # for a `when` on lm_head.bias where a config key switches it (PhiMoE lm_head_bias)
    sliding_window: int | None = None  # a query sees only the last sliding_window positions, itself included
    layer_types: tuple[str, ...] | None = None  # one of LAYER_TYPES per layer; None: sliding_window on every layer
    attn_softcap: float | None = None  # attention scores s → cap·tanh(s / cap) before the mask (Gemma 2)
    logit_softcap: float | None = None  # the same on the final logits
    attn_scalar: float | None = None  # scores scaled by attn_scalar**-0.5, not head_dim**-0.5 (query_pre_attn_scalar)
    # q, k and v each clamped to [-qkv_clip, qkv_clip] after their projections (and a q/k norm over the projection)
    qkv_clip: float | None = None  # OLMo 1 / OLMoE clip_qkv, DBRX attn_config.clip_qkv
    rope: RopeConfig | None = None
    # the RoPE of sliding-window layers where it differs from the others' (Gemma 3: base 10000 on its local layers,
    # 1e6 and linear scaling on its global ones): from a rope dict nested per layer type, or sliding_rope_theta
    sliding_rope: RopeConfig | None = None
    sliding_rope_theta: float | None = None  # a base of their own for them (Gemma 3's rope_local_base_freq)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # architecture flags (core.spec.FLAGS): from the spec, or mapped from config.json
    norm: str = "rmsnorm"
    norm_offset: float = 0.0
    norm_weight: bool = True  # False: no norm has a learned weight (OLMo 1's LayerNorm); each computes as with ones
    mlp: str = "gated"
    positions: str = "rope"
    rope_style: str = "half"
    qk_norm: str = "none"
    scale_embeddings: bool = False
    block: str = "sequential"
    norm_placement: str = "pre"
    # rotary parameters a plugin maps from older spellings (rotary_emb_base, rotary_pct, rotary_dim); values
    # inside rope_parameters / rope_scaling win (see core.rope.parse_rope)
    rope_theta: float | None = None
    partial_rotary_factor: float | None = None
    rotary_dim: int | None = None
    # layers whose attention applies no RoPE at all (SmolLM3's no_rope_layers, the global layers of Cohere 2 and
    # EXAONE 4, Llama 4's NoPE layers); q and k go to the cache as projected (and normed)
    nope_layers: tuple[int, ...] = ()
    # scalar multipliers (None: off)
    embed_multiplier: float | None = None  # token embeddings times this (Granite embedding_multiplier)
    residual_multiplier: float | None = None  # each sublayer's output times this before the residual add (Granite)
    attention_multiplier: float | None = None  # the score scale itself, replacing head_dim**-0.5 (Granite)
    logit_multiplier: float | None = None  # final logits times this (Cohere logit_scale; Granite 1 / logits_scaling)
    # mixture of experts (num_experts 0: every MLP is dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_intermediate_size: int | None = None  # each expert's; None: intermediate_size
    router_scoring: str = "softmax"  # softmax over all experts, or an independent sigmoid per expert
    moe_renormalize: bool = False  # the top-k weights rescaled to sum to 1 (Mixtral always; Qwen3-MoE norm_topk_prob)
    moe_routed_scale: float = 1.0  # the routed experts' sum times this (DeepSeek routed_scaling_factor)
    shared_expert_intermediate_size: int = 0  # a dense expert every token goes through; 0: none
    mlp_only_layers: tuple[int, ...] = ()  # layers whose MLP is dense although the model has experts (Qwen3-MoE)
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 (Qwen2/3-MoE)
    first_dense_layers: int = 0  # the first k layers are dense (DeepSeek first_k_dense_replace)
    # layers a checkpoint carries after the model's own that the model does not run, their tensors skipped on load
    # (the multi-token-prediction layers of GLM-4.5 and DeepSeek-V3: num_nextn_predict_layers)
    unused_layers: int = 0
    # group-limited routing (DeepSeek-V3 / GLM-4.5 n_group, topk_group): experts in moe_groups contiguous groups,
    # only the moe_topk_groups best groups' experts eligible; 1, 1: plain top-k
    moe_groups: int = 1
    moe_topk_groups: int = 1
    # a plugin's own sublayer functions (ModelSpec.attention_block / mlp_block), copied from the spec
    attention_block: Any = attrs.field(default=None, eq=False, repr=False)
    mlp_block: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def context_limit(self) -> int:
        """The longest sequence generation allows: max_position_embeddings, or with dynamic NTK rope (which exists
        to run past it: transformers grows the base once a sequence is longer) that times the rope factor."""
        if self.rope is not None and self.rope.type == "dynamic" and self.rope.dynamic:  # not NTK-alpha's fixed base
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    @property
    def expert_dim(self) -> int:
        """One expert's intermediate size."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def moe_routing(self) -> "MoeRouting":
        """How the `moe` op routes and combines experts."""
        return MoeRouting(self.num_experts_per_tok, self.router_scoring, self.moe_renormalize, self.activation,
                          float(self.moe_routed_scale), self.mlp == "gated", self.moe_groups, self.moe_topk_groups)

    def sparse_layer(self, layer: int) -> bool:
        """Whether `layer`'s MLP is a mixture of experts."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers and layer >= self.first_dense_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def sliding_layer(self, layer: int) -> bool:
        """Whether `layer` is a sliding-window layer by its kind (layer_types; without them, every layer when
        sliding_window is set)."""
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return self.sliding_window is not None

    def rope_for(self, layer: int) -> RopeConfig | None:
        """The RoPE of `layer`: None on a NoPE layer, sliding_rope on sliding layers where the model has one,
        else rope."""
        if layer in self.nope_layers:
            return None
        return self.sliding_rope if self.sliding_rope is not None and self.sliding_layer(layer) else self.rope

    def window(self, layer: int) -> int | None:
        """How many positions (itself included) a query of `layer` attends to; None for all before it."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def attn_scale(self) -> float:
        """What q·k is multiplied by: attention_multiplier, or 1/sqrt(attn_scalar), or 1/sqrt(head_dim)."""
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        return 1.0 / math.sqrt(self.attn_scalar or self.head_dim)

    @property
    def embed_scale(self) -> float | None:
        """What token embeddings are multiplied by (sqrt(hidden_size) for specs that scale them, or the
        embedding multiplier), or None."""
        s = self.hidden_size ** 0.5 if self.scale_embeddings else None
        if self.embed_multiplier is not None:
            s = self.embed_multiplier * (s or 1.0)
        return s

    @classmethod
    def from_hf(cls, spec: ModelSpec, raw: dict, source: str = "config.json") -> "ModelConfig":
        """Read a config.json dict through `spec`'s key map; raises ConfigError naming the key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        check_rejects(spec, raw, source)
        values, derived, stated, keys = read_keys(spec, raw, source)
        # Conventions shared by every HF config: no kv-head count means MHA, no head_dim means hidden/heads.
        for name, rule in (("num_kv_heads", Derived("num_heads")), ("head_dim", Derived("hidden_size", div="num_heads"))):
            if values.get(name) is None:
                values.pop(name, None)
                derived.setdefault(name, rule)
        for name in INT_FIELDS:
            if values.get(name) is not None and name not in derived:
                values[name] = to_int(values[name], keys.get(name, name), source)
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
            values["layer_types"] = layer_types_of(values["layer_types"], values.get("num_layers"), "layer_types" in stated, source)
        values["eos_token_ids"] = ids_of(values.get("eos_token_ids", ()), "eos_token_id", source)
        for name in ("mlp_only_layers", "nope_layers"):
            values[name] = ids_of(values.get(name, ()), keys.get(name, name), source)
        for name in ("bos_token_id", "pad_token_id"):
            v = values.get(name)
            values[name] = v if isinstance(v, int) and not isinstance(v, bool) else None
        drop_ids_outside_vocab(values, keys, source)
        for flag in FLAGS:
            if getattr(spec, flag) is not None:
                values[flag] = getattr(spec, flag)
        for name in ("norm_offset", "scale_embeddings", "attention_block", "mlp_block"):
            if getattr(spec, name) is not None:
                values[name] = getattr(spec, name)
        if values.get("positions", "rope") == "rope":
            kw = dict(partial_rotary_factor=values.get("partial_rotary_factor"), rotary_dim=values.get("rotary_dim"),
                      interleaved=values.get("rope_style") == "interleaved",
                      max_position_embeddings=values.get("max_position_embeddings"))
            values["rope"] = parse_rope(raw, source, theta=values.get("rope_theta"), **kw)
            values["sliding_rope"] = sliding_rope_of(raw, source, values, kw)
        else:
            values["rope"] = values["sliding_rope"] = None
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
                raise ConfigError(f"{source}: {k(name, name)}={_brief(v)} must be an integer in [1, {limit}]")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{source}: {k('num_heads', 'num_heads')}={self.num_heads} is not a multiple of "
                              f"{k('num_kv_heads', 'num_kv_heads')}={self.num_kv_heads}")
        for flag, allowed in FLAGS.items():
            if getattr(self, flag) not in allowed:
                raise ConfigError(f"{source}: {k(flag, flag)}={_brief(getattr(self, flag))} is not supported "
                                  f"(supported: {list(allowed)})")
        if self.rope is not None:
            try:
                self.rope.rotary_dims(self.head_dim)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= MAX_WINDOW):
            raise ConfigError(f"{source}: {k('sliding_window', 'sliding_window')}={_brief(w)} must be a positive integer "
                              f"or null (an integer in [1, {MAX_WINDOW}])")
        for name, (lo, hi) in FLOAT_RANGES.items():
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
                raise ConfigError(f"{source}: {k(name, name)}={_brief(v)} must be a positive number or null (a number "
                                  f"in [{lo:g}, {hi:g}])")
        lo, hi = NORM_EPS_RANGE
        if isinstance(self.norm_eps, bool) or not (isinstance(self.norm_eps, (int, float)) and lo <= self.norm_eps < hi):
            raise ConfigError(f"{source}: {k('norm_eps', 'norm epsilon')}={_brief(self.norm_eps)} must be a number in "
                              f"[{lo:g}, {hi:g})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{source}: activation {_brief(self.activation)} is not supported "
                              f"(supported: {list(ACTIVATIONS)})")
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "lm_head_bias", "moe_renormalize",
                     "scale_embeddings", "norm_weight"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{source}: {k(name, name)}={_brief(getattr(self, name))} must be true or false")
        self._validate_moe(source, k)
        self._validate_layers("nope_layers", source, k)
        specials = [("eos_token_ids", t) for t in self.eos_token_ids] + [("bos_token_id", self.bos_token_id)] * (self.bos_token_id is not None)
        for name, t in specials:
            if not 0 <= t < self.vocab_size:
                raise ConfigError(f"{source}: {k(name, name)} {t} is outside the vocabulary [0, {self.vocab_size})")

    def _validate_moe(self, source, k) -> None:
        for name, lo, hi in (("num_experts", 0, 1 << 16), ("shared_expert_intermediate_size", 0, 1 << 20),
                             ("decoder_sparse_step", 1, 4096), ("first_dense_layers", 0, 4096),
                             ("moe_groups", 1, 1 << 16), ("moe_topk_groups", 1, 1 << 16), ("unused_layers", 0, 4096)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"{source}: {k(name, name)}={_brief(v)} must be an integer in [{lo}, {hi}]")
        if self.num_experts == 0:
            return
        top = self.num_experts_per_tok
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= self.num_experts:
            raise ConfigError(f"{source}: {k('num_experts_per_tok', 'num_experts_per_tok')}={_brief(top)} must be an "
                              f"integer in [1, {k('num_experts', 'num_experts')}={self.num_experts}]")
        m = self.moe_intermediate_size
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 0 < m <= LIMITS["intermediate_size"]):
            raise ConfigError(f"{source}: {k('moe_intermediate_size', 'moe_intermediate_size')}={_brief(m)} must be an "
                              f"integer in [1, {LIMITS['intermediate_size']}]")
        if self.router_scoring not in ROUTER_SCORINGS:
            raise ConfigError(f"{source}: router scoring {_brief(self.router_scoring)} is not supported "
                              f"(supported: {list(ROUTER_SCORINGS)})")
        self._validate_groups(source, k)
        self._validate_layers("mlp_only_layers", source, k)

    def _validate_groups(self, source, k) -> None:
        """Group-limited routing: whole groups of at least two experts (each is scored by its two best), at most
        all of them kept, and enough experts in the kept groups for top_k."""
        G, kept, E = self.moe_groups, self.moe_topk_groups, self.num_experts
        g, t = k("moe_groups", "moe_groups"), k("moe_topk_groups", "moe_topk_groups")
        if E % G or (G > 1 and E // G < 2):
            raise ConfigError(f"{source}: {g}={G} must divide {k('num_experts', 'num_experts')}={E} into groups of "
                              f"at least 2 experts (each group is scored by its two best)")
        if kept > G:
            raise ConfigError(f"{source}: {t}={kept} must be at most {g}={G}")
        if self.num_experts_per_tok > kept * (E // G):
            raise ConfigError(f"{source}: {k('num_experts_per_tok', 'num_experts_per_tok')}={self.num_experts_per_tok}"
                              f" is more than the {kept * (E // G)} experts of the {t}={kept} groups kept")

    def _validate_layers(self, name: str, source, k) -> None:
        """A list of layer indices: each in [0, num_layers), and no longer than the model."""
        v = getattr(self, name)
        if len(v) > self.num_layers:  # repeats: each layer would scan them all
            raise ConfigError(f"{source}: {k(name, name)} has {len(v)} entries for {self.num_layers} layers; each "
                              f"layer may be named once")
        bad = [i for i in v if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"{source}: {k(name, name)} names layer {bad[0]}, outside [0, {self.num_layers})")

    def summary(self) -> dict:
        """A flat dict for `archkit inspect`."""
        d = attrs.asdict(self, recurse=False, filter=lambda a, v: a.name not in ("attention_block", "mlp_block"))
        d["rope"] = attrs.asdict(self.rope) if self.rope else None
        d["sliding_rope"] = attrs.asdict(self.sliding_rope) if self.sliding_rope else None
        return d


# Bytes read at most from each side file (by the `what` read_json is given), far above any real checkpoint's:
# config.json and generation_config.json are a few KB, the largest index.json (~90,000 tensors) ~10 MB, and
# tokenizer_config.json with a 256k-token added_tokens_decoder ~20 MB. Beyond these a file is refused unread,
# where reading it whole would cost twice its size in memory.
SIDE_FILE_LIMITS = {"config.json": 16 << 20, "generation_config.json": 16 << 20,
                    "model.safetensors.index.json": 64 << 20, "tokenizer_config.json": 64 << 20,
                    "chat_template.json": 16 << 20}
DEFAULT_SIDE_FILE_LIMIT = 64 << 20


def read_bounded(path: Path, what: str, limit: int, error: type[Exception] = ConfigError) -> bytes:
    """The bytes of the side file `path` (config, tokenizer, template), refused unread — `error` naming the file —
    when it is missing, not a regular file (a FIFO would block the read) or over `limit` bytes."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {what} is not a regular file")
        if st.st_size > limit:
            raise error(f"{path}: {what} is {st.st_size} bytes, over the {_limit(limit)} archkit reads for it")
        with open(path, "rb") as f:
            raw = f.read(st.st_size + 1)  # one more: the file may have grown since stat()
        if len(raw) > limit:
            raise error(f"{path}: {what} is over the {_limit(limit)} archkit reads for it")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    return raw


def _limit(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


def read_json(path: Path, what: str, error: type[Exception] = ConfigError, limit: int | None = None) -> dict:
    """Parse a JSON object from `path`; `error` naming the file otherwise, also when it is over `limit` bytes
    (default: SIDE_FILE_LIMITS[what])."""
    path = Path(path)
    raw = read_bounded(path, what, limit or SIDE_FILE_LIMITS.get(what, DEFAULT_SIDE_FILE_LIMIT), error)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: "[[[[..."
        raise error(f"{path}: {what} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


CONFIG_FIELDS = (frozenset(f.name for f in attrs.fields(ModelConfig)) - {"attention_block", "mlp_block", "rope",
                                                                        "sliding_rope"}
                 | {"q_dim", "kv_dim", "expert_dim"})
# Fields a weight rule's `when` may test: the booleans, and qk_norm (false when "none": Phi's q/k LayerNorms exist
# only with qk_layernorm).
BOOL_FIELDS = frozenset(f.name for f in attrs.fields(ModelConfig) if f.type in ("bool", bool)) | {"qk_norm"}
