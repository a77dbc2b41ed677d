"""GLM-4.5 / GLM-4.5-Air (Zhipu AI 2025), as transformers' models/glm4_moe/modeling_glm4_moe.py.

An out-of-tree plugin written only in archkit's vocabulary: Llama's pre-norm blocks (RMSNorm, GQA) with
- RoPE on the first half of each head (partial_rotary_factor 0.5), q/k/v biases when attention_bias (never o),
  q and k RMS-normed per head when use_qk_norm;
- the first first_k_dense_replace layers dense, every later one a mixture of experts: sigmoid scores of the
  router `mlp.gate`, the top num_experts_per_tok chosen by score + e_score_correction_bias (router.select_bias)
  within the topk_group best of n_group expert groups, weighted by the scores alone (renormalised when
  norm_topk_prob) times routed_scaling_factor; SwiGLU experts of moe_intermediate_size, one tensor each (hub) or
  stacked (gate_up_proj, gate first; down_proj); plus one shared SwiGLU expert of n_shared_experts *
  moe_intermediate_size that every token goes through, ungated.
The hub checkpoints' multi-token-prediction layer (model.layers.46.* in GLM-4.5-Air), which transformers skips,
is reported unexpected (docs/writing-a-plugin.md §3.11): transformers' own save_pretrained writes none.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."
E = L + "mlp.experts."
S = L + "mlp.shared_experts."
MLP = ("gate", "up", "down")

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkv"),
    W("q_norm.weight", L + "self_attn.q_norm.weight", when="qk_norm"),
    W("k_norm.weight", L + "self_attn.k_norm.weight", when="qk_norm"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight", when="!sparse_layer") for r in MLP),
    W("router.weight", L + "mlp.gate.weight", when="sparse_layer"),
    W("router.select_bias", L + "mlp.gate.e_score_correction_bias", when="sparse_layer"),
    *(W(f"experts.{r}.weight", E + f"{{expert}}.{r}_proj.weight", when="sparse_layer") for r in MLP),
    W(("experts.gate.weight", "experts.up.weight"), E + "gate_up_proj", split=("expert_dim", "expert_dim"),
      when="sparse_layer"),
    W("experts.down.weight", E + "down_proj", when="sparse_layer"),
    *(W(f"shared.{r}.weight", S + f"{r}_proj.weight", when="sparse_layer") for r in MLP),
)

# Defaults are Glm4MoeConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 151552),
    ConfigKey("hidden_size", ("hidden_size",), 4096),
    ConfigKey("num_layers", ("num_hidden_layers",), 46),
    ConfigKey("num_heads", ("num_attention_heads",), 96),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 8),
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 10944),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 131072),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("qk_norm", ("use_qk_norm",), "none", transform=lambda on: "head" if on else "none"),
    ConfigKey("partial_rotary_factor", ("partial_rotary_factor",), 0.5),
    ConfigKey("num_experts", ("n_routed_experts",), 128),
    ConfigKey("num_experts_per_tok", ("num_experts_per_tok",), 8),
    ConfigKey("moe_intermediate_size", ("moe_intermediate_size",), 1408),
    ConfigKey("shared_expert_intermediate_size", ("n_shared_experts", "moe_intermediate_size"), 1408,
              compute=lambda c: c.get("n_shared_experts", 1) * c.get("moe_intermediate_size", 1408)),
    ConfigKey("router_scoring", (), "sigmoid"),
    ConfigKey("moe_renormalize", ("norm_topk_prob",), True),
    ConfigKey("moe_routed_scale", ("routed_scaling_factor",), 1.0),
    ConfigKey("moe_groups", ("n_group",), 1),
    ConfigKey("moe_topk_groups", ("topk_group",), 1),
    ConfigKey("first_dense_layers", ("first_k_dense_replace",), 1),
    ConfigKey("unused_layers", ("num_nextn_predict_layers",), 1),  # the hub's multi-token-prediction layer
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="glm4_moe",
    description="GLM-4.5: partial RoPE, optional q/k norms, sigmoid MoE chosen with a selection bias, shared expert",
    reference="transformers/models/glm4_moe/modeling_glm4_moe.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("Glm4MoeForCausalLM",), model_types=("glm4_moe",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
