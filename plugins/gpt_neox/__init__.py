"""GPT-NeoX / Pythia (Black et al. 2022; Biderman et al. 2023), as transformers' models/gpt_neox/modeling_gpt_neox.py.

What differs from Llama, each a capability of the core vocabulary:
- LayerNorm with bias everywhere, biases on every linear (attention_bias drives q/k/v and o);
- q, k and v fused in one `query_key_value` laid out per head as [heads, (q, k, v), head_dim]: split interleaved
  over the heads (interleave="num_kv_heads"; GPT-NeoX has no GQA, so that is num_attention_heads);
- a parallel block by default: x + attn(ln1(x)) + mlp(ln2(x)) (use_parallel_residual, which GPTNeoXConfig
  defaults to true, so an absent key means parallel); false gives the sequential block;
- partial rotary embeddings: rotary_pct of each head (default 0.25), rotate-half over those dims only; older
  configs spell it `rotary_pct` and the base `rotary_emb_base`;
- a plain GELU MLP (dense_h_to_4h, dense_4h_to_h), untied `embed_out`.
"""

from core import ConfigKey, Detection, ModelSpec, W, hookimpl

L = "gpt_neox.layers.{layer}."
QKV = ("q.weight", "k.weight", "v.weight")

WEIGHTS = (
    W("embed", "gpt_neox.embed_in.weight"),
    W("final_norm.weight", "gpt_neox.final_layer_norm.weight"),
    W("final_norm.bias", "gpt_neox.final_layer_norm.bias"),
    W("lm_head", "embed_out.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    W("attn_norm.bias", L + "input_layernorm.bias"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    W("mlp_norm.bias", L + "post_attention_layernorm.bias"),
    W(QKV, L + "attention.query_key_value.weight", split=("q_dim", "kv_dim", "kv_dim"), interleave="num_kv_heads"),
    W(("q.bias", "k.bias", "v.bias"), L + "attention.query_key_value.bias", split=("q_dim", "kv_dim", "kv_dim"),
      interleave="num_kv_heads", when="qkv_bias"),
    W("o.weight", L + "attention.dense.weight"),
    W("o.bias", L + "attention.dense.bias", when="o_bias"),
    W("up.weight", L + "mlp.dense_h_to_4h.weight"),
    W("up.bias", L + "mlp.dense_h_to_4h.bias"),
    W("down.weight", L + "mlp.dense_4h_to_h.weight"),
    W("down.bias", L + "mlp.dense_4h_to_h.bias"),
)

# Defaults are GPTNeoXConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 50432),
    ConfigKey("hidden_size", ("hidden_size",), 6144),
    ConfigKey("num_layers", ("num_hidden_layers",), 44),
    ConfigKey("num_heads", ("num_attention_heads",), 64),
    ConfigKey("intermediate_size", ("intermediate_size",), 24576),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 2048),
    ConfigKey("norm_eps", ("layer_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "gelu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), True),
    ConfigKey("o_bias", ("attention_bias",), True),
    ConfigKey("block", ("use_parallel_residual",), "parallel",
              transform=lambda parallel: "parallel" if parallel else "sequential"),
    ConfigKey("partial_rotary_factor", ("rotary_pct",), 0.25),
    ConfigKey("rope_theta", ("rotary_emb_base",), 10000.0),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="gpt_neox",
    description="GPT-NeoX / Pythia: parallel block, fused per-head QKV, partial rotary, LayerNorm, biases",
    reference="transformers/models/gpt_neox/modeling_gpt_neox.py",
    weights=WEIGHTS,
    config=CONFIG,
    # causal-mask buffers and rotary caches that older checkpoints saved as tensors
    ignore=(L + "attention.bias", L + "attention.masked_bias", L + "attention.rotary_emb.inv_freq"),
    norm="layernorm",
    mlp="plain",
    positions="rope",
    detection=Detection(architectures=("GPTNeoXForCausalLM",), model_types=("gpt_neox",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
