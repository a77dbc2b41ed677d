"""RowSampler: GPU sampling of many rows in one launch per pass, for the engine's batched steps (issue 15). The
backend reaches it through its room row_sampling.py (sample_rows), as batch_step.py reaches batch_graph.py.

sample.cu's `sample_pass` runs over the R rows of a step at once (gridDim.y = R), so a step of sampled requests
hands 8 bytes a row back to the host instead of the row's logits, and no row is sorted by numpy.

A request keeps a SLOT from one step to the next: the kernel's per-request state (SampleParams, SampleState, the
keys and the seen mask) lives there, while a step's rows are whichever requests want a token. RowSampler holds S
slots (S grows to the next power of two when a call has more rows; the old buffers are freed and every request's slot
is set up again), assigns them by request key (a key not used by the current call is evicted, least recently used
first, when they run out), uploads a slot's parameters when they change and its seen mask when the slot is
(re)assigned or the mask no longer covers the request's tokens. The kernel marks each pick seen, so in the steady
state a call copies one int32 array of slots and counters to the device and one of (id, flag) pairs back.

Each row samples as the solo run's GpuSampler does (the same kernel, blocks per row, seed and counter), so a request
batched with others gets the tokens it gets alone. Eager only (one synchronisation per call), never under capture.
"""

from __future__ import annotations

import atexit
import collections
import weakref

import numpy as np

from ..errors import DeviceError, GenerationError
from .gpu_sampling import (MAX_VOCAB, PARAMS_DTYPE, PASS_FORMAT, SAMPLE_PASSES, STATE_BYTES, THREADS, blocks_per_row,
                           pack_params)
from .tensors import DTensor

MAX_ROWS = 65535  # gridDim.y: one row of blocks per row


