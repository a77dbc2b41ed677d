"""Testing a kernel against its numpy reference: the hypothesis harness core's own CUDA kernel tests use
(tests/test_cuda_kernels.py), public for plugin authors testing their own ops (core/custom_ops.py).

Needs the `test` extra (pytest, hypothesis). On a GPU machine with PyCUDA:

    from hypothesis import strategies as st
    from core import testing

    def test_xielu_on_the_gpu():
        x = testing.arrays(testing.shapes(), scale=4.0)
        p = testing.arrays((1,))
        testing.check_op(XIELU, st.tuples(x, p, p, st.just(np.float32(0.5)), st.just(np.float32(-1e-6))),
                         weights=(1, 2, 3, 4))   # arguments 1-4 are weights: stored in the backend's dtype

    def test_xielu_compiles():      # CI: nvcc, no GPU
        testing.compile_op(XIELU)

- TOL: ‖gpu − ref‖ / ‖ref‖ allowed per dtype where the GPU rounds activations to the dtype; EXACT (TOL["float32"])
  for ops computed in float32 from the same rounded weights.
- Strategies: dtypes(), seeds(), dims() (awkward sizes and the aligned sizes real models use), shapes(), arrays()
  (fresh random values each example, cheap at any size).
- cuda_backend(dtype): a poisoning CudaBackend (every fresh buffer NaN-filled, so an element a kernel forgets to
  write fails the comparison), one per dtype, its weights released after each use. upload_weight, rel_err.
- check_op(op, args, dtype=None, ...): be.custom(op, ...) on the GPU against op.reference in float64 on the same
  inputs (weights rounded to the dtype as loading rounds them), over hypothesis examples; a test that calls it
  is skipped, saying why, without PyCUDA or a GPU. assert_op: one example.
- compile_op(op): the op's .cu built with nvcc for sm_80 and sm_90, with every -D set the runtime uses and the
  runtime's own flags (core.cuda.modules.nvcc_options); skipped without nvcc. nvcc_command: that command line.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, strategies as st

from .backend import NumpyBackend, Weights
from .cuda import modules

DTYPES = ("float32", "float16", "bfloat16")
# ‖gpu − ref‖ / ‖ref‖ allowed where the GPU rounds activations or cached keys/values to the dtype (GEMM
# operands, KV cache). Ops computed in fp32 from the same rounded weights are held to TOL["float32"].
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
EXACT = TOL["float32"]
ARCHS = ("sm_80", "sm_90")  # what CI compiles for: Ampere and Hopper


# --- strategies -------------------------------------------------------------------------------------------------
def dtypes():
    """A weight dtype: "float32", "float16" or "bfloat16"."""
    return st.sampled_from(DTYPES)


def seeds():
    """A numpy seed."""
    return st.integers(0, 2**32 - 1)


def dims(max_size: int = 300):
    """A size: mostly awkward ones (1..max_size), sometimes the aligned sizes real models use (vector paths)."""
    return st.one_of(st.integers(1, max_size), st.sampled_from([64, 128, 256, 768, 1024, 2048]))


def shapes(min_dims: int = 1, max_dims: int = 3, max_size: int = 300, max_elements: int = 1 << 22):
    """A shape of min_dims..max_dims sizes drawn from dims(max_size), of at most max_elements elements."""
    return st.lists(dims(max_size), min_size=min_dims, max_size=max_dims).map(tuple).filter(
        lambda s: math.prod(s) <= max_elements)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def arrays(shape, scale: float = 1.0, loc: float = 0.0):
    """float32 arrays of `shape` (a tuple, or a strategy of tuples) of normal(loc, scale) values, drawn from a seed:
    fresh values every example and cheap at any size (hypothesis shrinks the shape and the seed)."""
    shape = shape if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape))
    return st.tuples(shape, seeds()).map(lambda s: rng(s[1]).normal(loc, scale, s[0]).astype(np.float32))


# --- comparing --------------------------------------------------------------------------------------------------
def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64; every element of a must be finite (a poisoned, unwritten one is NaN)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), f"{np.count_nonzero(~np.isfinite(a))} of {a.size} outputs are not finite"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --- the GPU ----------------------------------------------------------------------------------------------------
def require_gpu() -> None:
    """Skip the calling test, saying why, unless PyCUDA and an NVIDIA GPU are there."""
    import pytest

    from .load import cuda_available

    ok, why = cuda_available()
    if not ok:
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {why}")


_backends: dict = {}


@contextlib.contextmanager
def cuda_backend(dtype: str, **switches):
    """A poisoning CudaBackend for `dtype` (made once per dtype and switches), the switches (e.g. gemm="own") set
    on entry, its weights and caches released after the block."""
    from .cuda.backend import CudaBackend

    key = (dtype, tuple(sorted(switches.items())))
    be = _backends.get(key)
    if be is None:
        be = _backends[key] = CudaBackend(dtype, poison=True)
    for name, value in switches.items():  # again each time: a test may have flipped one
        setattr(be, name, value)
    try:
        yield be
    finally:
        be.release(Weights())


def upload_weight(be, w):
    """(device weight, the float64 copy the GPU holds: rounded to be.dtype exactly as loading does)."""
    w = np.asarray(w, np.float32)
    return be.convert(w, "F32", "test"), NumpyBackend(be.dtype).convert(w, "F32", "test").astype(np.float64)


def assert_op(op, args, dtype: str = "float32", *, weights=(), scalars=None, tol: float | None = None) -> float:
    """One example: be.custom(op, *args, **scalars) on a poisoning CudaBackend against op.reference in float64 on
    the same inputs. Arguments whose index is in `weights` are uploaded as weights (stored in `dtype`, as loading
    stores them); the others as float32 (or, integer arrays, int32) activations. Asserts ‖gpu − ref‖ / ‖ref‖ <
    tol (default TOL[dtype]) and returns that error."""
    scalars = dict(scalars or {})
    with cuda_backend(dtype) as be:
        dev, ref = [], []
        for i, a in enumerate(args):
            if i in weights:
                d, r = upload_weight(be, a)
            else:
                a = np.asarray(a)
                a = a if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32)
                d, r = be.from_host(a), (a if np.issubdtype(a.dtype, np.integer) else a.astype(np.float64))
            dev.append(d)
            ref.append(r)
        got = be.to_host(be.custom(op, *dev, **scalars))
    want = np.asarray(op.reference(*ref, **scalars), np.float64)
    assert got.shape == want.shape, f"custom op {op.name!r}: the GPU gave shape {got.shape}, the reference {want.shape}"
    err, limit = rel_err(got, want), TOL[dtype] if tol is None else tol
    assert err < limit, (f"custom op {op.name!r} ({dtype}, shapes {[np.shape(a) for a in args]}, scalars {scalars}): "
                         f"relative error {err:.3g} >= {limit:g}")
    return err


def check_op(op, args, dtype: str | None = None, *, weights=(), scalars=None, tol: float | None = None) -> None:
    """Property test of a custom op on the GPU: assert_op over hypothesis examples.

    args: a strategy of argument tuples (e.g. st.tuples(arrays(shapes()), ...)); scalars: a strategy of keyword
    dicts (default: none); dtype: one weight dtype, or None to draw each of DTYPES; weights, tol: as assert_op.
    Skips the calling test, saying why, without PyCUDA or a GPU. Runs under the active hypothesis profile."""
    require_gpu()
    kinds = dtypes() if dtype is None else st.just(dtype)

    @given(dt=kinds, values=args, kw=st.just({}) if scalars is None else scalars)
    def run(dt, values, kw):
        assert_op(op, tuple(values), dt, weights=weights, scalars=kw, tol=tol)

    run()


# --- compiling (CI: nvcc, no GPU) -------------------------------------------------------------------------------
def nvcc_command(nvcc: str, name: str, defines: dict, arch: str, out) -> list[str]:
    """The nvcc command line that builds module `name` (a core/cuda file or a plugin's absolute path) as the
    runtime does: its include path, the runtime's flags and `defines`, for `arch`, into the cubin `out`."""
    includes = [f"-I{d}" for d in modules.include_dirs(name)]
    return [nvcc, "-cubin", f"-arch={arch}", *includes, *modules.nvcc_options(defines), str(modules.source_path(name)),
            "-o", str(out)]


def compile_op(op, archs=ARCHS) -> list[tuple[str, dict]]:
    """Build op's .cu with nvcc for each of `archs` and every -D set the runtime uses (one per weight dtype);
    an AssertionError carries nvcc's output if a build fails or warns. Returns the (arch, defines) built.
    Skips the calling test without nvcc on PATH; an op without cuda_source has nothing to build (an error)."""
    import pytest

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc (CUDA toolkit) is not on PATH")
    assert op.cuda_source is not None, f"custom op {op.name!r} has no cuda_source to compile"
    name, built = str(Path(op.cuda_source)), []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for defines in modules.variants(name):
                r = subprocess.run(nvcc_command(nvcc, name, defines, arch, Path(tmp) / "out.cubin"),
                                   capture_output=True, text=True)
                assert r.returncode == 0, f"custom op {op.name!r}: {name} {defines} for {arch}:\n{r.stderr}"
                assert "warning" not in r.stderr.lower(), f"custom op {op.name!r}: {name} {defines} for {arch} warns:\n{r.stderr}"
                built.append((arch, defines))
    return built
