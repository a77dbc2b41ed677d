"""Launches: the kernel cache, kernel launches on the backend's one stream, synchronisation, and CUDA errors
pinned to the op that caused them.

Every kernel comes from kernel(file, name, fmt, **defines) (compiled once per process by modules.py, prepared
once per backend) and goes on the one stream through launch(), so operations are ordered without host syncs.
ARCHKIT_CUDA_SYNC=1 (sync_each) synchronises after every launch, so an asynchronous CUDA error is reported
against the op that caused it; otherwise synchronize() names the last op launched.
"""

from __future__ import annotations

from os.path import isabs

from ..errors import DeviceError
from . import pdl
from .modules import get_module
from .tensors import DTensor

# Kernels that call pdl_wait() before touching anything another kernel writes (common.cuh), so they may be
# launched with programmatic stream serialization inside a decode graph. Core's own files only: a plugin's
# kernel (a module given by absolute path, core/custom_ops.py) never is, whatever its name.
PDL_KERNELS = frozenset({"embed", "norm_rows", "norm_reg", "head_norm", "rope", "rope_kv", "add", "act", "gated_act",
                         "soft_cap", "clamp", "scale", "sigmoid_gate",
                         "kv_write", "gemv_rows", "gemv_gated", "gemv_rows_norm", "gemv_gated_norm",
                         "gemv_rows_ln", "gemv_gated_ln",
                         "qgemv_int4", "qgemv_int8", "qgemv_fp8", "qgemv_gated_int4", "qgemv_gated_int8",
                         "qgemv_gated_fp8",
                         "attn_decode_step", "step_advance", "moe_route", "moe_gate_up", "moe_up", "moe_down"})


class LaunchMixin:
    """CudaBackend's kernel cache, launches and error reporting (see the module docstring).

    State (the facade gives it its first value): _wcode, the weight type's WDTYPE code; _fns, prepared kernels
    by (file, kernel, defines); _last_op, the op launched last (for error messages). Uses the backend's drv,
    stream, capture, pdl and sync_each, and flush_pending() (deferred.py): a launch runs any deferred write
    first."""

    def synchronize(self, what: str = "synchronize") -> None:
        """Wait for the stream; an asynchronous CUDA error becomes a DeviceError naming the last op."""
        self.flush_pending()
        try:
            self.stream.synchronize()
        except self.drv.Error as e:
            raise DeviceError(f"CUDA error surfaced at {what} after op {self._last_op!r} "
                              f"(set ARCHKIT_CUDA_SYNC=1 to pin it to its op): {e}") from None

    def check(self, fn, op: str):
        """fn(), with a CUDA error turned into a DeviceError naming `op`."""
        try:
            return fn()
        except self.drv.Error as e:
            raise DeviceError(f"CUDA op {op!r} failed: {e}") from None

    def kernel(self, file: str, kernel: str, fmt: str, **defines):
        """The prepared kernel `kernel` of `file` built with `defines` (WDTYPE: the weight type unless given),
        made once per backend; `fmt` is its PyCUDA argument format."""
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

    def launch(self, op: str, fn, grid, block, *args, shared: int = 0) -> None:
        """Launch fn on the stream as op `op` (the name errors and profiles use): DTensor arguments pass their
        pointers, None a null pointer. While capturing, PDL_KERNELS launch with programmatic dependent launch."""
        self.flush_pending()  # a deferred cache write runs before any other launch
        args = [a.ptr if isinstance(a, DTensor) else (0 if a is None else a) for a in args]
        if self.capture is not None and self.pdl and fn._archkit[1] in PDL_KERNELS and not isabs(fn._archkit[0]):
            file, kernel, defines, fmt = fn._archkit
            rc = pdl.launch(pdl.function(file, kernel, defines), fmt, grid, block, self.stream.handle, args, shared)
            if rc != 0:
                raise DeviceError(f"CUDA op {op!r} failed to launch with programmatic dependent launch "
                                  f"(grid {grid}, block {block}, CUresult {rc})")
            self.after_op(op)
            return
        try:
            fn.prepared_async_call(grid, block, self.stream, *args, shared_size=shared)
        except self.drv.Error as e:
            raise DeviceError(f"CUDA op {op!r} failed to launch (grid {grid}, block {block}): {e}") from None
        self.after_op(op)

    def after_op(self, op: str) -> None:
        """Remember the op for error messages; under ARCHKIT_CUDA_SYNC=1 pin an asynchronous error on it."""
        self._last_op = op
        if self.sync_each and self.capture is None:
            try:
                self.stream.synchronize()
            except self.drv.Error as e:
                raise DeviceError(f"CUDA op {op!r} failed: {e}") from None

    def start_dev(self):
        """Device pointer the kernels read the position from while capturing, else None."""
        return self.capture.start_ptr if self.capture is not None else None
