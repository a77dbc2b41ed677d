"""IBM Granite 3 (Granite Team 2024), as transformers' models/granite/modeling_granite.py.

An out-of-tree plugin written only in archkit's vocabulary: Llama's layout (RMSNorm, SwiGLU, RoPE, GQA) with
four scalars, each a ModelConfig multiplier:
- token embeddings times embedding_multiplier;
- every sublayer's output times residual_multiplier before the residual add;
- attention scores scaled by attention_multiplier itself (it replaces head_dim**-0.5; GraniteConfig's default 1.0);
- logits divided by logits_scaling: logit_multiplier = 1 / logits_scaling.
q/k/v/o biases when attention_bias, MLP biases when mlp_bias.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkv"),
    W("o.bias", L + "self_attn.o_proj.bias", when="o_bias"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight") for r in ("gate", "up", "down")),
    *(W(f"{r}.bias", L + f"mlp.{r}_proj.bias", when="mlp_bias") for r in ("gate", "up", "down")),
)

# Defaults are GraniteConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 32000),
    ConfigKey("hidden_size", ("hidden_size",), 4096),
    ConfigKey("num_layers", ("num_hidden_layers",), 32),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 11008),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 2048),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-6),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("mlp_bias", ("mlp_bias",), False),
    ConfigKey("rope_theta", ("rope_theta",), 10000.0),
    ConfigKey("embed_multiplier", ("embedding_multiplier",), 1.0),
    ConfigKey("residual_multiplier", ("residual_multiplier",), 1.0),
    ConfigKey("attention_multiplier", ("attention_multiplier",), 1.0),
    ConfigKey("logit_multiplier", ("logits_scaling",), 1.0, transform=lambda s: 1 / s),
    ConfigKey("bos_token_id", ("bos_token_id",), 1, null_is_value=True),
    ConfigKey("eos_token_ids", ("eos_token_id",), 2, null_is_value=True),
)

SPEC = ModelSpec(
    name="granite",
    description="Granite: Llama layout with embedding, residual, attention and logit multipliers",
    reference="transformers/models/granite/modeling_granite.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("GraniteForCausalLM",), model_types=("granite",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
