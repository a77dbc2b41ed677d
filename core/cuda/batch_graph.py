"""Decode-only batched steps (core.engine) as CUDA graphs, one per (rows bucket, keys bucket).

An eager batched step costs ~12 launches a layer at ~7 us of host time each (PyCUDA, cuBLAS through ctypes): ~2 ms
a step for TinyLlama's 22 layers whatever the batch, more than the GPU's own time up to dozens of rows. A step
whose every segment is one decode row is the same launch sequence for any contents, so it is captured once per
shape and replayed:

- Rows are padded to a bucket B (1, 2, 4, ... MAX_ROWS): padding rows decode token 0 at position 0 of the paged
  cache's spare block (DevicePagedCache.spare, which no sequence owns), so they write and read nothing of anyone
  else's; their logits are never looked at.
- The step's int32 arrays (core/cuda/paged.py StepArrays) live in one persistent device buffer per graph, laid
  out for B rows and block tables of the longest context; before each replay the host writes the step's values
  into a page-locked copy and one asynchronous copy moves them (token ids first). Kernels read everything that
  changes from there, as the single-sequence graphs read their token and position (graph.py).
- The attention's key-splitting (paged_splits) follows the longest row's keys, which grows; the graph is captured
  for a keys bucket (the next power of two, at least MIN_KEYS) and the kernels skip the splits past each row's own
  keys, as they already do for the shorter rows of an eager step.
- cuBLAS products are captured too (linear.py: the handle gets a fixed workspace, so cuBLAS allocates nothing
  while capturing); a mixture-of-experts layer with more than MOE_DECODE_T rows groups tokens on the host, so such
  models use graphs only up to that many rows.

As graph.py does for single steps, a shape's first step runs eagerly (compiles kernels, uploads constants such as
the RoPE frequencies) and its second is captured. A graph is keyed by weights, config, cache buffers, B, the keys
bucket and the backend switches; release() and clear_graphs() destroy them. The backend reaches this module through
its room batch_step.py.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import numpy as np

from ..errors import DeviceError
from ..log import warn_once
from ..paged import Batch, Segment
from .graph import CAPTURE_MODE_RELAXED, Capture, _call, _cuda, destroy_all, switches
from .moe import MOE_DECODE_T
from .paged import DevicePagedCache, StepArrays, step_arrays
from .tensors import DTensor, Lazy

MAX_ROWS = 128        # the largest bucket; a step of more rows runs eagerly
MIN_KEYS = 256        # the smallest keys bucket
MAX_BATCH_GRAPHS = 16  # captured shapes kept per backend (least recently used dropped first): each keeps its
                       # activations, ~165 MB for 64 rows of TinyLlama
FIELDS = ("ids", "pos", "slot", "row_seg", "seg", "dec", "tables")


def bucket(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least)."""
    return 1 << max(int(n) - 1, int(least) - 1, 0).bit_length()


def eligible(be, c, cache, batch: Batch, rope) -> bool:
    """Whether this batched step can replay a graph: graphs and fused kernels on, every segment one decode row
    whose logits are wanted, one RoPE table for all rows, the paged cache new_paged_cache made, and no grouped
    mixture-of-experts product (more than MOE_DECODE_T rows of a MoE model)."""
    segs = batch.segments
    if not (be.graphs and be.fused and segs and len(segs) <= MAX_ROWS) or batch.tables is not None:
        return False
    if rope is not None and getattr(rope, "dynamic", False):
        return False
    if not isinstance(cache, DevicePagedCache) or cache.spare is None:
        return False
    if c.num_experts and bucket(len(segs)) > MOE_DECODE_T:
        return False
    return all(g.n == 1 and g.logits for g in segs)


