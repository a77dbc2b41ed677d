"""OLMo 1 from outside (tests/vocab_plugins/archkit_olmo.py), and the two words of the vocabulary it needed:
norms without weights (ModelConfig.norm_weight false: no norm tensor in the checkpoint, the forward reads ones) and
q, k and v clamped after their projections (ModelConfig.qkv_clip, the backend op `clamp`).

Parity with transformers' OlmoForCausalLM is tv.assert_parity's (prefill and cached logits < 1e-4, 20 greedy tokens,
numpy fp32) on random models saved by save_pretrained, with clip_qkv off and with one small enough to clamp most
of q, k and v (asserted to change the logits). The GPU side: test_cuda_vocab_kernels.py::test_clamp and
test_cuda_parity.py's VOCAB_CASES["olmo"].
"""

from __future__ import annotations

import json
import tempfile

import attrs
import numpy as np
import pytest
from hypothesis import given, strategies as st

import core
import test_vocabulary as tv
import test_vocabulary_checks as tvc
from conftest import needs_torch
from core import ConfigKey, W
from core.backend import NumpyBackend
from core.errors import ConfigError, WeightsError
from core.weights import check_spec
from hfmodels import hf_logits, hf_reference, rel_err
from test_families import prompt

pytestmark = needs_torch

CLIP = 0.4  # |q|, |k|, |v| reach ~3 in these models (LayerNorm'd inputs, init std 0.15 over 64 features)


def load(ckpt, registry=None, **kw) -> core.Model:
    return core.load(ckpt, registry=registry or tv.registry("olmo"), device="cpu", quiet=True, **kw)


@pytest.mark.parametrize("clip, bias, tie", [(None, False, False), (None, True, True), (CLIP, True, False),
                                             (CLIP, False, True)])  # each switch both ways, the clip with each
@tv.FEW
@given(heads=tv.S.heads, layers=tv.S.layers, theta=tv.S.theta, seed=tv.S.seed)
def test_olmo_parity(clip, bias, tie, heads, layers, theta, seed):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tv.build("olmo", tmp, seed, **tv.dims(heads, layers, theta=theta), clip_qkv=clip, attention_bias=bias,
                        tie_word_embeddings=tie)
        assert not any("norm" in n for n in tv.tensor_names(ckpt))  # OlmoLayerNorm has no parameters
        ids = prompt(seed, 16)
        model = tv.assert_parity("olmo", ckpt, ids)
        c = model.config
        assert (c.norm, c.norm_weight, c.qkv_clip, c.qkv_bias) == ("layernorm", False, clip, bias)
        assert model.weights.globals["final_norm.weight"].tolist() == [1.0] * c.hidden_size
        if clip is not None:  # the clamp binds: the same weights unclamped give other logits
            unclamped = load(tv.edited(ckpt, clip_qkv=None)).logits(ids)
            assert rel_err(unclamped, model.logits(ids)) > 0.05


def test_the_plugin_is_small_pure_and_keeps_transformers_defaults():
    tvc.test_plugin_module_is_small_and_pure("olmo")
    tv.test_config_defaults_are_the_transformers_config_classs("olmo")


# -- norms without weights --------------------------------------------------------------------------------------

def test_a_spec_whose_norms_have_no_weights_registers():
    spec = tv.plugin("olmo").SPEC
    assert check_spec(spec) == []
    weighted = attrs.evolve(spec, config=tuple(k for k in spec.config if k.field != "norm_weight"))
    assert check_spec(weighted) == ["no weight rule provides ['attn_norm.weight', 'final_norm.weight', "
                                    "'mlp_norm.weight'], which the forward needs under the family's defaults"]


def olmo_variant(tmp_path, **changes):
    """(checkpoint, registry of the OLMo spec with `changes`, named olmo-variant)."""
    spec = attrs.evolve(tv.plugin("olmo").SPEC, name="olmo-variant", **changes)
    reg = core.Registry.discover(entry_points=False, extra=[tvc._registering(spec)])
    assert not reg.broken
    return tv.tiny("olmo", tmp_path), reg


