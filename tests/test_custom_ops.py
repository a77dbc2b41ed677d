"""The plugin escape hatch (issue 14 §2), CPU only: a family's own layer functions (ModelSpec.attention_block /
mlp_block) and extra roles, and a plugin's own op (core/custom_ops.py).

- A CustomOp is validated at registration, every problem named, and a plugin with a bad one is broken whole;
  op names are per family ("<family>.<op>"), so two plugins may ship ops of the same name.
- be.custom runs op.reference on the numpy backend; on the CUDA backend (core/cuda/custom.py, checked here with a
  stand-in for the rest of the backend) op.launch gets a launcher whose kernels come from the op's .cu by absolute
  path, through the backend's own kernel(), alloc() and launch(); a plugin's kernel is never launched with PDL.
- core.testing.compile_op builds a .cu outside core/cuda as the runtime would (nvcc, sm_80 and sm_90).
- End to end: a family whose attention is its own function, reading a global extra role through a numpy-only
  op, matches transformers (prefill, decode through the KV cache, greedy). The Apertus plugin
  (tests/test_apertus.py) does the same for an MLP with a custom op that has a CUDA kernel.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import core
from core import testing
from core.backend import NumpyBackend
from core.custom_ops import CustomOp, registered, validate_op
from core.cuda import modules
from core.cuda.custom import CustomMixin, Kernels
from core.cuda.launch import LaunchMixin
from core.cuda.tensors import DTensor
from core.errors import DeviceError
from core.spec import Detection, ExtraRole, W
from conftest import needs_torch
from test_plugins import discover, llama_like, registering  # noqa: F401  (discover: a fixture)

HERE = Path(__file__).resolve().parent
TWICE_CU = """#include "common.cuh"
extern "C" __global__ void twice(float* __restrict__ y, const float* __restrict__ x, const wt* __restrict__ s,
                                 long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = 2.f * x[i] * to_f(*s);
}
"""


def twice_launch(kernels, x, s):
    y = kernels.empty(x.shape)
    kernels.launch(kernels.function("twice", "PPPq"), kernels.grid1(x.size), (256, 1, 1), y, x, s, x.size)
    return y


@pytest.fixture
def twice(tmp_path) -> CustomOp:
    """y = 2 x s: a .cu of its own outside core/cuda (in a folder that also holds a header it could include)."""
    src = tmp_path / "ops" / "twice.cu"
    src.parent.mkdir()
    src.write_text(TWICE_CU)
    return CustomOp("twice", lambda x, s: 2 * x * s, src, twice_launch)


# --- the record and its validation ------------------------------------------------------------------------------
def test_a_valid_op_has_no_problems(twice):
    assert validate_op(twice) == []
    assert validate_op(CustomOp("numpy_only", np.tanh)) == []  # no CUDA kernel: runs on the numpy backend only


@pytest.mark.parametrize("change,message", [
    (dict(name="XIELU"), "op name 'XIELU' must be lowercase letters, digits or '_', starting with a letter"),
    (dict(name="fam.op"), "op name 'fam.op' must be lowercase"),
    (dict(reference=None), "op 'twice': reference None is not callable"),
    (dict(launch="launch"), "op 'twice': launch 'launch' is not callable"),
    (dict(cuda_source="twice.cu"), "op 'twice': cuda_source 'twice.cu' must be an absolute path "
                                   "(e.g. Path(__file__).with_name('twice.cu'))"),
    (dict(cuda_source="/nowhere/twice.cu"), "op 'twice': cuda_source '/nowhere/twice.cu' does not exist"),
    (dict(cuda_source="/nowhere/twice.cuh"), "op 'twice': cuda_source '/nowhere/twice.cuh' must be a .cu file"),
    (dict(cuda_source=3), "op 'twice': cuda_source 3 must be a path"),
    (dict(cuda_source=None), "op 'twice': launch is given but cuda_source is None"),
])
def test_each_problem_is_named(twice, change, message):
    import attrs

    bad = validate_op(attrs.evolve(twice, **change))
    assert len(bad) == 1 and bad[0].startswith(message), bad


def test_a_spec_with_a_bad_op_breaks_its_plugin_whole(discover, twice):
    import attrs

    good = llama_like(name="with-ops", ops=(twice,))
    dup = llama_like(name="dup-ops", detection=Detection(model_types=("dup",)), ops=(twice, twice))
    missing = llama_like(name="lost-op", detection=Detection(model_types=("lost",)),
                         ops=(attrs.evolve(twice, cuda_source="/nowhere/twice.cu"),))
    reg = discover(registering("fine", good), registering("twins", dup), registering("lost", missing),
                   registering("notop", llama_like(name="not-op", detection=Detection(model_types=("n",)),
                                                   ops=("xielu",))),
                   registering("notuple", llama_like(name="not-tuple", detection=Detection(model_types=("t",)),
                                                     ops=[twice])))
    assert "with-ops" in reg
    why = {b.name: b.error for b in reg.broken}
    assert why["twins"] == "invalid spec 'dup-ops': op name 'twice' is used twice (a family's op names must be unique)"
    assert why["lost"].startswith("invalid spec 'lost-op': op 'twice': cuda_source '/nowhere/twice.cu' does not exist")
    assert why["notop"] == "invalid spec 'not-op': op 'xielu' is not a core.custom_ops.CustomOp"
    assert why["notuple"] == "invalid spec 'not-tuple': ops must be a tuple of core.custom_ops.CustomOp, got list"


def test_op_names_are_per_family(discover, twice):
    """Two plugins each shipping an op called "twice" (other files, other code) do not clash: the registry knows
    them as "<family>.twice", and the runtime never looks an op up by name."""
    import attrs

    other = attrs.evolve(twice, reference=lambda x, s: x + x * s)
    reg = discover(registering("one", llama_like(name="fam-a", ops=(twice,))),
                   registering("two", llama_like(name="fam-b", detection=Detection(model_types=("b",)), ops=(other,))))
    assert not reg.broken
    ops = registered(reg)
    assert ops["fam-a.twice"] is twice and ops["fam-b.twice"] is other


# --- the numpy backend ------------------------------------------------------------------------------------------
def test_numpy_backend_runs_the_reference_in_float32():
    seen = []

    def ref(x, w, *, k):
        seen.append((x.dtype, w.dtype, k))
        return x * w[0] + k  # float32 in, float32 out

    op = CustomOp("axpk", ref)
    out = NumpyBackend("bfloat16").custom(op, np.arange(3.0), [2], k=1)
    assert out.dtype == np.float32 and out.tolist() == [1.0, 3.0, 5.0]
    assert seen == [(np.float32, np.float32, 1)]


# --- the CUDA side, without a GPU -------------------------------------------------------------------------------
class StandIn(CustomMixin):
    """The members of a CudaBackend that core/cuda/custom.py uses, recording what it asks for."""

    dtype = "bfloat16"

    def __init__(self):
        self.calls, self.next_ptr = [], 0x1000

    def kernel(self, file, kernel, fmt, **defines):
        self.calls.append(("kernel", file, kernel, fmt, defines))
        return f"<{kernel}>"

    def alloc(self, shape, dtype="float32"):
        self.next_ptr += 0x100
        return DTensor(None, self.next_ptr, shape, dtype)

    def from_host(self, x):
        self.calls.append(("upload", np.asarray(x).shape))
        return self.alloc(np.shape(x))

    def launch(self, op, fn, grid, block, *args, shared=0):
        self.calls.append(("launch", op, fn, grid, block, args, shared))


def test_cuda_custom_hands_launch_a_launcher_over_the_backend(twice):
    be = StandIn()
    s = DTensor(None, 0x42, (), "bfloat16")
    y = be.custom(twice, np.ones((3, 700), np.float32), s)
    assert isinstance(y, DTensor) and y.shape == (3, 700) and y.dtype == "float32"
    upload, kernel, launch = be.calls
    assert upload == ("upload", (3, 700))
    assert kernel == ("kernel", str(twice.cuda_source), "twice", "PPPq", {})  # WDTYPE: the backend's default
    assert launch[:5] == ("launch", "custom(twice)", "<twice>", (9, 1, 1), (256, 1, 1))
    assert launch[5][0] is y and launch[5][2] is s and launch[5][3] == 2100
    k = Kernels(be, twice)
    assert k.dtype == "bfloat16" and k.grid1(10**9) == (8192, 1, 1) and k.empty([2, 3]).shape == (2, 3)


def test_cuda_custom_errors_name_the_op(twice):
    import attrs

    with pytest.raises(DeviceError, match=r"custom op 'numpy_only' has no CUDA kernel .*device='cpu'"):
        StandIn().custom(CustomOp("numpy_only", np.tanh), np.ones(3, np.float32))
    with pytest.raises(DeviceError, match=r"custom op 'twice': launch returned ndarray, not a device tensor"):
        StandIn().custom(attrs.evolve(twice, launch=lambda k, x, s: np.zeros(3)), np.ones(3, np.float32), None)


def test_a_plugin_kernel_is_never_launched_with_pdl(monkeypatch):
    """Inside a decode graph capture (PDL on), core's kernels in launch.PDL_KERNELS go through pdl.launch; a kernel
    of a plugin's .cu with the same name ("add") is launched plainly: it was not written to call pdl_wait()."""
    from core.cuda import launch as launch_mod

    pdl_launched, plain = [], []
    monkeypatch.setattr(launch_mod.pdl, "function", lambda file, kernel, defines: 7)
    monkeypatch.setattr(launch_mod.pdl, "launch", lambda fn, fmt, grid, block, stream, args, shared: pdl_launched.append(fn) or 0)

    class Capturing(LaunchMixin):
        capture, pdl, stream, drv = object(), True, SimpleNamespace(handle=0), SimpleNamespace(Error=RuntimeError)

        def flush_pending(self):
            pass

        def after_op(self, op):
            pass

    def fn(file):
        return SimpleNamespace(_archkit=(file, "add", {"WDTYPE": 1}, "PPPq"),
                               prepared_async_call=lambda *a, **kw: plain.append(file))

    Capturing().launch("add", fn("elementwise.cu"), (1, 1, 1), (256, 1, 1), 0, 0, 0, 1)
    Capturing().launch("custom(add)", fn("/plugin/ops.cu"), (1, 1, 1), (256, 1, 1), 0, 0, 0, 1)
    assert pdl_launched == [7] and plain == ["/plugin/ops.cu"]


