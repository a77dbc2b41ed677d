"""A plugin's own operations (core/custom_ops.py) on the GPU: be.custom(op, *tensors, **scalars) compiles the
op's .cu through modules.py (by absolute path: same flags, WDTYPE, module cache) and calls op.launch with a
Kernels launcher, which goes through the backend's public kernel(), alloc() and launch(): its kernels run on the
one stream, are captured into decode CUDA graphs like core's own, and a failure names the op.
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceError
from .geometry import grid1
from .tensors import DTensor


class Kernels:
    """What op.launch gets: the kernels of one op's .cu file and the backend's buffers and launches.

    function(name, fmt): the kernel `name` of the op's cuda_source, built with WDTYPE = the weight type and
    prepared with PyCUDA argument format `fmt` ("P" pointer, "i" int, "q" long long, "f" float, ...), compiled
    once per process. empty(shape, dtype="float32"): a fresh activation buffer. launch(fn, grid, block, *args,
    shared=0): DTensor arguments pass their pointers (None a null pointer). grid1(n, block=256): a 1-D grid for a
    grid-stride loop over n elements. dtype: the weight type of the backend."""

    def __init__(self, be, op):
        self.be, self.op, self.dtype = be, op, be.dtype
        self.file = str(op.source_path)
        self.grid1 = grid1

    def function(self, name: str, fmt: str):
        """The prepared kernel `name` of the op's .cu file."""
        return self.be.kernel(self.file, name, fmt)

    def empty(self, shape, dtype: str = "float32") -> DTensor:
        """A fresh activation buffer of `shape` (pooled; kept alive by a graph being captured)."""
        return self.be.alloc(tuple(shape), dtype)

    def launch(self, fn, grid, block, *args, shared: int = 0) -> None:
        """fn on the backend's stream as op "custom(<name>)"."""
        self.be.launch(f"custom({self.op.name})", fn, grid, block, *args, shared=shared)


class CustomMixin:
    """CudaBackend's custom ops (see the module docstring). Uses the backend's dtype; kernel() / launch()
    (launch.py), alloc() / from_host() (memory.py)."""

    def custom(self, op, *args, **scalars) -> DTensor:
        """CustomOp `op` on device tensors (host arrays are uploaded as float32 activations): op.launch with a
        Kernels launcher → the DTensor it returns."""
        if op.cuda_source is None or op.launch is None:
            raise DeviceError(f"custom op {op.name!r} has no CUDA kernel (its CustomOp gives no cuda_source and "
                              f"launch); run it on the numpy backend (device='cpu')")
        args = tuple(self.from_host(a) if isinstance(a, np.ndarray) else a for a in args)
        out = op.launch(Kernels(self, op), *args, **scalars)
        if not isinstance(out, DTensor):
            raise DeviceError(f"custom op {op.name!r}: launch returned {type(out).__name__}, not a device tensor "
                              f"(make it with kernels.empty)")
        return out
