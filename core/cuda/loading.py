"""Loading and lifetime: weights converted and uploaded, the hooks core.load calls around them, release, and
the per-model session.

begin_loading fails early when the model needs what the kernels lack (capabilities.py) or the weights cannot
fit; convert uploads each weight in the backend's dtype (converted on the host in CONVERT_CHUNK pieces, so host
memory stays bounded); finish_loading preallocates the KV cache (kvcache.py); release frees everything the other
rooms hold, in the order they need.

Quantized checkpoints (issue 16): core.load asks quantized_nbytes for each quantized weight (a
core.quant.QuantizedTensor, not dequantized) and hands those it gets a size for to convert_quantized, which repacks
its stored parts into the device layout (qlayout.py) and uploads them as a QTensor; the products of qlinear.py read
it. Kept quantized (QUANT_ROLES): the projections of the standard blocks and lm_head (when a checkpoint quantizes it),
which every kernel reads through linear.py, and the experts (EXPERT_ROLES: a core.quant.QuantizedStack, one stacked
QTensor [E, out, in] that moe.py's quantized kernels read); not the weights of a plugin's own sublayer function (it
may hand them to a custom op). Everything else, and a weight whose data the layout cannot hold (convert_quantized
returns None; for experts also a layout that differs between experts, or act-order), is loaded dense through
convert, as before.
"""

from __future__ import annotations

import math

import numpy as np

from ..checkpoint import float32_to_bf16_bits, to_float32
from ..errors import DeviceError, DeviceMemoryError
from ..quant.base import QuantizedStack
from ..spec import FLOAT32_ROLES
from .capabilities import missing_capabilities
from .geometry import grid1
from .memory import mib
from .qlayout import Packed, device_nbytes, repack
from .session import Session
from .tensors import ITEMSIZE, DTensor, QTensor

CONVERT_CHUNK = 1 << 24  # elements converted on the host per upload step (64 MB as float32)
ATTENTION_ROLES = frozenset({"q.weight", "k.weight", "v.weight", "o.weight"})
MLP_ROLES = frozenset({"gate.weight", "up.weight", "down.weight", "shared.gate.weight", "shared.up.weight",
                       "shared.down.weight"})
