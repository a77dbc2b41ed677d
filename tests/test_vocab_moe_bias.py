"""The vocabulary's MoE selection bias (router.select_bias) and group-limited routing (moe_groups, moe_topk_groups),
tried from outside as tests/test_vocabulary.py tries the rest: GLM-4.5 (tests/vocab_plugins/archkit_glm4_moe.py, a
pure plugin) against transformers' Glm4MoeForCausalLM.

The numpy router (core.ops.moe_route) against transformers' own Glm4MoeTopkRouter on random hidden states; then
random-init models (every 1-D parameter perturbed, e_score_correction_bias random and large enough to change the
picks: the same weights with the bias zeroed give other logits), saved by save_pretrained: prefill logits, decode
through the KV cache and greedy tokens as transformers', over the family's switches (partial RoPE, q/k norms,
attention biases, dense first layers, shared experts, renormalisation, routed scale, groups); the stacked expert
layout; expert parallelism; the bias kept in float32 under bf16; the defaults and the values refused.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import core
from core import ops
from core.config import ModelConfig
from core.errors import ConfigError, WeightsError

from conftest import needs_torch
from hfmodels import hf_logits, hf_reference, rel_err
from test_cuda_moe import route_margin
from test_families import prompt
import test_tp
import test_vocabulary as tv
import test_vocabulary_checks as tvc

pytestmark = needs_torch

FAMILY = "glm4_moe"
FEW = settings(max_examples=4)
BIAS_KEY = "e_score_correction_bias"


def build(tmp, seed: int, bias_std: float = 0.3, **cfg) -> Path:
    """A random Glm4MoeForCausalLM, every 1-D parameter perturbed (norms init to 1, biases to 0) and each router's
    e_score_correction_bias (a buffer, zero at init) drawn with std bias_std, saved by save_pretrained."""
    import torch
    import transformers

    config = transformers.Glm4MoeConfig(vocab_size=tv.VOCAB, initializer_range=0.15, bos_token_id=None,
                                        eos_token_id=None, pad_token_id=None, **cfg)
    torch.manual_seed(seed)
    model = transformers.Glm4MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith(BIAS_KEY):
                b.copy_(torch.randn_like(b) * bias_std)
    path = Path(tmp) / FAMILY
    model.save_pretrained(path)
    return path


def moe_dims(heads=(4, 2), layers=2, experts=8, top_k=2, **extra) -> dict:
    return dict(tv.dims(heads, layers), n_routed_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=32,
                **extra)


def zero_bias(ckpt: Path) -> Path:
    """The checkpoint with every e_score_correction_bias set to zero, in place."""
    from safetensors.torch import load_file, save_file

    (f,) = ckpt.glob("*.safetensors")
    t = load_file(str(f))
    save_file({k: v.zero_() if k.endswith(BIAS_KEY) else v for k, v in t.items()}, str(f), metadata={"format": "pt"})
    return ckpt


def load(ckpt: Path, **kw) -> core.Model:
    return core.load(ckpt, registry=tv.registry(FAMILY), device="cpu", quiet=True, **kw)


@st.composite
def routers(draw):
    """(experts, groups, groups kept, top_k): whole groups of at least two, top_k within the kept groups' experts
    and below the expert count (so the bias can change the picks)."""
    experts = draw(st.sampled_from([4, 6, 8]))
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if experts % g == 0 and experts // g >= 2]))
    kept = draw(st.integers(1, groups))
    top_k = draw(st.integers(1, min(kept * experts // groups, experts - 1)))
    return experts, groups, kept, top_k


# -- the router alone ----------------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(r=routers(), T=st.integers(1, 12), renorm=st.booleans(), scale=st.sampled_from([1.0, 2.5]),
       seed=tv.S.seed)
def test_router_matches_transformers(r, T, renorm, scale, seed):
    """core.ops.moe_route (sigmoid, select_bias, groups) picks transformers' experts with its weights."""
    import torch
    import transformers
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    E, G, kept, k = r
    cfg = transformers.Glm4MoeConfig(hidden_size=16, n_routed_experts=E, num_experts_per_tok=k, n_group=G,
                                     topk_group=kept, norm_topk_prob=renorm, routed_scaling_factor=scale)
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(E, 16)).astype(np.float32), (rng.normal(size=E) * 0.3).astype(np.float32)
    x = rng.normal(size=(T, 16)).astype(np.float32)
    assume(route_margin(ops.sigmoid(x.astype(np.float64) @ w.T) + b, G, kept, k) > 1e-5)
    router = Glm4MoeTopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(w))
        router.e_score_correction_bias.copy_(torch.from_numpy(b))
        _, hf_w, hf_top = router(torch.from_numpy(x))
    top, wts = ops.moe_route(x, w, None, k, "sigmoid", renorm, scale, b, G, kept)
    order = np.argsort(hf_top.numpy(), axis=-1)  # transformers' topk is unsorted: compare as sets, weights along
    np.testing.assert_array_equal(np.sort(top, axis=-1), np.take_along_axis(hf_top.numpy(), order, -1))
    want = np.take_along_axis(hf_w.numpy(), order, -1)
    np.testing.assert_allclose(np.take_along_axis(wts, np.argsort(top, axis=-1), -1), want, rtol=1e-5)


