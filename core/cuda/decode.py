"""Decode steps: one token at a time as a replayed CUDA graph (graph.py), or many ids picked on the GPU and
launched ahead of the host (greedy by argmax_key, sampled by gpu_sampling.py).

Kernels that need the position read it from device memory when given start_dev() (launch.py), because a
graph bakes its launch arguments in; graph.py captures a step by running the ordinary forward pass with
`capture` set. A rope table that changes with the length (dynamic NTK, longrope) is bound before each step
(norm_rope.bind_rope: one persistent buffer the graph reads); such models step one token at a time from the host
(decode_ids declines), since the host binds each step's table.
"""

from __future__ import annotations

import atexit
import gc
import weakref

import numpy as np

from ..backend import Cache
from ..errors import DeviceError
from .gpu_sampling import GpuSampler, nonfinite_error, pick
from .graph import GraphCache
from .tensors import DTensor, Lazy


class DecodeMixin:
    """CudaBackend's decode steps (see the module docstring).

    State (the facade gives it its first value): _graph_cache, the GraphCache (made on first use);
    _gpu_sampler, made on first sampled run. Uses the backend's graphs, fused, drv and stream; alloc()
    (memory.py), kernel() / launch() / check() (launch.py), bind_rope() (norm_rope.py)."""

    def decode(self, forward, W, c, token: int, cache: Cache, start: int, rope, greedy: bool = False):
        """Logits [V] for one new token at position `start` (greedy: the argmax id instead, as an int):
        replayed as a CUDA graph when enabled; with fused kernels a greedy graph ends in argmax_key, so only
        the id crosses to the host. `rope` is the model's RopeConfig (None without RoPE): forward takes the
        step's table from it; one that changes with the length is bound first (norm_rope.bind_rope), so that
        a replayed graph reads this step's frequencies."""
        if self.graphs:
            if self._graph_cache is None:
                self._graph_cache = GraphCache(self)
                free_at_exit(self)
            if getattr(rope, "dynamic", False):
                self.bind_rope(rope.table(c.head_dim, start + 1))  # the table forward takes at T = 1
            on_gpu = greedy and self.fused
            out = self._graph_cache.step(forward, W, c, token, cache, start, rope, on_gpu)
            return pick(out) if greedy and not on_gpu else out
        logits = forward(self, W, c, np.asarray([token]), cache, start, rope, all_logits=False)[-1]
        return pick(logits) if greedy else logits

    def decode_ids(self, forward, W, c, token: int, cache: Cache, start: int, rope, count: int, params,
                   seen=(), seed=0):
        """An iterator of the ids of `count` decode steps from (token, start) picked on the GPU, with steps
        launched ahead of the host (CUDA graphs and fused kernels): greedy by an argmax, otherwise by
        GpuSampler (core/cuda/gpu_sampling.py: repetition penalty over `seen` and the ids it picks, temperature,
        top-k, top-p; random draws keyed by (seed, position), so a seed reproduces a run on the GPU, though
        not the numbers the CPU's generator draws). None when graphs or fused kernels are off, or when the rope
        table changes with the length (dynamic NTK, longrope: each step's table is bound from the host, which
        steps launched ahead would outrun); the caller then steps with decode()."""
        if not (self.graphs and self.fused) or getattr(rope, "dynamic", False):
            return None
        if self._graph_cache is None:
            self._graph_cache = GraphCache(self)
            free_at_exit(self)
        sampler = None
        if not (params.greedy and params.repetition_penalty == 1.0):
            sampler = self._sampler(W.lm_head().shape[0])
            sampler.set_params(params, seed() if callable(seed) else seed)  # a callable: drawn only here
            sampler.set_seen(list(seen))
        return self._graph_cache.run(forward, W, c, token, cache, start, rope, count, sampler)

    def _sampler(self, V: int):
        """The GpuSampler for a vocabulary of V (a new one, and no graph of the old, when V changes)."""
        s = getattr(self, "_gpu_sampler", None)
        if s is None or s.V != V:
            if s is not None and self._graph_cache is not None:
                self._graph_cache.clear()  # captured graphs use the old sampler's buffers, freed with it
            s = self._gpu_sampler = GpuSampler(self, V)
        return s

    def drop_sampler(self) -> None:
        """Forget the GPU sampler (its buffers are freed with it); the next sampled run makes a new one."""
        if self._graph_cache is not None:
            self._graph_cache.clear()  # captured sampled steps use its buffers
        self._gpu_sampler = None

    def clear_graphs(self) -> None:
        """Destroy every captured decode step (the next ones capture anew): after flipping a switch, or before
        freeing a buffer a graph uses."""
        if self._graph_cache is not None:
            self._graph_cache.clear()
        self.clear_batch_graphs()

    def argmax_key(self, x: DTensor) -> DTensor:
        """uint64 key of x's argmax (sample.cu; the id is 0xffffffff - the low word): stays on the GPU."""
        key = self.alloc((2,), "int32")
        self.check(lambda: self.drv.memset_d8_async(key.ptr, 0, 8, self.stream), "argmax")
        fn = self.kernel("sample.cu", "argmax_key", "PPi")
        self.launch("argmax", fn, (max(1, min(-(-x.size // 1024), 264)), 1, 1), (256, 1, 1), key, x, x.size)
        return key

    def argmax_rows(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [R], bad bool [R]) for logits x [R, V] on the GPU (float32): each row's argmax, numpy's
        (first index of the largest), found by sample.cu's argmax_rows, and whether the row's logits were not
        finite (NaN or +inf anywhere, or all -inf: the rule of gpu_sampling.pick). Only 8 bytes a row cross to the
        host, instead of the row: the engine's greedy rows."""
        if isinstance(x, Lazy):
            x = x.materialize()
        self.flush_pending()
        if not isinstance(x, DTensor):
            x = self.from_host(np.ascontiguousarray(x, np.float32))
        elif x.dtype != "float32":
            raise DeviceError(f"argmax_rows needs float32 logits, got {x.dtype}")
        R, V = (x.shape[0], x.shape[-1]) if len(x.shape) > 1 else (1, x.shape[0])
        if R == 0:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        keys = self.alloc((2 * R,), "int32")
        fn = self.kernel("sample.cu", "argmax_rows", "PPi")
        self.launch("argmax_rows", fn, (R, 1, 1), (1024 if V >= 4096 else 256, 1, 1), keys, x, V)
        self.synchronize("argmax_rows")
        raw = np.empty(2 * R, np.int32)
        self.check(lambda: self.drv.memcpy_dtoh(raw, keys.ptr), "argmax_rows")
        raw = raw.view(np.uint32).reshape(R, 2)
        lo, hi = raw[:, 0].astype(np.int64), raw[:, 1]
        bits = np.where(hi & 0x80000000, hi & 0x7FFFFFFF, ~hi)  # undo the order-preserving map
        return 0xFFFFFFFF - lo, (bits & 0x7F800000) == 0x7F800000

    @staticmethod
    def key_to_id(key: np.ndarray) -> int:
        """The id in an argmax key read back as int32 [2] (little-endian: low word first). The high word is the
        largest logit itself (sample.cu's order-preserving map, every NaN on top), so a NaN, +inf or an all -inf
        row is caught from the same 8 bytes, with no extra copy or sync: NonFiniteLogitsError, not a silent token."""
        lo, hi = (int(w) for w in np.asarray(key).view(np.uint32)[:2])
        bits = (hi & 0x7FFFFFFF) if hi & 0x80000000 else (~hi & 0xFFFFFFFF)  # undo the map onto unsigned ints
        if bits & 0x7F800000 == 0x7F800000:  # exponent all ones: inf or NaN
            raise nonfinite_error()
        return 0xFFFFFFFF - lo


def free_at_exit(be) -> None:
    """Free the backend's graphs, their page-locked buffers and events, and the GPU sampler at interpreter exit,
    while the CUDA context still exists: registered after PyCUDA's own exit hook (which pops the context), so it
    runs first (atexit is last in, first out). Left to the garbage collector at shutdown, after the context is
    gone, their destructors made PyCUDA abort the process ("explicit_context_dependent failed")."""
    ref = weakref.ref(be)

    def free() -> None:
        b = ref()
        if b is None:
            return
        try:
            b.clear_graphs()
            b.clear_batch_graphs()
            b.drop_sampler()
        except Exception:  # noqa: BLE001 - exiting anyway; a failed clean-up must not hide the real exit status
            pass
        gc.collect()

    atexit.register(free)
