"""Per-row sampling on the GPU: the backend's room for row_sampler.py (which explains it), so that the engine can ask
any backend for `sample_rows` and sample on the host when it has none or it declines.
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceError
from .row_sampler import RowSampler, free_at_exit
from .tensors import DTensor, Lazy


class RowSamplingMixin:
    """CudaBackend's per-row GPU sampling for the engine (see row_sampler.py).

    State (the facade gives it its first value): _row_sampler, the RowSampler (made on first use, anew when V
    changes; freed by drop_row_sampler, which release() calls, and at exit). Uses the backend's graphs, fused,
    capture, drv, device and stream; alloc() / mem_alloc() / from_host() / to_host() (memory.py), kernel() /
    launch() / check() / synchronize() (launch.py), flush_pending() (deferred.py)."""

    def sample_rows(self, logits, rows, rope):
        """(ids int64 [R], bad bool [R]) for logits float32 [R, V] (on the GPU) and R row tuples (key, params, seed,
        counter, tokens), each sampled by RowSampler (row_sampler.py) as the solo run's GpuSampler would; None when
        GPU sampling does not apply (graphs or fused kernels off, or a rope table that changes with the length):
        the conditions of decode_ids, so a batched run picks the way its solo run does."""
        if not (self.graphs and self.fused) or getattr(rope, "dynamic", False):
            return None
        if isinstance(logits, Lazy):
            logits = logits.materialize()
        self.flush_pending()
        if not isinstance(logits, DTensor):
            logits = self.from_host(np.ascontiguousarray(logits, np.float32))
        elif logits.dtype != "float32":
            raise DeviceError(f"sample_rows needs float32 logits, got {logits.dtype}")
        V = logits.shape[-1]
        s = self._row_sampler
        if s is None or s.V != V:
            self.drop_row_sampler()
            s = self._row_sampler = RowSampler(self, V)
            free_at_exit(s)
        return s.sample(logits, rows)

    def drop_row_sampler(self) -> None:
        """Free the row sampler's buffers (release() and exit call this); the next sample_rows makes a new one."""
        if self._row_sampler is not None:
            self._row_sampler.free()
            self._row_sampler = None
