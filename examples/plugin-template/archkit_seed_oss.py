"""Seed-OSS (ByteDance Seed, 2025), as transformers' models/seed_oss/modeling_seed_oss.py and
configuration_seed_oss.py implement it — an archkit family plugin kept outside archkit, and the
template for writing your own (see docs/writing-a-plugin.md in the archkit repository).

The architecture is the Llama layout — pre-RMSNorm blocks, rotary positions (rotate-half), a SwiGLU
MLP, grouped-query attention — with two differences that the spec states as data:
  - q/k/v projections carry a bias by default (`attention_bias`, default true) while the output
    projection has its own switch (`attention_out_bias`, default false). Llama drives both with one key.
  - head_dim is a config field with its own default (128), not hidden_size / num_attention_heads.
Dropout (attention_dropout, residual_dropout) only acts in training and is ignored.
"""

from core import ConfigKey, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

# Canonical role ← checkpoint tensor name(s). Roles are archkit's fixed vocabulary (core.spec.GLOBAL_ROLES,
# LAYER_ROLES); "{layer}" matches the layer index; `when` names a boolean config field ("!" negates).
WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    # Tied checkpoints omit lm_head or carry a copy of the embedding, which is ignored (transformers ties it too).
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    W("q.weight", L + "self_attn.q_proj.weight"),
    W("k.weight", L + "self_attn.k_proj.weight"),
    W("v.weight", L + "self_attn.v_proj.weight"),
    W("o.weight", L + "self_attn.o_proj.weight"),
    W("q.bias", L + "self_attn.q_proj.bias", when="qkv_bias"),
    W("k.bias", L + "self_attn.k_proj.bias", when="qkv_bias"),
    W("v.bias", L + "self_attn.v_proj.bias", when="qkv_bias"),
    W("o.bias", L + "self_attn.o_proj.bias", when="o_bias"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    W("gate.weight", L + "mlp.gate_proj.weight"),
    W("up.weight", L + "mlp.up_proj.weight"),
    W("down.weight", L + "mlp.down_proj.weight"),
    W("gate.bias", L + "mlp.gate_proj.bias", when="mlp_bias"),
    W("up.bias", L + "mlp.up_proj.bias", when="mlp_bias"),
    W("down.bias", L + "mlp.down_proj.bias", when="mlp_bias"),
)

# ModelConfig field ← config.json key(s), with SeedOssConfig's own defaults (the 36B model's), so that a
# config.json that omits a key means what it means to transformers. Rope parameters (rope_parameters, or
# rope_theta + rope_scaling) are read by archkit itself for every rotary family.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 155136),
    ConfigKey("hidden_size", ("hidden_size",), 4096),
    ConfigKey("num_layers", ("num_hidden_layers",), 64),
    ConfigKey("num_heads", ("num_attention_heads",), 80),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 8, null_is_value=True),  # null: num_heads, as transformers
    ConfigKey("head_dim", ("head_dim",), 128),  # explicit, not hidden_size / num_heads
    ConfigKey("intermediate_size", ("intermediate_size",), 27648),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 524288),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-6),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), True),  # on by default, unlike Llama
    ConfigKey("o_bias", ("attention_out_bias",), False),  # its own key, unlike Llama
    ConfigKey("mlp_bias", ("mlp_bias",), False),
    ConfigKey("bos_token_id", ("bos_token_id",), 0),
    ConfigKey("eos_token_ids", ("eos_token_id",), 2),
)

SPEC = ModelSpec(
    name="seed_oss",
    description="Seed-OSS: Llama layout, q/k/v bias on and o bias off by default, explicit head_dim",
    reference="transformers/models/seed_oss/modeling_seed_oss.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("SeedOssForCausalLM",), model_types=("seed_oss",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
