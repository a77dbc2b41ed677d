"""Nemotron (NVIDIA Nemotron-3 / Nemotron-4, Minitron), as transformers' models/nemotron/modeling_nemotron.py.

An out-of-tree plugin written only in archkit's vocabulary. What differs from Llama:
- every norm is NemotronLayerNorm1P: LayerNorm with a bias, its weight applied as (1 + w) (norm_offset=1.0);
- a plain MLP, down(relu2(up(x))), with biases when mlp_bias;
- partial rotary embeddings, rotate-half over the first partial_rotary_factor of each head (default 0.5);
- one attention_bias switch for q/k/v and o.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("final_norm.bias", "model.norm.bias"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    W("attn_norm.bias", L + "input_layernorm.bias"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    W("mlp_norm.bias", L + "post_attention_layernorm.bias"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkv"),
    W("o.bias", L + "self_attn.o_proj.bias", when="o_bias"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight") for r in ("up", "down")),
    *(W(f"{r}.bias", L + f"mlp.{r}_proj.bias", when="mlp_bias") for r in ("up", "down")),
)

# Defaults are NemotronConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 256000),
    ConfigKey("hidden_size", ("hidden_size",), 6144),
    ConfigKey("num_layers", ("num_hidden_layers",), 32),
    ConfigKey("num_heads", ("num_attention_heads",), 48),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 24576),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 4096),
    ConfigKey("norm_eps", ("norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "relu2"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("mlp_bias", ("mlp_bias",), False),
    ConfigKey("partial_rotary_factor", ("partial_rotary_factor",), 0.5),
    ConfigKey("bos_token_id", ("bos_token_id",), 2, null_is_value=True),
    ConfigKey("eos_token_ids", ("eos_token_id",), 3, null_is_value=True),
    ConfigKey("pad_token_id", ("pad_token_id",), None, null_is_value=True),
)

SPEC = ModelSpec(
    name="nemotron",
    description="Nemotron: LayerNorm1P (bias, weight as 1 + w), relu2 plain MLP, partial rotary",
    reference="transformers/models/nemotron/modeling_nemotron.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="layernorm",
    norm_offset=1.0,
    mlp="plain",
    positions="rope",
    detection=Detection(architectures=("NemotronForCausalLM",), model_types=("nemotron",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
