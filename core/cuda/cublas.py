"""Optional vendor GEMM: cuBLAS loaded through ctypes, for prefill matrix products (issue 4 allows it as an
option, measured side by side with our own WMMA GEMM).

Nothing here is required: when no libcublas is found, `available()` says why and the backend keeps its own
kernels. Where it is looked for, in order:
- $ARCHKIT_CUBLAS (a path to libcublas.so.*),
- the NVIDIA pip wheels on sys.path (what a CUDA build of torch installs: site-packages/nvidia/cublas/lib/,
  or nvidia/cu13/lib/ for CUDA 13 wheels), torch/lib,
- $CUDA_HOME / $CUDA_PATH / /usr/local/cuda (lib64, targets/*/lib),
- the loader's own search (libcublas.so.13, .12, libcublas.so).

The handle is given a workspace the backend owns (cublasSetWorkspace), so that batched decode steps can be
captured as CUDA graphs with their cuBLAS products in them (batch_graph.py).

The runtime-API handle uses the calling thread's current context, which is PyCUDA's primary context
(pycuda.autoprimaryctx), so cuBLAS and our kernels share memory and the backend's stream.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

from ..errors import DeviceError

# cublas_api.h / library_types.h
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_DEFAULT_MATH = 0
DATA_TYPES = {"float32": CUDA_R_32F, "float16": CUDA_R_16F, "bfloat16": CUDA_R_16BF}
STATUS = {0: "SUCCESS", 1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH",
          11: "MAPPING_ERROR", 13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED",
          16: "LICENSE_ERROR"}

_lib = None
_why = None


def candidates() -> list[str]:
    """Paths or sonames to try, in order (see the module docstring)."""
    out = []
    env = os.environ.get("ARCHKIT_CUBLAS")
    if env:
        out.append(env)
    for base in sys.path:
        if not base or not os.path.isdir(os.path.join(base, "nvidia")) and not os.path.isdir(os.path.join(base, "torch")):
            continue
        for pat in ("nvidia/cublas/lib/libcublas.so*", "nvidia/*/lib/libcublas.so*", "torch/lib/libcublas.so*"):
            out += sorted(glob.glob(os.path.join(base, pat)), key=len)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            for pat in ("lib64/libcublas.so*", "targets/*/lib/libcublas.so*"):
                out += sorted(glob.glob(os.path.join(root, pat)), key=len)
    out += ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def _open(path: str):
    """dlopen libcublas at `path`, its libcublasLt from the same folder first (no rpath needed)."""
    folder = os.path.dirname(path)
    if folder:  # best effort: a runtime library beside it (or in the cuda_runtime wheel), then cublasLt
        for pat in ("libcudart.so*", "../../cuda_runtime/lib/libcudart.so*", "libcublasLt.so*"):
            for dep in sorted(glob.glob(os.path.join(folder, pat)), key=len):
                try:
                    ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
                    break
                except OSError:
                    continue
    return ctypes.CDLL(path)


class Cublas:
    """The few cuBLAS entry points the backend uses, with their C signatures."""

    def __init__(self, lib, path: str):
        self.lib, self.path = lib, path
        vp, i = ctypes.c_void_p, ctypes.c_int
        self._create = lib.cublasCreate_v2
        self._create.argtypes, self._create.restype = [ctypes.POINTER(vp)], i
        self._destroy = lib.cublasDestroy_v2
        self._destroy.argtypes, self._destroy.restype = [vp], i
        self._set_stream = lib.cublasSetStream_v2
        self._set_stream.argtypes, self._set_stream.restype = [vp, vp], i
        self._set_math = lib.cublasSetMathMode
        self._set_math.argtypes, self._set_math.restype = [vp, i], i
        try:  # cuBLAS 11.4+: a workspace the caller owns, so that graph capture finds nothing to allocate
            self._set_ws = lib.cublasSetWorkspace_v2
            self._set_ws.argtypes, self._set_ws.restype = [vp, vp, ctypes.c_size_t], i
        except AttributeError:
            self._set_ws = None
        self._version = lib.cublasGetVersion_v2
        self._version.argtypes, self._version.restype = [vp, ctypes.POINTER(i)], i
        # cublasGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
        #              computeType, algo)
        self._gemm = lib.cublasGemmEx
        self._gemm.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
        self._gemm.restype = i
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise DeviceError(f"cuBLAS {what} failed: CUBLAS_STATUS_{STATUS.get(status, status)}")

    def create(self, stream_handle: int, workspace: int = 0, workspace_bytes: int = 0) -> tuple[int, bool]:
        """(handle, whether it took the workspace): a handle whose work goes on `stream_handle` (a CUstream, e.g.
        pycuda Stream.handle), given `workspace` (a device pointer of workspace_bytes) when the library can take
        one: with it cuBLAS allocates nothing per call, which a CUDA graph capture needs."""
        h = ctypes.c_void_p()
        self.check(self._create(ctypes.byref(h)), "cublasCreate")
        fixed = False
        try:
            self.check(self._set_stream(h, ctypes.c_void_p(stream_handle)), "cublasSetStream")
            self.check(self._set_math(h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode")  # no TF32 for fp32
            if workspace and self._set_ws is not None:
                self.check(self._set_ws(h, ctypes.c_void_p(workspace), workspace_bytes), "cublasSetWorkspace")
                fixed = True
        except BaseException:
            self._destroy(h)
            raise
        return h.value, fixed

    def destroy(self, handle: int) -> None:
        self.check(self._destroy(ctypes.c_void_p(handle)), "cublasDestroy")

    def version(self, handle: int) -> int:
        v = ctypes.c_int()
        self.check(self._version(ctypes.c_void_p(handle), ctypes.byref(v)), "cublasGetVersion")
        return v.value

    def linear(self, handle: int, y: int, x: int, w: int, M: int, N: int, K: int, dtype: str) -> None:
        """y[M, N] (float32, row-major) = x[M, K] @ w[N, K]^T, x and w both of `dtype`, fp32 accumulation.

        cuBLAS is column-major: row-major y [M, N] is column-major Y' [N, M] (ld N), w [N, K] is column-major
        [K, N] (ld K) and x [M, K] column-major [K, M] (ld K), so Y' = op_T(w) . x: m = N, n = M, k = K.
        """
        t = DATA_TYPES[dtype]
        self.check(self._gemm(ctypes.c_void_p(handle), CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, ctypes.byref(self._one),
                              ctypes.c_void_p(w), t, K, ctypes.c_void_p(x), t, K, ctypes.byref(self._zero),
                              ctypes.c_void_p(y), CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   f"cublasGemmEx (M={M}, N={N}, K={K}, {dtype})")


def load() -> Cublas | None:
    """The library (loaded once per process), or None; `why()` then says what was tried."""
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    errors = []
    for c in candidates():
        try:
            lib = _open(c)
            _lib = Cublas(lib, c)
            return _lib
        except (OSError, AttributeError) as e:
            errors.append(f"{c}: {e}")
    _why = "no usable libcublas found (tried: " + "; ".join(errors[-6:]) + ")"
    return None


def available() -> tuple[bool, str]:
    lib = load()
    return (True, lib.path) if lib is not None else (False, _why or "")
