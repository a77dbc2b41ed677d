"""The CUDA backend's layout of quantized weights, on the CPU (CI): core/cuda/qlayout.py, the arithmetic of
core/cuda/gemv_q.cu modelled in numpy, and core.load handing a backend the weights as stored.

- Each format's parts drawn at random (quantcases.py), repacked into the layout and decoded by its numpy reference
  (qlayout.dense), give the reference dequantization (core/quant/dequant.py) bit for bit: GPTQ (4 / 8 bits, symmetric
  or not, v1 / v2 zero points, desc_act), AWQ, compressed-tensors (pack-quantized and naive; tensor, channel, group
  strategies; actorder), FP8 (blocks cut short, channel, tensor), with K off the 16-byte chunk; so does every quantized
  tensor of real checkpoint files; what the layout cannot hold goes dense.
- The kernels' dequantization (MAGIC numbers, byte permutes, the e4m3 bit shift), written out op for op in numpy,
  gives that same weight; the preprocessed kernels take the arguments the backend launches them with.
- core.load hands over exactly the weights a backend asks for, undequantized, counts their bytes, stays atomic.
The kernels themselves run in test_cuda_quant.py (GPU).
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess

import attrs
import numpy as np
import pytest
from hypothesis import given

import core
from core.backend import NumpyBackend
from core.checkpoint import Checkpoint
from core.cuda import qlayout as L
from core.cuda.geometry import GEMV_MAX_T, QGEO, QTC_STEP
from core.cuda.modules import HERE, nvcc_options
from core.cuda.qlinear import FORMATS
from core.quant import QuantizedTensor, dequant
from core.quant.pack import float32_to_e4m3, pack, round_to
from core.safetensors_io import to_float32
from core.testing import rng
from quantcases import QUANTIZED, cases, ct_checkpoint, fp8_case, gptq_case, scales

NVCC = shutil.which("nvcc")


# -- the layout on the CPU ------------------------------------------------------------------------------------------

@given(case=cases())
def test_repacked_layout_decodes_to_the_reference(case):
    p = case.packed
    assert p is not None and L.packed_shape_ok(p)
    assert p.kp % L.chunk_codes(p.kind) == 0 and p.words.dtype == np.uint32
    assert np.array_equal(L.dense(p), case.ref)
    # the integer GEMVs' unrounded weight (gemv_q.cu QFOLD) is exact: rounded to the scale dtype it is the reference's
    exact = L.dense(p, rounded=False)
    assert np.array_equal(to_float32(round_to(exact.astype(np.float32), p.sdtype), p.sdtype), case.ref)


@pytest.mark.parametrize("bits, sym, desc_act, v1", [(4, True, False, True), (4, False, True, True),
                                                     (8, False, False, False), (8, True, True, False)])
def test_gptq_words_and_zeros(bits, sym, desc_act, v1):
    """Without act-order the words are qweight transposed (no unpacking); symmetric zero points need no tensor; an
    act-order g_idx becomes the permutation that makes each group contiguous."""
    c = gptq_case(1, bits, 24, 256, 64, sym, desc_act, v1, "F16")
    assert (c.packed.zeros is None) == sym and (c.packed.perm is not None) == desc_act
    assert np.array_equal(L.dense(c.packed), c.ref)
    if desc_act:
        assert sorted(c.packed.perm) == list(range(256))
    else:
        r = rng(1)
        qw = pack(r.integers(0, 1 << bits, (256, 24)), bits, axis=0)
        assert np.array_equal(L.from_gptq(qw, pack(np.full((4, 24), 8), bits, axis=1), scales(r, (4, 24), "F16"),
                                          None, bits, False, "F16").words, qw.T.view(np.uint32))


def test_fp8_block_layout():
    """128 x 128 blocks over a weight cut short in both dimensions; scales stored times 256, rows per scale 128."""
    r = rng(2)
    codes = float32_to_e4m3(r.normal(size=(200, 300)).astype(np.float32))
    s = scales(r, (2, 3), "BF16")
    p = L.from_fp8(codes, s, "BF16", (128, 128))
    assert (p.srow, p.lg, p.scales.shape, p.kp) == (128, 7, (2, 3), 304)
    assert np.array_equal(to_float32(p.scales, "BF16"), to_float32(s, "BF16") * 256)
    assert np.array_equal(L.dense(p), to_float32(dequant.fp8(codes, "F8_E4M3", s, "BF16", (128, 128)), "BF16"))
    t = fp8_case(3, 7, 50, (7, 50), "F32").packed
    assert (t.srow, t.scales.shape) == (L.ALL_ROWS, (1, 1))


def test_what_the_layout_cannot_hold_goes_dense():
    r = rng(0)
    s = scales(r, (4, 8), "F16")
    qw, qz = pack(r.integers(0, 4, (128, 8)), 2, axis=0), pack(np.ones((4, 8), int), 2, axis=1)
    assert L.from_gptq(qw, qz, s, None, 2, False, "F16") is None  # 2-bit codes
    qw4 = pack(r.integers(0, 16, (96, 8)), 4, axis=0)
    assert L.from_gptq(qw4, pack(np.ones((2, 8), int), 4, axis=1), scales(r, (2, 8), "F16"), None, 4, False,
                       "F16") is None  # groups of 48
    g_idx = r.integers(0, 4, 128).astype(np.int32)  # not a permutation of whole groups
    qw4 = pack(r.integers(0, 16, (128, 8)), 4, axis=0)
    assert L.from_gptq(qw4, pack(np.ones((4, 8), int), 4, axis=1), s, g_idx, 4, False, "F16") is None
    assert L.from_int(r.integers(-8, 8, (4, 64)).astype(np.int8), 4, (4, 64), scales(r, (4, 1), "F16"), "F16",
                      np.full((4, 1), 9, np.int8), (1, 64)) is None  # zero point 9 + 8 is past 4 bits
    codes = float32_to_e4m3(r.normal(size=(4, 32)).astype(np.float32))
    assert L.from_fp8(codes, np.full((4, 1), 300.0, np.float16), "F16", (1, 32)) is None  # 256 s overflows fp16
    codes[1, 3] = 0x7F  # NaN
    assert L.from_fp8(codes, np.ones((4, 1), np.float32), "F32", (1, 32)) is None


# -- gemv_q.cu's arithmetic, modelled in numpy ------------------------------------------------------------------------
# dequant_word's bit tricks (MAGIC numbers, __byte_perm selectors, the e4m3 -> fp16 shift) written out op for op with
# numpy's IEEE fp16 (an fp16 op is an exact float32 op rounded once) and bf16 (float32, rounded to nearest even), so
# that a wrong constant shows on the CPU. Not a proof that the GPU does this: test_cuda_quant.py checks that.

def byte_perm(x, y, sel: int):
    """__byte_perm(x, y, sel): byte i of the result is byte (sel >> 4i) & 7 of the 8 bytes x0..x3, y0..y3."""
    b = [(np.uint32(x) >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)]
    b += [(np.uint32(y) >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)]
    return sum(b[(sel >> (4 * i)) & 7] << np.uint32(8 * i) for i in range(4)).astype(np.uint32)


def lanes(u, sd: str):
    """The two 16-bit halves of uint32 words as float32 values of type sd."""
    lo, hi = (u & np.uint32(0xFFFF)).astype(np.uint16), (u >> np.uint32(16)).astype(np.uint16)
    return [to_float32(h.view(np.float16) if sd == "F16" else h, sd) for h in (lo, hi)]


def op16(a, b, f, sd: str):
    """One half2 / bfloat162 op on values of type sd: exact in float32, rounded once."""
    return to_float32(round_to(f(np.float32(a), np.float32(b)).astype(np.float32), sd), sd)


def f32(u):
    return np.asarray(u, np.uint32).view(np.float32)


def model_word(kind: str, sd: str, w, s, z):
    """dequant_word<KIND> for SDTYPE sd: words w uint32 [M], stored scale values s (float32 [M]), zero points z
    (int [M]) → float32 [M, PER]."""
    w, z = w.astype(np.uint32), z.astype(np.uint32)
    if kind == "fp8":
        out = []
        for i in (0, 1):
            t = byte_perm(w, 0, 0x3424 if i else 0x1404)
            h = (t & np.uint32(0x80008000)) | ((t >> np.uint32(1)) & np.uint32(0x3F803F80))
            for e in lanes(h, "F16"):
                v = op16(e, s, np.multiply, "F16") if sd == "F16" else (e * s).astype(np.float32)
                out.append(v if sd != "BF16" else to_float32(round_to(v, "BF16"), "BF16"))
        return np.stack(out, 1)
    magic32 = np.uint32(0x4B000000)
    if sd == "F32" or (kind == "int8" and sd == "BF16"):
        biased = [((w >> np.uint32(4 * i)) & np.uint32(0xF)) | magic32 for i in range(8)] if kind == "int4" else \
            [byte_perm(w, magic32, 0x7440 + i) for i in range(4)]  # 2**23 + u
        d = [(f32(u) - f32(z | magic32)).astype(np.float32) for u in biased]
        if sd == "F32":
            return np.stack([(x * s).astype(np.float32) for x in d], 1)
        out = []
        for i in (0, 2):
            e = byte_perm(d[i].view(np.uint32), d[i + 1].view(np.uint32), 0x7632)
            out += [op16(x, s, np.multiply, "BF16") for x in lanes(e, "BF16")]
        return np.stack(out, 1)
    magic2 = np.uint32(0x64006400 if sd == "F16" else 0x43004300)
    z2 = lanes(magic2 | z | (z << np.uint32(16)), sd)
    out = [None] * (8 if kind == "int4" else 4)
    for i in range(4 if kind == "int4" else 2):
        h = ((w >> np.uint32(4 * i)) & np.uint32(0x000F000F)) | magic2 if kind == "int4" else \
            byte_perm(w, 0x64646464, 0x4240 + 0x0101 * i)
        for half, d, zz in zip((0, 1), lanes(h, sd), z2):
            out[i + half * (4 if kind == "int4" else 2)] = op16(op16(d, zz, np.subtract, sd), s, np.multiply, sd)
    return np.stack(out, 1)


@given(case=cases())
def test_the_kernels_arithmetic_modelled_in_numpy(case):
    """Every word of a repacked weight, dequantized by the numpy model of gemv_q.cu's dequant_word with the scale and
    zero point the kernel picks for it (row n // srow, column min(k >> lg, G - 1)), is the reference weight."""
    p = case.packed
    n, k = p.shape
    per = 32 // p.bits
    rows, words = np.meshgrid(np.arange(n), np.arange(p.words.shape[1]), indexing="ij")
    col = np.minimum((words * per) >> p.lg, p.scales.shape[1] - 1)
    s = to_float32(p.scales, p.sdtype)[rows // p.srow, col]
    z = np.full_like(col, 1 << (p.bits - 1)) if p.zeros is None else p.zeros[rows, col].astype(np.int64)
    w = model_word(p.kind, p.sdtype, p.words.reshape(-1), s.reshape(-1), z.reshape(-1)).reshape(n, -1)[:, :k]
    if p.perm is not None:
        w[:, p.perm] = w.copy()
    assert np.array_equal(w, case.ref)


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_checkpoint_weights_repack_to_their_dequantization(tmp_path, name):
    ckpt = Checkpoint(QUANTIZED[name](tmp_path))
    qs = [q for q in ckpt.tensors.values() if isinstance(q, QuantizedTensor)]
    assert len(qs) == 14
    for q in qs:
        p = L.repack(q)
        assert p is not None, q.name
        assert np.array_equal(L.dense(p), to_float32(q.dequantize(), q.dtype)), q.name
        (n, k), G = p.shape, p.scales.shape[1]
        # the estimate from the headers counts zero points and a permutation the data may show are not needed
        assert L.device_nbytes(q) - p.nbytes in (0, n * G, 4 * k, n * G + 4 * k), q.name


class Keeping(NumpyBackend):
    """A numpy backend that asks for the quantized weights as stored (as the CUDA backend does), records what it was
    handed, and turns each into the dense weight through the layout (so its logits must equal a plain load's)."""

    def __init__(self, refuse=(), fail_at=None):
        super().__init__("float32")
        self.refuse, self.fail_at, self.taken, self.budget = set(refuse), fail_at, [], None

    def begin_loading(self, config, numel, quantized_bytes=0):
        self.budget = (numel, quantized_bytes)

    def quantized_nbytes(self, q, role, config):
        return None if role in self.refuse else L.device_nbytes(q)

    def convert_quantized(self, q, role):
        if len(self.taken) == self.fail_at:
            raise RuntimeError("device full")
        self.taken.append(role)
        p = L.repack(q)
        return self.convert(L.dense(p), "F32", role)


def test_the_loader_hands_over_quantized_weights_undequantized(tmp_path, monkeypatch):
    path = ct_checkpoint(tmp_path, "w4a16", 16, False)
    plain = core.load(path, device="cpu", quiet=True)
    be = Keeping(refuse={"down.weight"})
    monkeypatch.setattr(importlib.import_module("core.load"), "make_backend", lambda *a, **k: be)
    reads = []
    real = QuantizedTensor.dequantize
    monkeypatch.setattr(QuantizedTensor, "dequantize", lambda self: reads.append(self.name) or real(self))
    got = core.load(path, device="cpu", quiet=True)
    assert sorted(set(be.taken)) == ["gate.weight", "k.weight", "o.weight", "q.weight", "up.weight", "v.weight"]
    assert len(be.taken) == 12 and all("down_proj" in n for n in reads) and len(reads) == 2  # refused: dense
    ckpt = Checkpoint(path)
    kept = [q for q in ckpt.tensors.values() if isinstance(q, QuantizedTensor) and "down_proj" not in q.name]
    dense = sum(i.numel for n, i in ckpt.tensors.items() if n not in {q.name for q in kept})
    assert be.budget == (dense, sum(L.device_nbytes(q) for q in kept))
    ids = [1, 2, 3, 4, 5]
    assert np.array_equal(got.logits(ids), plain.logits(ids))


def test_loading_stays_atomic_when_a_quantized_upload_fails(tmp_path, monkeypatch):
    load_module = importlib.import_module("core.load")
    path = ct_checkpoint(tmp_path, "fp8", None, True)
    be = Keeping(fail_at=3)
    released = []
    monkeypatch.setattr(be, "release", lambda w: released.append(len(w.layers)))
    monkeypatch.setattr(load_module, "make_backend", lambda *a, **k: be)
    with pytest.raises(RuntimeError, match="device full"):
        core.load(path, device="cpu", quiet=True)
    assert released and len(be.taken) == 3  # the fourth raised; core.load released what the three made


def test_roles_the_cuda_backend_keeps_quantized(tmp_path):
    from core.config import ModelConfig
    from core.cuda.loading import LoadingMixin
    from core.registry import default_registry

    ckpt = Checkpoint(ct_checkpoint(tmp_path, "w4a16", 16, True))
    spec = default_registry()["llama"].spec
    config = ModelConfig.from_hf(spec, ckpt.config)
    q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]
    keeps = LoadingMixin.quantized_nbytes
    assert keeps(None, q, "q.weight", config) == L.device_nbytes(q) > 0
    assert keeps(None, q, "lm_head", config) == L.device_nbytes(q)  # read through linear() alone
    assert keeps(None, q, "experts.up.weight", config) is None and keeps(None, q, "router.weight", config) is None
    custom = attrs.evolve(config, attention_block=lambda *a: None)
    assert keeps(None, q, "q.weight", custom) is None and keeps(None, q, "up.weight", custom) is not None
    assert keeps(None, q.as_transposed(), "q.weight", config) is None


# -- the kernels' source, checked on the CPU -------------------------------------------------------------------------

@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")
def test_kernel_arguments_match_the_launch_formats(tmp_path):
    """The preprocessed gemv_q.cu's kernel parameters (pointer or int) are the PyCUDA formats qlinear.py launches them
    with, in order; and the file's default geometry is int4's (geometry.QGEO; the builds pass theirs)."""
    defines = {"WDTYPE": 1, "SDTYPE": 1, "GEMV_MAX_T": 4}
    out = subprocess.run([NVCC, "-E", f"-I{HERE}", *nvcc_options(defines), str(HERE / "gemv_q.cu")],
                         capture_output=True, text=True, check=True).stdout
    head = r'extern "C" __attribute__\(\(global\)\) void (?:__attribute__\(\(launch_bounds\(\d+\)\)\) )?'
    sigs = {m[1]: m[2] for m in re.finditer(head + r"(\w+)\(([^()]*)\)", out)}
    assert set(sigs) == {f"{b}_{k}" for b in ("qgemv", "qgemv_gated", "qdequant") for k in L.KINDS} | {"qstage"}
    for name, params in sigs.items():
        fmt = "".join("P" if "*" in p else "i" for p in params.split(","))
        assert fmt == FORMATS[re.sub(r"_(int4|int8|fp8)$", "", name)], name
    macros = {m[1]: int(m[2]) for m in re.finditer(r"^#define (\w+) (\d+)\b", (HERE / "gemv_q.cu").read_text(), re.M)}
    assert (macros["QTHREADS"], macros["QROWS"], macros["QUNROLL"], macros["QWORDS_INT4"]) == QGEO["int4"]
    assert macros["QWORDS_INT8"] == QGEO["int8"][3]
    assert macros["GEMV_MAX_T"] == GEMV_MAX_T
    # gemv_qtc.cu: the same arguments as gemv_q.cu's gated GEMV (qlinear.py launches either with the same values)
    out = subprocess.run([NVCC, "-E", f"-I{HERE}", *nvcc_options(defines), str(HERE / "gemv_qtc.cu")],
                         capture_output=True, text=True, check=True).stdout
    head = r'extern "C" __attribute__\(\(global\)\) void (?:__attribute__\(\(launch_bounds\([\d *]+\)\)\) )?'
    sigs = {m[1]: m[2] for m in re.finditer(head + r"(\w+)\(([^()]*)\)", out)}
    assert set(sigs) == {f"qgemv_gated_tc_{k}" for k in QTC_STEP}
    for name, params in sigs.items():
        fmt = "".join("P" if "*" in p else "i" for p in params.split(","))
        assert fmt == FORMATS[re.sub(r"_tc_(int4|int8)$", "", name)], name
