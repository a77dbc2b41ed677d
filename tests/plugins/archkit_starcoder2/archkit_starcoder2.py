"""Starcoder2 (Lozhkov et al., 2024, "StarCoder 2 and The Stack v2"), as transformers'
models/starcoder2/modeling_starcoder2.py and configuration_starcoder2.py implement it.

A family that archkit's core does not ship, declared as data from outside: pre-LayerNorm blocks
(LayerNorm always has a bias), rotary positions, grouped-query attention, a plain (non-gated) MLP
c_fc → gelu_pytorch_tanh → c_proj, biases on every linear layer when `use_bias` (the default), an
lm_head tied to the embedding by default, and sliding-window attention on every layer when the config
gives a `sliding_window` (starcoder2-3b/7b/15b: 4096; null or absent means plain causal attention).
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("final_norm.bias", "model.norm.bias"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    W("attn_norm.bias", L + "input_layernorm.bias"),  # nn.LayerNorm: bias whatever use_bias says
    W("q.weight", L + "self_attn.q_proj.weight"),
    W("k.weight", L + "self_attn.k_proj.weight"),
    W("v.weight", L + "self_attn.v_proj.weight"),
    W("o.weight", L + "self_attn.o_proj.weight"),
    W("q.bias", L + "self_attn.q_proj.bias", when="qkv_bias"),
    W("k.bias", L + "self_attn.k_proj.bias", when="qkv_bias"),
    W("v.bias", L + "self_attn.v_proj.bias", when="qkv_bias"),
    W("o.bias", L + "self_attn.o_proj.bias", when="o_bias"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    W("mlp_norm.bias", L + "post_attention_layernorm.bias"),
    # Plain MLP named like GPT-2's, but nn.Linear ([out, in]): no transpose.
    W("up.weight", L + "mlp.c_fc.weight"),
    W("up.bias", L + "mlp.c_fc.bias", when="mlp_bias"),
    W("down.weight", L + "mlp.c_proj.weight"),
    W("down.bias", L + "mlp.c_proj.bias", when="mlp_bias"),
)

# Defaults are Starcoder2Config's own (the 7B model's), so a config.json that omits a key means what
# it means to transformers.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 49152),
    ConfigKey("hidden_size", ("hidden_size",), 3072),
    ConfigKey("num_layers", ("num_hidden_layers",), 30),
    ConfigKey("num_heads", ("num_attention_heads",), 24),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 2),  # not num_heads: Starcoder2Config's default is 2
    # head_dim is not a Starcoder2Config field, but the modeling file honours one if the config has it.
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 12288),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 4096),
    ConfigKey("norm_eps", ("norm_epsilon",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "gelu_pytorch_tanh"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), True),
    ConfigKey("qkv_bias", ("use_bias",), True),  # one key drives every linear layer's bias
    ConfigKey("o_bias", ("use_bias",), True),
    ConfigKey("mlp_bias", ("use_bias",), True),
    # Starcoder2Config says 50256 for both, but a JSON null here means "none", which archkit reads as absent.
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
    # A query sees the last sliding_window positions (create_sliding_window_causal_mask); None: no window.
    ConfigKey("sliding_window", ("sliding_window",), None),
)

SPEC = ModelSpec(
    name="starcoder2",
    description="Starcoder2: LayerNorm with bias, RoPE, GQA, plain gelu_pytorch_tanh MLP, use_bias",
    reference="transformers/models/starcoder2/modeling_starcoder2.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="layernorm",
    mlp="plain",
    positions="rope",
    detection=Detection(architectures=("Starcoder2ForCausalLM",), model_types=("starcoder2",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
