"""One generation at a time per CUDA model, from any thread.

A CudaBackend owns one preallocated KV cache and one set of decode buffers (baked into its CUDA graph),
so two generations on the same model cannot overlap: another thread waits its turn, and the same thread
starting a second generation before finishing the first gets a DeviceError rather than corrupted output.
PyCUDA makes the primary context current only in the thread that imported pycuda.autoprimaryctx, so
each session pushes it in other threads.
"""

from __future__ import annotations

import threading

from ..errors import DeviceError


class Session:
    """Context manager returned by CudaBackend.session()."""

    def __init__(self, backend):
        self.be = backend
        self.pushed = False

    def __enter__(self):
        lock, me = self.be.session_lock, threading.get_ident()
        if self.be.session_owner == me:
            raise DeviceError("this model is already generating in this thread (its GPU KV cache is in use); "
                              "finish or close that generator first, or load the model twice")
        lock.acquire()
        try:
            self.be.session_owner = me
            cur, ctx = self.be.drv.Context.get_current(), self.be.primary_context
            if cur is None or getattr(cur, "handle", cur) != getattr(ctx, "handle", ctx):
                ctx.push()
                self.pushed = True
        except BaseException:
            self.be.session_owner = None
            lock.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self.pushed:
                self.be.drv.Context.pop()
        finally:
            self.be.session_owner = None
            self.be.session_lock.release()
        return False
