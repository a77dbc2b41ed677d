"""Sampling on the GPU: core/sampling.py's rules (repetition penalty -> temperature -> top-k -> top-p, seeded)
run by sample.cu's `sample_pass`, so a decode step's CUDA graph can end in a sampled token id without copying
the logits to the host.

Every parameter lives in device memory (set_params copies it there), so one captured graph serves any
parameters; the random draw is keyed by (seed, counter), where the counter is read from device memory under
capture (the step's position). Each sample() is SAMPLE_PASSES launches of one kernel (sample.cu explains the
passes); the chosen id is also marked in the seen mask, so the repetition penalty follows the generated tokens
without the host.

Use (the order matters only as shown):
    gs = GpuSampler(be, V)
    gs.set_params(params, seed)       # host -> device, on be's stream; not while capturing
    gs.set_seen(prompt_ids)           # likewise
    out = gs.sample(logits)           # DTensor int32 [2] (always the same buffer): (id, non-finite flag)

Non-finite logits (a NaN or +inf anywhere, or every logit -inf) set the flag: read_id() and graph.py, which gets
the flag through step.cu's ring, raise NonFiniteLogitsError (issue 17); `pick()` applies the same rule to logits
on the host, for the eager steps, so one rule holds whichever path picks. -inf among finite values is a masked
logit, not an error.
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceError, GenerationError, NonFiniteLogitsError
from ..sampling import SamplingParams
from .tensors import DTensor

SAMPLE_PASSES = 9          # sample.cu SAMPLE_PASSES
THREADS = 512              # sample.cu SAMPLE_THREADS
STATE_BYTES = 32768        # sample.cu SAMPLE_STATE_BYTES
MAX_VOCAB = 1 << 22        # sample.cu TIE_BITS
ELEMS_PER_THREAD = 4       # grid: ceil(V / (THREADS * this)) blocks, at most one per SM
# sample_pass's PyCUDA argument format (params, state, keys, seen, logits, out, warped, counter_dev, slots; counter, V,
# pass, mark): one constant, since the backend caches the prepared kernel by file and name, not by format, and
# row_sampler.py launches the same kernel.
PASS_FORMAT = "PPPPPPPPPiiii"
PARAMS_DTYPE = np.dtype([("temperature", "<f8"), ("top_p", "<f8"), ("penalty", "<f4"), ("top_k", "<i4"),
                         ("seed_lo", "<u4"), ("seed_hi", "<u4")])  # sample.cu SampleParams (32 bytes)
assert PARAMS_DTYPE.itemsize == 32


def pack_params(params: SamplingParams, seed: int) -> np.ndarray:
    """SampleParams as bytes: None top_k / top_p become their 'off' values (0, 1.0)."""
    params.validate()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise GenerationError(f"seed={seed!r} must be a non-negative integer")
    rec = np.zeros(1, PARAMS_DTYPE)
    rec["temperature"] = float(params.temperature)
    rec["top_p"] = 1.0 if params.top_p is None else float(params.top_p)
    rec["penalty"] = float(params.repetition_penalty)
    rec["top_k"] = min(int(params.top_k or 0), 2**31 - 1)
    seed = int(seed) & (2**64 - 1)
    rec["seed_lo"], rec["seed_hi"] = seed & 0xFFFFFFFF, seed >> 32
    return rec.view(np.uint8)


def blocks_per_row(be, V: int) -> int:
    """gridDim.x of sample_pass for a vocabulary of V: ceil(V / (THREADS * ELEMS_PER_THREAD)), at most one per SM
    (the same for one row and for many, so a row samples the same way in both)."""
    sms = be.device.get_attribute(be.drv.device_attribute.MULTIPROCESSOR_COUNT)
    return max(1, min(-(-V // (THREADS * ELEMS_PER_THREAD)), sms))


def nonfinite_error() -> NonFiniteLogitsError:
    """The error a GPU pick's non-finite flag becomes (the generation loop adds the step)."""
    return NonFiniteLogitsError("non-finite logits: NaN or +inf among them, or all of them -inf; the weights or the "
                                "activations overflowed")


def pick(logits: np.ndarray) -> int:
    """numpy's argmax of host logits under the GPU's rule for non-finite ones (see the module docstring)."""
    x = np.asarray(logits).reshape(-1)
    top = x.max(initial=-np.inf)
    if np.isnan(x).any() or top == np.inf or top == -np.inf:
        raise nonfinite_error()
    return int(np.argmax(x))


