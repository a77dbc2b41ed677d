"""Qwen2-MoE (Qwen team 2024: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B), as transformers' models/qwen2_moe/modeling_qwen2_moe.py.

An out-of-tree plugin written only in archkit's vocabulary: Qwen2's attention (RMSNorm, RoPE, GQA, q/k/v biases
when qkv_bias) with sparse MLPs: a softmax router `mlp.gate` over num_experts, the top num_experts_per_tok experts
per token (weights renormalised only when norm_topk_prob), SwiGLU experts of moe_intermediate_size, plus a shared
SwiGLU expert of shared_expert_intermediate_size that every token goes through, scaled by
sigmoid(shared_expert_gate(x)). Layers in mlp_only_layers, or off the decoder_sparse_step grid, are dense MLPs of
intermediate_size. Experts load one tensor each (hub) or stacked (gate_up_proj, gate first; down_proj).
"""

from core import ConfigKey, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."
E = L + "mlp.experts."
S = L + "mlp.shared_expert."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkv"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight", when="!sparse_layer") for r in ("gate", "up", "down")),
    W("router.weight", L + "mlp.gate.weight", when="sparse_layer"),
    *(W(f"experts.{r}.weight", E + f"{{expert}}.{r}_proj.weight", when="sparse_layer") for r in ("gate", "up", "down")),
    W(("experts.gate.weight", "experts.up.weight"), E + "gate_up_proj", split=("expert_dim", "expert_dim"),
      when="sparse_layer"),
    W("experts.down.weight", E + "down_proj", when="sparse_layer"),
    *(W(f"shared.{r}.weight", S + f"{r}_proj.weight", when="sparse_layer") for r in ("gate", "up", "down")),
    W("shared_gate.weight", L + "mlp.shared_expert_gate.weight", when="sparse_layer"),
)

# Defaults are Qwen2MoeConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 151936),
    ConfigKey("hidden_size", ("hidden_size",), 2048),
    ConfigKey("num_layers", ("num_hidden_layers",), 24),
    ConfigKey("num_heads", ("num_attention_heads",), 16),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 16),
    ConfigKey("intermediate_size", ("intermediate_size",), 5632),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 32768),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-6),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("qkv_bias",), True),
    ConfigKey("rope_theta", ("rope_theta",), 10000.0),
    ConfigKey("num_experts", ("num_experts",), 60),
    ConfigKey("num_experts_per_tok", ("num_experts_per_tok",), 4),
    ConfigKey("moe_intermediate_size", ("moe_intermediate_size",), 1408),
    ConfigKey("shared_expert_intermediate_size", ("shared_expert_intermediate_size",), 5632),
    ConfigKey("moe_renormalize", ("norm_topk_prob",), False),
    ConfigKey("mlp_only_layers", ("mlp_only_layers",), ()),
    ConfigKey("decoder_sparse_step", ("decoder_sparse_step",), 1),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="qwen2_moe",
    description="Qwen2-MoE: Qwen2 attention + sparse MoE MLPs with a sigmoid-gated shared expert",
    reference="transformers/models/qwen2_moe/modeling_qwen2_moe.py",
    weights=WEIGHTS,
    config=CONFIG,
    rejects=(("use_sliding_window", (False,)),),
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("Qwen2MoeForCausalLM",), model_types=("qwen2_moe",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
