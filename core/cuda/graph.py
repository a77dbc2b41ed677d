"""Decode steps as CUDA graphs, through the driver API over ctypes (PyCUDA has no graph API).

A decode step is ~15 launches per layer; replaying them as one graph removes the per-launch host cost
(~7 us through PyCUDA vs ~1 us per kernel in a graph). The step is captured by running the ordinary
forward pass with the backend in capture mode (backend.capture set): every launch goes to the captured
stream, activation buffers are kept alive for the graph's lifetime (it reuses their addresses), and the
kernels read the token id and position from a small device buffer that is rewritten before each replay,
since a graph bakes its launch arguments in. The first step for a given (weights, cache) runs eagerly, so
kernels are compiled and constants uploaded before capture; later steps replay.
"""

from __future__ import annotations

import collections
import ctypes

import attrs
import numpy as np

from ..errors import ContextOverflowError, DeviceError
from .gpu_sampling import nonfinite_error, pick
from .tensors import DTensor

CAPTURE_MODE_RELAXED = 2  # CUstreamCaptureMode: allows the memory pool to cuMemAlloc during capture
MAX_GRAPHS = 8
RING = 8    # slots of the ring the steps write their picked ids into (host-mapped)
AHEAD = 3   # greedy steps in flight ahead of the host (< RING)

_libcuda = None


def _cuda():
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        for name, args in {
            "cuStreamBeginCapture_v2": [ctypes.c_void_p, ctypes.c_int],
            "cuStreamEndCapture": [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)],
            "cuGraphInstantiateWithFlags": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_ulonglong],
            "cuGraphLaunch": [ctypes.c_void_p, ctypes.c_void_p],
            "cuGraphExecDestroy": [ctypes.c_void_p],
            "cuGraphDestroy": [ctypes.c_void_p],
            "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        }.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        _libcuda = lib
    return _libcuda


def _call(name: str, *args) -> None:
    lib = _cuda()
    rc = getattr(lib, name)(*args)
    if rc != 0:
        s = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(s))
        raise DeviceError(f"CUDA graph call {name} failed: {(s.value or b'?').decode()} ({rc})")


@attrs.define
class Capture:
    """What the backend needs while capturing: where the inputs live, what to keep, the output."""

    ids: object            # DTensor int32 [1]: the token id
    start_ptr: int         # int32 [1]: its position
    keep: list = attrs.field(factory=list)
    out: object = None

    def output(self, x):
        self.out = x
        return np.zeros(x.shape, np.float32)  # forward's return value is not used while capturing


