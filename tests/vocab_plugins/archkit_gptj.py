"""GPT-J (Wang & Komatsuzaki 2021, "GPT-J-6B"), as transformers' models/gptj/modeling_gptj.py.

An out-of-tree plugin written only in archkit's vocabulary. What differs from Llama:
- one LayerNorm (with bias) feeding attention and MLP in parallel: x + attn(ln_1(x)) + mlp(ln_1(x))
  (block="parallel_shared_norm"), a final LayerNorm ln_f;
- interleaved rotary embeddings (rotate_every_two: pairs (2i, 2i+1)) over the first rotary_dim dims of each head
  only (GPTJConfig's default 64; null means the whole head), base 10000, not configurable;
- separate q/k/v and out_proj without biases; a plain gelu_new MLP fc_in → fc_out with biases;
- an untied lm_head with a bias; GPT-2 style config names (n_embd, n_layer, n_head, n_positions, n_inner).
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "transformer.h.{layer}."

WEIGHTS = (
    W("embed", "transformer.wte.weight"),
    W("final_norm.weight", "transformer.ln_f.weight"),
    W("final_norm.bias", "transformer.ln_f.bias"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("lm_head.bias", "lm_head.bias"),
    W("attn_norm.weight", L + "ln_1.weight"),
    W("attn_norm.bias", L + "ln_1.bias"),
    *(W(f"{r}.weight", L + f"attn.{r}_proj.weight") for r in "qkv"),
    W("o.weight", L + "attn.out_proj.weight"),
    W("up.weight", L + "mlp.fc_in.weight"),
    W("up.bias", L + "mlp.fc_in.bias"),
    W("down.weight", L + "mlp.fc_out.weight"),
    W("down.bias", L + "mlp.fc_out.bias"),
)

# Defaults are GPTJConfig's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 50400),
    ConfigKey("hidden_size", ("n_embd", "hidden_size"), 4096),
    ConfigKey("num_layers", ("n_layer", "num_hidden_layers"), 28),
    ConfigKey("num_heads", ("n_head", "num_attention_heads"), 16),
    ConfigKey("intermediate_size", ("n_inner",), Derived("hidden_size", mul=4)),  # null: 4 * n_embd
    ConfigKey("max_position_embeddings", ("n_positions", "max_position_embeddings"), 2048),
    ConfigKey("norm_eps", ("layer_norm_epsilon",), 1e-5),
    ConfigKey("activation", ("activation_function",), "gelu_new"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("rotary_dim", ("rotary_dim",), 64, null_is_value=True),  # null: every dim of the head rotates
    ConfigKey("rope_theta", (), 10000.0),  # fixed in create_sinusoidal_positions
    ConfigKey("bos_token_id", ("bos_token_id",), 50256, null_is_value=True),
    ConfigKey("eos_token_ids", ("eos_token_id",), 50256, null_is_value=True),
)

SPEC = ModelSpec(
    name="gptj",
    description="GPT-J: parallel block from one LayerNorm, interleaved partial rotary (rotary_dim), lm_head bias",
    reference="transformers/models/gptj/modeling_gptj.py",
    weights=WEIGHTS,
    config=CONFIG,
    ignore=(L + "attn.bias", L + "attn.masked_bias"),  # causal-mask buffers of older checkpoints
    norm="layernorm",
    mlp="plain",
    positions="rope",
    rope_style="interleaved",
    block="parallel_shared_norm",
    detection=Detection(architectures=("GPTJForCausalLM",), model_types=("gptj",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
