"""Qwen3-MoE (Qwen team, 2025: Qwen3-30B-A3B, Qwen3-235B-A22B), as transformers' models/qwen3_moe/modeling_qwen3_moe.py.

Qwen3's attention (per-head q/k RMSNorm before RoPE, explicit head_dim) with sparse MLPs: a softmax router
`mlp.gate` over num_experts, the top num_experts_per_tok experts per token, their weights renormalised only
when norm_topk_prob is true (Qwen3MoeConfig's default is false; the released models set it). Layers listed in
mlp_only_layers, or not on the decoder_sparse_step grid, keep a dense SwiGLU MLP of intermediate_size; the
experts use moe_intermediate_size.

Experts come one tensor per expert in hub checkpoints (`mlp.experts.{expert}.gate_proj`), or stacked as
transformers 5 holds them in memory (`mlp.experts.gate_up_proj` [experts, 2 * moe_intermediate, hidden] with the
gate first, and `mlp.experts.down_proj`); both load.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."
E = L + "mlp.experts."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkv"),
    W("o.bias", L + "self_attn.o_proj.bias", when="o_bias"),
    W("q_norm.weight", L + "self_attn.q_norm.weight"),
    W("k_norm.weight", L + "self_attn.k_norm.weight"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    # dense layers
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight", when="!sparse_layer") for r in ("gate", "up", "down")),
    # sparse layers
    W("router.weight", L + "mlp.gate.weight", when="sparse_layer"),
    W("experts.gate.weight", E + "{expert}.gate_proj.weight", when="sparse_layer"),
    W("experts.up.weight", E + "{expert}.up_proj.weight", when="sparse_layer"),
    W("experts.down.weight", E + "{expert}.down_proj.weight", when="sparse_layer"),
    W(("experts.gate.weight", "experts.up.weight"), E + "gate_up_proj", split=("expert_dim", "expert_dim"),
      when="sparse_layer"),
    W("experts.down.weight", E + "down_proj", when="sparse_layer"),
)

# Defaults are Qwen3MoeConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 151936),
    ConfigKey("hidden_size", ("hidden_size",), 2048),
    ConfigKey("num_layers", ("num_hidden_layers",), 24),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 4),
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 6144),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 32768),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-6),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("num_experts", ("num_experts", "num_local_experts"), 128),
    ConfigKey("num_experts_per_tok", ("num_experts_per_tok",), 8),
    ConfigKey("moe_intermediate_size", ("moe_intermediate_size",), 768),
    ConfigKey("moe_renormalize", ("norm_topk_prob",), False),
    ConfigKey("mlp_only_layers", ("mlp_only_layers",), ()),
    ConfigKey("decoder_sparse_step", ("decoder_sparse_step",), 1),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="qwen3_moe",
    description="Qwen3-MoE: Qwen3 attention + sparse MoE MLPs (softmax top-k, optional renormalisation, dense layers mixed in)",
    reference="transformers/models/qwen3_moe/modeling_qwen3_moe.py",
    weights=WEIGHTS,
    config=CONFIG,
    rejects=(("use_sliding_window", (False,)),),
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    qk_norm="head",
    detection=Detection(architectures=("Qwen3MoeForCausalLM",), model_types=("qwen3_moe",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
