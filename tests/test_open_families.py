"""The in-tree families outside the Llama lineage, each built only from the open vocabulary (issue 14):
GPT-NeoX / Pythia (parallel block, fused per-head QKV, partial rotary), Phi-1/1.5/2 (parallel block from one
norm, partial rotary, lm_head bias, optional q/k LayerNorm), Mixtral and Qwen3-MoE (mixture of experts).

The oracle is transformers: random-init models of each family's own class over hypothesis-drawn configs, every
norm weight and bias perturbed (they init to exactly 1 / 0, which would hide a misapplied one), saved with
save_pretrained in hub layout. archkit (numpy, fp32) must give the same prefill logits, the same logits through
the KV cache one token at a time, and the same greedy tokens (test_families.assert_parity).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import core
from conftest import needs_torch
from core.checkpoint import Checkpoint
from core.errors import ConfigError, WeightsError
from hfmodels import FAMILIES
from test_families import assert_parity, detect_dir, prompt, without_config

pytestmark = needs_torch

FEW = settings(max_examples=4)


def save(family: str, path: Path, *, seed: int = 0, noise: float = 0.3, **cfg) -> Path:
    """A random transformers model of `family` with config `cfg` (tiny defaults), saved to `path`."""
    import torch
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=128, initializer_range=0.15, bos_token_id=None, eos_token_id=None,
                pad_token_id=None)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**base, **cfg})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(path)
    return path


def check(family: str, seed: int, **cfg):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save(family, Path(tmp) / family, seed=seed, **cfg)
        assert_parity(family, ckpt, prompt(seed, 12, 96))
        return core.load(ckpt, device="cpu", quiet=True).config


# -- GPT-NeoX / Pythia ---------------------------------------------------------------------------------------------

@FEW
@given(parallel=st.booleans(), rotary=st.sampled_from([0.25, 0.5, 1.0]), heads=st.sampled_from([2, 4, 8]),
       bias=st.booleans(), act=st.sampled_from(["gelu", "gelu_new", "relu"]), tie=st.booleans(), seed=st.integers(0, 999))
def test_gpt_neox_parity(parallel, rotary, heads, bias, act, tie, seed):
    c = check("gpt_neox", seed, use_parallel_residual=parallel, num_attention_heads=heads, attention_bias=bias,
              hidden_size=16 * heads,  # head_dim 16: a quarter of it still rotates an even number of dims
              hidden_act=act, tie_word_embeddings=tie,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary})
    assert c.block == ("parallel" if parallel else "sequential")
    assert c.rope.rotary_dims(c.head_dim) == int(c.head_dim * rotary)


def test_gpt_neox_absent_parallel_key_means_parallel(tmp_path):
    """GPTNeoXConfig defaults use_parallel_residual to true: a config.json without the key is parallel."""
    ckpt = save("gpt_neox", tmp_path / "n")
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["use_parallel_residual"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert core.load(ckpt, device="cpu", quiet=True).config.block == "parallel"
    assert_parity("gpt_neox", ckpt, [1, 2, 3, 4, 5])


def test_gpt_neox_old_key_spellings(tmp_path):
    """Pythia's config.json spells the rotary fraction rotary_pct and the base rotary_emb_base."""
    ckpt = save("gpt_neox", tmp_path / "n", rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                               "partial_rotary_factor": 0.5})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("rope_parameters")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "rotary_pct": 0.5, "rotary_emb_base": 500.0}))
    c = core.load(ckpt, device="cpu", quiet=True).config
    assert (c.rope.theta, c.rope.partial_rotary_factor) == (500.0, 0.5)
    assert_parity("gpt_neox", ckpt, [1, 2, 3, 4, 5])


# -- Phi-1 / 1.5 / 2 -----------------------------------------------------------------------------------------------

@FEW
@given(qk=st.booleans(), rotary=st.sampled_from([0.25, 0.5, 1.0]), kv=st.sampled_from([1, 2, 4]), tie=st.booleans(),
       seed=st.integers(0, 999))