def test_modules_take_a_plugin_source_by_absolute_path(twice):
    name = str(twice.cuda_source)
    assert modules.source_path(name) == twice.cuda_source and modules.source(name) == TWICE_CU
    assert modules.include_dirs(name) == [str(modules.HERE), str(twice.cuda_source.parent)]
    assert modules.source_path("gemv.cu") == modules.HERE / "gemv.cu" and modules.include_dirs("gemv.cu") == [str(modules.HERE)]
    assert modules.variants(name) == [{"WDTYPE": 0}, {"WDTYPE": 1}, {"WDTYPE": 2}]


def test_compile_op_builds_a_plugin_source_like_the_runtime(twice):
    built = testing.compile_op(twice)  # skips without nvcc
    assert built == [(a, {"WDTYPE": c}) for a in ("sm_80", "sm_90") for c in (0, 1, 2)]
    Path(twice.cuda_source).write_text(TWICE_CU.replace("to_f(*s)", "to_f(*s) + undefined_name"))
    with pytest.raises(AssertionError, match=r"custom op 'twice': .*twice.cu \{'WDTYPE': 0\} for sm_80:\n.*undefined_name"):
        testing.compile_op(twice)


def test_check_op_skips_without_a_gpu(twice):
    from core.load import cuda_available

    if cuda_available()[0]:
        pytest.skip("a GPU is here: check_op runs (tests/test_apertus.py)")
    with pytest.raises(pytest.skip.Exception, match="needs PyCUDA and an NVIDIA GPU"):
        testing.check_op(twice, testing.arrays((3,)).map(lambda x: (x, np.float32(1))), weights=(1,))


