"""SmolLM3 (Hugging Face 2025), as transformers' models/smollm3/modeling_smollm3.py.

An out-of-tree plugin written only in archkit's vocabulary. The Llama layout (pre-RMSNorm, SwiGLU, GQA, one
attention_bias key for q/k/v/o), except:
- NoPE layers: no_rope_layers[i] == 0 skips RoPE on layer i (nope_layers); without the list, every
  no_rope_layer_interval-th layer (4) is one, over num_hidden_layers: a value of three keys (`compute`);
- a sliding window only under use_sliding_window, on the layers layer_types marks (by default the NoPE ones).
"""

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl

L = "model.layers.{layer}."


def rope_flags(cfg: dict) -> list:
    """SmolLM3Config's no_rope_layers: 1 for a RoPE layer, 0 for a NoPE one."""
    n, k = cfg.get("num_hidden_layers", 36), cfg.get("no_rope_layer_interval", 4)
    return cfg.get("no_rope_layers") or [int((i + 1) % k != 0) for i in range(n)]


def layer_types(cfg: dict) -> tuple:
    """As written, else SmolLM3Config's: sliding on the NoPE layers when a window is on."""
    window = cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None
    return tuple(cfg.get("layer_types") or ("full_attention" if f or not window else "sliding_attention"
                                            for f in rope_flags(cfg)))


WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "input_layernorm.weight"),
    W("mlp_norm.weight", L + "post_attention_layernorm.weight"),
    *(W(f"{r}.weight", L + f"self_attn.{r}_proj.weight") for r in "qkvo"),
    *(W(f"{r}.bias", L + f"self_attn.{r}_proj.bias", when="qkv_bias") for r in "qkvo"),
    *(W(f"{r}.weight", L + f"mlp.{r}_proj.weight") for r in ("gate", "up", "down")),
    *(W(f"{r}.bias", L + f"mlp.{r}_proj.bias", when="mlp_bias") for r in ("gate", "up", "down")),
)

NOPE_KEYS = ("no_rope_layers", "no_rope_layer_interval", "num_hidden_layers")

# Defaults are SmolLM3Config's own.
CONFIG = (
    ConfigKey("vocab_size", ("vocab_size",), 128256),
    ConfigKey("hidden_size", ("hidden_size",), 2048),
    ConfigKey("num_layers", ("num_hidden_layers",), 36),
    ConfigKey("num_heads", ("num_attention_heads",), 16),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), 4, null_is_value=True),
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 11008),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 32768),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-6),
    ConfigKey("activation", ("hidden_act",), "silu"),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), True),
    ConfigKey("qkv_bias", ("attention_bias",), False),
    ConfigKey("mlp_bias", ("mlp_bias",), False),
    ConfigKey("rope_theta", ("rope_theta",), 2000000.0),
    ConfigKey("nope_layers", NOPE_KEYS, tuple(range(3, 36, 4)),
              compute=lambda cfg: tuple(i for i, f in enumerate(rope_flags(cfg)) if not f)),
    ConfigKey("sliding_window", ("use_sliding_window", "sliding_window"), None,
              compute=lambda cfg: cfg.get("sliding_window") if cfg.get("use_sliding_window") else None),
    ConfigKey("layer_types", ("layer_types", *NOPE_KEYS), None, compute=layer_types),
    ConfigKey("bos_token_id", ("bos_token_id",), 128000, null_is_value=True),
    ConfigKey("eos_token_ids", ("eos_token_id",), 128001, null_is_value=True),
    ConfigKey("pad_token_id", ("pad_token_id",), 128004, null_is_value=True),
)

SPEC = ModelSpec(
    name="smollm3",
    description="SmolLM3: the Llama layout with NoPE layers (no_rope_layers) and an optional window on them",
    reference="transformers/models/smollm3/modeling_smollm3.py",
    weights=WEIGHTS,
    config=CONFIG,
    norm="rmsnorm",
    mlp="gated",
    positions="rope",
    detection=Detection(architectures=("SmolLM3ForCausalLM",), model_types=("smollm3",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
