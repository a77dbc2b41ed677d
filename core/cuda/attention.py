"""Attention: causal GQA attention of q over the KV cache, with sliding windows and logit soft-capping.

One token (decode): attn_decode_step, one launch of a block per (kv head, slice) for the group's query heads,
which also takes over a held cache write (deferred.py: the q/k norm, RoPE and the K/V write of the step); past
48 KB of shared memory, or with fused kernels off, attn_decode + attn_combine. Several tokens (prefill): the
tensor-core kernel (attention_tc.cu) for half-precision caches and head sizes that are multiples of 16 (`attn`
"tc"), else the SIMT kernel (attention.cu).
"""

from __future__ import annotations

from ..backend import Cache
from ..errors import DeviceError
from ..paged import Batch
from .geometry import PREFILL_BK, PREFILL_NQ, TC_FK, TC_FQ, TC_NW, decode_step_geometry
from .tensors import DTensor, Lazy


class AttentionMixin:
    """CudaBackend's attention (see the module docstring).

    State (made on first use): _sms, the device's multiprocessor count; _counter_buf, attn_decode_step's block
    counters. Uses the backend's dtype, fused, attn, capture, drv and device; alloc() (memory.py), kernel() /
    launch() / start_dev() (launch.py), take_pending() / flush_pending() (deferred.py), check_room()
    (kvcache.py), paged_attention() (paged.py)."""

    @property
    def attn_tc_available(self) -> bool:
        """Whether the tensor-core prefill attention can run (a half-precision cache)."""
        return self.dtype != "float32"

    def step_attention_ok(self, Dh: int, g: int) -> bool:
        """Whether one-token attention runs attn_decode_step (else attn_decode + attn_combine)."""
        return self.fused and g <= 128 and g * Dh <= 2048 and decode_step_geometry(Dh, g, self.dtype)[1] <= 48 * 1024

    def attention(self, q: DTensor, cache: Cache, layer: int, start: int, scale: float,
                  window: int | None = None, softcap: float | None = None) -> DTensor:
        """Causal GQA attention of q [T, H, Dh] over cache positions 0..start+T-1 → [T, H, Dh].

        window: a query at position p sees only keys p-window+1..p; softcap: scores s → softcap·tanh(s/softcap).
        A core.paged.Batch as `start` (with a paged cache): each row over its own sequence's blocks (paged.py).
        """
        if isinstance(start, Batch):
            return self.paged_attention(q, cache, layer, start, scale, window, softcap, self.sm_count())
        win, cap = int(window or 0), float(softcap or 0.0)
        T, H, Dh = q.shape
        kc, vc = cache.k[layer], cache.v[layer]
        Hkv, S, _ = kc.shape
        if H % Hkv:
            raise DeviceError(f"attention: {H} query heads are not a multiple of {Hkv} key/value heads")
        self.check_room(cache, layer, start, T, "attention")
        g = H // Hkv
        fold = self.take_pending(q, cache, layer, start) if T == 1 and self.step_attention_ok(Dh, g) else None
        if fold is None:
            self.flush_pending()
            if isinstance(q, Lazy):
                q = q.materialize()
        out = self.alloc(q.shape)
        if fold is not None or (T == 1 and self.step_attention_ok(Dh, g)):
            # One launch: a block per (kv head, slice) for all its query heads; the last block of each kv head
            # merges the slices. The kernel splits the live keys evenly over the slices itself (it reads the
            # position from device memory), so a captured graph keeps one grid for every position. With `fold`
            # it also norms and rotates q and the new key and writes the new key and value to the cache.
            q0, knew, vnew, f, qw, kw, eps, off = fold if fold is not None else (q, None, None, None, None, None, 0.0, 0.0)
            threads, _, minchunk = decode_step_geometry(Dh, g, self.dtype)
            n = S if self.capture is not None else start + 1
            n = min(n, win) if win else n
            nsplit = max(1, min(64, self.sm_count() // Hkv, -(-n // minchunk)))  # slices of >= DS_MINCHUNK keys
            part = self.alloc((Hkv, nsplit, g, 2 + Dh))
            fn = self.kernel("attention.cu", "attn_decode_step", "PPPPPPPPPPPffiPiifif", HEAD_DIM=Dh, GROUP=g,
                             DS_THREADS=threads)
            self.launch("attention(decode)", fn, (Hkv, nsplit, 1), (threads, 1, 1), out, part, self._counters(Hkv),
                        q0, knew, vnew, kc, vc, f, qw, kw, float(eps), float(off), start, self.start_dev(), Hkv, S,
                        float(scale), win, cap)
        elif T == 1:
            # Slices of ~256 keys; a captured graph sizes them for the whole cache (positions change).
            n = S if self.capture is not None else start + 1
            n = min(n, win) if win else n
            nsplit = max(1, min(64, -(-n // 256)))
            part = self.alloc((H, nsplit, 2 + Dh))
            fn = self.kernel("attention.cu", "attn_decode", "PPPPiPiiifif", HEAD_DIM=Dh)
            self.launch("attention(decode)", fn, (H, nsplit, 1), (128, 1, 1), part, q, kc, vc, start,
                        self.start_dev(), H, Hkv, S, float(scale), win, cap)
            fn = self.kernel("attention.cu", "attn_combine", "PPii", HEAD_DIM=Dh)
            self.launch("attention(combine)", fn, (H, 1, 1), (min(128, 32 * -(-Dh // 32)), 1, 1), out, part, H, nsplit)
        elif self.attn == "tc" and self.attn_tc_available and Dh % 16 == 0 and Dh <= 256:
            fn = self.kernel("attention_tc.cu", "attn_prefill_tc", "PPPPiPiiiifif", HEAD_DIM=Dh)
            smem = 2 * TC_FK * (Dh + 8) * 2 + TC_NW * (16 * (TC_FK + 4) * 4 + 16 * (TC_FK + 8) * 2 + 16 * (Dh + 4) * 4)
            if smem > 48 * 1024 and getattr(fn, "_smem", 0) < smem:
                fn.set_attribute(self.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                fn._smem = smem
            self.launch("attention(prefill_tc)", fn, (-(-T // TC_FQ), H, 1), (32 * TC_NW, 1, 1), out, q, kc, vc, start,
                        self.start_dev(), T, H, Hkv, S, float(scale), win, cap, shared=smem)
        else:
            fn = self.kernel("attention.cu", "attn_prefill", "PPPPiPiiiifif", HEAD_DIM=Dh)
            dhp = Dh + 2 if Dh % 2 else Dh + 1
            smem = 4 * (PREFILL_NQ * Dh + PREFILL_BK * dhp + PREFILL_BK * Dh)
            if smem > 48 * 1024 and getattr(fn, "_smem", 0) < smem:
                fn.set_attribute(self.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                fn._smem = smem
            self.launch("attention(prefill)", fn, (-(-T // PREFILL_NQ), H, 1), (128, 1, 1), out, q, kc, vc, start,
                        self.start_dev(), T, H, Hkv, S, float(scale), win, cap, shared=smem)
        return out

    def sm_count(self) -> int:
        """The device's multiprocessor count (asked once)."""
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