def test_strategies_draw_what_they_say():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=20, derandomize=True)
    @given(shape=testing.shapes(2, 3, max_size=40, max_elements=10**6), x=testing.arrays(st.just((5, 7)), scale=3.0))
    def run(shape, x):
        assert len(shape) in (2, 3) and all(1 <= s <= 2048 for s in shape) and np.prod(shape) <= 10**6
        assert x.dtype == np.float32 and x.shape == (5, 7) and np.isfinite(x).all()

    run()
    assert set(testing.TOL) == set(testing.DTYPES) and testing.EXACT == testing.TOL["float32"]


# --- end to end: a family's own attention function, a global extra role, a numpy-only op -------------------------
GAIN = CustomOp("gain", lambda x, g: x * g)  # numpy only (no cuda_source)


def own_attention(s, L, i, h):
    """Self-attention composed here from backend ops (q, k and v one product at a time, no fused q/k norm), its
    output scaled by the global extra role "attn_gain" through the numpy-only op GAIN before o_proj."""
    c, be, T = s.c, s.be, s.T
    q, k, v = (be.linear(h, L[r + ".weight"], L.get(r + ".bias")).reshape(T, -1, c.head_dim) for r in "qkv")
    q = be.rope_cache_write(q, k, v, s.cache, i, s.start, s.rope)
    o = be.attention(q, s.cache, i, s.start, c.attn_scale, window=c.window(i), softcap=c.attn_softcap)
    o = be.custom(GAIN, o.reshape(T, c.q_dim), s.W.globals["attn_gain"])
    return be.linear(o, L["o.weight"], L.get("o.bias"))


