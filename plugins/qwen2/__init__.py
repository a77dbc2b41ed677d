"""Qwen2 / Qwen2.5 dense models (Qwen team, 2024), as transformers' models/qwen2/modeling_qwen2.py.

The Llama layout with biases on q, k and v always (nn.Linear(..., bias=True); Qwen2Config has no
attention_bias key) and never on o, and lm_head tied to the embedding in the small models (0.5B, 1.5B).
Sliding-window attention (use_sliding_window, on layers >= max_window_layers) is off in every released
checkpoint and is rejected when a config turns it on.
"""

import attrs

from core import ConfigKey, Detection, W, hookimpl
from plugins.llama import SPEC as LLAMA

L = "model.layers.{layer}."

# q/k/v biases carry no `when`: a Qwen2 checkpoint always has them, and their absence tells a Llama
# checkpoint apart when detecting from tensor names alone.
WEIGHTS = tuple(r for r in LLAMA.weights if not r.targets[0].endswith(".bias")) + (
    W("q.bias", L + "self_attn.q_proj.bias"),
    W("k.bias", L + "self_attn.k_proj.bias"),
    W("v.bias", L + "self_attn.v_proj.bias"),
)


def _qwen2_keys(keys):
    # No key drives the biases: q/k/v always, o never, MLP never (and no attention_bias / mlp_bias in config.json).
    fixed = {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
    return tuple(ConfigKey(k.field, (), fixed[k.field]) if k.field in fixed else k for k in keys)


SPEC = attrs.evolve(
    LLAMA,
    name="qwen2",
    description="Qwen2/2.5: Llama layout + q/k/v biases (no o bias), tied lm_head in small models",
    reference="transformers/models/qwen2/modeling_qwen2.py",
    weights=WEIGHTS,
    config=_qwen2_keys(LLAMA.config),
    rejects=(("use_sliding_window", (False,)),),
    detection=Detection(architectures=("Qwen2ForCausalLM",), model_types=("qwen2",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
