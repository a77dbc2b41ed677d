"""OLMoE (Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models"), as transformers'
models/olmoe/modeling_olmoe.py.

An out-of-tree plugin written only in archkit's vocabulary: Llama's pre-norm blocks (RMSNorm, RoPE, GQA) with
- q and k RMS-normed over the whole projection before the heads are split (weights [q_dim] and [kv_dim]);
- every MLP a sparse mixture of experts: a softmax router `mlp.gate` over num_experts, the top
  num_experts_per_tok per token (renormalised only when norm_topk_prob), SwiGLU experts of intermediate_size,
  one tensor each (hub) or stacked (gate_up_proj, gate first; down_proj);
- q/k/v/o biases when attention_bias. clip_qkv (clamping q, k and v) is not in the vocabulary: rejected.
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
    # every OLMoE layer is sparse; saying so keeps the absent layout's rules optional for detection by tensor names
    W("router.weight", L + "mlp.gate.weight", when="sparse_layer"),
    *(W(f"experts.{r}.weight", E + f"{{expert}}.{r}_proj.weight", when="sparse_layer") for r in ("gate", "up", "down")),
    W(("experts.gate.weight", "experts.up.weight"), E + "gate_up_proj", split=("expert_dim", "expert_dim"),
      when="sparse_layer"),
    W("experts.down.weight", E + "down_proj", when="sparse_layer"),
)

# Defaults are OlmoeConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 50304),
    ConfigKey("hidden_size", ("hidden_size",), 2048),
    ConfigKey("num_layers", ("num_hidden_layers",), 16),
    ConfigKey("num_heads", ("num_attention_heads",), 16),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 2048),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 4096),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("rope_theta", ("rope_theta",), 10000.0),
    ConfigKey("num_experts", ("num_experts", "num_local_experts"), 64),
    ConfigKey("num_experts_per_tok", ("num_experts_per_tok",), 8),
    ConfigKey("moe_renormalize", ("norm_topk_prob",), False),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), 50279, null_is_value=True),
)

SPEC = ModelSpec(
    name="olmoe",
    description="OLMoE: q/k RMSNorm over the projection + sparse MoE MLPs (softmax top-k, optional renormalisation)",
    reference="transformers/models/olmoe/modeling_olmoe.py",
    weights=WEIGHTS,
    config=CONFIG,
    rejects=(("clip_qkv", (None,)),),
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    qk_norm="projection",
    detection=Detection(architectures=("OlmoeForCausalLM",), model_types=("olmoe",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
