"""Qwen3 dense models (Qwen team, 2025), as transformers' models/qwen3/modeling_qwen3.py.

The Llama layout plus a per-head RMSNorm on q and k (q_norm, k_norm) applied before RoPE, an explicit
head_dim that is not hidden_size / num_heads (Qwen3-0.6B: 1024 hidden, 16 heads, head_dim 128), and
tied embeddings in the small models. Sliding-window attention (use_sliding_window) is not supported.
"""

import attrs

from core import ConfigKey, Detection, W, hookimpl
from plugins.llama import SPEC as LLAMA

L = "model.layers.{layer}."


def _with_qwen3_defaults(keys):
    # Qwen3Config's head_dim default is 128, not hidden / heads.
    return tuple(ConfigKey("head_dim", ("head_dim",), 128) if k.field == "head_dim" else k for k in keys)


SPEC = attrs.evolve(
    LLAMA,
    name="qwen3",
    description="Qwen3: Llama layout + per-head q/k RMSNorm before RoPE, explicit head_dim",
    reference="transformers/models/qwen3/modeling_qwen3.py",
    weights=LLAMA.weights + (
        W("q_norm.weight", L + "self_attn.q_norm.weight"),
        W("k_norm.weight", L + "self_attn.k_norm.weight"),
    ),
    config=_with_qwen3_defaults(LLAMA.config),
    rejects=(("use_sliding_window", (False,)),),
    qk_norm=True,
    detection=Detection(architectures=("Qwen3ForCausalLM",), model_types=("qwen3",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
