"""OLMo (Groeneveld et al. 2024, "OLMo: Accelerating the Science of Language Models"), as transformers'
models/olmo/modeling_olmo.py.

An out-of-tree plugin written only in archkit's vocabulary: Llama's pre-norm blocks (RoPE, GQA, SwiGLU) with
- every norm an OlmoLayerNorm: LayerNorm with no weight and no bias, eps fixed at 1e-5 (not in config.json), so
  the checkpoint holds no norm tensor at all (norm_weight=False: the forward reads ones);
- q, k and v clamped to [-clip_qkv, clip_qkv] right after their projections when clip_qkv is set (qkv_clip);
- q/k/v/o biases when attention_bias.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkv"),
    W("o.bias", L + "self_attn.o_proj.bias", when="o_bias"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight") for r in ("gate", "up", "down")),
)

# Defaults are OlmoConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 50304),
    ConfigKey("hidden_size", ("hidden_size",), 4096),
    ConfigKey("num_layers", ("num_hidden_layers",), 32),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 11008),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 2048),
    ConfigKey("norm_eps", (), 1e-5),  # OlmoLayerNorm's own constant; OlmoConfig has no epsilon key
    ConfigKey("norm_weight", (), False),  # OlmoLayerNorm: F.layer_norm(x, shape, None, None)
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("qkv_clip", ("clip_qkv",), None),
    ConfigKey("rope_theta", ("rope_theta",), 10000.0),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), 50279, null_is_value=True),  # null: no EOS
)

SPEC = ModelSpec(
    name="olmo",
    description="OLMo 1: Llama's layer with weightless LayerNorms and q/k/v clamped to clip_qkv",
    reference="transformers/models/olmo/modeling_olmo.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="layernorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("OlmoForCausalLM",), model_types=("olmo",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