class GpuSampler:
    """Per-backend sampling state on the GPU for a vocabulary of V."""

    def __init__(self, be, vocab_size: int):
        V = int(vocab_size)
        if not 1 <= V <= MAX_VOCAB:
            raise DeviceError(f"GPU sampling handles vocabularies of 1 to {MAX_VOCAB} tokens, not {V}")
        self.be, self.V = be, V
        drv = be.drv
        self._params = be.mem_alloc(PARAMS_DTYPE.itemsize, "sampling parameters")
        self._state = be.mem_alloc(STATE_BYTES, "sampling state")
        self._keys = be.mem_alloc(4 * V, "sampling keys")
        self._seen = be.mem_alloc(V, "the seen-token mask")
        self._out = be.mem_alloc(8, "the sampled id")
        self.out = DTensor(self._out, int(self._out), (2,), "int32")
        self._warped = None
        self._host = {}  # host copies kept alive until their asynchronous uploads have run
        be.check(lambda: drv.memset_d8_async(int(self._state), 0, STATE_BYTES, be.stream), "sampling state")
        be.check(lambda: drv.memset_d8_async(int(self._seen), 0, V, be.stream), "sampling state")
        be.check(lambda: drv.memset_d8_async(int(self._out), 0, 8, be.stream), "sampling state")
        self.fn = be.kernel("sample.cu", "sample_pass", PASS_FORMAT)  # compiled now, never under capture
        self.grid = (blocks_per_row(be, V), 1, 1)
        self.set_params(SamplingParams(), 0)

    def set_params(self, params: SamplingParams, seed: int) -> None:
        """Copy temperature, top_k, top_p, penalty and seed to the device (on be's stream)."""
        self._upload("params", int(self._params), pack_params(params, seed))

    def set_seen(self, ids) -> None:
        """Reset the seen mask to exactly these token ids (the prompt)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.V):
            raise GenerationError(f"token ids must be in [0, {self.V}), got {ids.min()} .. {ids.max()}")
        mask = np.zeros(self.V, np.uint8)
        mask[ids] = 1
        self._upload("seen", int(self._seen), mask)

    def seen_mask(self) -> np.ndarray:
        """The seen mask as bool [V] (waits for the stream; for tests)."""
        self.be.synchronize("seen mask")
        mask = np.empty(self.V, np.uint8)
        self.be.check(lambda: self.be.drv.memcpy_dtoh(mask, int(self._seen)), "seen mask")
        return mask.astype(bool)

    def sample(self, logits, counter_ptr: int | None = None, counter: int = 0) -> DTensor:
        """Launch the passes on be's stream (capturable): the returned int32 [2] gets (chosen id, non-finite flag)."""
        self._run(logits, counter_ptr, counter, None, 1)
        return self.out

    def debug_warped(self, logits, counter=0) -> np.ndarray:
        """float32 [V]: the warped logits as the kernel computed them (penalised, / temperature, -inf where
        top-k / top-p dropped them; with temperature 0 the penalised logits). Leaves the seen mask alone."""
        if self._warped is None:
            self._warped = self.be.mem_alloc(4 * self.V, "warped logits")
        self._run(logits, None, counter, int(self._warped), 0)
        self.be.synchronize("debug_warped")
        out = np.empty(self.V, np.float32)
        self.be.check(lambda: self.be.drv.memcpy_dtoh(out, int(self._warped)), "debug_warped")
        return out

    def read_id(self) -> int:
        """The last sampled id (waits for the stream; for tests and eager use); NonFiniteLogitsError when the
        logits it was drawn from were not finite."""
        self.be.synchronize("sampled id")
        out = np.empty(2, np.int32)
        self.be.check(lambda: self.be.drv.memcpy_dtoh(out, int(self._out)), "sampled id")
        if out[1]:
            raise nonfinite_error()
        return int(out[0])

    # -- internals ---------------------------------------------------------------------------------------------
    def _upload(self, what: str, ptr: int, host: np.ndarray) -> None:
        be = self.be
        if be.capture is not None:
            raise DeviceError(f"GpuSampler: set the {what} before capturing, not inside a graph")
        self._host[what] = host
        be.check(lambda: be.drv.memcpy_htod_async(ptr, host, be.stream), f"sampling {what}")

    def _run(self, logits, counter_ptr, counter, warped, mark) -> None:
        if not isinstance(logits, DTensor) or logits.dtype != "float32" or logits.size != self.V:
            raise DeviceError(f"GpuSampler needs float32 logits of {self.V} values on the GPU, got {logits!r}")
        counter = int(counter) & 0xFFFFFFFF
        counter = counter - (1 << 32) if counter >= 1 << 31 else counter  # int32 bits
        be = self.be
        for p in range(SAMPLE_PASSES):
            be.launch(f"sample[{p}]", self.fn, self.grid, (THREADS, 1, 1), int(self._params), int(self._state),
                      int(self._keys), int(self._seen), logits.ptr, int(self._out), warped or 0,
                      counter_ptr or 0, 0, counter, self.V, p, mark)  # slots null: slot 0 = row 0
