"""Gemma 3, text (Gemma Team 2025), as transformers' models/gemma3/modeling_gemma3.py (Gemma3ForCausalLM).

An out-of-tree plugin written only in archkit's vocabulary. Gemma 2's layer (embeddings times sqrt(hidden),
(1 + w) RMSNorms, sandwich norms, GeGLU, query_pre_attn_scalar), and:
- q and k RMS-normed per head, (1 + w) like every norm;
- five local layers to one global: sliding_window_pattern (6) over num_hidden_layers unless layer_types lists
  them (`compute`);
- two RoPE bases: the global layers' rope_theta (1e6, with the checkpoint's scaling: linear 8 on the larger
  models), the local layers' rope_local_base_freq (10000) without scaling (sliding_rope_theta); transformers 5
  writes the two as one rope dict nested per layer type, which archkit reads itself;
- no soft-capping by default (the keys remain, null).
"""

from core import ConfigKey, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."
LOCAL, GLOBAL = "sliding_attention", "full_attention"


def layer_types(cfg: dict) -> tuple:
    """As written, else Gemma3TextConfig's: every sliding_window_pattern-th layer global."""
    n, p = cfg.get("num_hidden_layers", 26), cfg.get("sliding_window_pattern", 6)
    return tuple(cfg.get("layer_types") or (LOCAL if (i + 1) % p else GLOBAL for i in range(n)))


WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkvo"),
    W("q_norm.weight", L + "self_attn.q_norm.weight"),
    W("k_norm.weight", L + "self_attn.k_norm.weight"),
    W("post_attn_norm.weight", L + "post_attention_layernorm.weight"),
    W("mlp_norm.weight", L + "pre_feedforward_layernorm.weight"),
    W("post_mlp_norm.weight", L + "post_feedforward_layernorm.weight"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight") for r in ("gate", "up", "down")),
)

# Defaults are Gemma3TextConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 262208),
    ConfigKey("hidden_size", ("hidden_size",), 2304),
    ConfigKey("num_layers", ("num_hidden_layers",), 26),
    ConfigKey("num_heads", ("num_attention_heads",), 8),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 4),
    ConfigKey("head_dim", ("head_dim",), 256),
    ConfigKey("intermediate_size", ("intermediate_size",), 9216),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 131072),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-6),
    ConfigKey("activation", ("hidden_activation",), "gelu_pytorch_tanh"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), True),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("sliding_window", ("sliding_window",), 4096, null_is_value=True),
    ConfigKey("layer_types", ("layer_types", "sliding_window_pattern", "num_hidden_layers"), (LOCAL,) * 5 + (GLOBAL,),
              compute=layer_types),
    ConfigKey("rope_theta", ("rope_theta",), 1_000_000.0),
    ConfigKey("sliding_rope_theta", ("rope_local_base_freq",), 10_000.0),
    ConfigKey("attn_softcap", ("attn_logit_softcapping",), None, null_is_value=True),
    ConfigKey("logit_softcap", ("final_logit_softcapping",), None, null_is_value=True),
    ConfigKey("attn_scalar", ("query_pre_attn_scalar",), 256),
    ConfigKey("bos_token_id", ("bos_token_id",), 2, null_is_value=True),
    ConfigKey("eos_token_ids", ("eos_token_id",), 1, null_is_value=True),
    ConfigKey("pad_token_id", ("pad_token_id",), 0, null_is_value=True),
)

SPEC = ModelSpec(
    name="gemma3",
    description="Gemma 3 (text): Gemma 2's layer with q/k norms, 5 local : 1 global layers, a RoPE base for each kind",
    reference="transformers/models/gemma3/modeling_gemma3.py",
    weights=WEIGHTS,
    config=CONFIG,
    rejects=(("use_bidirectional_attention", (None, False)),),
    norm="rmsnorm",
    norm_offset=1.0,
    mlp="gated",
    positions="rope",
    qk_norm="head",
    scale_embeddings=True,
    norm_placement="sandwich",
    detection=Detection(architectures=("Gemma3ForCausalLM",), model_types=("gemma3_text",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
