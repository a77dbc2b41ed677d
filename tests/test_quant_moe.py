"""Quantized MoE experts on the CPU (issue 16): the stacked device layout (core/cuda/qlayout.py), core.load handing a
per-expert role over as one core.quant.QuantizedStack.

- Experts drawn in one format and layout (quantcases.expert_cases: every format, symmetric experts among asymmetric
  ones), stacked, decode to each expert's reference dequantization bit for bit; what cannot share one layout (a
  different kind, group, scale dtype or shape, an act-order permutation, an expert that did not repack) is refused,
  and a real checkpoint's role then loads dense.
- The loader: a tiny Qwen3-MoE / Mixtral checkpoint (GPTQ, compressed-tensors int4 / int8 / fp8) keeps its experts
  as stacks the layout decodes to the dense load's weights (logits equal bit for bit), counted in the budget; GPTQ
  act-order experts and an expert holding an FP8 NaN code go dense, the rest of the model staying quantized.
The room (moe.py's launches on a fake device) is test_quant_moe_room.py's; the kernels themselves run in
test_cuda_quant_moe.py (GPU).
"""

from __future__ import annotations

import importlib

import attrs
import numpy as np
import pytest
from hypothesis import given, strategies as st

import core
from core.backend import NumpyBackend
from core.checkpoint import Checkpoint
from core.config import ModelConfig
from core.cuda import qlayout as L
from core.cuda.loading import EXPERT_ROLES, LoadingMixin
from core.quant import QuantizedStack, QuantizedTensor
from core.registry import default_registry
from core.safetensors_io import to_float32
from core.weights import plan
from quantcases import expert_cases, fp8_case, gptq_case, moe_quantized

WIDTHS = st.sampled_from([8, 16, 24, 40, 64, 72, 96, 128, 136])


# -- the stacked layout ----------------------------------------------------------------------------------------------

@given(data=st.data(), n=WIDTHS, k=WIDTHS, E=st.integers(1, 5))
def test_stacked_experts_decode_to_each_experts_reference(data, n, k, E):
    cs = data.draw(expert_cases(n, k, E))
    p = L.stack([c.packed for c in cs])
    assert p is not None and L.packed_shape_ok(p) and p.shape == (E, n, k) and p.experts == E
    assert np.array_equal(L.dense(p), np.stack([c.ref for c in cs]))
    assert p.nbytes == sum(c.packed.nbytes for c in cs) + (
        sum(n * p.scales.shape[-1] for c in cs if c.packed.zeros is None) if p.zeros is not None else 0)
    for e, c in enumerate(cs):  # expert e's arrays, a symmetric one's zero points written out
        x = p.expert(e)
        assert np.array_equal(x.words, c.packed.words) and np.array_equal(x.scales, c.packed.scales)
        if p.zeros is not None:
            want = c.packed.zeros if c.packed.zeros is not None else 1 << (p.bits - 1)
            assert np.array_equal(x.zeros, np.broadcast_to(want, x.zeros.shape))


def test_a_stack_needs_one_layout_and_no_permutation():
    one = gptq_case(1, 4, 16, 128, 32, False, False, True, "F16").packed
    same = gptq_case(2, 4, 16, 128, 32, True, False, True, "F16").packed
    assert L.stack([one, same]) is not None
    others = {
        "int8": gptq_case(3, 8, 16, 128, 32, False, False, True, "F16"),
        "group 64": gptq_case(3, 4, 16, 128, 64, False, False, True, "F16"),
        "F32 scales": gptq_case(3, 4, 16, 128, 32, False, False, True, "F32"),
        "more rows": gptq_case(3, 4, 24, 128, 32, False, False, True, "F16"),
        "act-order": gptq_case(3, 4, 16, 128, 32, False, True, True, "F16"),
        "fp8": fp8_case(3, 16, 128, (1, 128), "F16"),
    }
    for why, c in others.items():
        assert L.stack([one, c.packed]) is None, why
    assert L.stack([one, None]) is None and L.stack([]) is None
    assert L.stack([L.stack([one, same])]) is None  # a stack of stacks
    a, b = fp8_case(4, 200, 64, (128, 128), "F16").packed, fp8_case(5, 200, 64, (16, 32), "F16").packed
    assert L.stack([a, b]) is None  # block rows 128 against 16


# -- checkpoints and the loader --------------------------------------------------------------------------------------

def expert_sources(path):
    ckpt = Checkpoint(path)
    spec = default_registry()[ckpt.config["model_type"]].spec
    p = plan(spec, ModelConfig.from_hf(spec, ckpt.config), ckpt)
    return [src for src in p.sources if src.rule.targets[0] in EXPERT_ROLES]


