"""Phi-1, Phi-1.5 and Phi-2 (Gunasekar et al. 2023; Li et al. 2023; Microsoft 2023), as transformers'
models/phi/modeling_phi.py.

What differs from Llama, each a capability of the core vocabulary:
- one LayerNorm (with bias) feeding attention and MLP in parallel: x + attn(ln(x)) + mlp(ln(x))
  (block="parallel_shared_norm"); a final LayerNorm `final_layernorm`;
- biases on every linear, `lm_head.bias` included; a plain gelu_new MLP (fc1, fc2); o is `dense`;
- partial rotary embeddings, partial_rotary_factor of each head (default 0.5);
- optional per-head LayerNorm of q and k before RoPE (qk_layernorm, off by default): one [head_dim] weight
  and bias shared by the heads.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."

WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.final_layernorm.weight"),
    W("final_norm.bias", "model.final_layernorm.bias"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("lm_head.bias", "lm_head.bias"),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    W("attn_norm.bias", L + "input_layernorm.bias"),
    *(W(f"{r}.{p}", L + f"self_attn.{r}_proj.{p}") for r in "qkv" for p in ("weight", "bias")),
    W("o.weight", L + "self_attn.dense.weight"),
    W("o.bias", L + "self_attn.dense.bias"),
    *(W(f"{r}_norm.{p}", L + f"self_attn.{r}_layernorm.{p}", when="qk_norm") for r in "qk"
      for p in ("weight", "bias")),
    W("up.weight", L + "mlp.fc1.weight"),
    W("up.bias", L + "mlp.fc1.bias"),
    W("down.weight", L + "mlp.fc2.weight"),
    W("down.bias", L + "mlp.fc2.bias"),
)

# Defaults are PhiConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 51200),
    ConfigKey("hidden_size", ("hidden_size",), 2048),
    ConfigKey("num_layers", ("num_hidden_layers",), 24),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 8192),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 2048),
    ConfigKey("norm_eps", ("layer_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "gelu_new"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qk_norm", ("qk_layernorm",), "none", transform=lambda on: "head" if on else "none"),
    ConfigKey("partial_rotary_factor", ("partial_rotary_factor",), 0.5),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="phi",
    description="Phi-1/1.5/2: parallel block from one LayerNorm, partial rotary, biases incl. lm_head, optional q/k LayerNorm",
    reference="transformers/models/phi/modeling_phi.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="layernorm",
    mlp="plain",
    positions="rope",
    block="parallel_shared_norm",
    detection=Detection(architectures=("PhiForCausalLM",), model_types=("phi",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
