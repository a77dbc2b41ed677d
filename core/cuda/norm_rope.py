"""Norms and RoPE: RMSNorm and LayerNorm over rows (norm.cu), the residual add fused with the next norm, per-head
q/k norms (shared or per-head gains, LayerNorm with bias: head_norm), and RoPE from a core.rope.RopeTable (rope.cu:
partial rotary, interleaved pairs, a cos/sin scale), alone or, for plain tables, fused with the per-head RMSNorm and
the KV-cache write (rope.cu rope_kv).

At one decode token a norm whose result one GEMV reads is left to that GEMV (deferred.py: foldable, lazy_norm),
and add_norm hands a pending GEMV the residual add (linear.py: gemv_rows with resid); rope_cache_write's q and
cache write wait for the attention() that follows, which does them in its kernel. Only a plain table (every dim
rotates, rotate-half pairs, scale 1) takes rope_kv and that fold; any other runs the rope kernel on q and k and a
cache write, which attention() still folds in (without RoPE).

Frequency tables are uploaded once per RopeTable (keyed by the object: a RopeConfig returns the same table while
it does not change) or per bare array (by its bytes). A table that changes with the sequence length (dynamic NTK,
longrope) is bound before each decode step (bind_rope, decode.py): its values are copied into one persistent
buffer, which a captured decode graph reads, so a replay never rotates with a stale table.
"""

from __future__ import annotations

import weakref

import numpy as np

from ..backend import Cache
from ..errors import DeviceError
from ..paged import Batch
from ..rope import RopeTable
from .geometry import NORM_VPT
from .tensors import DTensor, Lazy


def rope_layout(table, Dh: int) -> tuple[int, bool, float]:
    """(rotated dims R, interleaved pairs, cos/sin scale) of a RopeTable, a bare inv_freq array or a DTensor of
    one, for heads of Dh; a DeviceError unless 0 < R <= Dh."""
    if isinstance(table, RopeTable):
        r, inter, scale = table.rotary_dim, bool(table.interleaved), float(table.scale)
    else:
        r, inter, scale = 2 * int(np.size(table) if not isinstance(table, DTensor) else table.size), False, 1.0
    if not 0 < r <= Dh:
        raise DeviceError(f"rope: a table of {r // 2} frequencies rotates {r} dims, which heads of {Dh} do not have")
    return r, inter, scale


def plain_rope(table, Dh: int) -> bool:
    """Whether the table rotates every dim of a Dh head in rotate-half pairs with scale 1 (what rope_kv and
    attn_decode_step implement)."""
    return rope_layout(table, Dh) == (Dh, False, 1.0)


