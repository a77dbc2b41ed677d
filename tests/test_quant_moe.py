"""Quantized MoE experts on the CPU (issue 16): the stacked device layout (core/cuda/qlayout.py), core.load handing a
per-expert role over as one core.quant.QuantizedStack, and core/cuda/moe.py's quantized decode and prefill driven
on test_quant_room.py's fake device (moe_q.cu's and moe.cu's kernels run by their meaning over the pointers, strides
and sizes each launch passes).

- Experts drawn in one format and layout (quantcases.expert_cases: every format, symmetric experts among asymmetric
  ones), stacked, decode to each expert's reference dequantization bit for bit; what cannot share one layout (a
  different kind, group, scale dtype or shape, an act-order permutation, an expert that did not repack) is refused,
  and a real checkpoint's role then loads dense.
- The loader: a tiny Qwen3-MoE / Mixtral checkpoint (GPTQ, compressed-tensors int4 / int8 / fp8) keeps its experts
  as stacks the layout decodes to the dense load's weights (logits equal bit for bit), counted in the budget; GPTQ
  act-order experts and an expert holding an FP8 NaN code go dense, the rest of the model staying quantized.
- The room: which kernels moe.py launches for stacked QTensors (the quantized gate / up pair, a pair in two layouts
  or half dense, a dense down after quantized gate / up and the reverse, x and h staged to the padded widths) with
  the results of core.ops.moe; the argument formats against the preprocessed moe_q.cu.
The kernels themselves run in test_cuda_quant_moe.py (GPU).
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from types import SimpleNamespace

import attrs
import numpy as np
import pytest
from hypothesis import given, strategies as st

import core
from core import ops
from core.backend import NumpyBackend
from core.checkpoint import Checkpoint
from core.config import ModelConfig, MoeRouting
from core.cuda import qlayout as L
from core.cuda.geometry import GEMV_MAX_T, MOE_ROWS, MOE_THREADS
from core.cuda.loading import EXPERT_ROLES, LoadingMixin
from core.cuda.modules import DTYPE_CODES, HERE, nvcc_options, variants
from core.cuda.moe import Q_FORMATS, MoeMixin
from core.cuda.tensors import DTensor, QTensor
from core.quant import QuantizedStack, QuantizedTensor
from core.registry import default_registry
from core.safetensors_io import to_float32
from core.testing import rel_err, rng
from core.weights import plan
from quantcases import ct_int_case, expert_cases, fp8_case, gptq_case, moe_quantized
from test_quant_room import CODES, SD, Fake

NVCC = shutil.which("nvcc")
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


# -- the room on a fake device ---------------------------------------------------------------------------------------

class MoeFake(Fake, MoeMixin):
    """test_quant_room's fake device with moe.py's room: moe.cu's and moe_q.cu's kernels run by their meaning, each
    expert's quantized weight read back at the offsets the kernel computes from the launch's arguments."""

    capture, stream = None, None

    def __init__(self, dtype="float32"):
        super().__init__(dtype)
        self.drv.memset_d32_async = lambda ptr, v, n, stream: self.write(ptr, np.full(n, v, np.uint32))

    def kernel(self, file, name, fmt, **defines):
        return SimpleNamespace(file=file, name=name, fmt=fmt, defines=defines)

    def launch(self, op, fn, grid, block, *args, shared=0):
        if fn.file == "gemv_q.cu":
            return super().launch(op, fn, grid, block, *args)
        args = [a.ptr if isinstance(a, DTensor) else 0 if a is None else a for a in args]
        assert len(args) == len(fn.fmt) and all(isinstance(a, float if f == "f" else int) for a, f in zip(args, fn.fmt))
        self.launches.append((op, fn.name, grid, dict(fn.defines)))
        name = re.sub(r"_(int4|int8|fp8)$", "", fn.name)
        getattr(self, "run_" + name)(fn, grid, block, *args)

    def check(self, fn, op):
        fn()

    def flush_pending(self):
        pass

    def from_host(self, x):
        if x.dtype != np.int32:
            return super().from_host(x)
        t = self.alloc(x.shape, "int32")
        self.write(t.ptr, x)
        return t

    def to_host(self, t):
        return self.host(t) if t.dtype != "int32" else self.read(t.ptr, np.int32, t.shape)

    def gated_linear(self, x, wg, bg, wu, bu, kind):
        if isinstance(wg, QTensor) or isinstance(wu, QTensor):
            return self.qgated(x, wg, bg, wu, bu, kind)
        return self.gated_act(*self.linears(x, [(wg, bg), (wu, bu)]), kind)

    def linear_act(self, x, w, b, kind):
        if isinstance(w, QTensor):
            return self.qlinear_act(x, w, b, kind)
        return self.act(self.linear(x, w, b), kind)

    def dense_of(self, ptr, shape):
        return self.host(DTensor(None, ptr, shape, self.dtype)).astype(np.float64) if ptr else None

    # -- moe.cu
    def run_moe_route(self, fn, grid, block, ids, wts, logits, T, E, k, sigmoid, renorm, scale):
        lg = self.read(logits, np.float32, (T, E)).astype(np.float64)
        sc = 1 / (1 + np.exp(-lg)) if sigmoid else np.exp(lg - lg.max(-1, keepdims=True))
        sc = sc if sigmoid else sc / sc.sum(-1, keepdims=True)
        top = np.argsort(-sc, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(sc, top, -1)
        w = (w / w.sum(-1, keepdims=True) if renorm else w) * scale
        self.write(ids, top.astype(np.int32))
        self.write(wts, w.astype(np.float32))

    def _up(self, h, xs, ids, wts, g, bg, u, bu, k, I, act, T):
        """h[slot] = w act(g + bg) (u + bu), (slot, I) for each slot; g, u: slot -> that slot's expert's products."""
        idv, wv = self.read(ids, np.int32, (T * k,)), self.read(wts, np.float32, (T * k,))
        out = np.zeros((T * k, I))
        for slot in range(T * k):
            e = idv[slot]
            uv = u(e, xs[slot // k]) + (0 if bu is None else bu[e])
            out[slot] = wv[slot] * (ops.ACT[CODES[act]](g(e, xs[slot // k]) + (0 if bg is None else bg[e])) * uv
                                    if g is not None else ops.ACT[CODES[act]](uv))
        return out

    def run_moe_gate_up(self, fn, grid, block, h, x, ids, wts, wg, bg, wu, bu, k, E, I, D, act, gated=True):
        T = grid[1] // k
        assert grid == (-(-I // MOE_ROWS), T * k, 1) and block == (MOE_THREADS, 1, 1)
        G, U = self.dense_of(wg, (E, I, D)), self.dense_of(wu, (E, I, D))
        out = self._up(h, self.read(x, np.float32, (T, D)).astype(np.float64), ids, wts,
                       (lambda e, xt: G[e] @ xt) if gated else None, self.dense_of(bg, (E, I)) if gated else None,
                       lambda e, xt: U[e] @ xt, self.dense_of(bu, (E, I)), k, I, act, T)
        self.write(h, out.astype(np.float32))

    def run_moe_up(self, *args):
        self.run_moe_gate_up(*args, gated=False)

    def run_moe_down(self, fn, grid, block, y, h, ids, wts, wd, bd, k, E, I, D):
        T = grid[1]
        self.write(y, self._down(self.read(h, np.float32, (T, k, I)).astype(np.float64), ids, wts,
                                 self.dense_of(wd, (E, D, I)), self.dense_of(bd, (E, D)), k, T).astype(np.float32))

    def _down(self, hv, ids, wts, W, bd, k, T):
        idv, wv = self.read(ids, np.int32, (T, k)), self.read(wts, np.float32, (T, k))
        return np.stack([sum(W[idv[t, j]] @ hv[t, j] + (0 if bd is None else wv[t, j] * bd[idv[t, j]])
                             for j in range(k)) for t in range(T)])

    def run_moe_gather(self, fn, grid, block, xs, x, tok, n, D):
        t = self.read(tok, np.int32, (n,))
        self.write(xs, self.read(x, np.float32, (t.max() + 1, D))[t])

    def run_moe_scatter_add(self, fn, grid, block, out, y, tok, slot, wts, n, D):
        t, s = self.read(tok, np.int32, (n,)), self.read(slot, np.int32, (n,))
        T = t.max() + 1
        o = self.read(out, np.float32, (T, D))
        o[t] += self.read(wts, np.float32, (s.max() + 1,))[s][:, None] * self.read(y, np.float32, (n, D))
        self.write(out, o)

    # -- moe_q.cu
    def expert_weight(self, fn, q, s, z, e, n, Kp, lg, G, srow, sstride):
        """Expert e's weight [n, Kp] read where moe_q.cu reads it: words e n Kp / per, scales e sstride, zero points
        e n G into the stacked arrays."""
        kind, sd = fn.name.rsplit("_", 1)[1], SD[fn.defines["SDTYPE"]]
        kw = Kp * L.KINDS[kind] // 32
        rows = -(-n // min(srow, n))
        assert sstride == rows * G
        stype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[sd]
        p = L.Packed(kind, (n, Kp), self.read(q + 4 * e * n * kw, np.uint32, (n, kw)),
                     self.read(s + np.dtype(stype).itemsize * e * sstride, stype, (rows, G)), sd, lg, srow,
                     self.read(z + e * n * G, np.uint8, (n, G)) if z else None)
        return L.dense(p)

    def run_moe_q_gate_up(self, fn, grid, block, h, x, ids, wts, qg, sg, zg, bg, qu, su, zu, bu, k, E, I, H, Kp, lg,
                          G, srow, sstride, act, gated=True):
        T = grid[1] // k
        assert grid == (-(-H // MOE_ROWS), T * k, 1) and block == (MOE_THREADS, 1, 1) and x % 16 == 0
        assert fn.fmt == Q_FORMATS["moe_q_up"] and H >= I

        def product(q, s, z):
            return lambda e, xt: self.expert_weight(fn, q, s, z, e, I, Kp, lg, G, srow, sstride) @ xt
        out = np.zeros((T * k, H))
        out[:, :I] = self._up(h, self.read(x, np.float32, (T, Kp)).astype(np.float64), ids, wts,
                              product(qg, sg, zg) if gated else None, self.dense_of(bg, (E, I)) if gated else None,
                              product(qu, su, zu), self.dense_of(bu, (E, I)), k, I, act, T)
        self.write(h, out.astype(np.float32))

    def run_moe_q_up(self, *args):
        self.run_moe_q_gate_up(*args, gated=False)

    def run_moe_q_down(self, fn, grid, block, y, h, ids, wts, qd, sd, zd, bd, k, E, D, Kp, lg, G, srow, sstride):
        T = grid[1]
        assert grid == (-(-D // MOE_ROWS), T, 1) and h % 16 == 0 and fn.fmt == Q_FORMATS["moe_q_down"]
        W = np.stack([self.expert_weight(fn, qd, sd, zd, e, D, Kp, lg, G, srow, sstride) for e in range(E)])
        self.write(y, self._down(self.read(h, np.float32, (T, k, Kp)).astype(np.float64), ids, wts, W,
                                 self.dense_of(bd, (E, D)), k, T).astype(np.float32))


def stack_of(make, E, n, k):
    """(stacked Packed, float64 [E, n, k]) of E experts made by make(seed, n, k)."""
    p = L.stack([make(1000 + e, n, k).packed for e in range(E)])
    return p, L.dense(p).astype(np.float64)


def int4(sdtype="F16", group=32, sym=False):
    return lambda seed, n, k: gptq_case(seed, 4, n, k, group if k % group == 0 else -1, sym, False, True, sdtype)


def int8(sdtype="F16"):
    return lambda seed, n, k: ct_int_case(seed, 8, n, k, "channel", None, False, False, True, sdtype)


def fp8(sdtype="F16"):
    return lambda seed, n, k: fp8_case(seed, n, k, (16, 32), sdtype)


def moe_case(be, r, T, E, I, D, k, gate, up, down, bias=True, routing=None):
    """Run be.moe on experts made by gate / up / down (a maker: stacked QTensor; "dense": a plain weight; None: no
    gate) and return (result, core.ops.moe's float64 result on the same weights)."""
    weights, refs = [], []
    for make, (n, kk) in ((gate, (I, D)), (up, (I, D)), (down, (D, I))):
        if make is None:
            weights.append(None), refs.append(None)
        elif make == "dense":
            w = (r.normal(size=(E, n, kk)) / np.sqrt(kk)).astype(np.float32)
            weights.append(be.upload_dense(w)), refs.append(w.astype(np.float64))
        else:
            p, ref = stack_of(make, E, n, kk)
            weights.append(be.upload_packed(p, "experts")), refs.append(ref)
    bs = [(r.normal(size=s) * 0.3).astype(np.float32) if bias else None for s in ((E, I), (E, I), (E, D))]
    rw = (r.normal(size=(E, D)) * 2 / np.sqrt(D)).astype(np.float32)
    x = r.normal(size=(T, D)).astype(np.float32)
    routing = routing or MoeRouting(k, "softmax", True, "silu", 1.5, gate is not None)
    got = be.host(be.moe(be.from_host(x), be.upload_dense(rw), None, *weights, routing,
                         tuple(None if b is None else be.upload_dense(b) for b in bs)))
    want = ops.moe(x.astype(np.float64), rw.astype(np.float64), None, *refs, routing.top_k, routing.scoring,
                   routing.renormalize, routing.activation, routing.routed_scale,
                   tuple(None if b is None else b.astype(np.float64) for b in bs))
    return got, want


def q_launches(be):
    return [n for _, n, _, _ in be.launches if n != "moe_route"]


@pytest.mark.parametrize("T", [1, GEMV_MAX_T])
@pytest.mark.parametrize("name, gate, down", [("int4", int4(), int4()), ("int8 bf16", int8("BF16"), int8("BF16")),
                                             ("fp8 f32", fp8("F32"), fp8("F32")), ("no gate", None, int4())])
def test_decode_reads_quantized_experts_in_two_launches(T, name, gate, down):
    """Gate and up of one layout in one moe_q launch, down in another; h's rows as long as down's padded K (72 here:
    96 for int4, 80 for int8 / fp8), zero past I; x (K = 128) read as it is."""
    be = MoeFake()
    got, want = moe_case(be, rng(1), T, 6, 72, 128, 2, gate, gate or int4(), down)
    kind = "int4" if name in ("int4", "no gate") else name.split()[0]
    up = "moe_q_gate_up" if gate else "moe_q_up"
    assert q_launches(be) == [f"{up}_{kind}", f"moe_q_down_{'int4' if name == 'no gate' else kind}"]
    assert rel_err(got, want) < 1e-6


def test_decode_stages_x_to_the_padded_width():
    be = MoeFake()
    got, want = moe_case(be, rng(2), 2, 4, 64, 40, 2, int8(), int8(), int4())  # D = 40: int8 rows of 48 codes
    assert q_launches(be) == ["qstage", "moe_q_gate_up_int8", "moe_q_down_int4"]
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("why", ["two layouts", "gate dense", "up dense"])
def test_a_pair_that_cannot_share_a_launch_is_dequantized(why):
    """Gate and up in different layouts (or one of them dense): each quantized one dequantized, every expert, for
    moe.cu's kernel; its h (I = 72) staged to the quantized down's padded width."""
    be = MoeFake()
    gate, up = {"two layouts": (int4(), int8()), "gate dense": ("dense", int4()), "up dense": (int4(), "dense")}[why]
    got, want = moe_case(be, rng(3), 3, 5, 72, 128, 2, gate, up, fp8())
    deq = [n for n in q_launches(be) if n.startswith("qdequant")]
    assert len(deq) == 5 * sum(m != "dense" for m in (gate, up))
    assert q_launches(be)[len(deq):] == ["moe_gate_up", "qstage", "moe_q_down_fp8"]
    assert rel_err(got, want) < 1e-6


def test_dense_down_after_quantized_gate_and_up():
    be = MoeFake()
    got, want = moe_case(be, rng(4), 1, 4, 72, 128, 3, fp8(), fp8(), "dense")
    assert q_launches(be) == ["moe_q_gate_up_fp8", "moe_down"]
    assert rel_err(got, want) < 1e-6


def test_prefill_hands_each_expert_slice_to_the_quantized_products():
    """Many tokens: tokens grouped per expert, each expert's QTensor view through qlinear.py (its GEMV for a few
    tokens, its weight dequantized for more); float32 weights, so both hold the reference's weight exactly."""
    be = MoeFake("float32")
    got, want = moe_case(be, rng(5), 24, 4, 64, 128, 2, int4(), int4(), int8())
    names = q_launches(be)
    assert {"moe_gather", "moe_scatter_add"} <= set(names) and not any(n.startswith("moe_q") for n in names)
    assert any(n.startswith("qdequant_int4") for n in names) and any(n.startswith("qdequant_int8") for n in names)
    assert rel_err(got, want) < 1e-6


def test_quantized_router_or_bias_is_refused():
    from core.errors import DeviceError

    be = MoeFake()
    p, _ = stack_of(int4(), 4, 16, 64)
    w = be.upload_packed(p, "experts")
    router = be.upload_packed(int4()(1, 4, 64).packed, "router")
    x = be.from_host(np.zeros((1, 64), np.float32))
    with pytest.raises(DeviceError, match=r"router\.weight is quantized"):
        be.moe(x, router, None, w, w, be.upload_packed(stack_of(int4(), 4, 64, 16)[0], "down"), MoeRouting(2))


def test_expert_views_point_into_the_stack():
    be = Fake()
    p, _ = stack_of(int4(group=16), 3, 40, 64)
    w = be.upload_packed(p, "experts.up.weight")
    assert w.ndim == 3 and w.shape == (3, 40, 64) and w.strides == (40 * 64 // 8, 40 * 4, 40 * 4)
    for e in range(3):
        v, x = w.expert(e), p.expert(e)
        assert v.shape == (40, 64) and v.layout_key() == w.layout_key() and v.perm == 0
        assert np.array_equal(be.read(v.q, np.uint32, x.words.shape), x.words)
        assert np.array_equal(be.read(v.s, np.float16, x.scales.shape), x.scales)
        assert np.array_equal(be.read(v.z, np.uint8, x.zeros.shape), x.zeros)
    f8 = be.upload_packed(stack_of(fp8(), 2, 20, 64)[0], "x")  # blocks of 16 x 32: 2 scale rows of 2 an expert
    assert (f8.srow, f8.G, f8.strides) == (16, 2, (20 * 64 // 4, 4, 20 * 2))


# -- the kernels' source, checked on the CPU -------------------------------------------------------------------------

def test_moe_q_builds_are_ci_s_and_match_the_geometry():
    d = {m[1]: int(m[2]) for m in re.finditer(r"^#define (\w+) (\d+)\b", (HERE / "moe_q.cu").read_text(), re.M)}
    assert (d["MOE_ROWS"], d["MOE_THREADS"]) == (MOE_ROWS, MOE_THREADS)
    assert {(v["WDTYPE"], v["SDTYPE"]) for v in variants("moe_q.cu")} == {
        (w, s) for w in DTYPE_CODES.values() for s in DTYPE_CODES.values()}


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")
def test_moe_q_arguments_match_the_launch_formats():
    """The preprocessed moe_q.cu's kernel parameters (pointer or int) are the PyCUDA formats moe.py launches them
    with, in order, for each kind."""
    out = subprocess.run([NVCC, "-E", f"-I{HERE}", *nvcc_options({"WDTYPE": 1, "SDTYPE": 1}), str(HERE / "moe_q.cu")],
                         capture_output=True, text=True, check=True).stdout
    head = r'extern "C" __attribute__\(\(global\)\) void (?:__attribute__\(\(launch_bounds\(\d+\)\)\) )?'
    sigs = {m[1]: m[2] for m in re.finditer(head + r"(\w+)\(([^()]*)\)", out)}
    assert set(sigs) == {f"moe_q_{b}_{k}" for b in ("gate_up", "up", "down") for k in L.KINDS}
    for name, params in sigs.items():
        fmt = "".join("P" if "*" in p else "i" for p in params.split(","))
        assert fmt == Q_FORMATS["moe_q_down" if "_down_" in name else "moe_q_up"], name


# -- the bench -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "fp8"])
def test_the_benchs_random_experts_are_stacked_layouts(scheme):
    from core.bench_shapes import bytes_per_token
    from core.cuda import bench_quant

    p = bench_quant.random_packed(scheme, (4, 48, 256), seed=1)
    assert L.packed_shape_ok(p) and p.experts == 4 and np.isfinite(L.dense(p)).all()
    be = Fake()
    make = bench_quant.quantized_weight(scheme)
    w = make(be, "experts.up.weight", (4, 48, 256), 1)
    assert isinstance(w, QTensor) and w.shape == (4, 48, 256) and w.nbytes == p.nbytes
    assert make(be, "router.weight", (4, 256), 1) is None
    weights = SimpleNamespace(layers=[{"experts.up.weight": w}], globals={"lm_head": w.expert(0)})
    model = SimpleNamespace(weights=weights, dtype="float16", config=SimpleNamespace(num_experts=4, num_experts_per_tok=1))
    assert bytes_per_token(model) == p.nbytes // 4 + p.nbytes // 4  # one expert a token, and the lm_head stand-in
