"""Cohere Command-R (Cohere 2024), as transformers' models/cohere/modeling_cohere.py.

An out-of-tree plugin written only in archkit's vocabulary. What differs from Llama:
- one LayerNorm without bias (CohereLayerNorm) feeding attention and MLP in parallel:
  x + attn(ln(x)) + mlp(ln(x)) (block="parallel_shared_norm"); the final norm is the same LayerNorm;
- interleaved RoPE: pairs (2i, 2i+1) (rotate_half on x[..., ::2] / x[..., 1::2], cos/sin repeat_interleave'd);
- logits times logit_scale (CohereConfig's default 0.0625);
- optional q/k LayerNorm per head before RoPE (use_qk_norm), with a weight per head: [heads, head_dim];
- lm_head tied to the embedding by default; q/k/v/o biases when attention_bias.
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
    W("q_norm.weight", L + "self_attn.q_norm.weight", when="qk_norm"),
    W("k_norm.weight", L + "self_attn.k_norm.weight", when="qk_norm"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight") for r in ("gate", "up", "down")),
)

# Defaults are CohereConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 256000),
    ConfigKey("hidden_size", ("hidden_size",), 8192),
    ConfigKey("num_layers", ("num_hidden_layers",), 40),
    ConfigKey("num_heads", ("num_attention_heads",), 64),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 22528),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 8192),
    ConfigKey("norm_eps", ("layer_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), True),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("qk_norm", ("use_qk_norm",), "none", transform=lambda on: "per_head" if on else "none"),
    ConfigKey("rope_theta", ("rope_theta",), 500000.0),  # CohereConfig.default_theta
    ConfigKey("logit_multiplier", ("logit_scale",), 0.0625),
    ConfigKey("bos_token_id", ("bos_token_id",), 5, null_is_value=True),
    ConfigKey("eos_token_ids", ("eos_token_id",), 255001, null_is_value=True),
)

SPEC = ModelSpec(
    name="cohere",
    description="Cohere Command-R: parallel block from one bias-free LayerNorm, interleaved RoPE, logit scale, "
                "optional per-head q/k LayerNorm",
    reference="transformers/models/cohere/modeling_cohere.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="layernorm",
    mlp="gated",
    positions="rope",
    rope_style="interleaved",
    block="parallel_shared_norm",
    detection=Detection(architectures=("CohereForCausalLM",), model_types=("cohere",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
