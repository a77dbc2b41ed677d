"""Tensor parallelism on the numpy backend: N ranks in one process, in lockstep, with an in-process all-reduce.

core.forward runs unchanged against TensorParallelNumpy. Every weight it holds is a Ranked (one shard per rank,
placed by core/tp.py); every op runs on each rank's own NumpyBackend with that rank's shards, and values cross
ranks only through Comm's all_reduce / all_gather, where the plan says a collective is due:

- a column-parallel product (q/k/v, gate/up) leaves each rank its slice of the features: a Ranked activation,
  split along axis 1 (features, or heads once reshaped), which flows through q/k norm, RoPE, the rank's own KV
  cache and attention untouched;
- a row-parallel product (o, down) sums the ranks' partial products (one all-reduce), then adds the bias once;
- the vocab-parallel embedding is a masked lookup per rank, all-reduced; the logits are all-gathered;
- the experts: the replicated router routes every token, each rank runs its own experts, one all-reduce;
- a norm over a split projection (qk_norm "projection") all-reduces its statistics.

What every rank would compute alike (norms, residual adds, RoPE tables, sampling) runs once, on rank 0's copy of
the replicated weights: the values are the same on every rank, and N copies of the work would only be slower.
Comm counts its collectives, so tests can hold the plan to exactly one all-reduce per row-parallel product.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import attrs
import numpy as np

from . import ops
from .backend import NumpyBackend, Weights
from .errors import DeviceError, TensorParallelError
from .log import logger
from .tp import TensorParallelPlan
from .tp_load import load_rank


@attrs.frozen(eq=False)
class Ranked:
    """One value per rank: a weight's shards (kind: its core.tp.Split kind), an activation split along axis 1
    ("act"), or the ranks' KV caches ("cache"). starts: each rank's first index along a weight's split axis."""

    parts: tuple
    kind: str = "act"
    starts: tuple = ()

    def reshape(self, *shape) -> "Ranked":
        """Each rank's part reshaped to `shape`, whose axis 1 (the split one) takes the rank's own size."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return Ranked(tuple(p.reshape(shape[:1] + (-1,) + tuple(shape[2:])) for p in self.parts))


def _at(x, rank: int):
    """Rank `rank`'s view of an op argument: its part of a Ranked, the value itself otherwise."""
    if isinstance(x, Ranked):
        return x.parts[rank]
    if isinstance(x, (tuple, list)):
        return type(x)(_at(v, rank) for v in x)
    return x


def _split(x) -> bool:
    """Whether an op argument differs between ranks (a Ranked that is not a replicated weight)."""
    if isinstance(x, Ranked):
        return x.kind != "replicated"
    if isinstance(x, (tuple, list)):
        return any(_split(v) for v in x)
    return False


class Comm:
    """The in-process collectives over the ranks' parts (NCCL's all-reduce and all-gather across processes).

    Sums run in rank order, so every rank would receive bit-identical values. `counts` tallies the calls.
    """

    def __init__(self):
        self.counts = {"all_reduce": 0, "all_gather": 0}

    def all_reduce(self, parts) -> np.ndarray:
        """The elementwise sum of every rank's array."""
        self.counts["all_reduce"] += 1
        out = parts[0].copy()
        for p in parts[1:]:
            out += p
        return out

    def all_gather(self, parts, axis: int = -1) -> np.ndarray:
        """The ranks' arrays joined along `axis` in rank order."""
        self.counts["all_gather"] += 1
        return np.concatenate(parts, axis=axis)


