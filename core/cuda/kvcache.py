"""The KV cache: one allocation preallocated for the model's context and lent to one Cache at a time, and the
kv_write kernel that stores new keys and values in it.

finish_loading sizes it (preallocate_kv: `context` if given, else max_position_embeddings capped by the free
memory less WORKSPACE_RESERVE); new_cache lends it when it is big enough and no live Cache holds it, else makes
a separate one. Layout: per layer, k then v, each [Hkv, positions, Dh] in the backend's dtype.
"""

from __future__ import annotations

import weakref

from ..backend import Cache
from ..errors import ContextOverflowError
from ..paged import Batch
from .tensors import ITEMSIZE, DTensor, Lazy

WORKSPACE_RESERVE = 512 << 20    # bytes left free beside the default KV cache for activations


class KVCacheMixin:
    """CudaBackend's KV cache (see the module docstring).

    State (the facade gives it its first value): _kv, the preallocated cache as (key, capacity, allocation,
    k views, v views) or None; _lent, a weakref to the Cache using its buffers. Uses the backend's context,
    dtype, poison, drv, stream and fused; mem_info() / mem_alloc() (memory.py), kernel() / launch() /
    start_dev() (launch.py), defer() / flush_pending() (deferred.py), paged_cache_write() (paged.py)."""

    def _bytes_per_position(self, config) -> int:
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * ITEMSIZE[self.dtype]

    def _default_context(self, config) -> int:
        """`context` if given, else the model's context limit (max_position_embeddings; times the factor for dynamic
        NTK rope) capped by free memory (at least 1)."""
        if self.context is not None:
            return self.context
        free, _ = self.mem_info()
        fits = (free - WORKSPACE_RESERVE) // self._bytes_per_position(config)
        return int(max(1, min(config.context_limit, fits)))

    def _make_kv(self, config, length: int):
        per = self._bytes_per_position(config)
        alloc = self.mem_alloc(per * length, f"a KV cache of {length} positions ({per:,} bytes each)")
        L, Hkv, Dh = config.num_layers, config.num_kv_heads, config.head_dim
        one = Hkv * length * Dh * ITEMSIZE[self.dtype]
        k = [DTensor(alloc, int(alloc) + 2 * i * one, (Hkv, length, Dh), self.dtype) for i in range(L)]
        v = [DTensor(alloc, int(alloc) + (2 * i + 1) * one, (Hkv, length, Dh), self.dtype) for i in range(L)]
        return ((L, Hkv, Dh), length, alloc, k, v)

    def preallocate_kv(self, config) -> None:
        """Make the cache new_cache lends, sized for the model's context (finish_loading), unless made already."""
        if self._kv is None:
            self._kv = self._make_kv(config, self._default_context(config))

    def free_kv(self) -> None:
        """Free the preallocated cache (release)."""
        if self._kv is not None:
            self._kv[2].free()
            self._kv = None

    def new_cache(self, config, length: int) -> Cache:
        """A cache for `length` positions: the preallocated one when it is big enough and not in use."""
        self.flush_pending()
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

    @property
    def kv_positions(self) -> int:
        """Positions the preallocated KV cache holds (0 before loading)."""
        return 0 if self._kv is None else self._kv[1]

    def check_room(self, cache: Cache, layer: int, start: int, T: int, what: str) -> None:
        """A ContextOverflowError unless positions start..start+T-1 fit the cache (`what` names the op)."""
        S = cache.k[layer].shape[1]
        if start + T > S:
            raise ContextOverflowError(f"{what}: positions {start}..{start + T - 1} do not fit the KV cache of {S} positions")

    def cache_write(self, cache: Cache, layer: int, k: DTensor, v: DTensor, start: int) -> None:
        """Store k, v [T, Hkv, Dh] at positions start..start+T-1. At one token (fused kernels) the write is
        deferred to the attention() that follows, whose kernel does it; any other launch first writes it.
        A core.paged.Batch as `start` (with a paged cache): each row at its own slot (paged.py)."""
        if isinstance(start, Batch):
            self.paged_cache_write(cache, layer, k, v, start)
            return
        T, Hkv, Dh = k.shape
        self.check_room(cache, layer, start, T, "cache_write")
        kc, vc = cache.k[layer], cache.v[layer]

        def run():
            fn = self.kernel("kv.cu", "kv_write", "PPPPiPiiii")
            self.launch("cache_write", fn, (T * Hkv, 1, 1), (min(128, 32 * -(-Dh // 32)), 1, 1),
                        kc, vc, k, v, start, self.start_dev(), T, Hkv, kc.shape[1], Dh)
        if T == 1 and self.fused and not isinstance(k, Lazy) and not isinstance(v, Lazy):
            self.defer(run, kv=(cache, layer, start, k, v))
            return
        run()