class Graph:
    """One captured decode step: its input buffer, output tensor and the instantiated graph."""

    def __init__(self, be, forward, W, c, cache, start, rope, greedy: bool = False, sampler=None):
        """greedy: the step ends in the GPU argmax; sampler (a GpuSampler): in a GPU sample. Either way its
        last kernel writes the picked id as the next step's input (run())."""
        drv = be.drv
        self.be = be
        self.inputs = drv.mem_alloc(8)                       # int32 [token, position]
        self.host = drv.pagelocked_empty(2, np.int32)
        cap = Capture(DTensor(self.inputs, int(self.inputs), (1,), "int32"), int(self.inputs) + 4)
        self.graph = ctypes.c_void_p()
        self.exec = ctypes.c_void_p()
        self.ring, self.ring_dev, self.mapped, self._ring_alloc = None, 0, False, None
        picks = greedy or sampler is not None
        if picks:  # compiled and loaded before capture, as the first (eager) step compiled the rest
            if greedy:
                be.kernel("sample.cu", "argmax_key", "PPi")
            advance = be.kernel("step.cu", "step_advance", "PPPPi")
            self.ring, self.ring_dev, self.mapped, self._ring_alloc = _ring(drv)
            ring_ptr = self.ring_dev
        be.synchronize("graph capture")
        stream = ctypes.c_void_p(be.stream.handle)
        _call("cuStreamBeginCapture_v2", stream, CAPTURE_MODE_RELAXED)
        be.capture = cap
        try:
            forward(be, W, c, np.asarray([0]), cache, start, rope, all_logits=False)
            if greedy and cap.out is not None:  # the step ends in the argmax: only its key is copied back
                cap.out = be.argmax_key(cap.out.reshape(-1))
                # ... and turns it into the next step's input, so steps can be launched ahead (run())
                be.launch("step_advance", advance, (1, 1, 1), (32, 1, 1), cap.ids, cap.out, None, ring_ptr, RING)
            elif sampler is not None and cap.out is not None:  # a sample keyed by (seed, position)
                cap.out = sampler.sample(cap.out.reshape(-1), counter_ptr=cap.start_ptr)
                be.launch("step_advance", advance, (1, 1, 1), (32, 1, 1), cap.ids, None, cap.out, ring_ptr, RING)
            be.flush_pending()  # (the model's attention takes every deferred cache write; none is left here)
        finally:
            be.drop_pending()  # never run a captured step's write outside it
            be.capture = None
            rc = _cuda().cuStreamEndCapture(stream, ctypes.byref(self.graph))
        if rc != 0 or cap.out is None:
            raise DeviceError(f"CUDA graph capture of a decode step failed (cuStreamEndCapture returned {rc})")
        _call("cuGraphInstantiateWithFlags", ctypes.byref(self.exec), self.graph, 0)
        self.keep, self.out, self.greedy, self.picks = cap.keep, cap.out, greedy, picks
        self.capacity = cache.k[0].shape[1]
        self.logits = drv.pagelocked_empty(self.out.shape, np.int32 if picks else np.float32)

    def replay(self, token: int, start: int) -> np.ndarray:
        if start + 1 > self.capacity:
            raise ContextOverflowError(f"decode at position {start} does not fit the KV cache of {self.capacity} positions")
        be, drv = self.be, self.be.drv
        self.host[0], self.host[1] = token, start
        drv.memcpy_htod_async(int(self.inputs), self.host, be.stream)
        _call("cuGraphLaunch", self.exec, ctypes.c_void_p(be.stream.handle))
        drv.memcpy_dtoh_async(self.logits, self.out.ptr, be.stream)
        be.synchronize("graph replay")
        if self.picks:
            if not self.greedy and self.logits[1]:
                raise nonfinite_error()
            return be.key_to_id(self.logits) if self.greedy else int(self.logits[0])
        return self.logits[-1].copy()

    def run(self, token: int, start: int, count: int):
        """Picked ids of `count` steps from (token, start), AHEAD launches in flight: each step's last kernel
        writes the next step's input on the GPU, so the host only reads the ids (from a host-mapped ring)
        while the next steps already run. Closing the generator early (a stop string, EOS) waits for the
        steps in flight, whose cache writes lie past the last token kept."""
        if not self.picks:
            raise DeviceError("Graph.run needs a step graph that picks its token on the GPU")
        if start + count > self.capacity:
            raise ContextOverflowError(f"decode at positions {start}..{start + count - 1} does not fit the KV cache "
                                       f"of {self.capacity} positions")
        be, drv = self.be, self.be.drv
        self.host[0], self.host[1] = token, start
        drv.memcpy_htod_async(int(self.inputs), self.host, be.stream)
        events, launched = collections.deque(), 0
        stream = ctypes.c_void_p(be.stream.handle)

        def launch():
            _call("cuGraphLaunch", self.exec, stream)
            if not self.mapped:  # a device ring: copy the step's slot back after it
                slot = (start + launched) % RING
                drv.memcpy_dtoh_async(self.ring[slot:slot + 1], self.ring_dev + 4 * slot, be.stream)
            ev = drv.Event(drv.event_flags.DISABLE_TIMING)
            ev.record(be.stream)
            events.append(ev)

        try:
            for i in range(count):
                while launched < count and launched < i + AHEAD:
                    launch()
                    launched += 1
                try:
                    events.popleft().synchronize()
                except drv.Error as e:
                    raise DeviceError(f"CUDA error in a decode step graph (position {start + i}): {e}") from None
                got = int(self.ring[(start + i) % RING])
                if got < 0:  # step.cu: -1 - id where the step's logits were not finite
                    raise nonfinite_error()
                yield got
        finally:
            be.synchronize("graph run-ahead")

    def destroy(self) -> None:
        if self.exec:
            _cuda().cuGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
        if self.graph:
            _cuda().cuGraphDestroy(self.graph)
            self.graph = ctypes.c_void_p()
        self.keep.clear()


