"""Apertus (Swiss AI, 2025), as transformers' models/apertus/modeling_apertus.py: Llama's layout with per-head q/k
RMSNorm (as Qwen3), llama3 RoPE, and a plain MLP down(xIELU(up(x))) whose activation archkit's core lacks: xIELU
(arXiv 2411.13010, transformers' XIELUActivation), with learned per-layer alpha_p, alpha_n and stored beta, eps.
It is this plugin's own op (core.custom_ops.CustomOp): the numpy reference below and xielu.cu beside this file;
the four parameters are extra roles that only the plugin's MLP function reads.
"""

from pathlib import Path

import numpy as np

from core import ConfigKey, Derived, Detection, ModelSpec, W, hookimpl
from core.custom_ops import CustomOp
from core.spec import ExtraRole

L = "model.layers.{layer}."
PARAMS = ("alpha_p", "alpha_n", "beta", "eps")  # XIELUActivation's parameters and buffers: [1], [1], [], []


def softplus(a):
    return np.where(a > 20, a, np.log1p(np.exp(np.minimum(a, 20))))  # torch's, with its threshold 20


def xielu(x, alpha_p, alpha_n, beta, eps):
    """xIELU of x with one layer's parameters, in the inputs' precision: the op's reference (as XIELUActivation)."""
    ap, an = softplus(alpha_p), beta + softplus(alpha_n)
    return np.where(x > 0, ap * x * x + beta * x, (np.expm1(np.minimum(x, eps)) - x) * an + beta * x)


def launch(kernels, x, alpha_p, alpha_n, beta, eps):
    """xielu.cu's kernel on device tensors (see core.custom_ops): x float32 activations, the parameters weights."""
    y = kernels.empty(x.shape)
    kernels.launch(kernels.function("xielu", "PPPPPPq"), kernels.grid1(x.size), (256, 1, 1), y, x, alpha_p, alpha_n,
                   beta, eps, x.size)
    return y


XIELU = CustomOp(name="xielu", reference=xielu, cuda_source=Path(__file__).with_name("xielu.cu"), launch=launch,
                 description="xIELU with learned per-layer alpha_p, alpha_n")


def mlp(step, L, layer, h):
    """Apertus' MLP on h [T, D]: down(xIELU(up(h))), from backend ops and the custom op."""
    be = step.be
    y = be.custom(XIELU, be.linear(h, L["up.weight"]), *(L["xielu." + p] for p in PARAMS))
    return be.linear(y, L["down.weight"])


WEIGHTS = (
    W("embed", "model.embed_tokens.weight"),
    W("final_norm.weight", "model.norm.weight"),
    W("lm_head", "lm_head.weight", when="!tie_word_embeddings", ignore_when_false=True),
    W("attn_norm.weight", L + "attention_layernorm.weight"),
    *(W(f"{p}.weight", L + f"self_attn.{p}_proj.weight") for p in "qkvo"),
    *(W(f"{p}.bias", L + f"self_attn.{p}_proj.bias", when="qkv_bias") for p in "qkv"),
    W("o.bias", L + "self_attn.o_proj.bias", when="o_bias"),
    W("q_norm.weight", L + "self_attn.q_norm.weight"),
    W("k_norm.weight", L + "self_attn.k_norm.weight"),
    W("mlp_norm.weight", L + "feedforward_layernorm.weight"),
    W("up.weight", L + "mlp.up_proj.weight"),
    W("down.weight", L + "mlp.down_proj.weight"),
    *(W("xielu." + p, L + "mlp.act_fn." + p) for p in PARAMS),
)

CONFIG = (  # defaults: ApertusConfig's (the 8B model's)
    ConfigKey("vocab_size", ("vocab_size",), 131072),
    ConfigKey("hidden_size", ("hidden_size",), 4096),
    ConfigKey("num_layers", ("num_hidden_layers",), 32),
    ConfigKey("num_heads", ("num_attention_heads",), 32),
    ConfigKey("num_kv_heads", ("num_key_value_heads",), Derived("num_heads")),
    ConfigKey("head_dim", ("head_dim",), Derived("hidden_size", div="num_heads")),
    ConfigKey("intermediate_size", ("intermediate_size",), 14336),
    ConfigKey("max_position_embeddings", ("max_position_embeddings",), 65536),
    ConfigKey("norm_eps", ("rms_norm_eps",), 1e-5),
    ConfigKey("tie_word_embeddings", ("tie_word_embeddings",), False),
    ConfigKey("qkv_bias", ("attention_bias",), False),  # one key drives q/k/v and o biases
    ConfigKey("o_bias", ("attention_bias",), False),
    ConfigKey("bos_token_id", ("bos_token_id",), None),
    ConfigKey("eos_token_ids", ("eos_token_id",), None),
)

SPEC = ModelSpec(
    name="apertus",
    description="Apertus: Llama layout + per-head q/k RMSNorm, plain MLP with xIELU (a custom op)",
    reference="transformers/models/apertus/modeling_apertus.py",
    weights=WEIGHTS,
    config=CONFIG,
    rejects=(("hidden_act", ("xielu",), "xielu"),),  # ApertusMLP runs any ACT2FN; this plugin ships xIELU only
    norm="rmsnorm", mlp="plain", positions="rope", qk_norm="head",
    mlp_block=mlp,  # the escape hatch: the MLP is this plugin's function, its activation a custom op
    extra_roles=tuple(ExtraRole("xielu." + p, (1,) if p.startswith("alpha") else ()) for p in PARAMS),
    ops=(XIELU,),
    detection=Detection(architectures=("ApertusForCausalLM",), model_types=("apertus",)),
)


@hookimpl
def archkit_register_architectures(register):
    register(SPEC)