class NormRopeMixin:
    """CudaBackend's norms and RoPE (see the module docstring).

    State (the facade gives it its first value): _freqs, inverse-frequency tables uploaded, by their bytes (bare
    arrays); _table_freqs, those of RopeTables, by the table object (weakly: a dropped table frees its copy);
    _rope_live, the persistent (buffer, bound table, its layout) bind_rope fills, or None.
    Uses the backend's fused, capture, drv and stream; alloc() / from_host() / mem_alloc() (memory.py), kernel() /
    launch() / start_dev() / check() / synchronize() (launch.py), foldable() / lazy_norm() / defer() /
    discard_pending() / flush_pending() (deferred.py), gemv_rows() (linear.py), check_room() / cache_write()
    (kvcache.py), step_attention_ok() (attention.py), clear_graphs() (decode.py), paged_rope() /
    paged_rope_cache_write() (paged.py)."""

    def norm(self, x: DTensor, w, b, eps, kind, offset=0.0) -> DTensor:
        if isinstance(x, Lazy):
            x = x.materialize()
        if self.foldable(x, w, b, kind):
            return self.lazy_norm(x, w, b, eps, offset, kind, "norm")
        y = self.alloc(x.shape)
        self.norm_kind("norm", y, None, x, None, w, b, eps, kind, offset)
        return y

    def add_norm(self, x: DTensor, delta: DTensor, w, b, eps, kind, offset=0.0):
        """(x + delta, norm(x + delta)) in one pass. At one decode token with RMSNorm, when delta is a GEMV
        not run yet, the add goes into that GEMV's epilogue and the norm into the next GEMV (no kernel here)."""
        if isinstance(x, Lazy):
            x = x.materialize()
        if (isinstance(delta, Lazy) and delta.pending and delta.kind == "linear" and self.foldable(x, w, b, kind)
                and delta.shape == x.shape):
            src, wd, bd = delta.args
            s = self.gemv_rows(src, [(wd, bd)], -1, "linear+residual(gemv)", resid=x)[0]
            return s, self.lazy_norm(s, w, b, eps, offset, kind, "norm")
        if isinstance(delta, Lazy):
            delta = delta.materialize()
        s, y = self.alloc(x.shape), self.alloc(x.shape)
        self.norm_kind("add_norm", y, s, x, delta, w, b, eps, kind, offset)
        return s, y

    def norm_kind(self, op, y, xsum, x, delta, w, b, eps, kind, offset):
        """Launch norm `kind` of x (+ delta, whose sum goes to xsum when given) into y, as NumpyBackend.norm
        reads its arguments."""
        # As the numpy reference: both apply the weight as (offset + w); only LayerNorm takes a bias.
        if kind == "layernorm":
            self._norm_rows(op, y, xsum, x, delta, w, b, x.shape[-1], False, eps, offset)
        else:
            self._norm_rows(op, y, xsum, x, delta, w, None, x.shape[-1], True, eps, offset)

    def _norm_rows(self, op, y, xsum, x, delta, w, b, D, rms, eps, offset):
        R = x.size // D
        threads = 32 * -(-D // (4 * NORM_VPT * 32))
        if (self.fused and D % 4 == 0 and threads <= 1024
                and all(t is None or t.ptr % 16 == 0 for t in (y, xsum, x, delta))):
            fn = self.kernel("norm.cu", "norm_reg", "PPPPPPiiiff", NORM_VPT=NORM_VPT)
            self.launch(op, fn, (R, 1, 1), (threads, 1, 1), y, xsum, x, delta, w, b, R, D, int(rms), float(eps),
                        float(offset))
            return
        threads = 32 if D <= 256 else 128 if D <= 2048 else 256
        fn = self.kernel("norm.cu", "norm_rows", "PPPPPPiiiff")
        self.launch(op, fn, (R, 1, 1), (threads, 1, 1), y, xsum, x, delta, w, b, R, D, int(rms), float(eps), float(offset))

    def head_norm(self, x: DTensor, w, eps, offset=0.0, b=None, kind="rmsnorm") -> DTensor:
        """RMSNorm or LayerNorm of each head of x [T, H, Dh] over Dh, as NumpyBackend.norm reads its arguments
        (both: weight as (offset + w); LayerNorm: bias b); w (and b) [Dh] shared by the heads or [H, Dh]."""
        if isinstance(x, Lazy):
            x = x.materialize()
        H, Dh = x.shape[-2], x.shape[-1]
        per_head = w.size != Dh
        if w.size not in (Dh, H * Dh) or (b is not None and kind == "layernorm" and b.size != w.size):
            raise DeviceError(f"head_norm: x is {list(x.shape)} but the gain is {list(w.shape)}"
                              + (f" and the bias {list(b.shape)}" if b is not None else ""))
        y = self.alloc(x.shape)
        if kind != "layernorm" and not per_head:  # Qwen3's: the row kernels, as before
            self._norm_rows("head_norm", y, None, x, None, w, None, Dh, True, eps, offset)
            return y
        rms = kind != "layernorm"
        R = x.size // Dh if Dh else 0
        fn = self.kernel("norm.cu", "head_norm", "PPPPiiiiiff", NORM_VPT=NORM_VPT)
        if R:
            self.launch("head_norm", fn, (-(-R // 4), 1, 1), (128, 1, 1), y, x, w, None if rms else b, R, H, Dh,
                        Dh if per_head else 0, int(rms), float(eps), float(offset))
        return y

    def _freq(self, table) -> DTensor:
        """The device copy of a table's inverse frequencies (a RopeTable, a bare array or a DTensor)."""
        if isinstance(table, DTensor):
            return table
        live = self._rope_live
        if live is not None and live[1] is not None and live[1]() is table:
            return live[0]
        if isinstance(table, RopeTable):
            t = self._table_freqs.get(table)
            if t is None:
                if self.capture is not None:
                    raise DeviceError("rope: a table must be uploaded (or bound) before a graph capture")
                t = self._table_freqs[table] = self.from_host(np.ascontiguousarray(table.inv_freq, dtype=np.float32))
            return t
        arr = np.ascontiguousarray(table, dtype=np.float32)
        key = arr.tobytes()
        t = self._freqs.get(key)
        if t is None:
            if self.capture is not None:
                raise DeviceError("rope: inverse frequencies must be uploaded before a graph capture")
            t = self._freqs[key] = self.from_host(arr)
        return t

    def bind_rope(self, table: RopeTable) -> None:
        """Make `table` the live one: its inverse frequencies are copied, in stream order, into one persistent
        buffer that every kernel given this table reads (decode.py binds the step's table of a model whose table
        changes with the length before each step, so a captured graph reads the current one)."""
        arr = np.ascontiguousarray(table.inv_freq, dtype=np.float32)
        live = self._rope_live
        if live is not None and live[2] is not None and live[2] != rope_layout(table, table.rotary_dim):
            # a captured step baked in the old table's rotated dims, pairing and cos/sin scale as launch
            # arguments (longrope's short and long mscales differ): such steps must be captured again
            if self.capture is not None:
                raise DeviceError("rope: the table's layout changed during a graph capture")
            self.clear_graphs()
        if live is None or live[0].size != arr.size:
            if self.capture is not None:
                raise DeviceError("rope: a table must be bound before a graph capture")
            if live is not None:
                self.clear_graphs()  # captured steps read the old buffer, freed below
                self.synchronize("bind_rope")  # ... and so may kernels in flight
                live[0].buf.free()
            alloc = self.mem_alloc(arr.nbytes, "the live rope table")
            live = (DTensor(alloc, int(alloc), arr.shape, "float32"), None, None)
        self._rope_live = (live[0], weakref.ref(table), rope_layout(table, table.rotary_dim))
        if arr.size:
            self.flush_pending()  # (a held write reads the old values: it runs before the copy)
            dev = live[0]
            self.check(lambda: self.drv.memcpy_htod_async(dev.ptr, arr, self.stream), "rope table upload")

    def free_freqs(self) -> None:
        """Forget the uploaded inverse-frequency tables and free the live one (release)."""
        self._freqs.clear()
        self._table_freqs.clear()
        if self._rope_live is not None:
            self._rope_live[0].buf.free()
            self._rope_live = None

    def rope(self, x: DTensor, start: int, table) -> DTensor:
        """RoPE with `table` (a core.rope.RopeTable, or a bare inv_freq array: rotate-half, scale 1) on [T, H, Dh]
        at positions start..start+T-1: the first table.rotary_dim dims rotate, the rest pass through. A
        core.paged.Batch as `start`: each row at its own position, with its sequence's table if batch.tables."""
        if isinstance(start, Batch):
            return self.paged_rope(x, start, table, None if start.tables is not None else self._freq(table))
        T, H, Dh = x.shape
        R, inter, scale = rope_layout(table, Dh)
        if R % 2:
            raise DeviceError(f"rope: {R} rotated dims is odd")
        f = self._freq(table)
        y = self.alloc(x.shape)
        fn = self.kernel("rope.cu", "rope", "PPPiPiiiiif")
        if T * H:
            self.launch("rope", fn, (T * H, 1, 1), (32 if Dh <= 64 else 64, 1, 1), y, x, f, start, self.start_dev(),
                        T, H, Dh, R, int(inter), float(scale))
        return y

    def rope_cache_write(self, q: DTensor, k: DTensor, v: DTensor, cache: Cache, layer: int, start: int, table,
                         qk_norm=None) -> DTensor:
        """RoPE on q and k, k and v stored in the cache, the rotated q returned; qk_norm = (q weight, k weight,
        eps, offset) applies per-head RMSNorm to q and k first. One kernel (rope_kv) when fused and the table is
        plain (plain_rope); otherwise head_norm, rope and cache_write (whose one-token write attention() folds in).
        A core.paged.Batch as `start` (with a paged cache): one kernel for any table, each row at its own position
        and cache slot (paged.py)."""
        if isinstance(start, Batch):
            freq = None if start.tables is not None else self._freq(table)
            return self.paged_rope_cache_write(q, k, v, cache, layer, start, table, freq, qk_norm)
        T, H, Dh = q.shape
        Hkv = k.shape[1]
        if not self.fused or Dh % 2 or T > 65535 or not plain_rope(table, Dh):
            if qk_norm is not None:
                qw, kw, eps, off = qk_norm
                q, k = self.head_norm(q, qw, eps, off), self.head_norm(k, kw, eps, off)
            q, k = self.rope(q, start, table), self.rope(k, start, table)
            self.cache_write(cache, layer, k, v, start)
            return q
        self.check_room(cache, layer, start, T, "rope_cache_write")
        f = self._freq(table)
        qw, kw, eps, off = qk_norm if qk_norm is not None else (None, None, 0.0, 0.0)
        kc, vc = cache.k[layer], cache.v[layer]

        def run():
            self.discard_pending(me())  # another use came first: no longer held for attention()
            qo = self.alloc(q.shape)
            fn = self.kernel("rope.cu", "rope_kv", "PPPPPPPPPffiPiiiii")
            self.launch("rope_cache_write", fn, (-(-(H + Hkv) // 4), T, 1), (128, 1, 1), qo, q, k, v, kc, vc, f, qw,
                        kw, float(eps), float(off), start, self.start_dev(), T, H, Hkv, kc.shape[1], Dh)
            return qo
        me = lambda: None  # noqa: E731  (a weak reference to the Lazy below: no cycle keeps the cache alive)
        if T == 1 and H % Hkv == 0 and self.step_attention_ok(Dh, H // Hkv):
            # Deferred: attention() at this position folds the norm, RoPE and cache write into its kernel
            # (attn_decode_step); any other use of q, or any other launch first, runs rope_kv as before.
            lazy = Lazy(q.shape, "rope", (q, k, v, cache, layer, start, f, qw, kw, float(eps), float(off)), run)
            me = weakref.ref(lazy)
            self.defer(lazy.materialize, rope=lazy)
            return lazy
        return run()
