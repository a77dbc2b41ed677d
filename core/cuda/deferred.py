"""Deferred work at one decode token: the cache write held for the attention that folds it in, and the Lazy
results (a norm, a GEMV) left for the kernel that reads them to fold in.

A held write: cache_write (kvcache.py) and rope_cache_write (norm_rope.py) at one token hand their launch to
defer(); the next attention() at that (cache, layer, position) takes it over (take_pending) and does it inside
attn_decode_step, with, for RoPE models, the q/k norm and rotation. Every other launch, copy to the host or
synchronisation runs it first (flush_pending), so nothing can observe the order changing.

Folding: with `fold` on, a norm whose result a GEMV reads next (foldable) becomes a Lazy "norm" (lazy_norm)
that the GEMV folds into its reduction (folded_norm, read by linear.py); any other use computes it by the
ordinary kernel (Lazy.materialize). Activations are never written in place, so computing later reads the same
inputs.
"""

from __future__ import annotations

from ..backend import Cache
from ..errors import DeviceError
from .tensors import ITEMSIZE, DTensor, Lazy


class DeferredMixin:
    """CudaBackend's held cache write and norm folding (see the module docstring).

    State (the facade gives it its first value): _pending, the held write (a callable) or None; _pending_rope,
    the Lazy q of a held rope_cache_write; _pending_kv, (cache, layer, start, k, v) of a held cache_write;
    _zero_bias, made on first use. Uses the backend's fold, fused, fold_ln, capture, drv and dtype; alloc() and
    mem_alloc() (memory.py), norm_kind() (norm_rope.py), clear_graphs() (decode.py)."""

    def defer(self, run, rope=None, kv=None) -> None:
        """Hold `run`, a cache write, for the next attention() to fold in (any write held before runs now):
        `rope` is the Lazy q of a rope_cache_write, `kv` the (cache, layer, start, k, v) of a cache_write."""
        self.flush_pending()
        self._pending, self._pending_rope, self._pending_kv = run, rope, kv

    def flush_pending(self) -> None:
        """Run the held cache write, if any (every launch, copy to the host and synchronisation does)."""
        run = self._pending
        if run is not None:
            self._pending = self._pending_rope = self._pending_kv = None
            run()

    def drop_pending(self) -> None:
        """Forget the held write without running it (a captured step's: only its graph may run it)."""
        self._pending = self._pending_rope = self._pending_kv = None

    def discard_pending(self, lazy) -> None:
        """Forget the held write if it is rope_cache_write's `lazy` (computed now by another use of its q)."""
        if self._pending_rope is not None and self._pending_rope is lazy:
            self._pending = self._pending_rope = None

    def take_pending(self, q, cache: Cache, layer: int, start: int):
        """(raw q, new k, new v, inv_freq, q-norm, k-norm, eps, offset) of the write pending for this attention,
        which is taken over (no longer run by a flush); None when there is none to fold in."""
        lr, kv = self._pending_rope, self._pending_kv
        if lr is not None and q is lr and lr.pending:
            q0, k, v, c, layer0, start0, f, qw, kw, eps, off = lr.args
            if c is cache and layer0 == layer and start0 == start:
                self._pending = self._pending_rope = None
                return q0, k, v, f, qw, kw, eps, off
        if kv is not None and not isinstance(q, Lazy):
            c, layer0, start0, k, v = kv
            if c is cache and layer0 == layer and start0 == start:
                self._pending = self._pending_kv = None
                return q, k, v, None, None, None, 0.0, 0.0
        return None

    def foldable(self, x, w, b, kind) -> bool:
        """Whether norm(x) can be left to the GEMV that reads it (one decode token, a gain of the row's width)."""
        D = x.shape[-1]
        return (self.fold and self.fused and (kind == "rmsnorm" or kind == "layernorm" and self.fold_ln)
                and x.size == D and D % 4 == 0 and w is not None and w.size == D and (b is None or kind == "layernorm"))

    def lazy_norm(self, x, w, b, eps, offset, kind, op):
        """norm(x) as a Lazy "norm" a GEMV folds in (LayerNorm without a bias gets zeros)."""
        def run():
            y = self.alloc(x.shape)
            self.norm_kind(op, y, None, x, None, w, b, eps, kind, offset)
            return y
        if kind == "layernorm":  # as norm_kind: LayerNorm takes a bias (zeros when it has none)
            if b is None:
                b = self._zeros_wt(x.shape[-1])
            return Lazy(x.shape, "norm", (x, w, b, float(eps), float(offset), "_ln"), run)
        return Lazy(x.shape, "norm", (x, w, None, float(eps), float(offset), "_norm"), run)

    @staticmethod
    def folded_norm(x):
        """(input, gain, norm bias, eps, offset, kernel suffix) when x is a pending norm a GEMV can fold in
        ("_norm": RMSNorm, "_ln": LayerNorm), else (x, None, None, 0, 0, "")."""
        if isinstance(x, Lazy) and x.pending and x.kind == "norm":
            return x.args
        return x, None, None, 0.0, 0.0, ""

    def _zeros_wt(self, n: int) -> DTensor:
        """A zero vector [n] of the weight type (a LayerNorm without bias, folded)."""
        z = getattr(self, "_zero_bias", None)
        if z is None or z.size < n:
            if self.capture is not None:
                raise DeviceError("a zero bias must be allocated before a graph capture")
            alloc = self.mem_alloc(n * ITEMSIZE[self.dtype], "zero bias")
            self.drv.memset_d8(alloc, 0, n * ITEMSIZE[self.dtype])
            if z is not None:
                self.clear_graphs()  # captured graphs may point at the old buffer, freed below
            z = self._zero_bias = DTensor(alloc, int(alloc), (n,), self.dtype)
        return z[:n] if z.size > n else z