class BatchGraph:
    """One captured decode-only batched step of B rows (see the module docstring)."""

    def __init__(self, be, forward, W, c, cache: DevicePagedCache, rope, B: int, keys: int):
        drv = be.drv
        self.be, self.B, self.keys = be, B, keys
        self.width = B * -(-c.context_limit // cache.block_size) + 1  # every row's table, and the spare block's
        sizes = {"ids": B, "pos": B, "slot": B, "row_seg": B, "seg": 4 * B, "dec": B, "tables": self.width}
        self.offsets, off = {}, 0
        for name in FIELDS:
            self.offsets[name] = (off, sizes[name])
            off += sizes[name]
        self.host = drv.pagelocked_empty(off, np.int32)
        self.copied = None  # an event after the last copy of `host` to the device: host is not rewritten before it
        self.dev = be.mem_alloc(4 * off, f"a batched step graph's inputs ({B} rows)")
        self.graph, self.exec = ctypes.c_void_p(), ctypes.c_void_p()
        self.keep, self.out = [], None
        dev = self._views()
        batch = self.padded_batch(cache, B)  # a Batch of the right shape: the capture reads only its shape
        st = self.fill(batch, cache, [0] * B)
        st.dev.update(dev)
        st.max_dec = keys
        try:
            self._capture(be, forward, W, c, cache, rope, batch, st, dev)
        except BaseException:
            self.destroy()
            raise

    def _capture(self, be, forward, W, c, cache, rope, batch, st, dev) -> None:
        B = self.B
        be.drv.memcpy_htod(int(self.dev), self.host)
        be.synchronize("batch graph capture")
        stream = ctypes.c_void_p(be.stream.handle)
        cap = Capture(DTensor(self.dev, int(self.dev), (B,), "int32"), dev["pos"].ptr)
        _call("cuStreamBeginCapture_v2", stream, CAPTURE_MODE_RELAXED)
        be.capture = cap
        be.bind_step(batch, st)  # the step's arrays: this graph's buffer, not an upload
        try:
            out = forward(be, W, c, np.zeros(B, np.int64), cache, batch, rope, all_logits=False, host=False)
            if isinstance(out, Lazy):
                out = out.materialize()
            be.flush_pending()
            cap.out = out
        finally:
            be.drop_pending()
            be.capture = None
            be.bind_step(None, None)
            rc = _cuda().cuStreamEndCapture(stream, ctypes.byref(self.graph))
        if rc != 0 or not isinstance(cap.out, DTensor):
            raise DeviceError(f"CUDA graph capture of a batched decode step failed (cuStreamEndCapture returned {rc})")
        _call("cuGraphInstantiateWithFlags", ctypes.byref(self.exec), self.graph, 0)
        self.keep, self.out = cap.keep, cap.out

    def _views(self) -> dict:
        base = int(self.dev)
        return {name: DTensor(self.dev, base + 4 * off, (n,), "int32") for name, (off, n) in self.offsets.items()
                if name != "ids"}

    @staticmethod
    def padded_batch(cache: DevicePagedCache, B: int, segs=()) -> Batch:
        """segs, then one-row segments at position 0 of the spare block up to B rows."""
        segs = list(segs)
        segs += [Segment(i, 1, 0, [cache.spare], True) for i in range(len(segs), B)]
        return Batch(segs, cache.block_size)

    def fill(self, batch: Batch, cache: DevicePagedCache, ids) -> StepArrays:
        """Write the padded batch's arrays (and token ids) into the page-locked host copy; returns them."""
        st = step_arrays(batch)
        if self.copied is not None:
            self.copied.synchronize()
        if st.tables.size > self.width:
            raise DeviceError(f"batched step graph: {st.tables.size} block-table entries exceed the {self.width} "
                              f"it was captured for")
        parts = {"ids": np.asarray(ids, np.int32), "pos": st.pos, "slot": st.slot, "row_seg": st.row_seg,
                 "seg": st.seg.reshape(-1), "dec": st.dec, "tables": st.tables}
        for name, (off, n) in self.offsets.items():
            a = parts[name]
            self.host[off:off + a.size] = a
        return st

    def fill_decode(self, batch: Batch, cache: DevicePagedCache, ids) -> None:
        """fill for a batch of one-row segments, padded to B, without building the padded Batch and its
        StepArrays: a few vectorised lines instead of per-segment numpy calls (~20 us each, 1+ ms at 64 rows).
        Gives the arrays step_arrays gives (tests/test_cuda_paged.py checks it on the CPU)."""
        B, bs, segs = self.B, cache.block_size, batch.segments
        C = len(segs)
        starts = np.zeros(B, np.int64)
        starts[:C] = [g.start for g in segs]
        need = starts // bs + 1
        tabs = [g.table[:n] for g, n in zip(segs, need[:C].tolist())]
        if any(len(t) < n for t, n in zip(tabs, need[:C].tolist())):
            raise DeviceError("batched step graph: a segment's block table does not reach its position")
        tables = np.fromiter(itertools.chain.from_iterable(tabs), np.int64, int(need[:C].sum()))
        tables = np.concatenate([tables, np.full(B - C, cache.spare, np.int64)])
        if tables.size > self.width:
            raise DeviceError(f"batched step graph: {tables.size} block-table entries exceed the {self.width} it "
                              f"was captured for")
        off = np.concatenate([[0], np.cumsum(need)[:-1]])
        rows = np.arange(B)
        slot = tables[off + need - 1] * bs + starts % bs
        seg = np.stack([rows, np.ones(B, np.int64), starts, off], axis=1)
        if self.copied is not None:
            self.copied.synchronize()
        h, o = self.host, self.offsets
        for name, a in (("ids", np.concatenate([np.asarray(ids, np.int64), np.zeros(B - C, np.int64)])),
                        ("pos", starts), ("slot", slot), ("row_seg", rows), ("seg", seg.reshape(-1)), ("dec", rows),
                        ("tables", tables)):
            h[o[name][0]:o[name][0] + a.size] = a

    def replay(self, ids, batch: Batch, cache: DevicePagedCache) -> DTensor:
        """Run the step for `batch`'s rows (fewer than or B) with token `ids`: float32 logits [rows, V] on the GPU,
        valid until the next replay of this graph."""
        be = self.be
        C = len(batch.segments)
        self.fill_decode(batch, cache, ids)
        be.check(lambda: be.drv.memcpy_htod_async(int(self.dev), self.host, be.stream), "batch graph inputs")
        if self.copied is None:
            self.copied = be.drv.Event(be.drv.event_flags.DISABLE_TIMING)
        self.copied.record(be.stream)
        _call("cuGraphLaunch", self.exec, ctypes.c_void_p(be.stream.handle))
        be.after_op("batch graph")
        return self.out[:C]

    def destroy(self) -> None:
        if self.exec:
            _cuda().cuGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
        if self.graph:
            _cuda().cuGraphDestroy(self.graph)
            self.graph = ctypes.c_void_p()
        self.keep, self.copied = [], None
        if self.dev is not None:
            self.dev.free()
            self.dev = None


class BatchGraphs:
    """The captured batched steps of one backend (see the module docstring)."""

    def __init__(self, be):
        self.be = be
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.eager: set = set()
        self.failed: set = set()
        self.replays = 0

    def step(self, forward, W, c, ids, cache, batch: Batch, rope):
        """Logits [rows, V] on the GPU from a graph of this step's shape, or None when it is not eligible or is
        the first step of its shape (the caller then runs it eagerly)."""
        be = self.be
        if not eligible(be, c, cache, batch, rope):
            return None
        B = bucket(len(batch.segments))
        keys = bucket(max(g.start + 1 for g in batch.segments), MIN_KEYS)
        key = (id(W), id(c), id(forward), cache.k[0].ptr, len(cache.k), cache.num_blocks, cache.block_size, B, keys,
               switches(be))
        g = self.graphs.get(key)
        if g is None:
            if key not in self.eager:  # first of its shape: eager (compiles, uploads constants), padded like a graph
                self.eager.add(key)
                padded = BatchGraph.padded_batch(cache, B, batch.segments)
                ids = list(ids) + [0] * (B - len(batch.segments))
                out = forward(be, W, c, np.asarray(ids, np.int64), cache, padded, rope, all_logits=False, host=False)
                if isinstance(out, Lazy):
                    out = out.materialize()
                return out[:len(batch.segments)]
            if key in self.failed:
                return None
            while len(self.graphs) >= MAX_BATCH_GRAPHS:
                self.graphs.popitem(last=False)[1].destroy()
            be.synchronize("batch graph")
            try:
                g = BatchGraph(be, forward, W, c, cache, rope, B, keys)
            except (DeviceError, be.drv.Error) as e:  # e.g. a library call that cannot be captured: eager steps
                self.failed.add(key)
                warn_once(f"a batched decode step of {B} rows could not be captured as a CUDA graph ({e}); such "
                          f"steps run without one")
                return None
            self.graphs[key] = g
        self.graphs.move_to_end(key)
        self.replays += 1
        return g.replay(ids, batch, cache)

    def clear(self) -> None:
        """Destroy every captured step (after a switch flips, before buffers they use are freed)."""
        destroy_all(self.be, self.graphs)
        self.eager.clear()
        self.failed.clear()