def test_the_bias_chooses_but_does_not_weigh():
    """Hand-made: scores (sigmoid) 0.9, 0.5, 0.1 with a bias lifting expert 2 over expert 1: picks 0 and 2, weighted
    by their scores 0.9 and 0.1; the groups {0, 1} and {2, 3} (sums of each group's two best) keep only the first."""
    logits = np.log(np.array([[0.9, 0.5, 0.1, 0.05]]) / (1 - np.array([[0.9, 0.5, 0.1, 0.05]])))
    bias = np.array([0.0, 0.0, 0.5, 0.0])
    top, w = ops.moe_route(logits, np.eye(4), None, 2, "sigmoid", False, 1.0, bias)
    assert top.tolist() == [[0, 2]] and np.allclose(w, [[0.9, 0.1]])
    top, w = ops.moe_route(logits, np.eye(4), None, 2, "sigmoid", False, 1.0, bias, groups=2, topk_groups=1)
    assert top.tolist() == [[0, 1]] and np.allclose(w, [[0.9, 0.5]])  # 1.4 for {0, 1}, 0.6 + 0.05 for {2, 3}


# -- whole models against transformers ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@FEW
@given(heads=tv.S.heads, layers=st.integers(2, 3), r=routers(), dense=st.integers(0, 1), shared=st.integers(0, 2),
       renorm=st.booleans(), scale=st.sampled_from([1.0, 2.5]), qk_norm=st.booleans(), bias=st.booleans(),
       seed=tv.S.seed)
def test_glm4_moe_parity(heads, layers, r, dense, shared, renorm, scale, qk_norm, bias, seed):
    E, G, kept, k = r
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build(tmp, seed, **moe_dims(heads, layers, E, k, n_group=G, topk_group=kept),
                     first_k_dense_replace=dense, n_shared_experts=shared, norm_topk_prob=renorm,
                     routed_scaling_factor=scale, use_qk_norm=qk_norm, attention_bias=bias)
        ids = prompt(seed, 16)
        model = tv.assert_parity(FAMILY, ckpt, ids)
        c = model.config
        assert (c.router_scoring, c.moe_groups, c.moe_topk_groups, c.first_dense_layers) == ("sigmoid", G, kept, dense)
        assert c.shared_expert_intermediate_size == 32 * shared and c.rope.rotary_dims(c.head_dim) == c.head_dim // 2
        sparse = [i for i in range(c.num_layers) if c.sparse_layer(i)]
        assert sparse == list(range(dense, layers)) and "router.select_bias" in model.weights.layers[sparse[0]]
        # the bias changes which experts run: the same weights without it give other logits
        assert rel_err(load(zero_bias(ckpt)).logits(ids), model.logits(ids)) > 1e-3


