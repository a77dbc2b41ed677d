"""Mixtral (Jiang et al. 2024, "Mixtral of Experts"), as transformers' models/mixtral/modeling_mixtral.py.

Mistral's attention (RMSNorm, RoPE, GQA, no biases, optional sliding window) with every MLP a sparse mixture
of experts: a router `block_sparse_moe.gate` scores num_local_experts experts by softmax, each token goes
through its top num_experts_per_tok, whose weights are renormalised to sum 1 (MixtralSparseMoeBlock always
does). Each expert is a SwiGLU MLP: w1 is the gate, w3 the up and w2 the down projection, stored one tensor per
expert (`experts.{expert}`), stacked on load.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."
E = L + "block_sparse_moe.experts.{expert}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    W("router.weight", L + "block_sparse_moe.gate.weight"),
    W("experts.gate.weight", E + "w1.weight"),
    W("experts.up.weight", E + "w3.weight"),
    W("experts.down.weight", E + "w2.weight"),
)

# Defaults are MixtralConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 32000),
    ConfigKey("hidden_size", ("hidden_size",), 4096),
    ConfigKey("num_layers", ("num_hidden_layers",), 32),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 8),
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 14336),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 4096 * 32),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("sliding_window", ("sliding_window",), None, null_is_value=True),
    ConfigKey("num_experts", ("num_local_experts",), 8),
    ConfigKey("num_experts_per_tok", ("num_experts_per_tok",), 2),
    ConfigKey("moe_renormalize", (), True),  # not a config key: Mixtral always renormalises the top-k weights
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="mixtral",
    description="Mixtral: Mistral attention + sparse MoE MLP (softmax router, top-k renormalised, SwiGLU experts)",
    reference="transformers/models/mixtral/modeling_mixtral.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("MixtralForCausalLM",), model_types=("mixtral",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
