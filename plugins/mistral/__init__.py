"""Mistral (Jiang et al. 2023, "Mistral 7B"), as transformers' models/mistral/modeling_mistral.py.

The Llama layout and computation (RMSNorm, RoPE, SwiGLU, GQA, no biases) plus sliding-window attention
on every layer: a query at position p sees keys p - sliding_window + 1 .. p (masking_utils'
sliding_window_overlay: kv_idx > q_idx - sliding_window). Mistral-7B-v0.1 uses a 4096 window; v0.2 and
later write "sliding_window": null, which is plain causal attention.

Its tensor names are exactly Llama's, so without config.json the two cannot be told apart: detection by
tensor names reports the ambiguity (llama and mistral tie) instead of guessing.
"""

import attrs

from core import ConfigKey, Detection, hookimpl
from plugins.llama import SPEC as LLAMA

# Mistral's linear layers never have biases (no attention_bias / mlp_bias in MistralConfig).
WEIGHTS = tuple(r for r in LLAMA.weights if not r.targets[0].endswith(".bias"))

_FIXED = {"qkv_bias": False, "o_bias": False, "mlp_bias": False}
CONFIG = tuple(ConfigKey(k.field, (), _FIXED[k.field]) if k.field in _FIXED else k for k in LLAMA.config) + (
    # MistralConfig's default when the key is missing; JSON null (v0.2 and later) means no window.
    ConfigKey("sliding_window", ("sliding_window",), 4096, null_is_value=True),
)

SPEC = attrs.evolve(
    LLAMA,
    name="mistral",
    description="Mistral: Llama layout + sliding-window attention on every layer, GQA",
    reference="transformers/models/mistral/modeling_mistral.py",
    weights=WEIGHTS,
    config=CONFIG,
    detection=Detection(architectures=("MistralForCausalLM",), model_types=("mistral",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
