"""Phi-3 (Abdin et al. 2024, "Phi-3 Technical Report"), as transformers' models/phi3/modeling_phi3.py.

Llama's computation (RMSNorm, RoPE, SwiGLU, GQA, no biases) with two fused projections, cut apart on
load by the generic split transform: qkv_proj holds q, k and v stacked along the output dim, and
gate_up_proj holds gate then up (Phi3MLP: `gate, up = gate_up_proj(x).chunk(2, dim=-1)`). Every layer
uses the sliding window when config.json sets one (Phi-3-mini-4k: 2047).

The 128k-context models' "longrope" scaling (older configs call it "su") and Phi-4-mini's partial rotary
(partial_rotary_factor 0.75) are read by core.rope like every other family's.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    # Phi3Attention: qkv[..., :q_dim] is q, the next kv_dim is k, the rest v.
    W(("q.weight", "k.weight", "v.weight"), L + "self_attn.qkv_proj.weight", split=("q_dim", "kv_dim", "kv_dim")),
    W("o.weight", L + "self_attn.o_proj.weight"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    # Phi3MLP: the first half of gate_up_proj's output is the gate, the second half up.
    W(("gate.weight", "up.weight"), L + "mlp.gate_up_proj.weight", split=("intermediate_size", "intermediate_size")),
    W("down.weight", L + "mlp.down_proj.weight"),
)

# Defaults are Phi3Config's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 32064),
    ConfigKey("hidden_size", ("hidden_size",), 3072),
    ConfigKey("num_layers", ("num_hidden_layers",), 32),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 8192),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 4096),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("sliding_window", ("sliding_window",), None),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="phi3",
    description="Phi-3: Llama computation with fused qkv_proj and gate_up_proj, optional sliding window",
    reference="transformers/models/phi3/modeling_phi3.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("Phi3ForCausalLM",), model_types=("phi3",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