def _ring(drv):
    """(int32 [RING] host array, pointer the kernel writes to, mapped?, allocation to keep): page-locked host
    memory mapped into the device's address space, or where that fails a device buffer copied back after
    each step."""
    try:
        host = drv.pagelocked_empty(RING, np.int32, mem_flags=drv.host_alloc_flags.DEVICEMAP)
        return host, int(host.base.get_device_pointer()), True, None
    except (drv.Error, AttributeError, TypeError):
        dev = drv.mem_alloc(4 * RING)
        return drv.pagelocked_empty(RING, np.int32), int(dev), False, dev


class GraphCache:
    """Captured decode steps of one backend, keyed by weights, config and cache buffers."""

    def __init__(self, be):
        self.be = be
        self.graphs: dict = {}
        self.eager: set = set()

    def step(self, forward, W, c, token: int, cache, start: int, rope, greedy: bool = False):
        """Logits [V] of the step, or with greedy the argmax id (an int)."""
        key = (id(W), id(c), id(forward), cache.k[0].ptr, cache.k[0].shape, len(cache.k), greedy, self._switches())
        g = self.graphs.get(key)
        if g is None:
            if key not in self.eager:  # first step: compile kernels and upload constants outside the graph
                self.eager.add(key)
                logits = forward(self.be, W, c, np.asarray([token]), cache, start, rope, all_logits=False)[-1]
                return pick(logits) if greedy else logits
            if len(self.graphs) >= MAX_GRAPHS:
                self.clear()
            g = self.graphs[key] = Graph(self.be, forward, W, c, cache, start, rope, greedy)
        return g.replay(token, start)

    def run(self, forward, W, c, token: int, cache, start: int, rope, count: int, sampler=None):
        """Ids of `count` decode steps from (token, start) picked on the GPU (greedy, or by `sampler`, a
        GpuSampler whose parameters and seen mask are set), run ahead (Graph.run); the first step for a
        (weights, cache) runs eagerly (compiles kernels, uploads constants), the next captures."""
        key = (id(W), id(c), id(forward), cache.k[0].ptr, cache.k[0].shape, len(cache.k),
               True if sampler is None else "sample", self._switches())
        if key not in self.graphs:
            if key not in self.eager:
                self.eager.add(key)
                logits = forward(self.be, W, c, np.asarray([token]), cache, start, rope, all_logits=False)[-1]
                if sampler is None:
                    token = pick(logits)
                else:  # the graph's draw, eagerly: same kernels, same counter (the position)
                    sampler.sample(self.be.from_host(logits), counter=start)
                    token = sampler.read_id()
                yield token
                start, count = start + 1, count - 1
                if count <= 0:
                    return
            if len(self.graphs) >= MAX_GRAPHS:
                self.clear()
            self.graphs[key] = Graph(self.be, forward, W, c, cache, start, rope, sampler is None, sampler)
        yield from self.graphs[key].run(token, start, count)

    def _switches(self) -> tuple:
        return switches(self.be)

    def clear(self) -> None:
        destroy_all(self.be, self.graphs)
        self.eager.clear()


def switches(be) -> tuple:
    """The backend switches a captured step depends on (flipping one captures anew): part of every graph's key."""
    return tuple(getattr(be, k, None) for k in ("fused", "pdl", "fold", "fold_ln", "gemm", "attn", "qtc", "skinny"))


def destroy_all(be, graphs: dict) -> None:
    """Wait for the stream (a graph may still run), destroy every graph in `graphs` and empty it."""
    try:
        be.stream.synchronize()
    except be.drv.Error:
        pass  # destroying is still right; the error was (or will be) reported where it happened
    for g in graphs.values():
        g.destroy()
    graphs.clear()