class TensorParallelNumpy:
    """The numpy backend over `size` in-process ranks (see the module docstring); core.load(..., tensor_parallel=N)."""

    name = "numpy"

    def __init__(self, size: int, dtype: str = "float32"):
        self.ranks = [NumpyBackend(dtype) for _ in range(size)]
        self.size, self.dtype = size, self.ranks[0].dtype
        self.comm = Comm()
        self.plan: TensorParallelPlan | None = None

    def __repr__(self):
        return f"TensorParallelNumpy(size={self.size}, dtype={self.dtype!r})"

    # -- loading and lifetime ----------------------------------------------------------------------------------
    def begin_loading(self, config, numel: int, quantized_bytes: int = 0) -> None:
        """Hook called before loading; the plan is built from the checked weights in load_weights."""

    def load_weights(self, spec, wplan) -> Iterator[tuple[str, int | None, Ranked]]:
        """Yield (role, layer, Ranked shards) of a checked core.weights.Plan: the sharding plan is built first (an
        indivisible shape fails before any byte is read), then each rank reads only its slices (core/tp_load.py)."""
        self.plan = TensorParallelPlan.for_weights(spec, wplan, self.size)
        shards = [{} for _ in self.ranks]
        for r, be in enumerate(self.ranks):
            for role, layer, t in load_rank(wplan, self.plan, r, be.convert):
                shards[r][role, layer] = t
        for role, layer in list(shards[0]):
            s = self.plan.split(role)
            yield role, layer, Ranked(tuple(d.pop((role, layer)) for d in shards), s.kind,
                                      tuple(lo for lo, _ in s.ranges))

    def convert(self, bits, stored: str, role: str) -> Ranked:
        """A whole tensor as every rank's part of it: the plan's slice where it splits `role` (a weight no checkpoint
        holds, core.weights.Plan.fill: a weightless q/k norm divided with the heads), else a replicated copy.
        Checkpoint weights come from load_weights, each rank reading only its slices."""
        s = self.plan.split(role) if self.plan is not None else None
        if s is None or s.axis is None:
            return Ranked(tuple(be.convert(bits, stored, role) for be in self.ranks), "replicated")
        parts = (np.ascontiguousarray(np.take(bits, range(lo, hi), axis=s.axis)) for lo, hi in s.ranges)
        return Ranked(tuple(be.convert(p, stored, role) for be, p in zip(self.ranks, parts)), s.kind,
                      tuple(lo for lo, _ in s.ranges))

    def finish_loading(self, weights: Weights) -> None:
        """Nothing to do after loading on the CPU."""

    def release(self, weights: Weights) -> None:
        """Drop every rank's shards."""
        weights.globals.clear()
        weights.layers.clear()

    def session(self):
        """Held around each forward or generation: every call has its own caches."""
        return contextlib.nullcontext()

    def new_cache(self, config, length: int) -> Ranked:
        """Each rank's KV cache, holding only its kv heads."""
        return Ranked(tuple(be.new_cache(self.plan.rank_config(r), length) for r, be in enumerate(self.ranks)), "cache")

    def new_paged_cache(self, config, num_blocks: int, block_size: int) -> Ranked:
        """Each rank's block pools (the engine's batched steps), holding only its kv heads."""
        return Ranked(tuple(be.new_paged_cache(self.plan.rank_config(r), num_blocks, block_size)
                            for r, be in enumerate(self.ranks)), "cache")

    def to_host(self, x) -> np.ndarray:
        """A float32 numpy copy of a (replicated) tensor."""
        if isinstance(x, Ranked):
            raise DeviceError("to_host of a tensor still split across ranks: the plan misses a collective")
        return np.asarray(x, dtype=np.float32)

    def argmax_rows(self, x):
        """(ids, non-finite) per row of (replicated) logits [R, V], as NumpyBackend.argmax_rows."""
        return NumpyBackend.argmax_rows(self, self.to_host(x))

    def decode(self, forward, W, c, token: int, cache, start: int, rope, greedy: bool = False):
        """Logits [V] of one token at `start`, or with greedy its argmax id (as NumpyBackend.decode)."""
        return NumpyBackend.decode(self, forward, W, c, token, cache, start, rope, greedy)

    # -- running ops on the ranks ----------------------------------------------------------------------------------
    def _each(self, op: str, *args, **kw):
        """Backend op `op` on every rank with its own parts (a Ranked result), or once when no argument is split."""
        if not _split(args) and not _split(tuple(kw.values())):
            return getattr(self.ranks[0], op)(*_at(args, 0), **{k: _at(v, 0) for k, v in kw.items()})
        return Ranked(tuple(getattr(be, op)(*_at(args, r), **{k: _at(v, r) for k, v in kw.items()})
                            for r, be in enumerate(self.ranks)))

    def embed(self, table, ids, scale=None):
        """Vocab-parallel lookup: each rank fills the rows of the ids it holds (zeros elsewhere), all-reduced."""
        if not isinstance(table, Ranked) or table.kind != "vocab":
            return self._each("embed", table, ids, scale)
        ids = np.asarray(ids)
        parts = []
        for be, t, lo in zip(self.ranks, table.parts, table.starts):
            local = ids - lo
            mine = (local >= 0) & (local < len(t))
            x = be.embed(t, np.where(mine, local, 0), scale)
            parts.append(np.where(mine[:, None], x, np.float32(0)))
        return self.comm.all_reduce(parts)

    def linear(self, x, w, b=None):
        """Column-parallel: each rank its features (Ranked). Row-parallel: partial products all-reduced, then the
        bias once. Vocab-parallel (lm_head): each rank's logits, all-gathered."""
        kind = w.kind if isinstance(w, Ranked) else "replicated"
        if kind == "row":
            y = self.comm.all_reduce([be.linear(_at(x, r), w.parts[r]) for r, be in enumerate(self.ranks)])
            return y if b is None else y + _at(b, 0)
        if kind == "vocab":
            return self.comm.all_gather([be.linear(_at(x, r), w.parts[r], _at(b, r))
                                         for r, be in enumerate(self.ranks)])
        return self._each("linear", x, w, b)

    def linears(self, x, pairs):
        """(linear(x, w, b) for (w, b) in pairs)."""
        return tuple(self.linear(x, w, b) for w, b in pairs)

    def linear_act(self, x, w, b, kind):
        """act(linear(x, w, b)): per rank on column-parallel weights."""
        if isinstance(w, Ranked) and w.kind in ("row", "vocab"):
            return self.act(self.linear(x, w, b), kind)
        return self._each("linear_act", x, w, b, kind)

    def gated_linear(self, x, wg, bg, wu, bu, kind):
        """act(linear(x, wg, bg)) * linear(x, wu, bu), per rank on its share of the intermediate rows."""
        return self._each("gated_linear", x, wg, bg, wu, bu, kind)

    def norm(self, x, w, b, eps, kind, offset=0.0):
        """A norm of a replicated x; over a split x (a projection's q/k norm), its statistics all-reduced."""
        if not (isinstance(x, Ranked) and x.kind == "act"):
            return self._each("norm", x, w, b, eps, kind, offset)
        return Ranked(self._split_norm(x.parts, _parts(w, self.size), _parts(b, self.size), eps, kind, offset))

    def _split_norm(self, xs, ws, bs, eps, kind, offset):
        """core.ops.layer_norm / rms_norm over the last axis of x split across ranks: the sums all-reduced."""
        d = sum(p.shape[-1] for p in xs)
        if kind == "layernorm":
            mu = self.comm.all_reduce([p.sum(-1, keepdims=True) for p in xs]) / d
            var = self.comm.all_reduce([((p - mu) ** 2).sum(-1, keepdims=True) for p in xs]) / d
            return tuple((p - mu) / np.sqrt(var + eps) * (offset + w) + (0 if b is None else b)
                         for p, w, b in zip(xs, ws, bs))
        ms = self.comm.all_reduce([(p * p).sum(-1, keepdims=True) for p in xs]) / d
        return tuple(p / np.sqrt(ms + eps) * (offset + w) for p, w in zip(xs, ws))

    def moe(self, x, router_w, router_b, gate, up, down, routing, biases=(None, None, None), select_bias=None):
        """Expert parallel: the replicated router routes every token over all experts, each rank runs its own
        experts (core.ops.moe_experts with its first expert id), and the outputs are all-reduced."""
        if not _split((gate, up, down)):
            return self._each("moe", x, router_w, router_b, gate, up, down, routing, biases, select_bias)
        top, w = ops.moe_route(_at(x, 0), _at(router_w, 0), _at(router_b, 0), routing.top_k, routing.scoring,
                               routing.renormalize, routing.routed_scale, _at(select_bias, 0), routing.groups,
                               routing.topk_groups)
        return self.comm.all_reduce([
            ops.moe_experts(_at(x, r), top, w, _at(gate, r), up.parts[r], down.parts[r], routing.activation,
                            _at(tuple(biases), r), first=up.starts[r]) for r in range(self.size)])

    def custom(self, op, *args, **scalars):
        """A plugin's own op on replicated tensors (the plan refuses specs whose layer functions would split them)."""
        return self._each("custom", op, *args, **scalars)


