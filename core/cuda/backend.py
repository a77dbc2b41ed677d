"""CUDA backend: NumpyBackend's primitive operations as the kernels in this folder, through PyCUDA.

Tensors stay on the GPU between operations (DTensor); only logits come back (to_host). Activations are
float32; weights and the KV cache are stored in the backend's dtype (fp16 / bf16, or fp32) and every
kernel accumulates in fp32. All work goes on one stream, so operations are ordered without host syncs.

Memory: weights and the KV cache are plain allocations made once (loading, finish_loading); activations
come from a DeviceMemoryPool, so a decode step allocates nothing from the driver. With `poison=True`
(or ARCHKIT_CUDA_POISON=1) every fresh activation buffer and KV cache is filled with NaN first, so an
element a kernel fails to write shows up in the result. ARCHKIT_CUDA_SYNC=1 synchronises after every
launch, so an asynchronous CUDA error is reported against the op that caused it.

Decode can run as a CUDA graph (see core/cuda/graph.py): kernels that need the position read it from
device memory when given `start_dev`, because a graph bakes its launch arguments in.
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np

from ..backend import DTYPES, Cache
from ..checkpoint import float32_to_bf16_bits, to_float32
from ..errors import ContextOverflowError, DeviceError, DeviceMemoryError
from .modules import DTYPE_CODES, get_module

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4}
ACT_CODES = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu": 1, "silu": 2, "relu": 3}  # elementwise.cu
GEMV_MAX_T = 4        # gemv.cu handles up to this many tokens per weight read; more go to the GEMM
GEMV_ROWS, GEMV_THREADS = 4, 128  # gemv.cu gemv_rows / gemv_gated: output rows and threads per block
NORM_VPT = 2          # norm.cu norm_reg: float4 values per thread kept in registers
CONVERT_CHUNK = 1 << 24  # elements converted on the host per upload step (64 MB as float32)
PREFILL_NQ, PREFILL_BK = 16, 32  # attention.cu: queries per block, keys per tile
TC_FQ, TC_FK, TC_NW = 64, 64, 4  # attention_tc.cu: queries per block, keys per tile, warps (TC_SMEM_BYTES there)
WORKSPACE_RESERVE = 512 << 20    # bytes left free beside the default KV cache for activations
GiB = 1 << 30


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


# Kernels that call pdl_wait() before touching anything another kernel writes (common.cuh), so they may be
# launched with programmatic stream serialization inside a decode graph.
PDL_KERNELS = frozenset({"embed", "norm_rows", "norm_reg", "rope", "rope_kv", "add", "act", "gated_act", "soft_cap",
                         "kv_write", "gemv_rows", "gemv_gated", "gemv_rows_norm", "gemv_gated_norm",
                         "gemv_rows_ln", "gemv_gated_ln",
                         "attn_decode_step", "step_advance"})


class DTensor:
    """A tensor in GPU memory: an allocation (kept alive here), a pointer into it, shape and dtype.

    dtype is one of "float32", "float16", "bfloat16", "int32". Views (reshape, slicing rows) share the
    allocation. Contiguous, row-major always.
    """

    __slots__ = ("buf", "ptr", "shape", "dtype")

    def __init__(self, buf, ptr: int, shape: tuple, dtype: str):
        self.buf, self.ptr, self.shape, self.dtype = buf, int(ptr), tuple(int(s) for s in shape), dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * ITEMSIZE[self.dtype]

    def reshape(self, *shape) -> "DTensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return DTensor(self.buf, self.ptr, shape, self.dtype)

    def __getitem__(self, key) -> "DTensor":
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"DTensor supports only contiguous row slices, got {key!r}")
        a, b, _ = key.indices(self.shape[0])
        b = max(a, b)
        row = math.prod(self.shape[1:]) * ITEMSIZE[self.dtype]
        return DTensor(self.buf, self.ptr + a * row, (b - a,) + self.shape[1:], self.dtype)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"DTensor({self.dtype}{list(self.shape)} @ {self.ptr:#x})"


def _decode_step_geometry(Dh: int, g: int, dtype: str) -> tuple[int, int, int]:
    """(threads per block, static shared memory in bytes, fewest keys a slice takes) of attn_decode_step
    (attention.cu) for head size Dh and group g, mirroring the kernel's DS_* macros: it has no build beyond
    48 KB (large GQA groups take the two-kernel path), and the backend launches it with this many threads."""
    es = ITEMSIZE[dtype]
    vec = 16 // es
    row = Dh * es
    tk = 64 if row <= 128 else 32 if row <= 256 else 16 if row <= 512 else 8
    threads = 256 if g * Dh >= 256 else 64 if g * Dh <= 64 else -(-g * Dh // 32) * 32
    nch = Dh // vec if Dh % vec == 0 else Dh
    sp = 1
    while sp * 2 <= 32 and sp * 2 * tk * g <= threads and nch % (sp * 2) == 0:
        sp *= 2
    kpad = Dh + vec * sp if Dh % vec == 0 else Dh + 1
    dhw = -(-row // 16) * 16 // es
    smem = (2 * tk * kpad * es + 2 * tk * Dh * es + 2 * dhw * es + 4 * (g * Dh + g * tk + 3 * g)
            + 4 * (4 * Dh + 2 * ((Dh + 1) // 2)) + 16)
    return threads, smem, min(tk, 32)


class Lazy(DTensor):
    """A decode-sized result (T <= GEMV_MAX_T) not computed yet, so that the GEMV consuming it can fold it in
    (issue 4): kind "norm" (an RMSNorm of `src`, folded into the next GEMV's reduction) or "linear" (a GEMV
    whose result is about to be added to the residual stream: add_norm runs it with the add in its epilogue)
    or "rope" (the rotated q of a one-token rope_cache_write, whose norm, RoPE and cache write attention() folds
    into attn_decode_step; until then the write is pending on the backend, see cache_write).
    Any other use reads .ptr, which computes it then (ordinary kernels, same result); activations are never
    written in place, so computing it later reads the same inputs."""

    __slots__ = ("kind", "args", "_run", "_real", "__weakref__")

    def __init__(self, shape, kind: str, args: tuple, run):
        self.buf, self.shape, self.dtype = None, tuple(shape), "float32"
        self.kind, self.args, self._run, self._real = kind, args, run, None

    @property
    def pending(self) -> bool:
        return self._real is None

    def materialize(self) -> DTensor:
        if self._real is None:
            self._real = self._run()
            self._run = self.args = None
        return self._real

    @property
    def ptr(self) -> int:
        return self.materialize().ptr

    def reshape(self, *shape) -> DTensor:
        return self.materialize().reshape(*shape)

    def __getitem__(self, key) -> DTensor:
        if isinstance(key, slice) and key.indices(self.shape[0]) == (0, self.shape[0], 1):
            return self  # h[T - 1:] with T = 1
        return self.materialize()[key]

    def __repr__(self):
        return f"Lazy({self.kind}, float32{list(self.shape)}, {'pending' if self.pending else 'computed'})"


class CudaBackend:
    """PyCUDA backend: see the module docstring. `context`: KV-cache positions to preallocate at load."""

    name = "cuda"

    def __init__(self, dtype: str = "float16", context: int | None = None, poison: bool | None = None):
        if dtype not in DTYPES:
            raise DeviceError(f"dtype {dtype!r} is not supported (choose from {list(DTYPES)})")
        if context is not None and (not isinstance(context, int) or context < 1):
            raise DeviceError(f"context={context!r} must be a positive number of positions")
        import pycuda.autoprimaryctx  # noqa: F401  (primary context: torch can share the GPU)
        import pycuda.driver as drv
        from pycuda.tools import DeviceMemoryPool

        self.drv = drv
        self.dtype, self.context = dtype, context
        self.poison = os.environ.get("ARCHKIT_CUDA_POISON") == "1" if poison is None else poison
        self.sync_each = os.environ.get("ARCHKIT_CUDA_SYNC") == "1"
        self.device = drv.Context.get_device()
        self._ctx = drv.Context.get_current()  # the primary context; other threads push it (session.py)
        self._session_lock, self._session_owner = threading.Lock(), None
        cc = self.device.compute_capability()
        if cc < (8, 0):
            raise DeviceError(f"{self.device.name()} has compute capability {cc[0]}.{cc[1]}; archkit's kernels need 8.0+")
        self.stream = drv.Stream()
        self.pool = DeviceMemoryPool()
        self._wcode = DTYPE_CODES[dtype]
        self._fns: dict = {}
        self._owned: list = []       # weight allocations, freed by release()
        self.weight_bytes = 0
        self._config = None
        self._kv = None              # the preallocated cache: (key, capacity, allocation, k views, v views)
        self._lent = None            # weakref to the Cache object currently using the preallocated buffers
        self._freqs: dict = {}
        self._last_op = None
        self.capture = None          # set by core.cuda.graph while a decode step is being captured
        self.graphs = os.environ.get("ARCHKIT_CUDA_GRAPHS", "1") != "0"
        # Fused decode kernels (issue 4: multi-row GEMV with epilogues, register norms, RoPE + cache write);
        # ARCHKIT_CUDA_FUSED=0 runs the previous one-op-per-kernel path (benchmarks compare the two).
        self.fused = os.environ.get("ARCHKIT_CUDA_FUSED", "1") != "0"
        # Programmatic dependent launch inside decode graphs (core/cuda/pdl.py; sm_90+): ARCHKIT_CUDA_PDL=0 off.
        self.pdl = os.environ.get("ARCHKIT_CUDA_PDL", "1") != "0" and cc >= (9, 0)
        # At one decode token: RMSNorm folded into the GEMV that reads it, the residual add into the GEMV whose
        # result is added (Lazy); ARCHKIT_CUDA_FOLD=0 runs the norm kernels.
        self.fold = os.environ.get("ARCHKIT_CUDA_FOLD", "1") != "0"
        # LayerNorm folds too (gemv_*_ln) but is off by default: on an H200 it made GPT-2 decode 0.92x (its
        # extra sums cost registers, 116 vs 72 a thread, in the 77 MB tied output GEMV); ARCHKIT_CUDA_FOLD_LN=1.
        self.fold_ln = os.environ.get("ARCHKIT_CUDA_FOLD_LN") == "1"
        self._graph_cache = None
        self._pending = self._pending_rope = self._pending_kv = None  # a deferred cache write (cache_write)
        # Prefill matrix products (T > GEMV_MAX_T): cuBLAS through ctypes (core/cuda/cublas.py) when a libcublas
        # is found ("auto", the default: 2.8x / 3.0x our WMMA GEMM at 2,048 tokens on an H200, NOTES.md round 2),
        # else our WMMA GEMM; ARCHKIT_CUDA_GEMM=own / cublas (or `be.gemm = ...`) forces one, and "cublas"
        # without a library is an error. `be.gemm` may be switched between operations (benchmarks run both).
        # Prefill attention (T > 1): the tensor-core kernel (attention_tc.cu, "tc", the default) for
        # half-precision caches and head sizes that are multiples of 16, else (or with ARCHKIT_CUDA_ATTN=simt)
        # the SIMT kernel.
        self.gemm = os.environ.get("ARCHKIT_CUDA_GEMM", "auto")
        if self.gemm not in ("auto", "own", "cublas"):
            raise DeviceError(f"ARCHKIT_CUDA_GEMM={self.gemm!r}: choose 'auto', 'own' or 'cublas'")
        self.attn = os.environ.get("ARCHKIT_CUDA_ATTN", "tc")
        if self.attn not in ("tc", "simt"):
            raise DeviceError(f"ARCHKIT_CUDA_ATTN={self.attn!r}: choose 'tc' or 'simt'")
        self._cublas, self._cublas_handle = None, None
        if self.gemm == "cublas":
            self._cublas_lib()  # asked for by name: say now if it is missing

    def __repr__(self):
        return f"CudaBackend(dtype={self.dtype!r}, device={self.device.name()!r})"

    @staticmethod
    def default_dtype(ckpt=None) -> str:
        """The checkpoint's half type: bfloat16 if it stores BF16, else float16."""
        stored = {t.dtype for t in ckpt.tensors.values()} if ckpt is not None else set()
        return "bfloat16" if "BF16" in stored else "float16"

    # -- memory ----------------------------------------------------------------------------------
    def _free_total(self) -> tuple[int, int]:
        return self.drv.mem_get_info()

    def _oom(self, need: int, what: str) -> DeviceMemoryError:
        free, total = self._free_total()
        return DeviceMemoryError(f"out of GPU memory for {what}: needs {_mib(need)}, {_mib(free)} free of "
                                 f"{_mib(total)} on {self.device.name()}")

    def _alloc(self, shape, dtype: str = "float32") -> DTensor:
        """A pooled activation buffer (NaN-filled when poisoning)."""
        n = math.prod(shape) * ITEMSIZE[dtype]
        try:
            buf = self.pool.allocate(max(n, 16))
        except self.drv.MemoryError:
            raise self._oom(n, f"an activation of shape {tuple(shape)}") from None
        t = DTensor(buf, int(buf), shape, dtype)
        if self.capture is not None:
            self.capture.keep.append(t)  # a captured graph keeps using this address
        if self.poison and n:
            self.drv.memset_d8_async(t.ptr, 0xFF, n, self.stream)  # all-ones bits: NaN in fp32/fp16/bf16
        return t

    def _mem_alloc(self, nbytes: int, what: str):
        try:
            return self.drv.mem_alloc(max(nbytes, 16))
        except self.drv.MemoryError:
            raise self._oom(nbytes, what) from None

    def from_host(self, x: np.ndarray) -> DTensor:
        """Upload a host array as a float32 (or, for integer input, int32) activation."""
        x = np.asarray(x)
        dtype = "int32" if np.issubdtype(x.dtype, np.integer) else "float32"
        x = np.ascontiguousarray(x, dtype=np.int32 if dtype == "int32" else np.float32)
        t = self._alloc(x.shape, dtype)
        if x.size:
            self._check(lambda: self.drv.memcpy_htod_async(t.ptr, x, self.stream), "upload")
        return t

    def to_host(self, x) -> np.ndarray:
        """A float32 numpy copy of a backend tensor (waits for the GPU)."""
        if isinstance(x, np.ndarray):
            return np.asarray(x, dtype=np.float32)
        if isinstance(x, Lazy):
            x = x.materialize()
        self._flush_pending()
        if self.capture is not None:
            return self.capture.output(x)
        self.synchronize("to_host")
        raw = np.empty(x.shape, {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
                                 "int32": np.int32}[x.dtype])
        if x.size:
            self._check(lambda: self.drv.memcpy_dtoh(raw, x.ptr), "to_host")
        return to_float32(raw, "BF16") if x.dtype == "bfloat16" else raw.astype(np.float32, copy=False)

    def synchronize(self, what: str = "synchronize") -> None:
        """Wait for the stream; an asynchronous CUDA error becomes a DeviceError naming the last op."""
        self._flush_pending()
        try:
            self.stream.synchronize()
        except self.drv.Error as e:
            raise DeviceError(f"CUDA error surfaced at {what} after op {self._last_op!r} "
                              f"(set ARCHKIT_CUDA_SYNC=1 to pin it to its op): {e}") from None

    def _check(self, fn, op: str):
        try:
            return fn()
        except self.drv.Error as e:
            raise DeviceError(f"CUDA op {op!r} failed: {e}") from None

    # -- kernels ---------------------------------------------------------------------------------
    def _fn(self, file: str, kernel: str, fmt: str, **defines):
        key = (file, kernel, tuple(sorted(defines.items())))
        fn = self._fns.get(key)
        if fn is None:
            defines.setdefault("WDTYPE", self._wcode)
            try:
                fn = get_module(file, defines).get_function(kernel)
            except Exception as e:  # CompileError, LogicError: say which kernel and defines
                raise DeviceError(f"cannot build kernel {kernel!r} from {file} with {defines}: {e}") from None
            fn.prepare(fmt)
            fn._archkit = (file, kernel, dict(defines), fmt)  # what pdl.function needs to load it again
            self._fns[key] = fn
        return fn

    def _launch(self, op: str, fn, grid, block, *args, shared: int = 0) -> None:
        if self._pending is not None:
            self._flush_pending()
        args = [a.ptr if isinstance(a, DTensor) else (0 if a is None else a) for a in args]
        if self.capture is not None and self.pdl and fn._archkit[1] in PDL_KERNELS:
            from . import pdl

            file, kernel, defines, fmt = fn._archkit
            rc = pdl.launch(pdl.function(file, kernel, defines), fmt, grid, block, self.stream.handle, args, shared)
            if rc != 0:
                raise DeviceError(f"CUDA op {op!r} failed to launch with programmatic dependent launch "
                                  f"(grid {grid}, block {block}, CUresult {rc})")
            self._after_op(op)
            return
        try:
            fn.prepared_async_call(grid, block, self.stream, *args, shared_size=shared)
        except self.drv.Error as e:
            raise DeviceError(f"CUDA op {op!r} failed to launch (grid {grid}, block {block}): {e}") from None
        self._after_op(op)

    def _after_op(self, op: str) -> None:
        """Remember the op for error messages; under ARCHKIT_CUDA_SYNC=1 pin an asynchronous error on it."""
        self._last_op = op
        if self.sync_each and self.capture is None:
            try:
                self.stream.synchronize()
            except self.drv.Error as e:
                raise DeviceError(f"CUDA op {op!r} failed: {e}") from None

    def _start_dev(self):
        """Device pointer the kernels read the position from while capturing, else None."""
        return self.capture.start_ptr if self.capture is not None else None

    @staticmethod
    def _grid1(n: int, block: int = 256) -> tuple:
        return (max(1, min((n + block - 1) // block, 8192)), 1, 1)

    # -- loading ---------------------------------------------------------------------------------
    def session(self):
        """Held around each forward or generation: one at a time per model, from any thread (session.py)."""
        from .session import Session
        return Session(self)

    def begin_loading(self, config, numel: int) -> None:
        """Remember the config (for the KV cache) and fail early if the weights cannot fit."""
        self._config = config
        need = numel * ITEMSIZE[self.dtype]
        free, total = self._free_total()
        if need > free:
            raise DeviceMemoryError(f"the weights need {_mib(need)} in {self.dtype} but only {_mib(free)} of "
                                    f"{_mib(total)} is free on {self.device.name()}")

    def convert(self, bits: np.ndarray, stored: str, role: str) -> DTensor:
        """Checkpoint bits → a weight in GPU memory, in self.dtype (converted on the host in chunks)."""
        flat = bits.reshape(-1)
        n = flat.size
        isz = ITEMSIZE[self.dtype]
        alloc = self._mem_alloc(n * isz, f"weight {role!r} {list(bits.shape)} ({self.weight_bytes:,} bytes already loaded)")
        try:
            same = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(stored) == self.dtype
            for i in range(0, n, CONVERT_CHUNK):
                part = flat[i:i + CONVERT_CHUNK]
                if not same:
                    x = to_float32(part, stored)
                    part = (x.astype(np.float16) if self.dtype == "float16" else
                            float32_to_bf16_bits(x) if self.dtype == "bfloat16" else x.astype(np.float32))
                self.drv.memcpy_htod(int(alloc) + i * isz, np.ascontiguousarray(part))
        except self.drv.Error as e:
            alloc.free()
            raise DeviceError(f"uploading weight {role!r} failed: {e}") from None
        except BaseException:
            alloc.free()
            raise
        self._owned.append(alloc)
        self.weight_bytes += n * isz
        return DTensor(alloc, int(alloc), bits.shape, self.dtype)

    def random_weight(self, shape, seed: int, scale: float, center: float = 0.0) -> DTensor:
        """A weight of `shape` filled on the GPU with uniform values in center ± scale (benchmarks)."""
        n = math.prod(shape)
        alloc = self._mem_alloc(n * ITEMSIZE[self.dtype], f"random weight {list(shape)}")
        self._owned.append(alloc)
        self.weight_bytes += n * ITEMSIZE[self.dtype]
        t = DTensor(alloc, int(alloc), shape, self.dtype)
        fn = self._fn("init.cu", "fill_uniform", "PqQff")
        self._launch("random_weight", fn, self._grid1(n), (256, 1, 1), t, n, seed, center, scale)
        return t

    def finish_loading(self, weights) -> None:
        """Preallocate the KV cache for the model's context and check that loading went through."""
        self.synchronize("finish_loading")
        if self._config is not None and self._kv is None:
            self._kv = self._make_kv(self._config, self._default_context(self._config))

    def release(self, weights) -> None:
        """Free every weight, the KV cache, captured graphs, the cuBLAS handle and pooled memory."""
        self._flush_pending()
        if self._graph_cache is not None:
            self._graph_cache.clear()
        try:
            self.stream.synchronize()
        except self.drv.Error:
            pass  # freeing is still right; the error was (or will be) reported where it happened
        if self._cublas_handle is not None:
            handle, self._cublas_handle = self._cublas_handle, None
            try:
                self._cublas.destroy(handle)
            except DeviceError:
                pass
        for a in self._owned:
            a.free()
        self._owned.clear()
        self.weight_bytes = 0
        if self._kv is not None:
            self._kv[2].free()
            self._kv = None
        weights.globals.clear()
        weights.layers.clear()
        self._freqs.clear()
        self.pool.free_held()

    # -- KV cache --------------------------------------------------------------------------------
    def _bytes_per_position(self, config) -> int:
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * ITEMSIZE[self.dtype]

    def _default_context(self, config) -> int:
        """`context` if given, else max_position_embeddings capped by free memory (at least 1)."""
        if self.context is not None:
            return self.context
        free, _ = self._free_total()
        fits = (free - WORKSPACE_RESERVE) // self._bytes_per_position(config)
        return int(max(1, min(config.max_position_embeddings, fits)))

    def _make_kv(self, config, length: int):
        per = self._bytes_per_position(config)
        alloc = self._mem_alloc(per * length, f"a KV cache of {length} positions ({per:,} bytes each)")
        L, Hkv, Dh = config.num_layers, config.num_kv_heads, config.head_dim
        one = Hkv * length * Dh * ITEMSIZE[self.dtype]
        k = [DTensor(alloc, int(alloc) + 2 * i * one, (Hkv, length, Dh), self.dtype) for i in range(L)]
        v = [DTensor(alloc, int(alloc) + (2 * i + 1) * one, (Hkv, length, Dh), self.dtype) for i in range(L)]
        return ((L, Hkv, Dh), length, alloc, k, v)

    def new_cache(self, config, length: int) -> Cache:
        """A cache for `length` positions: the preallocated one when it is big enough and not in use."""
        self._flush_pending()
        key = (config.num_layers, config.num_kv_heads, config.head_dim)
        kv = self._kv
        free_to_lend = self._lent is None or self._lent() is None
        if kv is None or kv[0] != key or kv[1] < length or not free_to_lend:
            kv = self._make_kv(config, length)
            if free_to_lend:  # replace the preallocated one (a second live cache stays separate)
                if self._kv is not None:
                    self._kv[2].free()
                self._kv = kv
        if self.poison:
            self.drv.memset_d8_async(int(kv[2]), 0xFF, self._bytes_per_position(config) * kv[1], self.stream)
        cache = Cache(list(kv[3]), list(kv[4]), length)
        if kv is self._kv:
            self._lent = weakref.ref(cache)
        return cache

    @property
    def kv_bytes(self) -> int:
        """Bytes of the preallocated KV cache (0 before loading)."""
        return 0 if self._kv is None else self._kv[4][0].nbytes * 2 * len(self._kv[3])

    # -- primitive operations (see core.ops for the numpy references) ----------------------------
    def _embed(self, op, table, ids_dev, x, scale, start, T) -> DTensor:
        D = table.shape[1]
        out = self._alloc((T, D))
        fn = self._fn("embed.cu", "embed", "PPPPfiPii")
        self._launch(op, fn, (T, 1, 1), (min(256, 32 * -(-D // 32)), 1, 1),
                     out, table, ids_dev, x, float(1.0 if scale is None else scale), start, self._start_dev(), T, D)
        return out

    def embed(self, table: DTensor, ids, scale: float | None = None) -> DTensor:
        """table[ids] (* scale) → float32 [T, D]."""
        if self.capture is not None:  # the token id lives in the graph's input buffer
            return self._embed("embed", table, self.capture.ids, None, scale, 0, 1)
        ids_dev = self.from_host(np.asarray(ids, dtype=np.int32))
        return self._embed("embed", table, ids_dev, None, scale, 0, ids_dev.shape[0])

    def add_positions(self, x: DTensor, table: DTensor, start: int) -> DTensor:
        """x [T, D] + table[start:start+T] (learned absolute positions)."""
        return self._embed("add_positions", table, None, x, None, start, x.shape[0])

    def add(self, a: DTensor, b: DTensor) -> DTensor:
        out = self._alloc(a.shape)
        fn = self._fn("elementwise.cu", "add", "PPPq")
        self._launch("add", fn, self._grid1(a.size), (256, 1, 1), out, a, b, a.size)
        return out

    def soft_cap(self, x: DTensor, cap: float) -> DTensor:
        """cap * tanh(x / cap)."""
        y = self._alloc(x.shape)
        fn = self._fn("elementwise.cu", "soft_cap", "PPqf")
        self._launch("soft_cap", fn, self._grid1(x.size), (256, 1, 1), y, x, x.size, float(cap))
        return y

    def linear(self, x: DTensor, w: DTensor, b: DTensor | None = None) -> DTensor:
        """x [..., K] @ w[N, K].T (+ b) → float32 [..., N]: GEMV for a few tokens, else a tiled GEMM.

        At one token (fused kernels, folding on) the result is a Lazy: it is computed when first read (or by
        add_norm with the residual add folded in), from x as it is then; activations are never written in place."""
        K, N = x.shape[-1], w.shape[0]
        if w.shape[1] != K:
            raise DeviceError(f"linear: x has {K} features but the weight is {list(w.shape)}")
        M = x.size // K if K else 0
        if M <= GEMV_MAX_T and self.fused:
            if self.fold and M == 1 and w.shape[0]:  # add_norm may fold the residual add into it
                return Lazy(x.shape[:-1] + (N,), "linear", (x, w, b), lambda: self.linears(x, [(w, b)])[0])
            return self.linears(x, [(w, b)])[0]
        if M > GEMV_MAX_T and self._use_cublas(M, K):
            return self._cublas_linears(x, [(w, b)])[0]
        y = self._alloc(x.shape[:-1] + (N,))
        if M <= GEMV_MAX_T:
            fn = self._fn("gemv.cu", "gemv", "PPPPiii", GEMV_MAX_T=GEMV_MAX_T)
            self._launch("linear(gemv)", fn, (-(-N // 8), 1, 1), (256, 1, 1), y, x, w, b, M, N, K)
        elif self.dtype == "float32":
            fn = self._fn("gemm_f32.cu", "gemm_f32", "PPPPiii")
            self._launch("linear(gemm_f32)", fn, (-(-N // 64), -(-M // 64), 1), (256, 1, 1), y, x, w, b, M, N, K)
        else:
            fn = self._fn("gemm.cu", "gemm", "PPPPiii")
            self._launch("linear(gemm)", fn, (-(-N // 128), -(-M // 128), 1), (256, 1, 1), y, x, w, b, M, N, K)
        return y

    def linears(self, x: DTensor, pairs) -> tuple:
        """(x @ w.T (+ b) for (w, b) in pairs): for a few tokens one GEMV launch covers up to 3 products."""
        K = x.shape[-1]
        M = x.size // K if K else 0
        if M > GEMV_MAX_T and self._use_cublas(M, K):
            return tuple(self._cublas_linears(x, pairs))
        if M > GEMV_MAX_T or not self.fused:
            return tuple(self.linear(x, w, b) for w, b in pairs)
        outs = []
        for i in range(0, len(pairs), 3):
            outs += self._gemv_rows(x, pairs[i:i + 3], -1, "linear(gemv)")
        return tuple(outs)

    @property
    def attn_tc_available(self) -> bool:
        """Whether the tensor-core prefill attention can run (a half-precision cache)."""
        return self.dtype != "float32"

    def _cublas_lib(self):
        """The loaded cuBLAS (core/cuda/cublas.py), or None under "auto" when there is none; a DeviceError
        saying what was tried when it was asked for by name."""
        if self._cublas is None:
            from . import cublas

            ok, why = cublas.available()
            if not ok:
                if self.gemm == "auto":
                    return None
                raise DeviceError(f"the cuBLAS GEMM was asked for (ARCHKIT_CUDA_GEMM=cublas) but {why}")
            self._cublas = cublas.load()
        return self._cublas

    def _use_cublas(self, M: int, K: int) -> bool:
        """Whether a product of M > GEMV_MAX_T rows goes to cuBLAS (never inside a graph capture, whose
        buffers and launches are ours alone)."""
        return (self.gemm in ("auto", "cublas") and self.capture is None and M > 0 and K > 0
                and self._cublas_lib() is not None)

    def _cublas_op(self, op: str, call) -> None:
        """Run one cuBLAS call (an op on the backend's stream, like _launch: named for errors, synced under
        ARCHKIT_CUDA_SYNC=1; profilers wrap this method)."""
        call()
        self._after_op(op)

    def _cublas_linears(self, x: DTensor, pairs) -> list:
        """x @ w.T (+ b) for (w, b) in pairs through cublasGemmEx: x is rounded to the weight type once (as our
        GEMM does when it stages x), the product accumulates and is written in fp32, bias added after."""
        K = x.shape[-1]
        M = x.size // K
        if self._cublas_handle is None:
            self._cublas_handle = self._cublas_lib().create(self.stream.handle)
        h = self._cublas_handle
        if self.dtype == "float32":
            xa = x
        else:
            xa = self._alloc((M, K), self.dtype)
            fn = self._fn("elementwise.cu", "to_wt", "PPq")
            self._launch("linear(cublas:round)", fn, self._grid1(M * K), (256, 1, 1), xa, x, M * K)
        outs = []
        for w, b in pairs:
            N = w.shape[0]
            if w.shape[1] != K:
                raise DeviceError(f"linear: x has {K} features but the weight is {list(w.shape)}")
            y = self._alloc(x.shape[:-1] + (N,))
            if N:
                self._cublas_op("linear(cublas)",
                                lambda: self._cublas.linear(h, y.ptr, xa.ptr, w.ptr, M, N, K, self.dtype))
                if b is not None:
                    fn = self._fn("elementwise.cu", "add_bias", "PPqi")
                    self._launch("linear(cublas:bias)", fn, self._grid1(M * N), (256, 1, 1), y, b, M * N, N)
            outs.append(y)
        return outs

    @staticmethod
    def _folded_norm(x):
        """(input, gain, norm bias, eps, offset, kernel suffix) when x is a pending norm a GEMV can fold in
        ("_norm": RMSNorm, "_ln": LayerNorm), else (x, None, None, 0, 0, "")."""
        if isinstance(x, Lazy) and x.pending and x.kind == "norm":
            return x.args
        return x, None, None, 0.0, 0.0, ""

    def _gemv_rows(self, x, pairs, act: int, op: str, resid=None) -> list:
        K = x.shape[-1]
        M = x.size // K if K else 0
        x, g, lb, eps, off, suffix = self._folded_norm(x)
        segs, ys = [], []
        for w, b in pairs:
            if w.shape[1] != K:
                raise DeviceError(f"{op}: x has {K} features but the weight is {list(w.shape)}")
            ys.append(self._alloc(x.shape[:-1] + (w.shape[0],)))
            segs += [ys[-1], w, b, w.shape[0]]
        segs += [None, None, None, 0] * (3 - len(pairs))
        rows, geo = self._gemv_geometry(K, M, qkv=len(pairs) == 3)
        blocks = sum(-(-w.shape[0] // rows) for w, _ in pairs)
        fn = self._fn("gemv.cu", "gemv_rows" + suffix, "PiiiPPffP" + "PPPi" * 3,
                      GEMV_MAX_T=1 if M == 1 else GEMV_MAX_T, **geo)
        if blocks:
            self._launch(op, fn, (blocks, 1, 1), (GEMV_THREADS, 1, 1), x, M, K, act, g, lb, float(eps), float(off),
                         resid, *segs)
        return ys

    def _gemv_geometry(self, K: int, M: int, qkv: bool = False, gated: bool = False) -> tuple:
        """(output rows per block, extra gemv.cu defines) for a GEMV over K features and M tokens."""
        # Each GEMV lets the next kernel launch as soon as all its blocks run (gemv.cu GEMV_EARLY_LAUNCH), except
        # the q/k/v product (the only three-output one), whose successor is the decode attention: launched that
        # early, its K/V prefetch slowed 4,096-position decode 0.94x; the others made decode 1.05x at 128
        # positions (TinyLlama / Qwen3-0.6B, H200, one run each; NOTES.md round 4).
        geo = {"GEMV_EARLY_LAUNCH": 0} if qkv else {}
        if M == 1 and K <= 1024:
            # one 16-byte chunk per thread per row: 8 rows a block keep 8 loads in flight (as 4 rows x 2 chunks
            # at K = 2048) and halve the blocks' x reads (Qwen3-0.6B decode 1.02x, traced; NOTES.md round 4)
            return 8, dict(geo, GEMV_ROWS=8, GEMV_UNROLL=1)
        if M == 1:
            # Every weight load a thread makes is issued before the wait when one pass of the block covers the
            # row: with 2 chunks a pass, Qwen3-0.6B's down projection (K = 3,072) took its last third after the
            # wait, an HBM round trip on the critical path (3.6 us there against 1.6 for the o projection,
            # whose bytes are 2/3 of it, NOTES.md round 5; Qwen3-0.6B decode 1.035x, GPT-2 1.02x, BENCHMARKS.md
            # item 19). Capped at 16 loads in flight a thread (registers).
            vec = 16 // ITEMSIZE[self.dtype]
            unroll = -(-K // (vec * GEMV_THREADS))
            if 2 < unroll <= 4 and (2 if gated else 1) * GEMV_ROWS * unroll <= 16:
                return GEMV_ROWS, dict(geo, GEMV_UNROLL=unroll)
        return GEMV_ROWS, geo

    def linear_act(self, x: DTensor, w: DTensor, b, kind: str) -> DTensor:
        """act(x @ w.T (+ b)): the activation as the GEMV's epilogue for a few tokens."""
        M = x.size // x.shape[-1] if x.shape[-1] else 0
        if M > GEMV_MAX_T or not self.fused:
            return self.act(self.linear(x, w, b), kind)
        return self._gemv_rows(x, [(w, b)], self._act_code(kind), f"linear_act({kind})")[0]

    def gated_linear(self, x: DTensor, wg: DTensor, bg, wu: DTensor, bu, kind: str) -> DTensor:
        """act(x @ wg.T (+ bg)) * (x @ wu.T (+ bu)): for a few tokens one GEMV reads both weights."""
        K, N = x.shape[-1], wg.shape[0]
        M = x.size // K if K else 0
        if M > GEMV_MAX_T or not self.fused:
            return self.gated_act(*self.linears(x, [(wg, bg), (wu, bu)]), kind)
        if wg.shape[1] != K or wu.shape != wg.shape:
            raise DeviceError(f"gated_linear: x has {K} features, gate {list(wg.shape)}, up {list(wu.shape)}")
        y = self._alloc(x.shape[:-1] + (N,))
        x, g, lb, eps, off, suffix = self._folded_norm(x)
        rows, geo = self._gemv_geometry(K, M, gated=True)
        fn = self._fn("gemv.cu", "gemv_gated" + suffix, "PPPPPPiiiiPPff", GEMV_MAX_T=1 if M == 1 else GEMV_MAX_T, **geo)
        if N:
            self._launch(f"gated_linear({kind})", fn, (-(-N // rows), 1, 1), (GEMV_THREADS, 1, 1),
                         y, x, wg, bg, wu, bu, M, N, K, self._act_code(kind), g, lb, float(eps), float(off))
        return y

    def _norm_rows(self, op, y, xsum, x, delta, w, b, D, rms, eps, offset):
        R = x.size // D
        threads = 32 * -(-D // (4 * NORM_VPT * 32))
        if (self.fused and D % 4 == 0 and threads <= 1024
                and all(t is None or t.ptr % 16 == 0 for t in (y, xsum, x, delta))):
            fn = self._fn("norm.cu", "norm_reg", "PPPPPPiiiff", NORM_VPT=NORM_VPT)
            self._launch(op, fn, (R, 1, 1), (threads, 1, 1), y, xsum, x, delta, w, b, R, D, int(rms), float(eps),
                         float(offset))
            return
        threads = 32 if D <= 256 else 128 if D <= 2048 else 256
        fn = self._fn("norm.cu", "norm_rows", "PPPPPPiiiff")
        self._launch(op, fn, (R, 1, 1), (threads, 1, 1), y, xsum, x, delta, w, b, R, D, int(rms), float(eps), float(offset))

    def _foldable(self, x, w, b, kind) -> bool:
        """Whether norm(x) can be left to the GEMV that reads it (one decode token, a gain of the row's width)."""
        D = x.shape[-1]
        return (self.fold and self.fused and (kind == "rmsnorm" or kind == "layernorm" and self.fold_ln)
                and x.size == D and D % 4 == 0 and w is not None and w.size == D and (b is None or kind == "layernorm"))

    def _lazy_norm(self, x, w, b, eps, offset, kind, op):
        def run():
            y = self._alloc(x.shape)
            self._norm_kind(op, y, None, x, None, w, b, eps, kind, offset)
            return y
        if kind == "layernorm":  # as _norm_kind: LayerNorm takes a bias and no weight offset
            if b is None:
                b = self._zeros_wt(x.shape[-1])
            return Lazy(x.shape, "norm", (x, w, b, float(eps), 0.0, "_ln"), run)
        return Lazy(x.shape, "norm", (x, w, None, float(eps), float(offset), "_norm"), run)

    def _zeros_wt(self, n: int) -> DTensor:
        """A zero vector [n] of the weight type (a LayerNorm without bias, folded)."""
        z = getattr(self, "_zero_bias", None)
        if z is None or z.size < n:
            if self.capture is not None:
                raise DeviceError("a zero bias must be allocated before a graph capture")
            alloc = self._mem_alloc(n * ITEMSIZE[self.dtype], "zero bias")
            self.drv.memset_d8(alloc, 0, n * ITEMSIZE[self.dtype])
            if z is not None and self._graph_cache is not None:
                self._graph_cache.clear()  # captured graphs may point at the old buffer, freed below
            z = self._zero_bias = DTensor(alloc, int(alloc), (n,), self.dtype)
        return z[:n] if z.size > n else z

    def norm(self, x: DTensor, w, b, eps, kind, offset=0.0) -> DTensor:
        if isinstance(x, Lazy):
            x = x.materialize()
        if self._foldable(x, w, b, kind):
            return self._lazy_norm(x, w, b, eps, offset, kind, "norm")
        y = self._alloc(x.shape)
        self._norm_kind("norm", y, None, x, None, w, b, eps, kind, offset)
        return y

    def add_norm(self, x: DTensor, delta: DTensor, w, b, eps, kind, offset=0.0):
        """(x + delta, norm(x + delta)) in one pass. At one decode token with RMSNorm, when delta is a GEMV
        not run yet, the add goes into that GEMV's epilogue and the norm into the next GEMV (no kernel here)."""
        if isinstance(x, Lazy):
            x = x.materialize()
        if (isinstance(delta, Lazy) and delta.pending and delta.kind == "linear" and self._foldable(x, w, b, kind)
                and delta.shape == x.shape):
            src, wd, bd = delta.args
            s = self._gemv_rows(src, [(wd, bd)], -1, "linear+residual(gemv)", resid=x)[0]
            return s, self._lazy_norm(s, w, b, eps, offset, kind, "norm")
        if isinstance(delta, Lazy):
            delta = delta.materialize()
        s, y = self._alloc(x.shape), self._alloc(x.shape)
        self._norm_kind("add_norm", y, s, x, delta, w, b, eps, kind, offset)
        return s, y

    def _norm_kind(self, op, y, xsum, x, delta, w, b, eps, kind, offset):
        # As the numpy reference: LayerNorm takes a bias and no weight offset; RMSNorm the reverse.
        if kind == "layernorm":
            self._norm_rows(op, y, xsum, x, delta, w, b, x.shape[-1], False, eps, 0.0)
        else:
            self._norm_rows(op, y, xsum, x, delta, w, None, x.shape[-1], True, eps, offset)

    def head_norm(self, x: DTensor, w, eps, offset=0.0) -> DTensor:
        """Per-head RMSNorm over the last axis of [T, H, Dh]."""
        y = self._alloc(x.shape)
        self._norm_rows("head_norm", y, None, x, None, w, None, x.shape[-1], True, eps, offset)
        return y

    def act(self, x: DTensor, kind: str) -> DTensor:
        y = self._alloc(x.shape)
        fn = self._fn("elementwise.cu", "act", "PPqi")
        self._launch(f"act({kind})", fn, self._grid1(x.size), (256, 1, 1), y, x, x.size, self._act_code(kind))
        return y

    def gated_act(self, gate: DTensor, up: DTensor, kind: str) -> DTensor:
        """act(gate) * up."""
        y = self._alloc(gate.shape)
        fn = self._fn("elementwise.cu", "gated_act", "PPPqi")
        self._launch(f"gated_act({kind})", fn, self._grid1(gate.size), (256, 1, 1), y, gate, up, gate.size,
                     self._act_code(kind))
        return y

    @staticmethod
    def _act_code(kind: str) -> int:
        if kind not in ACT_CODES:
            raise DeviceError(f"activation {kind!r} has no CUDA kernel (supported: {list(ACT_CODES)})")
        return ACT_CODES[kind]

    def _freq(self, inv_freq) -> DTensor:
        if isinstance(inv_freq, DTensor):
            return inv_freq
        arr = np.ascontiguousarray(inv_freq, dtype=np.float32)
        key = arr.tobytes()
        t = self._freqs.get(key)
        if t is None:
            if self.capture is not None:
                raise DeviceError("rope: inverse frequencies must be uploaded before a graph capture")
            t = self._freqs[key] = self.from_host(arr)
        return t

    def rope(self, x: DTensor, start: int, inv_freq) -> DTensor:
        """Rotate-half RoPE on [T, H, Dh] at positions start..start+T-1."""
        T, H, Dh = x.shape
        f = self._freq(inv_freq)
        y = self._alloc(x.shape)
        fn = self._fn("rope.cu", "rope", "PPPiPiii")
        self._launch("rope", fn, (T * H, 1, 1), (32 if Dh <= 64 else 64, 1, 1), y, x, f, start, self._start_dev(), T, H, Dh)
        return y

    def rope_cache_write(self, q: DTensor, k: DTensor, v: DTensor, cache: Cache, layer: int, start: int, inv_freq,
                         qk_norm=None) -> DTensor:
        """RoPE on q and k, k and v stored in the cache, the rotated q returned; qk_norm = (q weight, k weight,
        eps, offset) applies per-head RMSNorm to q and k first. One kernel (rope_kv) when fused."""
        T, H, Dh = q.shape
        Hkv = k.shape[1]
        if not self.fused or Dh % 2 or T > 65535:
            if qk_norm is not None:
                qw, kw, eps, off = qk_norm
                q, k = self.head_norm(q, qw, eps, off), self.head_norm(k, kw, eps, off)
            q, k = self.rope(q, start, inv_freq), self.rope(k, start, inv_freq)
            self.cache_write(cache, layer, k, v, start)
            return q
        self._check_room(cache, layer, start, T, "rope_cache_write")
        f = self._freq(inv_freq)
        qw, kw, eps, off = qk_norm if qk_norm is not None else (None, None, 0.0, 0.0)
        kc, vc = cache.k[layer], cache.v[layer]

        def run():
            if self._pending_rope is not None and self._pending_rope is me():  # another use came first
                self._pending = self._pending_rope = None
            qo = self._alloc(q.shape)
            fn = self._fn("rope.cu", "rope_kv", "PPPPPPPPPffiPiiiii")
            self._launch("rope_cache_write", fn, (-(-(H + Hkv) // 4), T, 1), (128, 1, 1), qo, q, k, v, kc, vc, f, qw,
                         kw, float(eps), float(off), start, self._start_dev(), T, H, Hkv, kc.shape[1], Dh)
            return qo
        me = lambda: None  # noqa: E731  (a weak reference to the Lazy below: no cycle keeps the cache alive)
        if T == 1 and H % Hkv == 0 and self._step_attention_ok(Dh, H // Hkv):
            # Deferred: attention() at this position folds the norm, RoPE and cache write into its kernel
            # (attn_decode_step); any other use of q, or any other launch first, runs rope_kv as before.
            lazy = Lazy(q.shape, "rope", (q, k, v, cache, layer, start, f, qw, kw, float(eps), float(off)), run)
            me = weakref.ref(lazy)
            self._defer(lazy.materialize)
            self._pending_rope = lazy
            return lazy
        return run()

    def _check_room(self, cache: Cache, layer: int, start: int, T: int, what: str) -> None:
        S = cache.k[layer].shape[1]
        if start + T > S:
            raise ContextOverflowError(f"{what}: positions {start}..{start + T - 1} do not fit the KV cache of {S} positions")

    def cache_write(self, cache: Cache, layer: int, k: DTensor, v: DTensor, start: int) -> None:
        """Store k, v [T, Hkv, Dh] at positions start..start+T-1. At one token (fused kernels) the write is
        deferred to the attention() that follows, whose kernel does it; any other launch first writes it."""
        T, Hkv, Dh = k.shape
        self._check_room(cache, layer, start, T, "cache_write")
        kc, vc = cache.k[layer], cache.v[layer]

        def run():
            fn = self._fn("kv.cu", "kv_write", "PPPPiPiiii")
            self._launch("cache_write", fn, (T * Hkv, 1, 1), (min(128, 32 * -(-Dh // 32)), 1, 1),
                         kc, vc, k, v, start, self._start_dev(), T, Hkv, kc.shape[1], Dh)
        if T == 1 and self.fused and not isinstance(k, Lazy) and not isinstance(v, Lazy):
            self._defer(run)
            self._pending_kv = (cache, layer, start, k, v)
            return
        run()

    # A cache write (with, for RoPE models, the q rotation) that the next attention() may fold into its kernel:
    # held in _pending until then; every other launch, copy to the host or synchronisation runs it first.
    def _defer(self, run) -> None:
        self._flush_pending()
        self._pending = run

    def _flush_pending(self) -> None:
        run = self._pending
        if run is not None:
            self._pending = self._pending_rope = self._pending_kv = None
            run()

    def _take_pending(self, q, cache: Cache, layer: int, start: int):
        """(raw q, new k, new v, inv_freq, q-norm, k-norm, eps, offset) of the write pending for this attention,
        which is taken over (no longer run by a flush); None when there is none to fold in."""
        lr, kv = self._pending_rope, self._pending_kv
        if lr is not None and q is lr and lr.pending:
            q0, k, v, c, layer0, start0, f, qw, kw, eps, off = lr.args
            if c is cache and layer0 == layer and start0 == start:
                self._pending = self._pending_rope = None
                return q0, k, v, f, qw, kw, eps, off
        if kv is not None and not isinstance(q, Lazy):
            c, layer0, start0, k, v = kv
            if c is cache and layer0 == layer and start0 == start:
                self._pending = self._pending_kv = None
                return q, k, v, None, None, None, 0.0, 0.0
        return None

    def _step_attention_ok(self, Dh: int, g: int) -> bool:
        """Whether one-token attention runs attn_decode_step (else attn_decode + attn_combine)."""
        return self.fused and g <= 128 and g * Dh <= 2048 and _decode_step_geometry(Dh, g, self.dtype)[1] <= 48 * 1024

    def attention(self, q: DTensor, cache: Cache, layer: int, start: int, scale: float,
                  window: int | None = None, softcap: float | None = None) -> DTensor:
        """Causal GQA attention of q [T, H, Dh] over cache positions 0..start+T-1 → [T, H, Dh].

        window: a query at position p sees only keys p-window+1..p; softcap: scores s → softcap·tanh(s/softcap).
        """
        win, cap = int(window or 0), float(softcap or 0.0)
        T, H, Dh = q.shape
        kc, vc = cache.k[layer], cache.v[layer]
        Hkv, S, _ = kc.shape
        if H % Hkv:
            raise DeviceError(f"attention: {H} query heads are not a multiple of {Hkv} key/value heads")
        self._check_room(cache, layer, start, T, "attention")
        g = H // Hkv
        fold = self._take_pending(q, cache, layer, start) if T == 1 and self._step_attention_ok(Dh, g) else None
        if fold is None:
            self._flush_pending()
            if isinstance(q, Lazy):
                q = q.materialize()
        out = self._alloc(q.shape)
        if fold is not None or (T == 1 and self._step_attention_ok(Dh, g)):
            # One launch: a block per (kv head, slice) for all its query heads; the last block of each kv head
            # merges the slices. The kernel splits the live keys evenly over the slices itself (it reads the
            # position from device memory), so a captured graph keeps one grid for every position. With `fold`
            # it also norms and rotates q and the new key and writes the new key and value to the cache.
            q0, knew, vnew, f, qw, kw, eps, off = fold if fold is not None else (q, None, None, None, None, None, 0.0, 0.0)
            threads, _, minchunk = _decode_step_geometry(Dh, g, self.dtype)
            n = S if self.capture is not None else start + 1
            n = min(n, win) if win else n
            nsplit = max(1, min(64, self._sm_count() // Hkv, -(-n // minchunk)))  # slices of >= DS_MINCHUNK keys
            part = self._alloc((Hkv, nsplit, g, 2 + Dh))
            fn = self._fn("attention.cu", "attn_decode_step", "PPPPPPPPPPPffiPiifif", HEAD_DIM=Dh, GROUP=g,
                          DS_THREADS=threads)
            self._launch("attention(decode)", fn, (Hkv, nsplit, 1), (threads, 1, 1), out, part, self._counters(Hkv),
                         q0, knew, vnew, kc, vc, f, qw, kw, float(eps), float(off), start, self._start_dev(), Hkv, S,
                         float(scale), win, cap)
        elif T == 1:
            # Slices of ~256 keys; a captured graph sizes them for the whole cache (positions change).
            n = S if self.capture is not None else start + 1
            n = min(n, win) if win else n
            nsplit = max(1, min(64, -(-n // 256)))
            part = self._alloc((H, nsplit, 2 + Dh))
            fn = self._fn("attention.cu", "attn_decode", "PPPPiPiiifif", HEAD_DIM=Dh)
            self._launch("attention(decode)", fn, (H, nsplit, 1), (128, 1, 1), part, q, kc, vc, start,
                         self._start_dev(), H, Hkv, S, float(scale), win, cap)
            fn = self._fn("attention.cu", "attn_combine", "PPii", HEAD_DIM=Dh)
            self._launch("attention(combine)", fn, (H, 1, 1), (min(128, 32 * -(-Dh // 32)), 1, 1), out, part, H, nsplit)
        elif self.attn == "tc" and self.attn_tc_available and Dh % 16 == 0 and Dh <= 256:
            fn = self._fn("attention_tc.cu", "attn_prefill_tc", "PPPPiPiiiifif", HEAD_DIM=Dh)
            smem = 2 * TC_FK * (Dh + 8) * 2 + TC_NW * (16 * (TC_FK + 4) * 4 + 16 * (TC_FK + 8) * 2 + 16 * (Dh + 4) * 4)
            if smem > 48 * 1024 and getattr(fn, "_smem", 0) < smem:
                fn.set_attribute(self.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                fn._smem = smem
            self._launch("attention(prefill_tc)", fn, (-(-T // TC_FQ), H, 1), (32 * TC_NW, 1, 1), out, q, kc, vc, start,
                         self._start_dev(), T, H, Hkv, S, float(scale), win, cap, shared=smem)
        else:
            fn = self._fn("attention.cu", "attn_prefill", "PPPPiPiiiifif", HEAD_DIM=Dh)
            dhp = Dh + 2 if Dh % 2 else Dh + 1
            smem = 4 * (PREFILL_NQ * Dh + PREFILL_BK * dhp + PREFILL_BK * Dh)
            if smem > 48 * 1024 and getattr(fn, "_smem", 0) < smem:
                fn.set_attribute(self.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                fn._smem = smem
            self._launch("attention(prefill)", fn, (-(-T // PREFILL_NQ), H, 1), (128, 1, 1), out, q, kc, vc, start,
                         self._start_dev(), T, H, Hkv, S, float(scale), win, cap, shared=smem)
        return out

    def _sm_count(self) -> int:
        if not hasattr(self, "_sms"):
            self._sms = self.device.get_attribute(self.drv.device_attribute.MULTIPROCESSOR_COUNT)
        return self._sms

    def _counters(self, n: int) -> DTensor:
        """int32 [>= n] of zeros that kernels count blocks in and leave at zero (attn_decode_step)."""
        c = getattr(self, "_counter_buf", None)
        if c is None or c.size < n:
            if self.capture is not None:
                raise DeviceError("attention: block counters must be allocated before a graph capture")
            alloc = self.drv.mem_alloc(4 * max(n, 256))
            self.drv.memset_d32(alloc, 0, max(n, 256))
            c = self._counter_buf = DTensor(alloc, int(alloc), (max(n, 256),), "int32")
        return c

    # -- decode steps ----------------------------------------------------------------------------
    def decode(self, forward, W, c, token: int, cache: Cache, start: int, inv_freq, greedy: bool = False):
        """Logits [V] for one new token at position `start` (greedy: the argmax id instead, as an int):
        replayed as a CUDA graph when enabled; with fused kernels a greedy graph ends in argmax_key, so only
        the id crosses to the host."""
        if self.graphs:
            from .graph import GraphCache

            if self._graph_cache is None:
                self._graph_cache = GraphCache(self)
            on_gpu = greedy and self.fused
            out = self._graph_cache.step(forward, W, c, token, cache, start, inv_freq, on_gpu)
            return int(np.argmax(out)) if greedy and not on_gpu else out
        logits = forward(self, W, c, np.asarray([token]), cache, start, inv_freq, all_logits=False)[-1]
        return int(np.argmax(logits)) if greedy else logits

    def decode_ids(self, forward, W, c, token: int, cache: Cache, start: int, inv_freq, count: int, params,
                   seen=(), seed=0):
        """An iterator of the ids of `count` decode steps from (token, start) picked on the GPU, with steps
        launched ahead of the host (CUDA graphs and fused kernels): greedy by an argmax, otherwise by
        GpuSampler (core/cuda/gpu_sampling.py: repetition penalty over `seen` and the ids it picks, temperature,
        top-k, top-p; random draws keyed by (seed, position), so a seed reproduces a run on the GPU, though
        not the numbers the CPU's generator draws). None when graphs or fused kernels are off (the caller
        then steps with decode())."""
        if not (self.graphs and self.fused):
            return None
        from .graph import GraphCache

        if self._graph_cache is None:
            self._graph_cache = GraphCache(self)
        sampler = None
        if not (params.greedy and params.repetition_penalty == 1.0):
            sampler = self._sampler(W.lm_head().shape[0])
            sampler.set_params(params, seed() if callable(seed) else seed)  # a callable: drawn only here
            sampler.set_seen(list(seen))
        return self._graph_cache.run(forward, W, c, token, cache, start, inv_freq, count, sampler)

    def _sampler(self, V: int):
        s = getattr(self, "_gpu_sampler", None)
        if s is None or s.V != V:
            from .gpu_sampling import GpuSampler

            if s is not None and self._graph_cache is not None:
                self._graph_cache.clear()  # captured graphs use the old sampler's buffers, freed with it
            s = self._gpu_sampler = GpuSampler(self, V)
        return s

    def argmax_key(self, x: DTensor) -> DTensor:
        """uint64 key of x's argmax (sample.cu; the id is 0xffffffff - the low word): stays on the GPU."""
        key = self._alloc((2,), "int32")
        self._check(lambda: self.drv.memset_d8_async(key.ptr, 0, 8, self.stream), "argmax")
        fn = self._fn("sample.cu", "argmax_key", "PPi")
        self._launch("argmax", fn, (max(1, min(-(-x.size // 1024), 264)), 1, 1), (256, 1, 1), key, x, x.size)
        return key

    @staticmethod
    def key_to_id(key: np.ndarray) -> int:
        """The id in an argmax key read back as int32 [2] (little-endian: low word first)."""
        return 0xFFFFFFFF - int(np.asarray(key).view(np.uint32)[0])
