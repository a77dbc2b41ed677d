"""EXAONE 4.0 (LG AI Research 2025), as transformers' models/exaone4/modeling_exaone4.py.

An out-of-tree plugin written only in archkit's vocabulary. Llama projections and SwiGLU without biases, and:
- norms after each sublayer's output and none before it (norm_placement "post", as OLMo 2);
- q and k RMS-normed per head (one [head_dim] weight) before RoPE;
- hybrid attention from layer_types: "sliding_attention" layers use the window and RoPE, the others see every
  position and use no RoPE (nope_layers). Without a window every layer is global and uses RoPE. Without
  layer_types, every sliding_window_pattern-th layer (4, or a string such as "LLLG") is global: values of
  several keys (`compute`).
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."
KEYS = ("layer_types", "sliding_window", "sliding_window_pattern", "num_hidden_layers")


def layer_types(cfg: dict) -> tuple:
    """As written, else Exaone4Config's: global every pattern-th layer (or per letter: L local, G global)."""
    if cfg.get("layer_types"):
        return tuple(cfg["layer_types"])
    n, p = cfg.get("num_hidden_layers", 32), cfg.get("sliding_window_pattern", 4)
    if cfg.get("sliding_window", 4096) is None:
        return ("full_attention",) * n
    local = [c == "L" for c in p] if isinstance(p, str) else [(i + 1) % p != 0 for i in range(p)]
    return tuple("sliding_attention" if local[i % len(local)] else "full_attention" for i in range(n))


def nope_layers(cfg: dict) -> tuple:
    if cfg.get("sliding_window", 4096) is None:
        return ()
    return tuple(i for i, t in enumerate(layer_types(cfg)) if t != "sliding_attention")


WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("post_attn_norm.weight", L + "post_attention_layernorm.weight"),
    W("post_mlp_norm.weight", L + "post_feedforward_layernorm.weight"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    W("q_norm.weight", L + "self_attn.q_norm.weight"),
    W("k_norm.weight", L + "self_attn.k_norm.weight"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight") for r in ("gate", "up", "down")),
)

# Defaults are Exaone4Config's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 102400),
    ConfigKey("hidden_size", ("hidden_size",), 4096),
    ConfigKey("num_layers", ("num_hidden_layers",), 32),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 32),
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 16384),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 2048),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-5),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("sliding_window", ("sliding_window",), 4096, null_is_value=True),
    ConfigKey("layer_types", KEYS, ("sliding_attention",) * 3 + ("full_attention",), compute=layer_types),
    ConfigKey("nope_layers", KEYS, tuple(range(3, 32, 4)), compute=nope_layers),
    ConfigKey("bos_token_id", ("bos_token_id",), 0, null_is_value=True),
    ConfigKey("eos_token_ids", ("eos_token_id",), 2, null_is_value=True),
    ConfigKey("pad_token_id", ("pad_token_id",), None, null_is_value=True),
)

SPEC = ModelSpec(
    name="exaone4",
    description="EXAONE 4.0: post-sublayer RMSNorms, q/k head norms, local RoPE layers and global NoPE layers",
    reference="transformers/models/exaone4/modeling_exaone4.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="rmsnorm",
    norm_placement="post",
    qk_norm="head",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("Exaone4ForCausalLM",), model_types=("exaone4",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