def test_a_norm_weight_in_the_checkpoint_is_unexpected(tmp_path):
    """Under norm_weight=False a norm tensor is an error, never silently dropped (a weight that is not 1 would
    change the output): unexplained without a rule, and a rule for a norm gain is off as if its `when` were false."""
    from safetensors.numpy import load_file, save_file

    rule = W("final_norm.weight", "model.norm.weight")
    ckpt, reg = olmo_variant(tmp_path, weights=tv.plugin("olmo").SPEC.weights + (rule,))
    (f,) = ckpt.glob("*.safetensors")
    save_file({**load_file(f), "model.norm.weight": np.full(32, 2.0, np.float32)}, f, metadata={"format": "pt"})
    for registry, arch in ((tv.registry("olmo"), "olmo"), (reg, "olmo-variant")):
        with pytest.raises(WeightsError) as e:
            load(ckpt, registry, arch=arch)
        assert e.value.unexpected == ["model.norm.weight"] and not e.value.missing


def test_weightless_norms_account_for_the_offset(tmp_path):
    """With norm_offset=1 (gains applied as 1 + w) the filled gains are 0: the same model, the same logits."""
    ckpt, reg = olmo_variant(tmp_path, norm_offset=1.0)
    want = load(ckpt).logits([1, 2, 3])
    model = load(ckpt, reg, arch="olmo-variant")
    assert not model.weights.layers[0]["attn_norm.weight"].any()
    np.testing.assert_array_equal(model.logits([1, 2, 3]), want)


@pytest.mark.parametrize("qk_norm", [None, "per_head", "projection"])
def test_weightless_norms_under_tensor_parallel(tmp_path, qk_norm):
    """The filled gains are divided over the ranks as a loaded one would be (q/k norms per head or over the
    projection are split with the heads); the others are every rank's copy."""
    ckpt, reg = olmo_variant(tmp_path, qk_norm=qk_norm)
    tv.edited(ckpt, clip_qkv=CLIP)
    ids = prompt(2, 12)
    want = load(ckpt, reg, arch="olmo-variant").logits(ids)
    assert rel_err(load(ckpt, reg, arch="olmo-variant", tensor_parallel=2).logits(ids), want) < 1e-6


# -- qkv_clip -----------------------------------------------------------------------------------------------------

def test_clamp_op():
    x = np.array([-3.0, -0.4, -0.25, 0.0, 0.3, 0.4000001, 7.0, np.nan, -np.inf], np.float32)
    got = NumpyBackend("float32").clamp(x, -0.4, 0.4)
    assert got.dtype == np.float32
    want = np.array([-0.4, -0.4, -0.25, 0.0, 0.3, 0.4, 0.4, np.nan, -0.4], np.float32)  # bounds rounded to float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("clip", [0, -1.0, "8", True, float("inf")])
def test_qkv_clip_must_be_a_positive_number(tmp_path, clip):
    ckpt = tv.edited(tv.tiny("olmo", tmp_path), clip_qkv=clip)
    with pytest.raises(ConfigError, match=r"clip_qkv=.* must be a positive number or null"):
        load(ckpt)


def test_clip_comes_after_a_projection_qk_norm(tmp_path):
    """OLMoE clamps after its q/k RMSNorm over the whole projection (OlmoeAttention); OLMo 1 and DBRX have no q/k norm,
    so 'after the projection and any such norm' is right for all three. The OLMoE plugin with clip_qkv mapped
    instead of rejected matches transformers."""
    spec = tv.plugin("olmoe").SPEC
    clip = ConfigKey("qkv_clip", ("clip_qkv",), None)
    spec = attrs.evolve(spec, name="olmoe-clip", rejects=(), config=spec.config + (clip,))
    reg = core.Registry.discover(entry_points=False, extra=[tvc._registering(spec)])
    ckpt = tv.build("olmoe", str(tmp_path), 1, **tv.dims((4, 2), 2, intermediate=32), num_experts=3,
                    num_experts_per_tok=2, clip_qkv=0.3)
    assert json.loads((ckpt / "config.json").read_text())["clip_qkv"] == 0.3
    ids = prompt(1, 16)
    model = load(ckpt, reg, arch="olmoe-clip")
    assert model.config.qkv_clip == 0.3
    assert rel_err(model.logits(ids), hf_logits(hf_reference(ckpt), ids)) < tv.TOL
