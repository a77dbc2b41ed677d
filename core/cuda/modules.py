"""Kernel modules: the `.cu` files beside this one, compiled by name with `-D` sizes and cached.

A module is compiled on first use (PyCUDA also caches the cubin on disk) and kept for the life of the
process, keyed by file and defines. A module may also be an absolute path outside this folder (a plugin's
own op, core/custom_ops.py): it is built the same way, with common.cuh and its own folder on the include path.
`nvcc_options` is the single source of compiler flags: the runtime and the CI compile tests
(tests/test_cuda_compile.py, core.testing.compile_op) both use it, so CI builds exactly what runs.
"""

from __future__ import annotations

from pathlib import Path

from .geometry import QGEO, QTC_WARPS, SK_SUB, qgemv_defines

HERE = Path(__file__).resolve().parent
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}  # WDTYPE in common.cuh
BASE_OPTIONS = ("-std=c++17", "-O3")  # no --use_fast_math: fp32 parity needs accurate expf/sincosf/erff

_modules: dict = {}


def kernel_files() -> list[str]:
    """Names of every kernel source in this package."""
    return sorted(p.name for p in HERE.glob("*.cu"))


def variants(name: str) -> list[dict[str, int]]:
    """The -D sets the runtime compiles `name` with (CI compiles each of them)."""
    if name == "gemm.cu":  # tensor-core path: half types only
        return [{"WDTYPE": 1}, {"WDTYPE": 2}]
    if name == "gemm_f32.cu":
        return [{"WDTYPE": 0}]
    if name == "skinny.cu":  # batched decode products: half types x the row tiles skinny_geometry picks
        return [{"WDTYPE": c, "SK_NT": nt, "SK_WARPS": 4 if nt <= 2 else 8, "SK_SUB": SK_SUB}
                for c in (1, 2) for nt in (1, 2, 4, 8)]
    dtypes = [{"WDTYPE": c} for c in DTYPE_CODES.values()]
    if name == "gemv.cu":  # one token (decode) and up to GEMV_MAX_T tokens per weight read; K <= 1024 decode
        return ([dict(d, GEMV_MAX_T=t) for d in dtypes for t in (1, 4)]
                + [dict(d, GEMV_MAX_T=1, GEMV_ROWS=8, GEMV_UNROLL=1) for d in dtypes]
                + [dict(d, GEMV_MAX_T=1, GEMV_UNROLL=u) for d in dtypes for u in (3, 4)])  # K <= 4096 in one pass
    if name == "gemv_q.cu":  # quantized weights: every weight type x scale type, one token and up to GEMV_MAX_T, each
        # kind's geometry (geometry.QGEO; kinds sharing one share the build)
        geos = {tuple(sorted(qgemv_defines(kind).items())): qgemv_defines(kind) for kind in QGEO}
        return [dict(d, SDTYPE=s, GEMV_MAX_T=t, **g) for g in geos.values() for d in dtypes
                for s in DTYPE_CODES.values() for t in (1, 4)]
    if name == "gemv_qtc.cu":  # one-token integer GEMVs on tensor cores: every weight type x scale type
        return [dict(d, SDTYPE=s, QTC_WARPS=QTC_WARPS) for d in dtypes for s in DTYPE_CODES.values()]
    if name == "moe_q.cu":  # quantized experts: every weight type (the biases) x scale type
        return [dict(d, SDTYPE=s) for d in dtypes for s in DTYPE_CODES.values()]
    if name == "norm.cu":
        return [dict(d, NORM_VPT=2) for d in dtypes]
    if name == "attention_tc.cu":  # tensor-core prefill: half types, head sizes that are multiples of 16
        return [{"WDTYPE": c, "HEAD_DIM": h} for c in (1, 2) for h in (64, 128, 80, 48, 32, 256)]
    if name == "attention.cu":  # compiled per head size; these are the common ones plus an odd one
        return ([dict(d, HEAD_DIM=h) for d in dtypes for h in (64, 128, 80, 37)]
                + [dict(d, HEAD_DIM=h, GROUP=g) for d in dtypes for h, g in ((64, 8), (128, 4), (128, 2), (64, 1))])  # decode
    if name == "paged_attn.cu":  # per head size and query heads per decode block (geometry.paged_decode_geometry):
        # TinyLlama (64, 8), Llama-3-8B / Qwen3-8B (128, 4), Qwen3-0.6B (128, 2), the demos (32, 2), Gemma 2
        # (256, 2), MHA (128, 1), the largest block (64, 16), and an odd head size
        return [dict(d, HEAD_DIM=h, GROUP=g) for d in dtypes
                for h, g in ((64, 8), (128, 4), (128, 2), (32, 2), (256, 2), (128, 1), (64, 16), (37, 3))]
    return dtypes


def nvcc_options(defines: dict[str, int]) -> list[str]:
    """Compiler flags for one module (arch and include path are added by the caller)."""
    return list(BASE_OPTIONS) + [f"-D{k}={v}" for k, v in sorted(defines.items())]


def source_path(name: str) -> Path:
    """The source file of module `name`: a file in this folder, or an absolute path (a plugin's .cu)."""
    p = Path(name)
    return p if p.is_absolute() else HERE / name


def include_dirs(name: str) -> list[str]:
    """The include path of module `name`: this folder (common.cuh), then the module's own folder."""
    return list(dict.fromkeys([str(HERE), str(source_path(name).parent)]))


def source(name: str) -> str:
    return source_path(name).read_text()


def get_module(name: str, defines: dict[str, int]):
    """The compiled pycuda SourceModule for `name` with `defines` (compiled once per process)."""
    return _compiled(name, defines)[0]


def get_cubin(name: str, defines: dict[str, int]) -> bytes:
    """The cubin of the module get_module returns (core/cuda/pdl.py loads it through the driver API)."""
    return _compiled(name, defines)[1]


def _compiled(name: str, defines: dict[str, int]):
    key = (name, tuple(sorted(defines.items())))
    got = _modules.get(key)
    if got is None:
        import pycuda.driver as drv
        from pycuda.compiler import compile as nvcc_compile

        # no_extern_c: the kernels declare extern "C" themselves; wrapping would break <mma.h>.
        cubin = nvcc_compile(source(name), options=nvcc_options(defines), include_dirs=include_dirs(name),
                             no_extern_c=True)
        got = _modules[key] = (drv.module_from_buffer(cubin), cubin)
    return got