@needs_torch
def test_own_attention_block_with_a_global_extra_role_matches_transformers(discover, tmp_path):
    """archkit runs a llama checkpoint plus a scalar "model.attn_gain" = 2 with own_attention; transformers runs the
    same weights with o_proj doubled, which is the same model. Equal logits (prefill, and decode through the
    cache) and greedy tokens show that the block ran, read the extra role, and applied the op."""
    from safetensors.numpy import load_file, save_file

    import hfmodels as hf
    from test_families import TOL, cached_logits, prompt

    from plugins.llama import SPEC

    ckpt = hf.save_model("llama", tmp_path / "ours", layers=2, heads=4, kv_heads=2, hidden=32, seed=3, norm_noise=0.3)
    tensors = load_file(ckpt / "model.safetensors")
    save_file({**tensors, "model.attn_gain": np.asarray(2.0, np.float32)}, ckpt / "model.safetensors",
              metadata={"format": "pt"})
    doubled = tmp_path / "doubled"
    shutil.copytree(ckpt, doubled)
    save_file({k: v * 2 if k.endswith("o_proj.weight") else v for k, v in tensors.items()},
              doubled / "model.safetensors", metadata={"format": "pt"})
    spec = llama_like(name="llama-own-attention", detection=Detection(model_types=("llama-own-attention",)),
                      weights=SPEC.weights + (W("attn_gain", "model.attn_gain"),),
                      extra_roles=(ExtraRole("attn_gain", (), per_layer=False),), attention_block=own_attention,
                      ops=(GAIN,))
    reg = discover(registering("own_attention", spec))
    assert not reg.broken
    model = core.load(ckpt, arch="llama-own-attention", device="cpu", quiet=True, registry=reg)
    assert model.config.attention_block is own_attention and float(model.weights.globals["attn_gain"]) == 2.0
    ref = hf.hf_reference(doubled)
    ids = prompt(3, 12, 256)
    longer = ids + prompt(4, 10, 256)
    assert hf.rel_err(model.logits(ids), hf.hf_logits(ref, ids)) < TOL
    assert hf.rel_err(cached_logits(model, longer, len(ids)), hf.hf_logits(ref, longer)) < TOL
    assert model.generate(ids, max_new_tokens=10, stop_at_eos=False) == hf.hf_greedy(ref, ids, 10)
    # the engine's batched steps pass a core.paged.Batch as step.start: the plugin's block runs them unchanged
    batch = model.generate([ids, longer], max_new_tokens=10, stop_at_eos=False, engine=model.engine(block_size=4))
    assert batch == [hf.hf_greedy(ref, ids, 10), hf.hf_greedy(ref, longer, 10)]
    with pytest.raises(core.WeightsError, match="1 unexpected: model.attn_gain"):  # plain llama knows no such tensor
        core.load(ckpt, arch="llama", device="cpu", quiet=True, registry=reg)
