"""Gemma 2 (Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size"), as
transformers' models/gemma2/modeling_gemma2.py.

What differs from Llama, each a generic capability of the core:
- token embeddings times sqrt(hidden_size) (Gemma2TextScaledWordEmbedding): scale_embeddings;
- RMSNorm applied as x_hat * (1 + w) (Gemma2RMSNorm; weights init to 0): norm_offset=1.0;
- GeGLU MLP, down(gelu_tanh(gate(x)) * up(x)) (hidden_activation "gelu_pytorch_tanh");
- "sandwich" norms: every sublayer's output is normed again before the residual add
  (post_attention_layernorm → post_attn_norm, post_feedforward_layernorm → post_mlp_norm); the norm
  before the MLP is pre_feedforward_layernorm (→ mlp_norm), not post_attention_layernorm as in Llama;
- scores scaled by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5;
- soft-capping, cap * tanh(x / cap), of the attention scores (attn_logit_softcapping, before the mask)
  and of the final logits (final_logit_softcapping); JSON null turns either off;
- sliding-window attention on the layers that layer_types marks "sliding_attention"; configs without
  layer_types alternate sliding, full, sliding, ... as Gemma2Config does.
"""

from core import ConfigKey, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
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
    W("post_attn_norm.weight", L + "post_attention_layernorm.weight"),  # on the attention output (not Llama's)
    W("mlp_norm.weight", L + "pre_feedforward_layernorm.weight"),
    W("post_mlp_norm.weight", L + "post_feedforward_layernorm.weight"),
    W("gate.weight", L + "mlp.gate_proj.weight"),
    W("up.weight", L + "mlp.up_proj.weight"),
    W("down.weight", L + "mlp.down_proj.weight"),
)

# Defaults are Gemma2Config's own (gemma-2-2b), so a key missing from config.json means what it means there.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 256000),
    ConfigKey("hidden_size", ("hidden_size",), 2304),
    ConfigKey("num_layers", ("num_hidden_layers",), 26),
    ConfigKey("num_heads", ("num_attention_heads",), 8),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 4),
    ConfigKey("head_dim", ("head_dim",), 256),  # stated, not hidden / heads (gemma-2-2b: 2304 / 8 != 256)
    ConfigKey("intermediate_size", ("intermediate_size",), 9216),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 8192),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-6),
    ConfigKey("activation", ("hidden_activation",), "gelu_pytorch_tanh"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), True),
    ConfigKey("qkv_bias", ("attention_bias",), False),  # one key drives q/k/v and o biases
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("mlp_bias", (), False),
    ConfigKey("sliding_window", ("sliding_window",), 4096, null_is_value=True),
    ConfigKey("layer_types", ("layer_types",), ("sliding_attention", "full_attention")),  # repeated over the layers
    ConfigKey("attn_softcap", ("attn_logit_softcapping",), 50.0, null_is_value=True),
    ConfigKey("logit_softcap", ("final_logit_softcapping",), 30.0, null_is_value=True),
    ConfigKey("attn_scalar", ("query_pre_attn_scalar",), 256),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="gemma2",
    description="Gemma 2: scaled embeddings, (1 + w) RMSNorm, sandwich norms, GeGLU, soft-capping, local/global layers",
    reference="transformers/models/gemma2/modeling_gemma2.py",
    weights=WEIGHTS,
    config=CONFIG,
    rejects=(("use_bidirectional_attention", (None, False)),),
    norm="rmsnorm",
    norm_offset=1.0,
    mlp="gated",
    positions="rope",
    scale_embeddings=True,
    norm_placement="sandwich",
    detection=Detection(architectures=("Gemma2ForCausalLM",), model_types=("gemma2",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