EXPERT_ROLES = frozenset({"experts.gate.weight", "experts.up.weight", "experts.down.weight"})  # read by moe.py only
QUANT_ROLES = ATTENTION_ROLES | MLP_ROLES | EXPERT_ROLES | {"lm_head"}  # kept quantized
SCALE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class LoadingMixin:
    """CudaBackend's loading hooks, release and session (see the module docstring).

    State (the facade gives it its first value): _owned, the weight allocations release() frees; _config, the
    config begin_loading was given. Uses the backend's dtype, device, drv, stream, pool and weight_bytes (which
    convert and random_weight add to); mem_info() / mem_alloc() (memory.py), kernel() / launch() / synchronize()
    (launch.py), flush_pending() (deferred.py), preallocate_kv() / free_kv() (kvcache.py), clear_graphs()
    (decode.py), close_cublas() (linear.py), free_freqs() (norm_rope.py), drop_row_sampler() (row_sampling.py)."""

    @staticmethod
    def default_dtype(ckpt=None) -> str:
        """The checkpoint's half type: bfloat16 if it stores BF16, else float16."""
        stored = {t.dtype for t in ckpt.tensors.values()} if ckpt is not None else set()
        return "bfloat16" if "BF16" in stored else "float16"

    def session(self):
        """Held around each forward or generation: one at a time per model, from any thread (session.py)."""
        return Session(self)

    def begin_loading(self, config, numel: int, quantized_bytes: int = 0) -> None:
        """Refuse a model needing what the kernels lack (capabilities.py, each named), remember the config (for
        the KV cache) and fail early if the weights cannot fit (numel dense elements in self.dtype, plus the bytes
        of weights kept quantized): all before the first upload."""
        missing = missing_capabilities(config)
        if missing:
            raise DeviceError(f"the CUDA backend cannot run this model: its kernels lack {', '.join(missing)} "
                              f"(device='cpu' runs it)")
        self._config = config
        need = numel * ITEMSIZE[self.dtype] + quantized_bytes
        free, total = self.mem_info()
        if need > free:
            raise DeviceMemoryError(f"the weights need {mib(need)} in {self.dtype} but only {mib(free)} of "
                                    f"{mib(total)} is free on {self.device.name()}")

    def convert(self, bits: np.ndarray, stored: str, role: str) -> DTensor:
        """Checkpoint bits → a weight in GPU memory, in self.dtype (core.spec.FLOAT32_ROLES: in float32), converted
        on the host in chunks."""
        flat = bits.reshape(-1)
        n = flat.size
        dtype = "float32" if role in FLOAT32_ROLES else self.dtype
        isz = ITEMSIZE[dtype]
        alloc = self.mem_alloc(n * isz, f"weight {role!r} {list(bits.shape)} ({self.weight_bytes:,} bytes already loaded)")
        try:
            same = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(stored) == dtype
            for i in range(0, n, CONVERT_CHUNK):
                part = flat[i:i + CONVERT_CHUNK]
                if not same:
                    x = to_float32(part, stored)
                    part = (x.astype(np.float16) if dtype == "float16" else
                            float32_to_bf16_bits(x) if dtype == "bfloat16" else x.astype(np.float32))
                self.drv.memcpy_htod(int(alloc) + i * isz, np.ascontiguousarray(part))
        except self.drv.Error as e:
            alloc.free()
            raise DeviceError(f"uploading weight {role!r} failed: {e}") from None
        except BaseException:
            alloc.free()
            raise
        self._owned.append(alloc)
        self.weight_bytes += n * isz
        return DTensor(alloc, int(alloc), bits.shape, dtype)

    def quantized_nbytes(self, q, role: str, config) -> int | None:
        """GPU bytes of quantized checkpoint weight `q` (a core.quant.QuantizedTensor, or a QuantizedStack for an
        expert role) if it is kept quantized for `role`, else None: it is then loaded dense (see the module
        docstring for which roles)."""
        if role not in QUANT_ROLES or (config.attention_block is not None and role in ATTENTION_ROLES) or (
                config.mlp_block is not None and role in MLP_ROLES | EXPERT_ROLES) or (
                (role in EXPERT_ROLES) != isinstance(q, QuantizedStack)):
            return None
        return device_nbytes(q)

    def convert_quantized(self, q, role: str) -> QTensor | None:
        """`q` repacked from its stored parts (qlayout.py) and uploaded, or None when its data does not fit the
        layout (a g_idx that is not a permutation of groups, a zero point out of range; experts in different
        layouts): load it dense then."""
        p = repack(q)
        return None if p is None else self.upload_packed(p, role)

    def upload_packed(self, p: Packed, role: str) -> QTensor:
        """A weight in qlayout.py's layout uploaded as it is (loading, and benchmarks' random quantized weights)."""
        allocs = []
        try:
            for a in (p.words, p.scales, p.zeros, p.perm):
                if a is not None:
                    allocs.append(self.mem_alloc(a.nbytes, f"quantized weight {role!r} {list(p.shape)} "
                                                           f"({self.weight_bytes:,} bytes already loaded)"))
                    self.drv.memcpy_htod(int(allocs[-1]), np.ascontiguousarray(a))
        except self.drv.Error as e:
            for a in allocs:
                a.free()
            raise DeviceError(f"uploading quantized weight {role!r} failed: {e}") from None
        except BaseException:
            for a in allocs:
                a.free()
            raise
        self._owned += allocs
        self.weight_bytes += p.nbytes
        ptrs = iter(int(a) for a in allocs)
        q, s = next(ptrs), next(ptrs)
        z = next(ptrs) if p.zeros is not None else 0
        perm = next(ptrs) if p.perm is not None else 0
        return QTensor(p.shape, p.kind, SCALE_DTYPES[p.sdtype], p.kp, p.lg, p.scales.shape[-1], p.srow,
                       (q, s, z, perm), p.nbytes)

    def random_weight(self, shape, seed: int, scale: float, center: float = 0.0) -> DTensor:
        """A weight of `shape` filled on the GPU with uniform values in center ± scale (benchmarks)."""
        n = math.prod(shape)
        alloc = self.mem_alloc(n * ITEMSIZE[self.dtype], f"random weight {list(shape)}")
        self._owned.append(alloc)
        self.weight_bytes += n * ITEMSIZE[self.dtype]
        t = DTensor(alloc, int(alloc), shape, self.dtype)
        fn = self.kernel("init.cu", "fill_uniform", "PqQff")
        self.launch("random_weight", fn, grid1(n), (256, 1, 1), t, n, seed, center, scale)
        return t

    def finish_loading(self, weights) -> None:
        """Preallocate the KV cache for the model's context and check that loading went through."""
        self.synchronize("finish_loading")
        if self._config is not None:
            self.preallocate_kv(self._config)

    def release(self, weights) -> None:
        """Free every weight, the KV cache, captured graphs, the cuBLAS handle, the row sampler and pooled memory."""
        self.flush_pending()
        self.clear_graphs()
        try:
            self.stream.synchronize()
        except self.drv.Error:
            pass  # freeing is still right; the error was (or will be) reported where it happened
        self.close_cublas()
        self.drop_row_sampler()
        for a in self._owned:
            a.free()
        self._owned.clear()
        self.weight_bytes = 0
        self.free_kv()
        weights.globals.clear()
        weights.layers.clear()
        self.free_freqs()
        self.pool.free_held()
