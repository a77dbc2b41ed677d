"""Device tensors: DTensor (an allocation, a pointer into it, shape and dtype), Lazy (a decode-sized result
not computed yet, which the kernel that reads it may fold in) and QTensor (a weight kept quantized).

Every room of the CUDA backend passes these around, and so do graph.py and gpu_sampling.py; nothing here
touches the driver.
"""

from __future__ import annotations

import math

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4}


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


class QTensor:
    """A weight [N, K] kept quantized in GPU memory, in core/cuda/qlayout.py's layout (loading.py uploads a Packed):
    `kind` ("int4", "int8", "fp8"), `sdtype` (the scales' dtype, which gemv_q.cu rounds the weight to), the layout's
    kp / lg / G / srow, and the device pointers of its words, scales, zero points and act-order permutation (0: none).
    linear.py routes every product with one to qlinear.py. A stack of experts' weights [E, N, K] (qlayout.py's
    stacked layout, never permuted) is read by moe.py, whole (moe_q.cu) or one expert at a time (`expert`)."""

    __slots__ = ("shape", "kind", "sdtype", "kp", "lg", "G", "srow", "q", "s", "z", "perm", "nbytes")
    quantized = True  # core/bench_shapes.py counts its nbytes, not size x the dtype's

    def __init__(self, shape, kind: str, sdtype: str, kp: int, lg: int, G: int, srow: int, ptrs, nbytes: int):
        self.shape, self.kind, self.sdtype = tuple(int(d) for d in shape), kind, sdtype
        self.kp, self.lg, self.G, self.srow, self.nbytes = kp, lg, G, srow, nbytes
        self.q, self.s, self.z, self.perm = ptrs  # int device pointers; z and perm 0 when absent

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # the dense weight's elements (nbytes: what the GPU holds)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def strides(self) -> tuple[int, int, int]:
        """Elements from one expert to the next in a stack: (words, scales, zero points) = (N Kp / per, R G, N G)."""
        n = self.shape[-2]
        per = 32 // (4 if self.kind == "int4" else 8)
        return n * self.kp // per, -(-n // min(self.srow, n)) * self.G if n else 0, n * self.G

    def expert(self, e: int) -> QTensor:
        """Expert e of a stack [E, N, K]: a QTensor [N, K] viewing its words, scales and zero points."""
        words, scales, zeros = self.strides
        z = self.z + e * zeros if self.z else 0
        ptrs = (self.q + 4 * e * words, self.s + ITEMSIZE[self.sdtype] * e * scales, z, 0)
        return QTensor(self.shape[1:], self.kind, self.sdtype, self.kp, self.lg, self.G, self.srow, ptrs,
                       self.nbytes // self.shape[0])

    def layout_key(self) -> tuple:
        """What weights read by one launch must share (one x, one scale geometry): kind, scale dtype, K, kp, lg, G,
        srow; a permuted one shares with none (its x is its own permutation)."""
        own = id(self) if self.perm else None
        return (self.kind, self.sdtype, self.shape[-1], self.kp, self.lg, self.G, self.srow, own)

    def __repr__(self):
        return f"QTensor({self.kind}, {self.sdtype} scales, {list(self.shape)}, {self.nbytes:,} bytes)"
