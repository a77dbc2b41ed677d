"""The CUDA backend's quantized products (core/cuda/qlinear.py) and uploads (loading.py's upload_packed) driven on the
CPU: a fake device keeps memory in numpy and runs each launch of gemv_q.cu's kernels by its meaning (the layout's
numpy reference, qlayout.dense, over the pointers and sizes the launch passes), so that what the room decides —
which launch, which segments, which staging, which arguments in which order — is checked without a GPU. The kernels'
own arithmetic is checked in test_quant_layout.py (numpy model) and test_cuda_quant.py (GPU).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from core import ops
from core.backend import NumpyBackend
from core.cuda import qlayout as L
from core.cuda.elementwise import ACT_CODES
from core.cuda.geometry import GEMV_MAX_T, QGEO, QTC_STEP, QTC_WARPS, grid1, qgemv_defines, qtc_smem
from core.cuda.loading import LoadingMixin
from core.cuda.qlinear import QuantLinearMixin
from core.cuda.tensors import ITEMSIZE, DTensor, QTensor
from core.errors import DeviceError
from core.safetensors_io import float32_to_bf16_bits, to_float32
from core.testing import rel_err, rng
from quantcases import ct_int_case, fp8_case, gptq_case

NP = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int32": np.int32}
SD = {0: "F32", 1: "F16", 2: "BF16"}


class Alloc(int):
    """A fake allocation: its address, freed once."""

    def free(self):
        Fake.live.discard(int(self))


class Fake(LoadingMixin, QuantLinearMixin):
    """Memory in numpy arrays at made-up addresses; kernel launches run by their meaning (see the module docstring);
    the dense products the room hands back to linear.py computed in numpy."""

    live: set = set()  # addresses of every fake allocation not freed, all instances (addresses never repeat)
    top = 1 << 20

    def __init__(self, dtype="float16", fail_copy_at=None):
        self.dtype, self.weight_bytes, self._owned, self.launches = dtype, 0, [], []
        self.mem, self.fail_copy_at, self.copies = {}, fail_copy_at, 0
        self.drv = SimpleNamespace(Error=RuntimeError, memcpy_htod=self._htod)

    # -- memory
    def mem_alloc(self, nbytes, what):
        base = Fake.top
        Fake.top += ((nbytes + 255) // 256 + 1) * 256
        self.mem[base] = np.zeros(max(nbytes, 16), np.uint8)
        Fake.live.add(base)
        return Alloc(base)

    def _htod(self, ptr, a):
        self.copies += 1
        if self.copies == self.fail_copy_at:
            raise RuntimeError("copy failed")
        self.bytes(ptr, a.nbytes)[:] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)

    def bytes(self, ptr, n):
        base = max(b for b in self.mem if b <= ptr)
        assert ptr + n <= base + self.mem[base].size, "read or write past an allocation"
        return self.mem[base][ptr - base:ptr - base + n]

    def read(self, ptr, dtype, shape):
        n = int(np.prod(shape))
        return self.bytes(ptr, n * np.dtype(dtype).itemsize).view(dtype).reshape(shape).copy()

    def write(self, ptr, a):
        self.bytes(ptr, a.nbytes)[:] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)

    def alloc(self, shape, dtype="float32"):
        a = self.mem_alloc(int(np.prod(shape)) * ITEMSIZE[dtype], "activation")
        self.bytes(int(a), int(np.prod(shape)) * ITEMSIZE[dtype])[:] = 0xFF  # poison: NaN
        return DTensor(a, int(a), shape, dtype)

    def from_host(self, x):
        t = self.alloc(x.shape)
        self.write(t.ptr, x.astype(np.float32))
        return t

    def host(self, t):
        a = self.read(t.ptr, NP[t.dtype], t.shape)
        return to_float32(a, "BF16") if t.dtype == "bfloat16" else a.astype(np.float32)

    def upload_dense(self, w):
        t = self.alloc(w.shape, self.dtype)
        self.write(t.ptr, bits_of(w, self.dtype))
        return t

    # -- what linear.py / elementwise.py would do
    def linear(self, x, w, b=None):
        if isinstance(w, QTensor):
            return self.qlinears(x, [(w, b)])[0]
        y = self.host(x) @ self.host(w).T + (0 if b is None else self.host(b))
        return self.from_host(y)

    def linears(self, x, pairs):
        if any(isinstance(w, QTensor) for w, _ in pairs):
            return self.qlinears(x, pairs)
        return tuple(self.linear(x, w, b) for w, b in pairs)

    def act_code(self, kind):
        return ACT_CODES[kind]

    def act(self, x, kind):
        return self.from_host(ops.ACT[kind](self.host(x)))

    def gated_act(self, g, u, kind):
        return self.from_host(ops.ACT[kind](self.host(g)) * self.host(u))

    # -- kernels
    def kernel(self, file, name, fmt, **defines):
        assert file == ("gemv_qtc.cu" if "_tc_" in name else "gemv_q.cu"), (file, name)
        return SimpleNamespace(name=name, fmt=fmt, defines=defines)

    def launch(self, op, fn, grid, block, *args, shared=0):
        args = [a.ptr if isinstance(a, DTensor) else 0 if a is None else a for a in args]
        assert len(args) == len(fn.fmt) and all(isinstance(a, int) for a in args), (fn.name, args)
        self.launches.append((op, fn.name, grid, dict(fn.defines)))
        self.shared = shared
        base = fn.name.rsplit("_", 1)[0] if fn.name != "qstage" else "qstage"
        getattr(self, "run_" + base)(fn, grid, block, *args)

    def _weight(self, fn, q, s, z, n, Kp, lg, G, srow, K=None):
        kind, sd = fn.name.rsplit("_", 1)[1], SD[fn.defines["SDTYPE"]]
        per = 32 // L.KINDS[kind]
        scales = self.read(s, {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[sd], (-(-n // min(srow, n)), G))
        zeros = self.read(z, np.uint8, (n, G)) if z else None
        p = L.Packed(kind, (n, K or Kp), self.read(q, np.uint32, (n, Kp // per)), scales, sd, lg, srow, zeros)
        return L.dense(p)

    def run_qstage(self, fn, grid, block, xs, x, perm, T, K, Kp):
        assert grid == grid1(T * Kp)
        src = self.read(x, np.float32, (T, K))
        out = np.zeros((T, Kp), np.float32)
        out[:, :K] = src[:, self.read(perm, np.int32, (K,))] if perm else src
        self.write(xs, out)

    def run_qgemv(self, fn, grid, block, x, T, Kp, lg, G, srow, act, *segs):
        threads, rows, unroll, words = QGEO[fn.name.rsplit("_", 1)[1]]
        kind = fn.name.rsplit("_", 1)[1]
        assert (fn.defines["QTHREADS"], fn.defines["QROWS"], fn.defines["QUNROLL"]) == (threads, rows, unroll)
        assert self.shared == 0 and (kind == "fp8" or fn.defines[f"QWORDS_{kind.upper()}"] == words)
        assert block == (threads, 1, 1) and grid[0] == sum(-(-segs[6 * i + 5] // rows) for i in range(3))
        assert T <= (1 if fn.defines["GEMV_MAX_T"] == 1 else GEMV_MAX_T) and (T == 1) == (fn.defines["GEMV_MAX_T"] == 1)
        assert x % 16 == 0, "the GEMV reads x in 16-byte loads"
        self._qgemv_math(fn, x, T, Kp, lg, G, srow, act, segs)

    def run_qgemv_gated_tc(self, fn, grid, block, y, x, T, Kp, lg, G, srow, act, n, *w):
        kind = fn.name.rsplit("_", 1)[1]
        assert T == 1 and block == (32 * QTC_WARPS, 1, 1) and grid[0] == -(-n // 16)
        assert self.shared == qtc_smem(kind, Kp) and (G == 1 or (1 << lg) >= QTC_STEP[kind])
        self._gated_math(fn, y, x, T, Kp, lg, G, srow, act, n, *w)

    def _qgemv_math(self, fn, x, T, Kp, lg, G, srow, act, segs):
        xs = self.read(x, np.float32, (T, Kp)).astype(np.float64)
        for i in range(3):
            y, q, s, z, b, n = segs[6 * i:6 * i + 6]
            if n:
                v = xs @ self._weight(fn, q, s, z, n, Kp, lg, G, srow).T + self.bias(b, n)
                self.write(y, (ops.ACT[CODES[act]](v) if act >= 0 else v).astype(np.float32))

    def run_qgemv_gated(self, fn, grid, block, y, x, T, Kp, lg, G, srow, act, n, *w):
        threads, rows = QGEO[fn.name.rsplit("_", 1)[1]][:2]
        assert block == (threads, 1, 1) and grid[0] == -(-n // rows) and x % 16 == 0 and self.shared == 0
        self._gated_math(fn, y, x, T, Kp, lg, G, srow, act, n, *w)

    def _gated_math(self, fn, y, x, T, Kp, lg, G, srow, act, n, qg, sg, zg, bg, qu, su, zu, bu):
        xs = self.read(x, np.float32, (T, Kp)).astype(np.float64)
        g = xs @ self._weight(fn, qg, sg, zg, n, Kp, lg, G, srow).T + self.bias(bg, n)
        u = xs @ self._weight(fn, qu, su, zu, n, Kp, lg, G, srow).T + self.bias(bu, n)
        self.write(y, (ops.ACT[CODES[act]](g) * u).astype(np.float32))

    def run_qdequant(self, fn, grid, block, out, q, s, z, perm, N, K, Kp, lg, G, srow):
        assert grid == grid1(N * Kp * L.KINDS[fn.name.rsplit("_", 1)[1]] // 32)  # a thread a word
        w = self._weight(fn, q, s, z, N, Kp, lg, G, srow, K)
        if perm:
            w[:, self.read(perm, np.int32, (K,))] = w.copy()
        self.write(out, bits_of(w, self.dtype))

    def bias(self, b, n):
        if not b:
            return 0.0
        a = self.read(b, NP[self.dtype], (n,))
        return to_float32(a, "BF16") if self.dtype == "bfloat16" else a.astype(np.float32)


CODES = {v: k for k, v in ACT_CODES.items()}


def bits_of(w, dtype):
    """float32 values → the stored bits of dtype (as a dense load rounds them)."""
    return float32_to_bf16_bits(w) if dtype == "bfloat16" else np.asarray(w, NP[dtype])


def run(be, M, K, seed=0, view=False):
    """(x float32 [M, K], the same on the device: rows 1.. of a bigger buffer with `view`)."""
    r = rng(seed)
    x = r.normal(size=(M + view, K)).astype(np.float32)
    xd = be.from_host(x)[1:] if view else be.from_host(x)
    return x[1:] if view else x, xd


@pytest.mark.parametrize("M", [1, 3, GEMV_MAX_T + 2])
def test_qkv_in_one_launch_beside_a_dense_weight(M):
    be = Fake("float16")
    cs = [gptq_case(i, 4, n, 256, 64, False, False, True, "F16") for i, n in enumerate([40, 8, 8])]
    ws = [be.upload_packed(c.packed, "q") for c in cs]
    dense = rng(9).normal(size=(12, 256)).astype(np.float32)
    x, xd = run(be, M, 256)
    got = [be.host(t) for t in be.linears(xd, [(ws[0], None), (ws[1], None), (ws[2], None),
                                              (be.upload_dense(dense), None)])]
    small = M <= GEMV_MAX_T
    names = [n for _, n, _, _ in be.launches]
    assert names == (["qgemv_int4"] if small else ["qdequant_int4"] * 3)
    if small:
        assert be.launches[0][3] == {"SDTYPE": 1, "GEMV_MAX_T": 1 if M == 1 else GEMV_MAX_T, "GEMV_EARLY_LAUNCH": 0,
                                     **qgemv_defines("int4")}
    for g, c in zip(got, cs):
        w = c.ref if small else NumpyBackend("float16").convert(c.ref, "F32", "t")
        assert rel_err(g, x.astype(np.float64) @ w.T) < 1e-6
    assert rel_err(got[3], x @ to_float32(dense.astype(np.float16), "F16").T) < 1e-6


@pytest.mark.parametrize("why", ["act-order", "short K", "short K, a view", "aligned view"])
def test_x_is_staged_when_the_kernel_cannot_read_it(why):
    """An act-order weight reads x permuted, a K short of whole chunks reads it zero-padded: staged first; rows 1..
    of a buffer whose K fills whole chunks are read as they are."""
    be = Fake("bfloat16")
    c = {"act-order": gptq_case(1, 8, 24, 128, 32, True, True, False, "BF16"),
         "short K": ct_int_case(2, 4, 24, 72, "group", 8, False, False, True, "F32"),
         "short K, a view": fp8_case(3, 24, 130, (128, 128), "F32"),
         "aligned view": fp8_case(3, 24, 128, (128, 128), "F32")}[why]
    w = be.upload_packed(c.packed, "q")
    x, xd = run(be, 2, c.packed.shape[1], view="view" in why)
    y = be.host(be.linear(xd, w, None))
    staged = ["qstage"] if why != "aligned view" else []
    assert [n for _, n, _, _ in be.launches] == staged + [f"qgemv_{c.packed.kind}"]
    assert rel_err(y, x.astype(np.float64) @ c.ref.T) < 1e-6


def test_gated_and_act_epilogues():
    be = Fake("float16")
    g, u = (ct_int_case(s, 8, 32, 128, "channel", None, False, False, True, "F16") for s in (4, 5))
    wg, wu = be.upload_packed(g.packed, "gate"), be.upload_packed(u.packed, "up")
    x, xd = run(be, 3, 128)
    y = be.host(be.qgated(xd, wg, None, wu, None, "silu"))
    a = be.host(be.qlinear_act(xd, wg, None, "gelu"))
    assert [n for _, n, _, _ in be.launches] == ["qgemv_gated_int8", "qgemv_int8"]
    xd64 = x.astype(np.float64)
    assert rel_err(y, ops.ACT["silu"](xd64 @ g.ref.T) * (xd64 @ u.ref.T)) < 1e-6
    assert rel_err(a, ops.ACT["gelu"](xd64 @ g.ref.T)) < 1e-6
    other = be.upload_packed(gptq_case(6, 4, 32, 128, 32, False, False, True, "F16").packed, "up")
    be.launches.clear()
    be.qgated(xd, wg, None, other, None, "silu")  # two layouts: two products, then gated_act
    assert [n for _, n, _, _ in be.launches] == ["qgemv_int8", "qgemv_int4"]


@pytest.mark.parametrize("qtc", [True, False])
def test_one_token_of_integer_weights_goes_to_tensor_cores(qtc):
    """One token of int8 per channel or int4 with groups of 128: gemv_qtc.cu's qgated (16 rows a block, x staged in
    shared memory); the plain products, groups shorter than a step, fp8, more tokens, or the qtc switch off:
    gemv_q.cu's."""
    be = Fake("float16")
    be.qtc = qtc
    q4 = [gptq_case(i, 4, n, 256, 128, False, False, True, "F16") for i, n in enumerate([40, 8, 8])]
    g8, u8 = (ct_int_case(s, 8, 24, 128, "channel", None, False, False, True, "F16") for s in (4, 5))
    short = gptq_case(6, 4, 24, 256, 64, False, False, True, "F16")
    f8 = fp8_case(7, 24, 256, (128, 128), "F16")
    x, xd = run(be, 1, 256)
    ys = be.linears(xd, [(be.upload_packed(c.packed, "q"), None) for c in q4])
    g4 = be.qgated(xd, be.upload_packed(q4[1].packed, "g"), None, be.upload_packed(q4[2].packed, "u"), None, "gelu")
    x8, xd8 = run(be, 1, 128, seed=1)
    gated = be.qgated(xd8, be.upload_packed(g8.packed, "g"), None, be.upload_packed(u8.packed, "u"), None, "silu")
    be.linear(xd, be.upload_packed(short.packed, "s"))
    be.linear(xd, be.upload_packed(f8.packed, "f"))
    be.linear(be.from_host(np.ones((2, 256), np.float32)), be.upload_packed(q4[0].packed, "q"))
    tc = "_tc" if qtc else ""
    assert [n for _, n, _, _ in be.launches] == ["qgemv_int4", f"qgemv_gated{tc}_int4", f"qgemv_gated{tc}_int8",
                                                 "qgemv_int4", "qgemv_fp8", "qgemv_int4"]
    for y, c in zip(ys, q4):
        assert rel_err(be.host(y), x.astype(np.float64) @ c.ref.T) < 1e-6
    want4 = ops.ACT["gelu"](x.astype(np.float64) @ q4[1].ref.T) * (x.astype(np.float64) @ q4[2].ref.T)
    assert rel_err(be.host(g4), want4) < 1e-6
    x64 = x8.astype(np.float64)
    assert rel_err(be.host(gated), ops.ACT["silu"](x64 @ g8.ref.T) * (x64 @ u8.ref.T)) < 1e-6


