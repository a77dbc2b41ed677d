"""StableLM (Stability AI 2023-24: stablelm-3b-4e1t, stablelm-2-1_6b/12b), as transformers'
models/stablelm/modeling_stablelm.py.

An out-of-tree plugin written only in archkit's vocabulary. What differs from Llama:
- LayerNorm with bias everywhere; a SwiGLU MLP without biases; o_proj without bias;
- partial rotary embeddings, rotate-half over the first partial_rotary_factor of each head (default 0.25);
- use_parallel_residual: x + attn(ln(x)) + mlp(ln(x)) from the one input LayerNorm (block="parallel_shared_norm";
  post_attention_layernorm exists only in the sequential block, the default);
- qk_layernorm: q and k LayerNormed per head before RoPE (no bias), each head its own weight, stored one tensor
  per head (`q_layernorm.norms.{head}.weight`) and stacked on load to [heads, head_dim];
- q/k/v biases when use_qkv_bias.
"""

from core import ConfigKey, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("final_norm.bias", "model.norm.bias"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    W("attn_norm.bias", L + "input_layernorm.bias"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkv"),
    W("q_norm.weight", L + "self_attn.q_layernorm.norms.{head}.weight", when="qk_norm"),
    W("k_norm.weight", L + "self_attn.k_layernorm.norms.{head}.weight", when="qk_norm"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight", when="block=sequential"),
    W("mlp_norm.bias", L + "post_attention_layernorm.bias", when="block=sequential"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight") for r in ("gate", "up", "down")),
)

# Defaults are StableLmConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 50304),
    ConfigKey("hidden_size", ("hidden_size",), 2560),
    ConfigKey("num_layers", ("num_hidden_layers",), 32),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 32),
    ConfigKey("intermediate_size", ("intermediate_size",), 6912),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 4096),
    ConfigKey("norm_eps", ("layer_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("use_qkv_bias",), False),
    ConfigKey("qk_norm", ("qk_layernorm",), "none", transform=lambda on: "per_head" if on else "none"),
    ConfigKey("block", ("use_parallel_residual",), "sequential",
              transform=lambda parallel: "parallel_shared_norm" if parallel else "sequential"),
    ConfigKey("partial_rotary_factor", ("partial_rotary_factor",), 0.25),
    ConfigKey("rope_theta", ("rope_theta",), 10000.0),
    ConfigKey("bos_token_id", ("bos_token_id",), 0, null_is_value=True),
    ConfigKey("eos_token_ids", ("eos_token_id",), 0, null_is_value=True),
)

SPEC = ModelSpec(
    name="stablelm",
    description="StableLM: LayerNorm, partial rotary, optional parallel block, optional per-head q/k LayerNorm",
    reference="transformers/models/stablelm/modeling_stablelm.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="layernorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("StableLmForCausalLM",), model_types=("stablelm",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