def test_phi_parity(qk, rotary, kv, tie, seed):
    c = check("phi", seed, qk_layernorm=qk, num_key_value_heads=kv, tie_word_embeddings=tie,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary})
    assert c.block == "parallel_shared_norm" and c.qk_norm == ("head" if qk else "none")


def test_phi_lm_head_bias_is_used(tmp_path):
    ckpt = save("phi", tmp_path / "p")
    model = core.load(ckpt, device="cpu", quiet=True)
    assert "lm_head.bias" in model.weights.globals
    assert_parity("phi", ckpt, [4, 5, 6])


# -- Mixtral -------------------------------------------------------------------------------------------------------

@FEW
@given(experts=st.sampled_from([2, 4, 8]), top=st.integers(1, 3), kv=st.sampled_from([1, 2, 4]),
       window=st.sampled_from([None, 5]), seed=st.integers(0, 999))
def test_mixtral_parity(experts, top, kv, window, seed):
    c = check("mixtral", seed, num_local_experts=experts, num_experts_per_tok=min(top, experts),
              num_key_value_heads=kv, sliding_window=window)
    assert c.num_experts == experts and c.moe_renormalize and all(c.sparse_layer(i) for i in range(c.num_layers))


def test_mixtral_missing_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = save("mixtral", tmp_path / "m", num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"missing: model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight"):
        core.load(ckpt, device="cpu", quiet=True)


# -- Qwen3-MoE -----------------------------------------------------------------------------------------------------

@FEW
@given(layers=st.integers(1, 4), experts=st.sampled_from([4, 8]), top=st.integers(1, 4), renorm=st.booleans(),
       step=st.sampled_from([1, 2]), dense=st.lists(st.integers(0, 3), max_size=2, unique=True), seed=st.integers(0, 999))
def test_qwen3_moe_parity(layers, experts, top, renorm, step, dense, seed):
    dense = [d for d in dense if d < layers]
    c = check("qwen3_moe", seed, num_hidden_layers=layers, num_experts=experts, num_experts_per_tok=top,
              moe_intermediate_size=16, norm_topk_prob=renorm, decoder_sparse_step=step, mlp_only_layers=dense,
              num_key_value_heads=2, head_dim=16)
    assert [c.sparse_layer(i) for i in range(layers)] == [i not in dense and (i + 1) % step == 0 for i in range(layers)]


def test_qwen3_moe_stacked_experts(tmp_path):
    """Experts stacked in one tensor per layer (gate_up_proj [E, 2I, D], down_proj [E, D, I], as transformers 5
    holds them) load like the hub's one tensor per expert, and give the same logits."""
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = save("qwen3_moe", tmp_path / "q", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    ids = [7, 8, 9, 10]
    want = core.load(ckpt, device="cpu", quiet=True).logits(ids)
    f = ckpt / "model.safetensors"
    t = load_file(str(f))
    for layer in range(2):
        e = f"model.layers.{layer}.mlp.experts."
        gate = torch.stack([t.pop(f"{e}{i}.gate_proj.weight") for i in range(4)])
        up = torch.stack([t.pop(f"{e}{i}.up_proj.weight") for i in range(4)])
        t[e + "gate_up_proj"] = torch.cat([gate, up], dim=1)
        t[e + "down_proj"] = torch.stack([t.pop(f"{e}{i}.down_proj.weight") for i in range(4)])
    save_file(t, str(f), metadata={"format": "pt"})
    np.testing.assert_allclose(core.load(ckpt, device="cpu", quiet=True).logits(ids), want, rtol=1e-6, atol=1e-6)


# -- detection -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,cfg", [("gpt_neox", {}), ("phi", {}),
                                        ("mixtral", dict(num_local_experts=4, num_key_value_heads=2)),
                                        ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=16))])
def test_detection(tmp_path, family, cfg):
    ckpt = save(family, tmp_path / "c", **cfg)
    d = detect_dir(ckpt)
    assert (d.name, d.method, d.score) == (family, "config.json", 3)
    bare = detect_dir(without_config(ckpt, tmp_path / "bare"))
    assert (bare.name, bare.method) == (family, "tensor names")
