"""Quantized MoE experts on the CPU, the room (issue 16): which kernels core/cuda/moe.py launches for stacked
QTensor experts, driven on test_quant_room.py's fake device (moe_q.cu's and moe.cu's kernels run by their meaning over
the pointers, strides and sizes each launch passes): the quantized gate / up pair, a pair in two layouts or half
dense, a dense down after quantized gate / up and the reverse, x and h staged to the padded widths, each with the
results of core.ops.moe; and the argument formats against the preprocessed moe_q.cu. The layout and the loader are
test_quant_moe.py's; the kernels themselves run in test_cuda_quant_moe.py (GPU).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from core import ops
from core.config import MoeRouting
from core.cuda import qlayout as L
from core.cuda.geometry import GEMV_MAX_T, MOE_ROWS, MOE_THREADS
from core.cuda.modules import DTYPE_CODES, HERE, nvcc_options, variants
from core.cuda.moe import Q_FORMATS, MoeMixin
from core.cuda.tensors import DTensor, QTensor
from core.testing import rel_err, rng
from quantcases import ct_int_case, fp8_case, gptq_case
from test_quant_room import CODES, SD, Fake

NVCC = shutil.which("nvcc")


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
    def run_moe_route(self, fn, grid, block, ids, wts, logits, bias, T, E, k, sigmoid, renorm, scale, groups, kept):
        lg = self.read(logits, np.float32, (T, E)).astype(np.float64)
        b = self.read(bias, np.float32, (E,)).astype(np.float64) if bias else None
        top, w = ops.moe_route(lg, np.eye(E), None, k, "sigmoid" if sigmoid else "softmax", renorm, scale, b, groups,
                               kept)  # (the identity router: the logits themselves)
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