def test_group_limited_routing_binds():
    """Four groups of two experts, the best one kept: transformers' logits, and other ones than plain top-k's."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build(tmp, 11, **moe_dims(experts=8, top_k=2, n_group=4, topk_group=1), first_k_dense_replace=0)
        ids = prompt(11, 16)
        grouped = tv.assert_parity(FAMILY, ckpt, ids).logits(ids)
        plain = load(tv.edited(ckpt, n_group=1, topk_group=1)).logits(ids)
        assert rel_err(plain, grouped) > 1e-3


def test_stacked_expert_layout(tmp_path):
    ckpt = build(tmp_path, 3, **moe_dims(experts=4))
    ids = prompt(3, 12)
    want = hf_logits(hf_reference(ckpt), ids)
    tv.stack_experts(ckpt)
    assert "model.layers.1.mlp.experts.gate_up_proj" in tv.tensor_names(ckpt)
    assert rel_err(load(ckpt).logits(ids), want) < tv.TOL


def test_expert_parallel_ranks_route_with_the_bias(tmp_path):
    """Over 2 and 4 ranks (two and one experts each) the replicated router chooses with the bias as one rank does."""
    ckpt = build(tmp_path, 5, **moe_dims(experts=8, top_k=3, n_group=2, topk_group=1))
    for n in (2, 4):
        test_tp.assert_tp_parity(ckpt, n, registry=tv.registry(FAMILY), ids=prompt(7, 12, tv.VOCAB))


def test_the_bias_stays_float32_under_bfloat16(tmp_path):
    """bf16 holds 8 bits of mantissa; the bias is kept as the checkpoint stores it (float32), the router as bf16."""
    ckpt = build(tmp_path, 2, **moe_dims(experts=4))
    from safetensors.numpy import load_file

    (f,) = ckpt.glob("*.safetensors")
    stored = load_file(str(f))["model.layers.1.mlp.gate." + BIAS_KEY]
    L = load(ckpt, dtype="bfloat16").weights.layers[1]
    assert L["router.select_bias"].dtype == np.float32 and np.array_equal(L["router.select_bias"], stored)
    assert not np.array_equal(stored.astype(np.float32), core.backend.NumpyBackend("bfloat16").convert(
        stored, "F32", "router.weight"))  # (what any other role would have become)


# -- the plugin, its defaults, what it refuses ---------------------------------------------------------------------

def test_the_plugin_is_small_and_pure():
    tvc.test_plugin_module_is_small_and_pure(FAMILY)


def test_an_empty_config_means_the_transformers_defaults():
    """Every key left out means what Glm4MoeConfig gives it (the shared expert's computed size included). head_dim is
    given, as GLM-4.5's config.json does: the class's own 4096 / 96 would rotate an odd 21 dims."""
    import transformers

    spec = tv.plugin(FAMILY).SPEC
    full = transformers.Glm4MoeConfig(head_dim=128).to_dict()
    empty = ModelConfig.from_hf(spec, {"head_dim": 128})
    assert attrs.asdict(empty) == attrs.asdict(ModelConfig.from_hf(spec, full))
    assert (empty.shared_expert_intermediate_size, empty.rope.rotary_dims(128), empty.moe_groups) == (1408, 64, 1)


@pytest.mark.parametrize("edit, parts", [
    ({"n_group": 3}, ("n_group=3 must divide n_routed_experts=8",)),
    ({"n_group": 8}, ("groups of at least 2 experts",)),
    ({"n_group": 2, "topk_group": 3}, ("topk_group=3 must be at most n_group=2",)),
    ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, ("num_experts_per_tok=3 is more than the 2 experts",)),
])
def test_group_values_refused(tmp_path, edit, parts):
    ckpt = tv.edited(build(tmp_path, 0, **moe_dims(layers=1, experts=8), first_k_dense_replace=0), **edit)
    with pytest.raises(ConfigError) as e:
        load(ckpt)
    assert all(p in str(e.value) for p in parts), str(e.value)


def test_the_bias_is_required_where_the_rule_maps_it(tmp_path):
    """A rule that maps the role makes the tensor required (the role itself is optional: other MoE families lack it)."""
    from core.errors import WeightsError
    from safetensors.torch import load_file, save_file

    ckpt = build(tmp_path, 1, **moe_dims(experts=4))
    (f,) = ckpt.glob("*.safetensors")
    save_file({k: v for k, v in load_file(str(f)).items() if not k.endswith(BIAS_KEY)}, str(f),
              metadata={"format": "pt"})
    with pytest.raises(WeightsError) as e:
        load(ckpt)
    assert e.value.missing == ["model.layers.1.mlp.gate." + BIAS_KEY]
    assert json.loads((ckpt / "config.json").read_text())["n_routed_experts"] == 4


def test_the_hub_multi_token_prediction_layer_is_skipped(tmp_path):
    """GLM-4.5's hub checkpoints carry one more layer after num_hidden_layers (multi-token prediction: a full
    layer plus eh_proj, enorm, hnorm, shared_head), which transformers skips and the model never runs. Under
    num_nextn_predict_layers (unused_layers) archkit skips it too, matched by the family's rules or not; without
    the key its tensors are unexpected."""
    from safetensors.numpy import load_file, save_file

    ckpt = build(tmp_path, 3, **moe_dims(layers=2))
    ids = prompt(3, 12)
    want = load(ckpt).logits(ids)
    (f,) = ckpt.glob("*.safetensors")
    t = load_file(str(f))
    extra = {n.replace("model.layers.1.", "model.layers.2."): v for n, v in t.items() if n.startswith("model.layers.1.")}
    extra.update({"model.layers.2.eh_proj.weight": np.zeros((4, 4), np.float32),
                  "model.layers.2.enorm.weight": np.ones(4, np.float32)})
    save_file({**t, **extra}, str(f), metadata={"format": "pt"})
    model = load(ckpt)
    assert model.config.unused_layers == 1 and len(model.weights.layers) == 2
    np.testing.assert_array_equal(model.logits(ids), want)
    with pytest.raises(WeightsError, match=r"unexpected: .*model\.layers\.2\.eh_proj\.weight"):
        load(tv.edited(ckpt, num_nextn_predict_layers=0))


def test_a_vector_stored_with_leading_unit_axes_loads(tmp_path):
    """ERNIE 4.5 MoE's save_pretrained stores e_score_correction_bias as [1, experts] (a parameter of shape
    (groups=1, experts)): a 1-D role accepts leading axes of size 1, and loads as the vector; other shapes of the
    same size stay errors."""
    from safetensors.numpy import load_file, save_file

    ckpt = build(tmp_path, 4, **moe_dims(layers=2))
    ids = prompt(4, 12)
    want = load(ckpt).logits(ids)
    (f,) = ckpt.glob("*.safetensors")
    t = load_file(str(f))
    name = next(n for n in t if n.endswith("e_score_correction_bias"))
    save_file({**t, name: t[name][None, :]}, str(f), metadata={"format": "pt"})
    np.testing.assert_array_equal(load(ckpt).logits(ids), want)
    save_file({**t, name: np.stack([t[name]] * 2)}, str(f), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"e_score_correction_bias is \[2, 8\], expected \[8\]"):
        load(ckpt)


def test_a_padded_vector_under_tensor_parallel(tmp_path):
    """The tensor-parallel loader reads its slices itself: the [1, experts] bias is a vector there too."""
    from safetensors.numpy import load_file, save_file

    ckpt = build(tmp_path, 4, **moe_dims(layers=2))
    ids = prompt(4, 12)
    want = load(ckpt).logits(ids)
    (f,) = ckpt.glob("*.safetensors")
    t = load_file(str(f))
    save_file({n: (v[None, :] if n.endswith("e_score_correction_bias") else v) for n, v in t.items()}, str(f),
              metadata={"format": "pt"})
    got = load(ckpt, tensor_parallel=2).logits(ids)
    assert rel_err(got, want) < 1e-5
