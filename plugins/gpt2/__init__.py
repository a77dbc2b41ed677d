"""GPT-2 (Radford et al., 2019), as transformers' models/gpt2/modeling_gpt2.py implements it.

Pre-LayerNorm blocks, learned absolute positions, gelu_new MLP, biases everywhere, lm_head tied to
the token embedding. Hub checkpoints come in two layouts: GPT2LMHeadModel's (names under
"transformer.") and the original release's (no prefix); both load.
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl


def both(name: str) -> tuple[str, str]:
    """A name with and without the "transformer." prefix (save_pretrained vs the original upload)."""
    return ("transformer." + name, name)


L = "h.{layer}."
QKV = ("q_dim", "kv_dim", "kv_dim")

SPEC = ModelSpec(
    name="gpt2",
    description="GPT-2: LayerNorm, learned positions, gelu_new, Conv1D weights, tied lm_head",
    reference="transformers/models/gpt2/modeling_gpt2.py",
    weights=(
        W("embed", *both("wte.weight")),
        W("pos_embed", *both("wpe.weight")),
        W("final_norm.weight", *both("ln_f.weight")),
        W("final_norm.bias", *both("ln_f.bias")),
        W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
        W("attn_norm.weight", *both(L + "ln_1.weight")),
        W("attn_norm.bias", *both(L + "ln_1.bias")),
        # HF GPT-2 uses Conv1D: weights are stored [in, out], and q, k, v are one fused c_attn.
        W(("q.weight", "k.weight", "v.weight"), *both(L + "attn.c_attn.weight"), transpose=True, split=QKV),
        W(("q.bias", "k.bias", "v.bias"), *both(L + "attn.c_attn.bias"), split=QKV),
        W("o.weight", *both(L + "attn.c_proj.weight"), transpose=True),
        W("o.bias", *both(L + "attn.c_proj.bias")),
        W("mlp_norm.weight", *both(L + "ln_2.weight")),
        W("mlp_norm.bias", *both(L + "ln_2.bias")),
        W("up.weight", *both(L + "mlp.c_fc.weight"), transpose=True),
        W("up.bias", *both(L + "mlp.c_fc.bias")),
        W("down.weight", *both(L + "mlp.c_proj.weight"), transpose=True),
        W("down.bias", *both(L + "mlp.c_proj.bias")),
    ),
    # Causal-mask buffers that older checkpoints saved as tensors.
    ignore=both(L + "attn.bias") + both(L + "attn.masked_bias"),
    config=(
        ConfigKey("vocab_size", ("vocab_size",)),
        ConfigKey("hidden_size", ("n_embd", "hidden_size")),
        ConfigKey("num_layers", ("n_layer", "num_hidden_layers")),
        ConfigKey("num_heads", ("n_head", "num_attention_heads")),
        ConfigKey("intermediate_size", ("n_inner",), Derived("hidden_size", mul=4)),  # n_inner: null means 4 * n_embd
        ConfigKey("max_position_embeddings", ("n_positions", "n_ctx"), 1024),
        ConfigKey("norm_eps", ("layer_norm_epsilon",), 1e-5),
        ConfigKey("activation", ("activation_function",), "gelu_new"),
        ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), True),
        ConfigKey("bos_token_id", ("bos_token_id",), None),
        ConfigKey("eos_token_ids", ("eos_token_id",), None),
    ),
    rejects=(
        ("scale_attn_weights", (True,)),
        ("scale_attn_by_inverse_layer_idx", (False,)),
        ("add_cross_attention", (False,)),
    ),
    norm="layernorm",
    mlp="plain",
    positions="learned",
    detection=Detection(architectures=("GPT2LMHeadModel", "GPT2Model"), model_types=("gpt2",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
