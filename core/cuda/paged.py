"""Batched steps: the paged KV cache, and the ops of a forward over rows of many sequences (core.engine).

The engine runs one forward per step over a core.paged.Batch: rows of several sequences, each row at its own
position, keys and values kept in fixed-size blocks through per-sequence block tables. This room gives CudaBackend
what NumpyBackend has for that: new_paged_cache, rows, and the Batch forms of add_positions, rope,
rope_cache_write, cache_write and attention (the rooms owning those ops hand a Batch here). Kernels: paged.cu
(RoPE + per-head RMSNorm + pool write, learned positions, row gather) and paged_attn.cu (attention).

Per step the row positions, cache slots, segments and block tables are packed into one int32 array and uploaded
once, by the first op that needs them (StepArrays); the step's 2 x layers cache writes and attentions reuse that
copy. It is held here beside a weak reference to its Batch, one step at a time: Batch is a slotted attrs class,
so the backend cannot hang it on the Batch itself.

Batched steps run uncaptured (no CUDA graph) and never defer work: nothing here interacts with deferred.py's held
writes except that every launch flushes them first, as any launch does.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import attrs
import numpy as np

from ..errors import ContextOverflowError, DeviceError, DeviceMemoryError
from .capabilities import missing_paged
from .geometry import PAGED_NQ, paged_decode_geometry, paged_prefill_smem, paged_splits
from .kvcache import WORKSPACE_RESERVE
from .memory import mib
from .norm_rope import rope_layout
from .tensors import ITEMSIZE, DTensor, Lazy


@attrs.define(eq=False)
class DevicePagedCache:
    """The block pools of batched steps (new_paged_cache): per layer k and v, each a DTensor
    [num_blocks, Hkv, block_size, Dh] in the backend's dtype, all views of one allocation.

    Why head-major inside a block: the attention kernels work per kv head (a decode block stages a tile of keys
    once for every query head of the group), so they want one kv head's keys contiguous; here a block's
    block_size keys of a head are one run of block_size * Dh values (2 KB for TinyLlama's 16 x 64 fp16), read with
    16-byte loads by consecutive threads. Token-major blocks ([num_blocks, block_size, Hkv, Dh]) would cut that
    into runs of Dh values (128 bytes) strided by Hkv * Dh. The write side (one row of Dh per token and kv head)
    is small either way. Slot s (= block * block_size + offset, core.paged.Batch.slots) and kv head h is at
    ((block * Hkv + h) * block_size + offset) * Dh: common.cuh paged_row."""

    k: list
    v: list
    block_size: int
    num_blocks: int
    alloc: object = attrs.field(repr=False)  # the DeviceAllocation (freed when the cache is collected)
    spare: int | None = None  # a block past num_blocks that no sequence owns: batch_graph.py's padding rows write there


@attrs.define(eq=False)
class StepArrays:
    """One step's int32 arrays as the kernels read them (step_arrays); `dev` holds their device copies once
    uploaded (name -> DTensor) and `freqs` the step's per-segment RoPE tables (length-dependent rope) when used."""

    pos: np.ndarray      # [T] each row's position
    slot: np.ndarray     # [T] each row's cache slot: block * block_size + position % block_size
    row_seg: np.ndarray  # [T] each row's segment (which RoPE table it takes when tables differ per sequence)
    seg: np.ndarray      # [segments, 4] (first row, rows, start position, offset of its block table in `tables`),
                         #   then one-row entries for the rows of segments of at most PAGED_NQ rows
    tables: np.ndarray   # [...] the segments' block tables, each cut to the blocks the step's positions reach
    dec: np.ndarray      # [nd] entries of seg of one row (decode tokens and short segments' rows: paged_attn_decode)
    tiles: np.ndarray    # [ntiles, 2] (segment, first query) of every PAGED_NQ queries of longer segments
                         #   (paged_attn_prefill)
    max_dec: int         # keys of the longest decode entry (its position + 1), 0 if none
    max_block: int       # the largest block id any table names (-1 if none)
    dev: dict = attrs.field(factory=dict)
    freqs: object = None


def step_arrays(batch) -> StepArrays:
    """The arrays of a core.paged.Batch (host only: a DeviceError for a batch the kernels cannot take — rows not
    in segment order, a block table too short for its positions, a negative block id, slots past int32)."""
    bs, segs, row = batch.block_size, batch.segments, 0
    seg, tabs, off = [], [], 0
    for i, g in enumerate(segs):
        if g.row != row or g.n < 0 or g.start < 0:
            raise DeviceError(f"batched step: segment {i} has rows {g.row}..+{g.n} at position {g.start}; the "
                              f"kernels expect segments in row order from row 0 (this one at row {row})")
        need = -(-(g.start + g.n) // bs)
        tab = np.asarray(g.table[:need], dtype=np.int64)
        if tab.size < need or (tab.size and tab.min() < 0):
            raise DeviceError(f"batched step: segment {i} reaches position {g.start + g.n - 1}, which needs {need} "
                              f"blocks of {bs}; its table {list(g.table)[:need]} does not give them")
        seg.append((g.row, g.n, g.start, off))
        tabs.append(tab)
        off, row = off + tab.size, row + g.n
    tables = np.concatenate(tabs) if tabs else np.zeros(0, np.int64)
    slot = np.concatenate([batch.slots(g) for g in segs]) if segs else np.zeros(0, np.int64)
    if slot.size and slot.max() >= 2**31:
        raise DeviceError(f"batched step: cache slot {int(slot.max())} does not fit the kernels' int32 slots")
    i32 = lambda a: np.asarray(a, dtype=np.int32).reshape(-1)  # noqa: E731
    # A segment of one prefill tile's rows or fewer (a question after a cached system prompt, a chat turn) goes to
    # the decode kernel one row at a time, as extra one-row entries after the real segments: the prefill kernel
    # would give it one block per head for all of its keys, the decode kernel splits the keys over the card.
    ones, tiles = [], []
    for i, g in enumerate(segs):
        if g.n == 1:
            ones.append(i)
        elif g.n <= PAGED_NQ:
            for j in range(g.n):
                ones.append(len(seg))
                seg.append((g.row + j, 1, g.start + j, seg[i][3]))
        else:
            tiles += [(i, t0) for t0 in range(0, g.n, PAGED_NQ)]
    seg = np.asarray(seg, dtype=np.int32).reshape(-1, 4)
    return StepArrays(
        pos=i32(batch.positions), slot=i32(slot), row_seg=i32(np.repeat(np.arange(len(segs)), [g.n for g in segs])),
        seg=seg, tables=i32(tables), dec=i32(ones), tiles=np.asarray(tiles, dtype=np.int32).reshape(-1, 2),
        max_dec=int(seg[ones, 2].max()) + 1 if ones else 0, max_block=int(tables.max()) if tables.size else -1)


class PagedMixin:
    """CudaBackend's batched steps (see the module docstring).

    State (the facade gives it its first value): _paged_step, (weak reference to the Batch, its StepArrays) of
    the step in progress, or None. Uses the backend's dtype, poison, drv, stream, device and session_owner;
    session() (loading.py), mem_info() / mem_alloc() / alloc() / from_host() (memory.py), kernel() / launch()
    (launch.py), head_norm() (norm_rope.py), kv_bytes (kvcache.py)."""

    # -- the cache and the step's arrays --------------------------------------------------------------------
    def new_paged_cache(self, config, num_blocks: int, block_size: int) -> DevicePagedCache:
        """Block pools for batched steps: per layer k and v [num_blocks, Hkv, block_size, Dh] (DevicePagedCache).
        A DeviceError if batched steps cannot run this model (capabilities.missing_paged), a DeviceMemoryError if
        the pools do not fit beside the weights, the single-sequence KV cache and the activations' reserve."""
        missing = missing_paged(config)
        if missing:
            raise DeviceError(f"the CUDA backend cannot run batched steps of this model: its kernels lack "
                              f"{', '.join(missing)} (device='cpu' runs it)")
        if num_blocks < 1 or block_size < 1 or (num_blocks + 1) * block_size >= 2**31:
            raise DeviceError(f"a paged KV cache of {num_blocks} blocks of {block_size} positions: the kernels take "
                              f"1 to 2**31 - 1 slots")
        L, Hkv, Dh = config.num_layers, config.num_kv_heads, config.head_dim
        # bytes of one layer's k (or v), with one spare block for the padding rows of batched graphs (batch_graph.py)
        one = (num_blocks + 1) * Hkv * block_size * Dh * ITEMSIZE[self.dtype]
        # An engine may be made on a thread without the CUDA context (the server's): hold the session for the
        # allocation, unless this thread holds it already.
        with self._on_this_thread():
            free, total = self.mem_info()
            if 2 * L * one > free - WORKSPACE_RESERVE:
                raise DeviceMemoryError(
                    f"out of GPU memory for the paged KV cache: {num_blocks:,} blocks of {block_size} positions need "
                    f"{mib(2 * L * one)}, {mib(free)} free of {mib(total)} on {self.device.name()} (the single-"
                    f"sequence KV cache holds {mib(self.kv_bytes)}, {mib(WORKSPACE_RESERVE)} stay free for "
                    f"activations); give the engine fewer blocks (EngineConfig num_blocks or kv_tokens)")
            alloc = self.mem_alloc(2 * L * one, f"a paged KV cache of {num_blocks:,} blocks")
            if self.poison:  # NaN in every slot a step reads before writing it
                self.drv.memset_d8_async(int(alloc), 0xFF, 2 * L * one, self.stream)
        shape = (num_blocks, Hkv, block_size, Dh)
        k = [DTensor(alloc, int(alloc) + 2 * i * one, shape, self.dtype) for i in range(L)]
        v = [DTensor(alloc, int(alloc) + (2 * i + 1) * one, shape, self.dtype) for i in range(L)]
        return DevicePagedCache(k, v, block_size, num_blocks, alloc, spare=num_blocks)

    def paged_kv_tokens(self, config, block_size: int) -> int:
        """How many KV positions an engine's default pool holds on this card: 80% of the free memory after the
        weights, the single-sequence cache and the activations' reserve (vLLM's gpu_memory_utilization idea),
        and never more than 64 full contexts."""
        per_position = 2 * config.num_layers * config.num_kv_heads * config.head_dim * ITEMSIZE[self.dtype]
        with self._on_this_thread():
            free, _ = self.mem_info()
        fit = int(0.8 * max(free - WORKSPACE_RESERVE, 0)) // per_position
        return max(block_size, min(fit, 64 * config.context_limit))

    def bind_step(self, batch, st: StepArrays | None) -> None:
        """Make `st` (its `dev` filled) the arrays of `batch`'s step, instead of an upload (batch_graph.py binds
        its persistent buffer while capturing); (None, None) forgets the binding."""
        self._paged_step = None if batch is None else (weakref.ref(batch), st)

    def _on_this_thread(self):
        """The session around work outside any (engine construction), or nothing if this thread holds it."""
        return contextlib.nullcontext() if self.session_owner == threading.get_ident() else self.session()

    def _step(self, batch) -> StepArrays:
        """The batch's StepArrays with their device copies: built and uploaded (one copy) on the step's first op."""
        held = self._paged_step
        if held is not None and held[0]() is batch:
            return held[1]
        st = step_arrays(batch)
        names = ("pos", "slot", "row_seg", "seg", "tables", "dec", "tiles")
        parts = [getattr(st, n).reshape(-1) for n in names]
        dev = self.from_host(np.concatenate(parts).astype(np.int32))
        off = 0
        for n, a in zip(names, parts):
            st.dev[n] = DTensor(dev.buf, dev.ptr + 4 * off, (a.size,), "int32")
            off += a.size
        self._paged_step = (weakref.ref(batch), st)
        return st

    def _pools(self, cache, layer: int, batch, st: StepArrays) -> tuple[DTensor, DTensor]:
        """(k, v) pools of `layer`, after checking that the cache is a paged one the batch's tables fit."""
        if not isinstance(cache, DevicePagedCache):
            raise DeviceError(f"a batched step needs the cache new_paged_cache made, got {type(cache).__name__}")
        if cache.block_size != batch.block_size or st.max_block >= cache.num_blocks + (cache.spare is not None):
            raise DeviceError(f"batched step: block size {batch.block_size} and block {st.max_block} do not fit the "
                              f"paged cache ({cache.num_blocks} blocks of {cache.block_size})")
        return cache.k[layer], cache.v[layer]

    def _step_freqs(self, batch, st: StepArrays, table, freq, Dh: int):
        """(inverse frequencies float32 [tables, R/2], each row's table or None) for a rope op of the step: the
        step's table (`freq`, its device copy), or one table per sequence when the rope depends on the length."""
        if batch.tables is None:
            return freq, None
        if st.freqs is None:
            layout = rope_layout(table, Dh)
            if any(rope_layout(t, Dh) != layout for t in batch.tables):
                raise DeviceError("rope: the sequences' tables of a batched step differ in layout (dims, pairs, scale)")
            st.freqs = self.from_host(np.stack([np.asarray(t.inv_freq, np.float32) for t in batch.tables]))
        return st.freqs, st.dev["row_seg"]

    # -- ops -----------------------------------------------------------------------------------------------
    def rows(self, x: DTensor, idx) -> DTensor:
        """x [T, N] rows at idx (int [R]) → float32 [R, N]: the rows whose logits a batched step returns."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        T = x.shape[0]
        if idx.size == T and np.array_equal(idx, np.arange(T)):
            return x  # all rows in order; a one-row step keeps its pending norm for the output GEMV to fold in
        if idx.size and (idx.min() < 0 or idx.max() >= T):
            raise DeviceError(f"rows: indices {idx.tolist()} fall outside the {T} rows")
        if isinstance(x, Lazy):
            x = x.materialize()
        out = self.alloc((idx.size,) + x.shape[1:])
        N = x.size // T if T else 0
        if idx.size and N:
            fn = self.kernel("paged.cu", "gather_rows", "PPPii")
            self.launch("rows", fn, (idx.size, 1, 1), (256, 1, 1), out, x, self.from_host(idx.astype(np.int32)),
                        idx.size, N)
        return out

    def paged_add_positions(self, x: DTensor, table: DTensor, batch) -> DTensor:
        """x [T, D] + table [P, D] rows at the batch's per-row positions (learned absolute positions)."""
        st = self._step(batch)
        T, D = x.shape
        if st.pos.size and int(st.pos.max()) >= table.shape[0]:
            raise ContextOverflowError(f"add_positions: position {int(st.pos.max())} is past the {table.shape[0]} "
                                       f"learned positions")
        out = self.alloc(x.shape)
        if T and D:
            fn = self.kernel("paged.cu", "paged_add_positions", "PPPPii")
            self.launch("add_positions(paged)", fn, (T, 1, 1), (min(256, 32 * -(-D // 32)), 1, 1), out, x, table,
                        st.dev["pos"], T, D)
        return out

    def paged_rope(self, x: DTensor, batch, table, freq) -> DTensor:
        """RoPE of x [T, H, Dh] at the batch's per-row positions with `table` (freq: its device inverse
        frequencies; per-sequence tables come from batch.tables)."""
        out = self.alloc(x.shape)
        self._rope_kv("rope(paged)", out, x, None, None, None, None, batch, table, freq, None)
        return out

    def paged_rope_cache_write(self, q: DTensor, k: DTensor, v: DTensor, cache, layer: int, batch, table, freq,
                               qk_norm=None) -> DTensor:
        """rope(q [T, H, Dh]) returned; rope(k [T, Hkv, Dh]) and v stored at the rows' cache slots; qk_norm (q
        gain, k gain, eps, offset) is a per-head RMSNorm first. One kernel, unless the gains are per head (then
        head_norm runs first)."""
        if qk_norm is not None and (qk_norm[0].size != q.shape[-1] or qk_norm[1].size != k.shape[-1]):
            qw, kw, eps, off = qk_norm
            q, k, qk_norm = self.head_norm(q, qw, eps, off), self.head_norm(k, kw, eps, off), None
        out = self.alloc(q.shape)
        self._rope_kv("rope_cache_write(paged)", out, q, k, v, cache, layer, batch, table, freq, qk_norm)
        return out

    def paged_cache_write(self, cache, layer: int, k: DTensor, v: DTensor, batch) -> None:
        """Store k, v [T, Hkv, Dh] at the rows' cache slots of `layer`."""
        self._rope_kv("cache_write(paged)", None, None, k, v, cache, layer, batch, None, None, None)

    def _rope_kv(self, op, qo, q, k, v, cache, layer, batch, table, freq, qk_norm) -> None:
        """Launch paged_rope_kv: q (H heads, or none) rotated into qo; k (Hkv heads, or none) rotated and stored
        with v; no table: nothing rotates (the plain cache write)."""
        st = self._step(batch)
        x = q if q is not None else k
        T, Dh = x.shape[0], x.shape[-1]
        H, Hkv = (q.shape[1] if q is not None else 0), (k.shape[1] if k is not None else 0)
        kp = vp = None
        if k is not None:
            kp, vp = self._pools(cache, layer, batch, st)
            if kp.shape[1:] != (Hkv, batch.block_size, Dh) or v.shape != k.shape:
                raise DeviceError(f"{op}: k {list(k.shape)} and v {list(v.shape)} do not fit pools {list(kp.shape)}")
        R, inter, scale, f, rt = 0, False, 1.0, None, None
        if table is not None:
            R, inter, scale = rope_layout(table, Dh)
            f, rt = self._step_freqs(batch, st, table, freq, Dh)
        qw, kw, eps, off = qk_norm if qk_norm is not None else (None, None, 0.0, 0.0)
        if T * (H + Hkv):
            fn = self.kernel("paged.cu", "paged_rope_kv", "PPPPPPPPPPPPffiiiiiiif")
            self.launch(op, fn, (-(-T * (H + Hkv) // 4), 1, 1), (128, 1, 1), qo, q, k, v, kp, vp, f, rt,
                        st.dev["pos"], st.dev["slot"], qw, kw, float(eps), float(off), T, H, Hkv, Dh,
                        batch.block_size, R, int(inter), float(scale))

    def paged_attention(self, q: DTensor, cache, layer: int, batch, scale: float, window, softcap, sms: int) -> DTensor:
        """Causal GQA attention of q [T, H, Dh] over each row's sequence in the paged cache → float32 [T, H, Dh]:
        one-row segments by paged_attn_decode (split over the keys so that ~4 blocks run per multiprocessor; `sms`
        is their count) and paged_attn_combine, longer ones by paged_attn_prefill. window / softcap as attention()."""
        st = self._step(batch)
        kp, vp = self._pools(cache, layer, batch, st)
        T, H, Dh = q.shape
        Hkv = kp.shape[1]
        if H % Hkv or kp.shape[3] != Dh:
            raise DeviceError(f"attention: q {list(q.shape)} does not fit the pools {list(kp.shape)}")
        win, cap = int(window or 0), float(softcap or 0.0)
        group, chunks, threads, smem = paged_decode_geometry(Dh, H // Hkv)
        out = self.alloc(q.shape)
        d = st.dev
        if st.dec.size:
            keys = min(st.max_dec, win) if win else st.max_dec
            nsplit = paged_splits(st.dec.size * Hkv * chunks, keys, sms)
            part = self.alloc((st.dec.size, H, nsplit, 2 + Dh)) if nsplit > 1 else None
            fn = self._attn_kernel("paged_attn_decode", "PPPPPPPPiiifif", Dh, group, smem)
            self.launch("attention(paged decode)", fn, (st.dec.size, Hkv * chunks, nsplit), (threads, 1, 1), out,
                        part, q, kp, vp, d["seg"], d["tables"], d["dec"], H, Hkv, batch.block_size, float(scale), win,
                        cap, shared=smem)
            if part is not None:
                fn = self._attn_kernel("paged_attn_combine", "PPPPii", Dh, group, 0)
                self.launch("attention(paged combine)", fn, (st.dec.size, H, 1), (min(128, 32 * -(-Dh // 32)), 1, 1),
                            out, part, d["seg"], d["dec"], H, nsplit)
        if st.tiles.size:
            smem = paged_prefill_smem(Dh)
            fn = self._attn_kernel("paged_attn_prefill", "PPPPPPPiiifif", Dh, group, smem)
            self.launch("attention(paged prefill)", fn, (st.tiles.shape[0], H, 1), (128, 1, 1), out, q, kp, vp,
                        d["seg"], d["tables"], d["tiles"], H, Hkv, batch.block_size, float(scale), win, cap,
                        shared=smem)
        return out

    def _attn_kernel(self, name: str, fmt: str, Dh: int, group: int, smem: int):
        """A paged_attn.cu kernel of the module built for (Dh, group), allowed `smem` bytes of dynamic shared
        memory (past the default 48 KB the function must opt in)."""
        fn = self.kernel("paged_attn.cu", name, fmt, HEAD_DIM=Dh, GROUP=group)
        if smem > 48 * 1024 and getattr(fn, "_smem", 0) < smem:
            fn.set_attribute(self.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            fn._smem = smem
        return fn