HOWS = ["gptq", "w4a16-g32-asym", "w8a16", "fp8"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_checkpoint_experts_stack_to_their_dequantization(tmp_path, how, family):
    srcs = expert_sources(moe_quantized(tmp_path, how, family))
    assert srcs and all(src.quantized for src in srcs)
    for src in srcs:
        q = src.stored
        assert isinstance(q, QuantizedStack) and q.experts == src.infos
        assert q.shape == (len(src.infos),) + q.experts[0].shape
        p = L.repack(q)
        assert p is not None and p.experts == len(q.experts), q.name
        ref = np.stack([to_float32(e.dequantize(), e.dtype) for e in q.experts])
        assert np.array_equal(L.dense(p), ref), q.name
        E, n, k = p.shape
        # the estimate from the headers counts zero points the data may show are not needed
        assert L.device_nbytes(q) - p.nbytes in (0, E * n * p.scales.shape[-1]), q.name


def test_what_cannot_share_a_layout_goes_dense(tmp_path):
    """Experts of two checkpoints in one stack: two kinds are refused from the headers, two groups of one kind only
    once repacked; act-order experts are refused from the headers."""
    g16, g32, w8 = (expert_sources(moe_quantized(tmp_path / h, h))[0].stored
                    for h in ("w4a16-g16", "w4a16-g32", "w8a16"))
    mixed = QuantizedStack(g16.experts[:2] + g32.experts[2:])
    assert L.covered(mixed) == "int4" and L.device_nbytes(mixed) is not None and L.repack(mixed) is None
    kinds = QuantizedStack(g16.experts[:2] + w8.experts[2:])
    assert L.covered(kinds) is None and L.device_nbytes(kinds) is None and L.repack(kinds) is None
    act = expert_sources(moe_quantized(tmp_path / "a", "gptq-desc-act"))[0].stored
    assert L.covered(act) is None and L.covered(act.experts[0]) == "int4"  # one weight alone: permuted is fine


class Keeping(NumpyBackend):
    """A numpy backend deciding which weights to keep as the CUDA backend does (LoadingMixin.quantized_nbytes), that
    records what it was handed and turns each into the dense weight through the layout (so its logits must equal a
    plain load's)."""

    def __init__(self):
        super().__init__("float32")
        self.taken, self.budget = {}, None

    def begin_loading(self, config, numel, quantized_bytes=0):
        self.budget = (numel, quantized_bytes)

    def quantized_nbytes(self, q, role, config):
        return LoadingMixin.quantized_nbytes(self, q, role, config)

    def convert_quantized(self, q, role):
        p = L.repack(q)
        if p is None:
            return None
        self.taken.setdefault(role, []).append(p)
        return self.convert(L.dense(p), "F32", role)


def load_keeping(monkeypatch, path):
    be = Keeping()
    monkeypatch.setattr(importlib.import_module("core.load"), "make_backend", lambda *a, **k: be)
    return be, core.load(path, device="cpu", quiet=True)


@pytest.mark.parametrize("how", ["gptq", "w4a16-g32-asym", "fp8"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_the_loader_keeps_experts_stacked_and_quantized(tmp_path, monkeypatch, how, family):
    path = moe_quantized(tmp_path, how, family)
    plain = core.load(path, device="cpu", quiet=True)
    be, got = load_keeping(monkeypatch, path)
    c = plain.config
    sparse = sum(c.sparse_layer(i) for i in range(c.num_layers))
    for role in EXPERT_ROLES:
        assert [p.shape for p in be.taken[role]] == [(c.num_experts,) + p.shape[1:] for p in be.taken[role]]
        assert len(be.taken[role]) == sparse
    assert len(be.taken["q.weight"]) == c.num_layers
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert np.array_equal(got.logits(ids), plain.logits(ids))
    ckpt = Checkpoint(path)
    kept = [src.stored for src in plan(plain.spec, c, ckpt).sources if src.quantized]
    assert be.budget[1] == sum(L.device_nbytes(q) for q in kept)
    assert be.budget[0] == sum(i.numel for i in ckpt.tensors.values() if not isinstance(i, QuantizedTensor))


def test_act_order_experts_load_dense_beside_quantized_attention(tmp_path, monkeypatch):
    path = moe_quantized(tmp_path, "gptq-desc-act")
    be, got = load_keeping(monkeypatch, path)
    assert not set(be.taken) & EXPERT_ROLES and len(be.taken["q.weight"]) == got.config.num_layers
    assert got.weights.layers[0]["experts.up.weight"].shape == (8, 64, 128)
    ids = [3, 1, 4, 1, 5]
    assert np.array_equal(got.logits(ids), core.load(path, device="cpu", quiet=True).logits(ids))


def test_an_expert_the_layout_cannot_hold_takes_its_role_dense(tmp_path, monkeypatch):
    """An FP8 NaN code in one expert of one role (the kernels' e4m3 decoding has none): that role of that layer is
    loaded dense, every other weight stays quantized."""
    path = moe_quantized(tmp_path, "fp8")
    info = Checkpoint(path).tensors["model.layers.2.mlp.experts.5.up_proj.weight"].part("weight")
    with open(info.file, "r+b") as f:
        f.seek(info.offset + 7)
        f.write(b"\x7f")
    be, got = load_keeping(monkeypatch, path)
    assert len(be.taken["experts.up.weight"]) == 1 and len(be.taken["experts.gate.weight"]) == 2
    w = got.weights.layers[2]["experts.up.weight"]
    assert w.shape == (8, 64, 128) and np.isnan(w[5]).sum() == 1 and not np.isnan(np.delete(w, 5, 0)).any()


def test_roles_the_cuda_backend_keeps_quantized(tmp_path):
    path = moe_quantized(tmp_path, "w4a16-g32")
    src = expert_sources(path)[0]
    config = ModelConfig.from_hf(default_registry()["qwen3_moe"].spec, Checkpoint(path).config)
    keeps = LoadingMixin.quantized_nbytes
    assert keeps(None, src.stored, "experts.up.weight", config) == L.device_nbytes(src.stored) > 0
    assert keeps(None, src.stored.experts[0], "experts.up.weight", config) is None  # one expert alone: not a role
    assert keeps(None, src.stored, "up.weight", config) is None
    custom = attrs.evolve(config, mlp_block=lambda *a: None)  # a plugin's MLP may hand the experts to its own op
    assert keeps(None, src.stored, "experts.up.weight", custom) is None