def test_a_wrong_width_is_named():
    be = Fake()
    w = be.upload_packed(gptq_case(1, 4, 8, 128, 32, True, False, True, "F16").packed, "q")
    with pytest.raises(DeviceError, match=r"linear: x has 64 features but the weight is \[8, 128\]"):
        be.linear(be.from_host(np.zeros((1, 64), np.float32)), w)


def test_upload_places_each_part_and_frees_all_on_failure():
    c = gptq_case(7, 4, 16, 128, 32, False, True, True, "F16")
    be = Fake()
    w = be.upload_packed(c.packed, "q")
    assert (w.kind, w.sdtype, w.kp, w.lg, w.G, w.srow) == ("int4", "float16", 128, 5, 4, 1)
    p = c.packed
    assert np.array_equal(be.read(w.q, np.uint32, p.words.shape), p.words)
    assert np.array_equal(be.read(w.s, np.float16, p.scales.shape), p.scales)
    assert np.array_equal(be.read(w.z, np.uint8, p.zeros.shape), p.zeros)
    assert np.array_equal(be.read(w.perm, np.int32, (128,)), p.perm)
    assert be.weight_bytes == w.nbytes == p.nbytes and len(be._owned) == 4
    before = set(Fake.live)
    bad = Fake(fail_copy_at=3)
    with pytest.raises(DeviceError, match="uploading quantized weight 'q' failed"):
        bad.upload_packed(c.packed, "q")
    assert Fake.live == before and bad._owned == [] and bad.weight_bytes == 0


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "fp8"])
def test_the_benchs_random_weights_are_valid_layouts(scheme):
    """core/cuda/bench_quant.py's weights: layouts the kernels can read, finite, each weight within 1 / sqrt(K), on
    the device in the bytes its roofline counts; and its table renders a result."""
    from core.cuda import bench_quant

    p = bench_quant.random_packed(scheme, (48, 384), seed=1)
    w = L.dense(p)
    assert L.packed_shape_ok(p) and np.isfinite(w).all() and np.abs(w).max() <= 1 / np.sqrt(384) * 1.001
    assert p.nbytes == 48 * 384 * p.bits // 8 + p.scales.nbytes
    be = Fake()
    q = bench_quant.quantized_weight(scheme)(be, "up.weight", (48, 384), 1)
    assert isinstance(q, QTensor) and q.nbytes == p.nbytes
    assert bench_quant.quantized_weight(scheme)(be, "lm_head", (48, 384), 1) is None  # stays fp16, as checkpoints
    m = {"bytes_per_token": 4.8e9, "roofline_tok_s": 700.0, "decode_tok_s": 500.0, "decode_pct_roofline": 71.4,
         "prefill_tok_s": 9000.0}
    row = {"config": "qwen3-8b", "scheme": scheme, "quant": m, "fp16": dict(m, decode_tok_s=250.0), "device": "X",
           "copy_gbps": 3300.0, "date": "today", "decode_x_fp16": 2.0, "prefill_x_fp16": 1.0}
    assert "qwen3-8b" in bench_quant.table([row]) and "2.00" in bench_quant.table([row])
