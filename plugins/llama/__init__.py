"""LLaMA 2 / 3 / 3.x (Touvron et al. 2023; Meta 2024), as transformers' models/llama/modeling_llama.py.

RMSNorm pre-norm blocks, rotary positions (rotate-half, optional "linear" or "llama3" scaling), SwiGLU
MLP, grouped-query attention, optional biases (attention_bias, mlp_bias), lm_head tied in the small
3.2 models. Also covers SmolLM, TinyLlama and other checkpoints saved as LlamaForCausalLM.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    # Tied checkpoints usually omit lm_head; some carry a copy, which is ignored (transformers ties it too).
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

CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",)),
    ConfigKey("hidden_size", ("hidden_size",)),
    ConfigKey("num_layers", ("num_hidden_layers",)),
    ConfigKey("num_heads", ("num_attention_heads",)),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),  # absent: plain multi-head
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",)),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 2048),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-6),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), False),  # one key drives q/k/v and o biases in Llama
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("mlp_bias", ("mlp_bias",), False),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="llama",
    description="LLaMA 2/3/3.x: RMSNorm, RoPE (llama3/linear scaling), SwiGLU, GQA",
    reference="transformers/models/llama/modeling_llama.py",
    weights=WEIGHTS,
    ignore=(L + "self_attn.rotary_emb.inv_freq",),  # a buffer some older conversions saved
    config=CONFIG,
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("LlamaForCausalLM",), model_types=("llama",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
