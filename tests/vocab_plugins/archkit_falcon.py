"""Falcon (TII 2023), as transformers' models/falcon/modeling_falcon.py, rotary variants.

An out-of-tree plugin written only in archkit's vocabulary:
- one fused query_key_value, laid out [kv heads, (the group's q heads, k, v), head_dim] under
  new_decoder_architecture, [q heads, k, v] under multi_query, [heads, (q, k, v), head_dim] otherwise: each is
  the split over num_kv_heads groups (1 for multi-query, one per head for plain MHA);
- the kv-head count and the block layout each depend on several keys (`compute`): ln_attn + ln_mlp
  (parallel) under new_decoder_architecture with num_ln_in_parallel_attn 2 (its default there), else one
  input_layernorm shared by both sublayers, or the sequential block when parallel_attn is false;
- LayerNorms with biases; one `bias` key for every linear; ALiBi (falcon-rw) is refused.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "transformer.h.{layer}."
QKV = ("q_dim", "kv_dim", "kv_dim")


def kv_heads(cfg: dict) -> int:
    """FalconConfig.num_key_value_heads: num_kv_heads (default: every head) unless old-style multi-query."""
    if cfg.get("new_decoder_architecture") or not cfg.get("multi_query", True):
        return cfg.get("num_kv_heads") or cfg.get("num_attention_heads") or cfg.get("n_head", 71)
    return 1


def block(cfg: dict) -> str:
    if cfg.get("new_decoder_architecture"):
        return "parallel" if cfg.get("num_ln_in_parallel_attn") in (None, 2) else "parallel_shared_norm"
    return "parallel_shared_norm" if cfg.get("parallel_attn", True) else "sequential"


WEIGHTS = (
    W("embed", "transformer.word_embeddings.weight"),
    *(W(f"final_norm.{p}", f"transformer.ln_f.{p}") for p in ("weight", "bias")),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W(("q.weight", "k.weight", "v.weight"), L + "self_attention.query_key_value.weight", split=QKV,
      interleave="num_kv_heads"),
    W(("q.bias", "k.bias", "v.bias"), L + "self_attention.query_key_value.bias", split=QKV,
      interleave="num_kv_heads", when="qkv_bias"),
    W("o.weight", L + "self_attention.dense.weight"),
    W("o.bias", L + "self_attention.dense.bias", when="qkv_bias"),
    *(W(f"attn_norm.{p}", L + f"ln_attn.{p}", L + f"input_layernorm.{p}") for p in ("weight", "bias")),
    *(W(f"mlp_norm.{p}", L + f"ln_mlp.{p}", L + f"post_attention_layernorm.{p}", when="!block=parallel_shared_norm")
      for p in ("weight", "bias")),
    W("up.weight", L + "mlp.dense_h_to_4h.weight"),
    W("up.bias", L + "mlp.dense_h_to_4h.bias", when="qkv_bias"),
    W("down.weight", L + "mlp.dense_4h_to_h.weight"),
    W("down.bias", L + "mlp.dense_4h_to_h.bias", when="qkv_bias"),
)

HEAD_KEYS = ("num_kv_heads", "multi_query", "new_decoder_architecture", "num_attention_heads", "n_head")

# Defaults are FalconConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 65024),
    ConfigKey("hidden_size", ("hidden_size", "n_embed"), 4544),
    ConfigKey("num_layers", ("num_hidden_layers", "n_layer"), 32),
    ConfigKey("num_heads", ("num_attention_heads", "n_head"), 71),
    ConfigKey("num_kv_heads", HEAD_KEYS, 1, compute=kv_heads),
    ConfigKey("intermediate_size", ("ffn_hidden_size",), Derived("hidden_size", mul=4)),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 2048),
    ConfigKey("norm_eps", ("layer_norm_epsilon",), 1e-5),
    ConfigKey("activation", ("activation",), "gelu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), True),
    ConfigKey("qkv_bias", ("bias",), False),  # every linear's bias
    ConfigKey("block", ("new_decoder_architecture", "parallel_attn", "num_ln_in_parallel_attn"),
              "parallel_shared_norm", compute=block),
    ConfigKey("bos_token_id", ("bos_token_id",), 11, null_is_value=True),
    ConfigKey("eos_token_ids", ("eos_token_id",), 11, null_is_value=True),
)

SPEC = ModelSpec(
    name="falcon",
    description="Falcon: fused QKV (multi-query, GQA groups or MHA), parallel LayerNorm blocks, rotary",
    reference="transformers/models/falcon/modeling_falcon.py",
    weights=WEIGHTS,
    config=CONFIG,
    rejects=(("alibi", (False,)),),
    norm="layernorm",
    mlp="plain",
    positions="rope",
    detection=Detection(architectures=("FalconForCausalLM",), model_types=("falcon",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
