"""Backends: where tensors live and how each operation runs.

The model (core.model.forward) is written once against the primitive operations below. A backend
implements them; it may also fuse several (the CUDA backend does) as long as each fused op has a numpy
reference in core.ops. The numpy backend is the reference: fp32 compute, always available.
"""

from __future__ import annotations

import contextlib

import attrs
import numpy as np

from . import ops
from .checkpoint import float32_to_bf16_bits, to_float32
from .errors import DeviceError
from .paged import Batch, PagedCache
from .sampling import check_finite
from .spec import FLOAT32_ROLES

DTYPES = ("float32", "float16", "bfloat16")


@attrs.define
class Weights:
    """Loaded tensors by canonical role: global ones and one dict per layer."""

    globals: dict = attrs.field(factory=dict)
    layers: list = attrs.field(factory=list)

    def lm_head(self):
        """The output projection: lm_head, or the embedding when the model ties them."""
        return self.globals.get("lm_head", self.globals["embed"])


@attrs.define
class Cache:
    """Per-layer key and value caches, each [Hkv, length, Dh]."""

    k: list
    v: list
    length: int


class NumpyBackend:
    """Reference backend: numpy arrays, float32 compute.

    dtype float16 / bfloat16 round the weights to that precision (then hold them as float32), so the
    CPU shows the same weight-rounding effects as a GPU run in that dtype.
    """

    name = "numpy"

    def __init__(self, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise DeviceError(f"dtype {dtype!r} is not supported (choose from {list(DTYPES)})")
        self.dtype = dtype

    def __repr__(self):
        return f"NumpyBackend(dtype={self.dtype!r})"

    # -- loading -------------------------------------------------------------------------------
    def convert(self, bits: np.ndarray, stored: str, role: str) -> np.ndarray:
        """Checkpoint bits → a float32 array rounded to self.dtype (FLOAT32_ROLES: not rounded)."""
        x = to_float32(bits, stored)
        dtype = "float32" if role in FLOAT32_ROLES else self.dtype
        if dtype == "float16" and stored != "F16":
            x = x.astype(np.float16).astype(np.float32)
        elif dtype == "bfloat16" and stored != "BF16":
            x = to_float32(float32_to_bf16_bits(x), "BF16")
        return np.ascontiguousarray(x, dtype=np.float32).reshape(x.shape)  # (ascontiguousarray makes a 0-d array 1-d)

    def begin_loading(self, config, numel: int, quantized_bytes: int = 0) -> None:
        """Hook called before the first convert(): the model's config and its weights' size (nothing to check here)."""

    def session(self):
        """Held around each forward or generation: nothing to guard here (every call has its own cache)."""
        return contextlib.nullcontext()

    def finish_loading(self, weights: Weights) -> None:
        """Hook for backends that fuse or upload after loading; nothing to do here."""

    def release(self, weights: Weights) -> None:
        """Drop references (host memory is reclaimed by the garbage collector)."""
        weights.globals.clear()
        weights.layers.clear()

    def new_cache(self, config, length: int) -> Cache:
        """Zeroed key/value caches for `length` positions."""
        shape = (config.num_kv_heads, length, config.head_dim)
        return Cache([np.zeros(shape, np.float32) for _ in range(config.num_layers)],
                     [np.zeros(shape, np.float32) for _ in range(config.num_layers)], length)

    def new_paged_cache(self, config, num_blocks: int, block_size: int) -> PagedCache:
        """Zeroed block pools for batched steps: per layer k and v [num_blocks * block_size, Hkv, Dh]."""
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        return PagedCache([np.zeros(shape, np.float32) for _ in range(config.num_layers)],
                          [np.zeros(shape, np.float32) for _ in range(config.num_layers)], block_size, num_blocks)

    def rows(self, x, idx):
        """x [T, N] rows at idx (int [R]) → [R, N]: the rows whose logits a batched step returns."""
        return x[np.asarray(idx, dtype=np.int64)]

    def to_host(self, x) -> np.ndarray:
        """A float32 numpy copy of a backend tensor."""
        return np.asarray(x, dtype=np.float32)

    def argmax_rows(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [R], bad bool [R]) for logits x [R, V]: each row's argmax (numpy's: first index of the
        largest) and whether the row holds a NaN or ±inf (core.sampling.check_finite's rule)."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
        return x.argmax(axis=1).astype(np.int64), ~np.isfinite(x).all(axis=1)

    def decode(self, forward, W, c, token: int, cache: Cache, start: int, rope, greedy: bool = False):
        """Logits [V] of one generated token at position `start`, or with greedy its argmax id (an int; a
        backend may then pick it on its device). A backend may replay a captured step."""
        logits = forward(self, W, c, np.asarray([token]), cache, start, rope, all_logits=False)[-1]
        if greedy:
            check_finite(logits)  # argmax of NaNs is 0: a silent, wrong token
            return int(np.argmax(logits))
        return logits

    # -- primitive operations (see core.ops for shapes) ------------------------------------------
    def embed(self, table, ids, scale=None):
        return ops.embed(table, ids, scale)

    def add(self, a, b):
        return a + b

    def add_positions(self, x, table, start):
        """x [T, D] + table[start:start+T] (learned absolute positions)."""
        return x + ops.embed(table, _positions(start, x.shape[0]))

    def linear(self, x, w, b=None):
        return ops.linear(x, w, b)

    def linears(self, x, pairs):
        """(linear(x, w, b) for (w, b) in pairs): several products of one input (q, k, v)."""
        return tuple(ops.linear(x, w, b) for w, b in pairs)

    def linear_act(self, x, w, b, kind):
        """act(linear(x, w, b))."""
        return ops.ACT[kind](ops.linear(x, w, b))

    def gated_linear(self, x, wg, bg, wu, bu, kind):
        """act(linear(x, wg, bg)) * linear(x, wu, bu): a gated MLP's first half."""
        return ops.ACT[kind](ops.linear(x, wg, bg)) * ops.linear(x, wu, bu)

    def norm(self, x, w, b, eps, kind, offset=0.0):
        if kind == "layernorm":
            return ops.layer_norm(x, w, b, eps, offset)
        return ops.rms_norm(x, w, eps, offset)

    def add_norm(self, x, delta, w, b, eps, kind, offset=0.0):
        """(x + delta, norm(x + delta)): the residual add fused with the next norm."""
        x = x + delta
        return x, self.norm(x, w, b, eps, kind, offset)

    def head_norm(self, x, w, eps, offset=0.0, b=None, kind="rmsnorm"):
        """Norm of each head of x [T, H, Dh] over Dh; w (and b) [Dh] shared by the heads or [H, Dh] per head."""
        return self.norm(x, w, b, eps, kind, offset)

    def act(self, x, kind):
        return ops.ACT[kind](x)

    def gated_act(self, gate, up, kind):
        """act(gate) * up."""
        return ops.ACT[kind](gate) * up

    def rope(self, x, start, table):
        """RoPE (a core.rope.RopeTable) on [T, H, Dh] at positions start..start+T-1."""
        if isinstance(start, Batch) and start.tables is not None:  # a table per sequence (length-dependent rope)
            return np.concatenate([ops.rope(x[g.row:g.row + g.n], np.arange(g.start, g.start + g.n), t)
                                   for g, t in zip(start.segments, start.tables)]) if start.segments else x
        return ops.rope(x, _positions(start, x.shape[0]), table)

    def rope_cache_write(self, q, k, v, cache: Cache, layer: int, start: int, table, qk_norm=None):
        """RoPE on q and k (after per-head RMSNorm when qk_norm = (q weight, k weight, eps, offset)), k and v
        stored in the cache; returns the rotated q."""
        if qk_norm is not None:
            qw, kw, eps, offset = qk_norm
            q, k = self.head_norm(q, qw, eps, offset), self.head_norm(k, kw, eps, offset)
        q, k = self.rope(q, start, table), self.rope(k, start, table)
        self.cache_write(cache, layer, k, v, start)
        return q

    def cache_write(self, cache: Cache, layer: int, k, v, start: int) -> None:
        if isinstance(start, Batch):  # each row to its sequence's slot, through the block tables
            slots = np.concatenate([start.slots(g) for g in start.segments])
            cache.k[layer][slots], cache.v[layer][slots] = k, v
            return
        ops.cache_write(cache.k[layer], cache.v[layer], k, v, start)

    def attention(self, q, cache: Cache, layer: int, start: int, scale: float, window=None, softcap=None):
        if isinstance(start, Batch):  # each sequence attends over its own blocks
            out = np.empty_like(q)
            for g in start.segments:
                k, v = cache.gather(layer, g.table, g.start + g.n)
                out[g.row:g.row + g.n] = ops.attention(q[g.row:g.row + g.n], k, v, g.start, scale, window, softcap)
            return out
        return ops.attention(q, cache.k[layer], cache.v[layer], start, scale, window, softcap)

    def soft_cap(self, x, cap):
        """cap * tanh(x / cap) (final logit soft-capping)."""
        return ops.soft_cap(x, cap)

    def clamp(self, x, lo: float, hi: float):
        """x clamped to [lo, hi] (q, k and v after their projections under qkv_clip), float32 as x."""
        return ops.clamp(x, np.float32(lo), np.float32(hi))

    def scale(self, x, s: float):
        """x * s (embedding, residual-branch and logit multipliers), s rounded to float32 as torch does."""
        return x * np.float32(s)

    def sigmoid_gate(self, y, g):
        """y [T, N] * sigmoid(g [T, 1]): a gate computed per token (Qwen2-MoE's shared expert)."""
        return y * ops.sigmoid(g)

    def moe(self, x, router_w, router_b, gate, up, down, routing, biases=(None, None, None), select_bias=None):
        """Mixture of experts on x [T, D] (see core.ops.moe; routing: core.config.MoeRouting; select_bias [E]: added
        to the router's scores to choose the experts, not to their weights)."""
        return ops.moe(x, router_w, router_b, gate, up, down, routing.top_k, routing.scoring, routing.renormalize,
                       routing.activation, routing.routed_scale, biases, select_bias, routing.groups,
                       routing.topk_groups)

    def custom(self, op, *args, **scalars):
        """A plugin's own op (core.custom_ops.CustomOp): its numpy reference on float32 arrays → float32."""
        out = op.reference(*(np.asarray(a, dtype=np.float32) for a in args), **scalars)
        return np.asarray(out, dtype=np.float32)


def _positions(start, T: int) -> np.ndarray:
    """Positions of T rows: start..start+T-1 for one sequence, or a Batch's per-row positions."""
    return start.positions if isinstance(start, Batch) else np.arange(start, start + T)
