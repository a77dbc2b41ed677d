"""One rank's share of a checkpoint: only the bytes of its slices are read (core/tp.py decides which).

Each role's slice is one range along one axis of the role. On disk that is one contiguous read when the axis is
the stored tensor's first (q/k/v/gate/up rows, vocabulary rows, whole experts), else one read per row of the
stored tensor (o / down columns; GPT-2's Conv1D, stored transposed, the other way round). A fused tensor (GPT-2's
c_attn, Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's interleaved query_key_value) is never read whole: the rows
of the fused axis that the rank's q, k and v (gate and up) slices come from are worked out first and only those
runs are read. Per-expert and per-head tensors outside a rank's experts or heads are not opened at all.

Transforms follow core.weights.Plan.load: a slice needing none is handed to `convert` as its stored bits, one that
is transposed or cut out of a fused tensor goes through float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from . import checkpoint
from .checkpoint import TensorInfo, to_float32
from .errors import TensorParallelError
from .tp import Split, TensorParallelPlan
from .weights import CANONICAL, Plan, Source, expected_shape, padded_vector, split_fused

READABLE = ("F32", "F16", "BF16")  # dtypes a slice can be cut from: one element, one fixed width


def load_rank(wplan: Plan, tp: TensorParallelPlan, rank: int,
              convert: Callable[[np.ndarray, str, str], object]) -> Iterator[tuple[str, int | None, object]]:
    """Yield (role, layer, rank `rank`'s slice converted) for every role of `wplan`, reading only those bytes.

    convert(bits or float32 array, stored dtype, role) → the backend's tensor, as in core.weights.Plan.load.
    """
    if not 0 <= rank < tp.size:
        raise TensorParallelError(f"rank {rank} is outside 0..{tp.size - 1}")
    for src in wplan.sources:
        # A quantized weight (a TensorInfo subclass standing for several packed tensors) is no one span of elements.
        odd = [i for i in src.infos if type(i) is not TensorInfo or i.dtype not in READABLE]
        if odd:
            what = "quantized" if type(odd[0]) is not TensorInfo else f"stored as {odd[0].dtype}"
            raise TensorParallelError(f"{odd[0].name} is {what}: tensor-parallel loading cuts slices of plain "
                                      f"{'/'.join(READABLE)} tensors only (quantized checkpoints are not sharded yet)")
        for role, layer, x in _source(src, tp, rank):
            part = x[0]
            s = tp.split(role)
            assert part.shape == s.rank_shape(rank), (role, part.shape, s.rank_shape(rank))
            yield role, layer, convert(part, x[1], role)


def _range(s: Split, rank: int) -> tuple[int, int, int]:
    """(axis, start, stop) of rank's slice; a replicated role is its whole axis 0."""
    if s.axis is None:
        return 0, 0, s.shape[0]
    return (s.axis, *s.ranges[rank])


def _stored_axis(axis: int, ndim: int, transpose: bool) -> int:
    """The stored tensor's axis holding the role's `axis` (a transposed matrix swaps its last two)."""
    if not transpose or ndim < 2 or axis < ndim - 2:
        return axis
    return 2 * ndim - 3 - axis


def _as_role(bits: np.ndarray, dtype: str, transpose: bool) -> tuple[np.ndarray, str]:
    """Stored bits in the role's layout: as stored when no transpose is needed, else float32 transposed."""
    if not transpose or bits.ndim < 2:
        return bits, dtype
    return np.ascontiguousarray(np.swapaxes(to_float32(bits, dtype), -1, -2)), "F32"


def _source(src: Source, tp: TensorParallelPlan, rank: int) -> Iterator[tuple[str, int | None, tuple]]:
    """(role, layer, (array, its dtype)) of rank's slices of one checkpoint tensor (or one layer's experts / heads)."""
    rule, info = src.rule, src.info
    splits = [tp.split(t) for t in rule.targets]
    if rule.stacked:
        yield from _stacked(src, splits, tp, rank)
        return
    ndim = len(info.shape)
    if len(rule.targets) == 1:
        axis, lo, hi = _range(splits[0], rank)
        # a vector stored with leading unit axes (core.weights.padded_vector): its one axis is the stored last one
        vector = ndim > 1 and rule.targets[0] in CANONICAL and padded_vector(info.shape, info.shape[-1:]) and \
            len(expected_shape(rule.targets[0], tp.config)) == 1
        bits = checkpoint.read_tensor_slice(info, ndim - 1 if vector else _stored_axis(axis, ndim, rule.transpose),
                                            lo, hi)
        if vector:
            bits = bits.reshape(bits.shape[-1])
        yield rule.targets[0], src.layer, _as_role(bits, info.dtype, rule.transpose)
        return
    fused = 1 if rule.targets[0].startswith("experts.") else 0  # as core.weights.Plan: experts fuse along axis 1
    sizes = [getattr(tp.config, s) for s in rule.split]
    groups = getattr(tp.config, rule.interleave) if rule.interleave else 1
    ranges = [_range(s, rank) for s in splits]
    if all(a == fused for a, _, _ in ranges):
        yield from _fused_rows(src, ranges, sizes, groups, fused)
        return
    # Split along another axis than the fused one (experts: whole experts of a fused gate_up): read that range,
    # then cut the parts apart as the unsharded loader does.
    axis, lo, hi = ranges[0]
    assert all(r == ranges[0] for r in ranges), ranges
    bits = checkpoint.read_tensor_slice(info, _stored_axis(axis, ndim, rule.transpose), lo, hi)
    x = to_float32(bits, info.dtype)
    if rule.transpose:
        x = np.swapaxes(x, -1, -2)
    for role, part in zip(rule.targets, split_fused(x, sizes, groups, axis=fused)):
        yield role, src.layer, (np.ascontiguousarray(part), "F32")


def fused_rows(sizes: list[int], groups: int = 1) -> list[np.ndarray]:
    """Where each part's rows lie along a fused axis: one index array per part (core.weights.split_fused's layout:
    the parts one after another, or `groups` blocks each holding size / groups rows of every part in turn)."""
    per = [s // groups for s in sizes]
    block = sum(per)
    offsets = np.cumsum([0] + per[:-1])
    return [np.concatenate([g * block + o + np.arange(p) for g in range(groups)]) for o, p in zip(offsets, per)]


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique indices as [start, stop) runs of consecutive ones."""
    if idx.size == 0:
        return []
    breaks = np.nonzero(np.diff(idx) != 1)[0]
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    stops = np.concatenate([idx[breaks] + 1, [idx[-1] + 1]])
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def _fused_rows(src: Source, ranges, sizes, groups, fused: int):
    """Rank's q/k/v (gate/up) slices of a fused tensor, reading only the fused rows they come from."""
    rule, info = src.rule, src.info
    ndim = len(info.shape)
    rows = fused_rows(sizes, groups)
    want = [r[lo:hi] for r, (_, lo, hi) in zip(rows, ranges)]
    need = np.unique(np.concatenate(want))
    axis = _stored_axis(fused, ndim, rule.transpose)
    bits = [checkpoint.read_tensor_slice(info, axis, a, b) for a, b in _runs(need)]
    x = to_float32(np.concatenate(bits, axis=axis) if bits else
                   np.zeros(info.shape[:axis] + (0,) + info.shape[axis + 1:], checkpoint.DTYPES[info.dtype][0]),
                   info.dtype)
    if rule.transpose and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    for role, w in zip(rule.targets, want):
        yield role, src.layer, (np.ascontiguousarray(np.take(x, np.searchsorted(need, w), axis=fused)), "F32")


def _stacked(src: Source, splits: list[Split], tp: TensorParallelPlan, rank: int):
    """Rank's experts (or heads) of a per-expert (per-head) rule: only their tensors are read, then stacked."""
    rule = src.rule
    axis, lo, hi = _range(splits[0], rank)
    assert axis == 0 and all(_range(s, rank) == (axis, lo, hi) for s in splits), "stacked roles split whole entries"
    infos = src.infos[lo:hi] if splits[0].axis is not None else src.infos
    whole = [checkpoint.read_tensor_slice(i, 0, 0, i.shape[0]) if i.shape else checkpoint.read_tensor(i)
             for i in infos]
    dtypes = {i.dtype for i in infos}
    if len(dtypes) == 1 and not rule.transpose and len(rule.targets) == 1:
        yield rule.targets[0], src.layer, (np.stack(whole), infos[0].dtype)
        return
    x = np.stack([to_float32(b, i.dtype) for b, i in zip(whole, infos)])
    if rule.transpose:
        x = np.swapaxes(x, -1, -2)
    parts = [x] if len(rule.targets) == 1 else split_fused(
        x, [getattr(tp.config, s) for s in rule.split],
        getattr(tp.config, rule.interleave) if rule.interleave else 1, axis=1)
    for role, part in zip(rule.targets, parts):
        yield role, src.layer, (np.ascontiguousarray(part), "F32")
