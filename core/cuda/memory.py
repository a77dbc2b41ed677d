"""Memory: pooled activation buffers, plain allocations, and copies between host and device.

Activations come from the backend's DeviceMemoryPool, so a decode step allocates nothing from the driver;
weights, the KV cache and other long-lived buffers are plain allocations that the room making them keeps and
frees. With `poison` (ARCHKIT_CUDA_POISON=1) every fresh activation buffer is filled with NaN first, so an
element a kernel fails to write shows up in the result.
"""

from __future__ import annotations

import atexit
import gc
import math
import weakref

import numpy as np

from ..checkpoint import to_float32
from ..errors import DeviceMemoryError
from .tensors import ITEMSIZE, DTensor, Lazy


def mib(n: int) -> str:
    """n bytes in MiB, for messages ("1,024.0 MiB")."""
    return f"{n / (1 << 20):,.1f} MiB"


def stop_pool_at_exit(be) -> None:
    """At interpreter exit, while the CUDA context still exists, collect what is garbage and make the backend's
    DeviceMemoryPool stop holding blocks: registered after PyCUDA's exit hook (which pops the context), so it runs
    first. A pool that still holds blocks when the interpreter tears it down aborts the process ("terminate called
    ... explicit_context_dependent failed: no currently active context?", inducer/pycuda#74, whose workaround this
    is; the message that ends engine runs on CUDA here). Blocks still in use then go straight to the driver when
    their owners are collected, which PyCUDA tolerates on a dead context."""
    ref = weakref.ref(be)
    atexit.register(_stop_pool, ref)


def _stop_pool(ref) -> None:
    be = ref()
    if be is None:
        return
    try:
        gc.collect()
        be.pool.stop_holding()
    except Exception:  # noqa: BLE001 - exiting anyway; a failed clean-up must not hide the real exit status
        pass


class MemoryMixin:
    """CudaBackend's allocations and host <-> device copies (see the module docstring).

    Uses the backend's drv, pool, stream, device, capture and poison; check() and synchronize() (launch.py),
    flush_pending() (deferred.py)."""

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        return self.drv.mem_get_info()

    def oom(self, need: int, what: str) -> DeviceMemoryError:
        """A DeviceMemoryError saying that `what` needs `need` bytes and how much is free."""
        free, total = self.mem_info()
        return DeviceMemoryError(f"out of GPU memory for {what}: needs {mib(need)}, {mib(free)} free of "
                                 f"{mib(total)} on {self.device.name()}")

    def alloc(self, shape, dtype: str = "float32") -> DTensor:
        """A pooled activation buffer (NaN-filled when poisoning)."""
        n = math.prod(shape) * ITEMSIZE[dtype]
        try:
            buf = self.pool.allocate(max(n, 16))
        except self.drv.MemoryError:
            raise self.oom(n, f"an activation of shape {tuple(shape)}") from None
        t = DTensor(buf, int(buf), shape, dtype)
        if self.capture is not None:
            self.capture.keep.append(t)  # a captured graph keeps using this address
        if self.poison and n:
            self.drv.memset_d8_async(t.ptr, 0xFF, n, self.stream)  # all-ones bits: NaN in fp32/fp16/bf16
        return t

    def mem_alloc(self, nbytes: int, what: str):
        """A plain allocation of nbytes (its caller keeps and frees it); out of memory names `what`."""
        try:
            return self.drv.mem_alloc(max(nbytes, 16))
        except self.drv.MemoryError:
            raise self.oom(nbytes, what) from None

    def from_host(self, x: np.ndarray) -> DTensor:
        """Upload a host array as a float32 (or, for integer input, int32) activation."""
        x = np.asarray(x)
        dtype = "int32" if np.issubdtype(x.dtype, np.integer) else "float32"
        x = np.ascontiguousarray(x, dtype=np.int32 if dtype == "int32" else np.float32)
        t = self.alloc(x.shape, dtype)
        if x.size:
            self.check(lambda: self.drv.memcpy_htod_async(t.ptr, x, self.stream), "upload")
        return t

    def to_host(self, x) -> np.ndarray:
        """A float32 numpy copy of a backend tensor (waits for the GPU)."""
        if isinstance(x, np.ndarray):
            return np.asarray(x, dtype=np.float32)
        if isinstance(x, Lazy):
            x = x.materialize()
        self.flush_pending()
        if self.capture is not None:
            return self.capture.output(x)
        self.synchronize("to_host")
        raw = np.empty(x.shape, {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
                                 "int32": np.int32}[x.dtype])
        if x.size:
            self.check(lambda: self.drv.memcpy_dtoh(raw, x.ptr), "to_host")
        return to_float32(raw, "BF16") if x.dtype == "bfloat16" else raw.astype(np.float32, copy=False)