def _parts(w, n: int) -> tuple:
    """A weight's per-rank parts (a replicated or absent one: the same for every rank)."""
    return w.parts if isinstance(w, Ranked) else (w,) * n


def _delegate(op: str):
    """TensorParallelNumpy.<op>: NumpyBackend.<op> (its signature and docstring) on every rank's own parts."""
    @functools.wraps(getattr(NumpyBackend, op))
    def method(self, *args, **kw):
        return self._each(op, *args, **kw)
    return method


# Ops that need no communication: each rank applies them to its own parts (heads, features, cache).
for _op in ("add_positions", "add", "add_norm", "head_norm", "act", "gated_act", "rope", "rope_cache_write",
            "cache_write", "attention", "soft_cap", "clamp", "scale", "sigmoid_gate",
            "rows"):
    setattr(TensorParallelNumpy, _op, _delegate(_op))


def make_backend(device: str, dtype: str | None, size: int, quiet: bool = False) -> TensorParallelNumpy:
    """The backend for core.load(..., tensor_parallel=size): the numpy one over `size` in-process ranks.

    The GPU side (one process per GPU, NCCL) is not built yet (docs/tensor-parallel.md): device "cuda" is refused
    and "auto" picks the CPU, saying why.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise TensorParallelError(f"tensor_parallel={size!r} must be a positive number of ranks")
    if device == "cuda":
        raise DeviceError(f"tensor_parallel={size} on device 'cuda' is not built yet (it needs one worker process per "
                          f"GPU joined by NCCL; see docs/tensor-parallel.md): use device='cpu' to run the same plan "
                          f"on the numpy backend")
    if device == "auto" and not quiet:
        logger.info("device auto → cpu (tensor_parallel=%d runs on the numpy backend only, for now)", size)
    return TensorParallelNumpy(size, dtype or "float32")


def rank_weights(weights: Weights, rank: int) -> Weights:
    """Rank `rank`'s own tensors out of a tensor-parallel model's Weights (what its process would hold)."""
    return Weights({k: v.parts[rank] for k, v in weights.globals.items()},
                   [{k: v.parts[rank] for k, v in layer.items()} for layer in weights.layers])