class RowSampler:
    """GPU sampling state of S request slots for a vocabulary of V (see the module docstring).

    Each row of a call is a tuple (key, params, seed, counter, tokens): key, a hashable that names the request from
    one call to the next (no two rows of a call share one); params, its core.sampling.SamplingParams (temperature,
    top-k, top-p and the repetition penalty are applied); seed, the non-negative int keying its draws; counter,
    the draw's counter (the position of the token fed in this step); tokens, every id the request has seen
    (prompt and output), whose last element is the one fed in this step. The caller appends each unflagged pick
    to the request's tokens before its next call (the kernel has already marked it seen)."""

    def __init__(self, be, vocab_size: int):
        V = int(vocab_size)
        if not 1 <= V <= MAX_VOCAB:
            raise DeviceError(f"GPU sampling handles vocabularies of 1 to {MAX_VOCAB} tokens, not {V}")
        self.be, self.V, self.S = be, V, 0
        self._bufs: dict = {}
        self._slot_of: collections.OrderedDict = collections.OrderedDict()  # key -> slot, least recently used first
        self._covered: dict = {}  # key -> (len(tokens) its slot's seen mask covers, the last of them)
        self._params = np.zeros(0, PARAMS_DTYPE)  # what each slot's SampleParams on the device hold
        self._host: list = []  # host arrays kept alive until the call's uploads have run
        self.fn = be.kernel("sample.cu", "sample_pass", PASS_FORMAT)
        self.gx = blocks_per_row(be, V)

    def sample(self, logits, rows) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [R], bad bool [R]) for logits DTensor float32 [R, V] and R row tuples (class docstring): each
        row's pick, and whether its logits were not finite (NaN or +inf anywhere, or all -inf; gpu_sampling.pick's
        rule). A flagged row's id is not a sample and is not marked seen."""
        ids, bad, _ = self._run(logits, rows, mark=1, want_warped=False)
        return ids, bad

    def debug_warped(self, logits, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """sample()'s (ids, bad) and the warped logits float32 [R, V] the kernel drew from (GpuSampler.debug_warped's,
        per row); leaves the seen masks alone, so the rows' tokens must not gain the ids (for tests)."""
        return self._run(logits, rows, mark=0, want_warped=True)

    def slot(self, key) -> int | None:
        """The slot `key` holds now, or None (for tests)."""
        return self._slot_of.get(key)

    def seen_mask(self, slot: int) -> np.ndarray:
        """bool [V]: the seen mask of `slot` on the device (waits for the stream; for tests)."""
        if not 0 <= slot < self.S:
            raise DeviceError(f"slot {slot} is not one of the {self.S} slots")
        be, mask = self.be, np.empty(self.V, np.uint8)
        be.synchronize("seen mask")
        be.check(lambda: be.drv.memcpy_dtoh(mask, int(self._bufs["seen"]) + slot * self.V), "seen mask")
        return mask.astype(bool)

    def free(self) -> None:
        """Free every device buffer and forget every slot (the next call sets them up again)."""
        be = self.be
        if self._bufs:
            try:
                be.stream.synchronize()  # a failed call may have left launches that use the buffers in flight
            except be.drv.Error:
                pass  # freeing is still right; the error was (or will be) reported where it happened
        for buf in self._bufs.values():
            buf.free()
        self._bufs, self.S = {}, 0
        self._slot_of.clear()
        self._covered.clear()
        self._params = np.zeros(0, PARAMS_DTYPE)
        self._host.clear()

    # -- internals ---------------------------------------------------------------------------------------------
    def _run(self, logits, rows, mark: int, want_warped: bool):
        be, V = self.be, self.V
        if be.capture is not None:
            raise DeviceError("RowSampler samples eagerly: not inside a graph capture")
        rows = list(rows)
        R = len(rows)
        if not isinstance(logits, DTensor) or logits.dtype != "float32" or logits.size != R * V:
            raise DeviceError(f"RowSampler needs float32 logits of {R} rows of {V} on the GPU, got {logits!r}")
        if R == 0:
            return np.zeros(0, np.int64), np.zeros(0, bool), np.zeros((0, V), np.float32)
        if R > MAX_ROWS:
            raise DeviceError(f"RowSampler samples at most {MAX_ROWS} rows a call (gridDim.y), not {R}")
        keys = [row[0] for row in rows]
        if len(set(keys)) != R:
            raise DeviceError("two rows of one sample_rows call name the same request (they would share a slot)")
        packed = [pack_params(params, seed).view(PARAMS_DTYPE)[0] for _, params, seed, _, _ in rows]  # raises first
        if R > self.S:
            self._grow(R)
        slots = self._assign(keys)
        for (key, _, _, _, tokens), s in zip(rows, slots):
            self._sync_seen(key, s, tokens)
        params = self._params.copy()
        params[slots] = packed
        if (params != self._params).any():  # self._params changes only with what the device gets
            self._upload(self._bufs["params"], params.view(np.uint8), "parameters")
            self._params = params
        # slots then counters (int32 bits of the counter, as GpuSampler passes it): one copy for both
        counters = np.asarray([int(row[3]) & 0xFFFFFFFF for row in rows], np.uint32).view(np.int32)
        idx = np.concatenate([np.asarray(slots, np.int32), counters])
        self._upload(self._bufs["idx"], idx, "slots and counters")
        warped = be.alloc((R, V)) if want_warped else None
        base = int(self._bufs["idx"])
        for p in range(SAMPLE_PASSES):
            be.launch(f"sample_rows[{p}]", self.fn, (self.gx, R, 1), (THREADS, 1, 1), int(self._bufs["params"]),
                      int(self._bufs["state"]), int(self._bufs["keys"]), int(self._bufs["seen"]), logits.ptr,
                      int(self._bufs["out"]), warped, base + 4 * R, base, 0, V, p, mark)
        be.synchronize("sample_rows")
        self._host.clear()
        raw = np.empty(2 * R, np.int32)
        be.check(lambda: be.drv.memcpy_dtoh(raw, int(self._bufs["out"])), "sample_rows")
        ids, bad = raw[0::2].astype(np.int64), raw[1::2] != 0
        if mark:  # the kernel marked each unflagged pick: the mask now covers the tokens plus it
            for (key, _, _, _, tokens), tok, b in zip(rows, ids.tolist(), bad.tolist()):
                if not b:
                    self._covered[key] = (len(tokens) + 1, tok)
        return ids, bad, (be.to_host(warped) if warped is not None else None)

    def _grow(self, need: int) -> None:
        """Room for `need` rows: S becomes the next power of two; the old slots are freed and forgotten."""
        be, V = self.be, self.V
        S = 1 << (need - 1).bit_length()
        self.free()
        sizes = {"params": S * PARAMS_DTYPE.itemsize, "state": S * STATE_BYTES, "keys": S * 4 * V, "seen": S * V,
                 "out": S * 8, "idx": S * 8}
        bufs = {name: be.mem_alloc(n, f"row sampling {name} for {S} requests") for name, n in sizes.items()}
        for name in ("params", "state", "seen"):  # the kernel expects a zeroed state; params match self._params
            be.check(lambda: be.drv.memset_d8_async(int(bufs[name]), 0, sizes[name], be.stream), "row sampling state")
        self._bufs, self.S = bufs, S
        self._params = np.zeros(S, PARAMS_DTYPE)

    def _assign(self, keys: list) -> list[int]:
        """The slot of each key: kept if it has one, else a free one, else the least recently used key's that is not
        in this call (there is one: len(keys) <= S). A newly assigned key's seen mask is uploaded again."""
        call = set(keys)
        for k in keys:
            if k in self._slot_of:
                self._slot_of.move_to_end(k)
        free = sorted(set(range(self.S)) - set(self._slot_of.values()), reverse=True)
        out = []
        for k in keys:
            s = self._slot_of.get(k)
            if s is None:
                if free:
                    s = free.pop()
                else:
                    victim = next(v for v in self._slot_of if v not in call)
                    s = self._slot_of.pop(victim)
                    self._covered.pop(victim, None)
                self._slot_of[k] = s  # (no mask covers k: a key is forgotten with its slot, so it uploads again)
            out.append(s)
        return out

    def _sync_seen(self, key, slot: int, tokens) -> None:
        """Upload the slot's seen mask from `tokens` unless it already covers exactly them (same count, same last)."""
        n = len(tokens)
        if n and self._covered.get(key) == (n, int(tokens[-1])):
            return
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.V):
            raise GenerationError(f"token ids must be in [0, {self.V}), got {ids.min()} .. {ids.max()}")
        mask = np.zeros(self.V, np.uint8)
        mask[ids] = 1
        self._upload(int(self._bufs["seen"]) + slot * self.V, mask, "seen mask")
        self._covered[key] = (n, int(ids[-1]) if n else None)

    def _upload(self, ptr, host: np.ndarray, what: str) -> None:
        be = self.be
        self._host.append(host)
        be.check(lambda: be.drv.memcpy_htod_async(int(ptr), host, be.stream), f"row sampling {what}")


def free_at_exit(sampler: RowSampler) -> None:
    """Free the sampler's buffers at interpreter exit while the CUDA context still exists: registered after PyCUDA's
    own exit hook, so it runs first (decode.free_at_exit explains why: left to the garbage collector after it, the
    frees abort the process)."""
    ref = weakref.ref(sampler)

    def free() -> None:
        s = ref()
        if s is None:
            return
        try:
            s.free()
        except Exception:  # noqa: BLE001 - exiting anyway; a failed clean-up must not hide the real exit status
            pass

    atexit.register(free)
