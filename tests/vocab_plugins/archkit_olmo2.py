"""OLMo 2 (Team OLMo 2024, "2 OLMo 2 Furious"), as transformers' models/olmo2/modeling_olmo2.py.

An out-of-tree plugin written only in archkit's vocabulary. What differs from Llama:
- post-norm blocks: each sublayer reads the residual itself and its output is RMS-normed before the add,
  x = x + norm(attn(x)); x = x + norm(mlp(x)) (post_attention_layernorm, post_feedforward_layernorm), no input norms;
- q and k RMS-normed over the whole projection before the heads are split: weights [q_dim] and [kv_dim];
- q/k/v/o biases when attention_bias (off by default).
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkv"),
    W("o.bias", L + "self_attn.o_proj.bias", when="o_bias"),
    W("q_norm.weight", L + "self_attn.q_norm.weight"),
    W("k_norm.weight", L + "self_attn.k_norm.weight"),
    W("post_attn_norm.weight", L + "post_attention_layernorm.weight"),
    W("post_mlp_norm.weight", L + "post_feedforward_layernorm.weight"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight") for r in ("gate", "up", "down")),
)

# Defaults are Olmo2Config's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 50304),
    ConfigKey("hidden_size", ("hidden_size",), 4096),
    ConfigKey("num_layers", ("num_hidden_layers",), 32),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 11008),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 2048),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("rope_theta", ("rope_theta",), 10000.0),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), 50279, null_is_value=True),  # null: no EOS
)

SPEC = ModelSpec(
    name="olmo2",
    description="OLMo 2: post-norm blocks (sublayer outputs RMS-normed before the add), q/k RMSNorm over the projection",
    reference="transformers/models/olmo2/modeling_olmo2.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    norm_placement="post",
    qk_norm="projection",
    detection=Detection(architectures=("Olmo2ForCausalLM",), model_types=("olmo2",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
