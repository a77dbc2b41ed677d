"""CUDA backend: NumpyBackend's primitive operations as the kernels in this folder, through PyCUDA.

Tensors stay on the GPU between operations (DTensor); only logits come back (to_host). Activations are
float32; weights and the KV cache are stored in the backend's dtype (fp16 / bf16, or fp32) and every
kernel accumulates in fp32. All work goes on one stream, so operations are ordered without host syncs.
The operations the model calls are listed once, in core/backend_api.py (the Backend protocol).

CudaBackend is this file: its state, set up in __init__, and the rooms it is made of, one module each:

    tensors.py      DTensor (GPU memory, shape, dtype) and Lazy (a result computed when first read)
    options.py      the ARCHKIT_CUDA_* switches, read from the environment once (Options.from_env)
    geometry.py     tile sizes, threads and shared memory of the kernels: constants and pure functions
    memory.py       pooled activations, plain allocations, host <-> device copies
    launch.py       the kernel cache, launches on the one stream, synchronisation, errors named by op
    deferred.py     the cache write held for the next attention, and norms folded into the next GEMV
    kvcache.py      the preallocated KV cache, new_cache, cache_write
    loading.py      begin_loading / convert / finish_loading / release, and session()
    decode.py       decode steps replayed as CUDA graphs (graph.py), ids picked on the GPU (gpu_sampling.py)
    elementwise.py  embed, add_positions, add, act, gated_act, soft_cap, clamp, scale, sigmoid_gate
    linear.py       linear, linears, linear_act, gated_linear: GEMV, our GEMM or cuBLAS (cublas.py)
    qlinear.py      the same products with a weight kept quantized (QTensor, qlayout.py): gemv_q.cu's GEMVs,
                    or the weight dequantized for the GEMM
    norm_rope.py    norm, add_norm, head_norm, rope, rope_cache_write (RopeTables: partial, interleaved, scaled)
    attention.py    attention: decode (one fused launch) and prefill (tensor-core or SIMT)
    batch_step.py   decode-only batched steps replayed as CUDA graphs (batch_graph.py), one per bucket
    paged.py        batched steps (core.engine): new_paged_cache, rows, and the core.paged.Batch forms of
                    add_positions / rope / rope_cache_write / cache_write / attention (paged.cu, paged_attn.cu)
    row_sampling.py sample_rows: the engine's sampled rows picked on the GPU, many rows in one launch
                    (row_sampler.py's RowSampler, sample.cu)
    custom.py       custom: a plugin's own op (core/custom_ops.py), its .cu compiled and launched like ours

A room's public methods are the ones other rooms and modules may call (each has a docstring); a name with a
leading underscore is used by its own room only. Memory: weights and the KV cache are plain allocations made
once (loading, finish_loading); activations come from a DeviceMemoryPool, so a decode step allocates nothing
from the driver. With `poison=True` (or ARCHKIT_CUDA_POISON=1) every fresh activation buffer and KV cache is
filled with NaN first, so an element a kernel fails to write shows up in the result. ARCHKIT_CUDA_SYNC=1
synchronises after every launch, so an asynchronous CUDA error is reported against the op that caused it.

Decode can run as a CUDA graph (see core/cuda/graph.py): kernels that need the position read it from
device memory when given `start_dev`, because a graph bakes its launch arguments in.
"""

from __future__ import annotations

import threading
import weakref

from ..backend import DTYPES
from ..errors import DeviceError
from .attention import AttentionMixin
from .custom import CustomMixin
from .decode import DecodeMixin
from .deferred import DeferredMixin
from .elementwise import ElementwiseMixin
from .kvcache import KVCacheMixin
from .launch import LaunchMixin
from .linear import LinearMixin
from .loading import LoadingMixin
from .memory import MemoryMixin, stop_pool_at_exit
from .modules import DTYPE_CODES
from .batch_step import BatchGraphMixin
from .moe import MoeMixin
from .norm_rope import NormRopeMixin
from .paged import PagedMixin
from .options import Options
from .qlinear import QuantLinearMixin
from .row_sampling import RowSamplingMixin
from .tensors import DTensor, Lazy

__all__ = ["CudaBackend", "DTensor", "Lazy", "Options"]


class CudaBackend(MemoryMixin, LaunchMixin, DeferredMixin, KVCacheMixin, LoadingMixin, DecodeMixin,
                  ElementwiseMixin, LinearMixin, QuantLinearMixin, NormRopeMixin, AttentionMixin, CustomMixin, MoeMixin,
                  PagedMixin, BatchGraphMixin, RowSamplingMixin):
    """PyCUDA backend: see the module docstring. `context`: KV-cache positions to preallocate at load;
    `poison`: NaN-fill fresh buffers (default: ARCHKIT_CUDA_POISON); `options`: the switches (default: read
    from the environment, Options.from_env).

    Shared state, read by every room and by graph.py, gpu_sampling.py, row_sampler.py and session.py:
      drv (pycuda.driver), dtype (weights and KV cache), context, device, stream (the one stream), pool (the
      activation pool), weight_bytes (bytes of weights loaded), capture (a graph.Capture while graph.py
      captures a decode step, else None), primary_context, session_lock and session_owner (session.py).
    Switches (options.py says what each does; benchmarks and tests flip them on a live backend):
      poison, sync_each, graphs, fused, pdl (only on sm_90+), fold, fold_ln, gemm, attn, qtc, skinny.
    Each room's own state, named with a leading underscore, gets its first value here and is documented in its
    room's class docstring."""

    name = "cuda"

    def __init__(self, dtype: str = "float16", context: int | None = None, poison: bool | None = None,
                 options: Options | None = None):
        if dtype not in DTYPES:
            raise DeviceError(f"dtype {dtype!r} is not supported (choose from {list(DTYPES)})")
        if context is not None and (not isinstance(context, int) or context < 1):
            raise DeviceError(f"context={context!r} must be a positive number of positions")
        import pycuda.autoprimaryctx  # noqa: F401  (primary context: torch can share the GPU)
        import pycuda.driver as drv
        from pycuda.tools import DeviceMemoryPool

        opts = Options.from_env() if options is None else options  # a bad ARCHKIT_CUDA_GEMM / _ATTN raises here
        self.drv = drv
        self.dtype, self.context = dtype, context
        self.poison = opts.poison if poison is None else poison
        self.sync_each = opts.sync_each
        self.device = drv.Context.get_device()
        self.primary_context = drv.Context.get_current()  # other threads push it (session.py)
        self.session_lock, self.session_owner = threading.Lock(), None
        cc = self.device.compute_capability()
        if cc < (8, 0):
            raise DeviceError(f"{self.device.name()} has compute capability {cc[0]}.{cc[1]}; archkit's kernels need 8.0+")
        self.stream = drv.Stream()
        self.pool = DeviceMemoryPool()
        stop_pool_at_exit(self)  # before PyCUDA pops the context (memory.py)
        self.weight_bytes = 0
        self.capture = None          # set by core.cuda.graph while a decode step is being captured
        self.graphs, self.fused, self.fold, self.fold_ln = opts.graphs, opts.fused, opts.fold, opts.fold_ln
        self.pdl = opts.pdl and cc >= (9, 0)
        self.gemm, self.attn, self.qtc, self.skinny = opts.gemm, opts.attn, opts.qtc, opts.skinny
        # each room's own state (documented in its class):
        self._wcode, self._fns, self._last_op = DTYPE_CODES[dtype], {}, None           # launch.py
        self._pending = self._pending_rope = self._pending_kv = None                     # deferred.py
        self._kv, self._lent = None, None                                                # kvcache.py
        self._owned, self._config = [], None                                             # loading.py
        self._graph_cache = None                                                         # decode.py
        self._cublas, self._cublas_handle, self._cublas_ws = None, None, None            # linear.py
        self._sk_count = None                                                            # linear.py
        self._freqs, self._table_freqs = {}, weakref.WeakKeyDictionary()                  # norm_rope.py
        self._rope_live = None                                                           # norm_rope.py
        self._paged_step = None                                                          # paged.py
        self._batch_graphs = None                                                        # batch_step.py
        self._row_sampler = None                                                         # row_sampling.py
        if self.gemm == "cublas":
            self.cublas_lib()  # asked for by name: say now if it is missing

    def __repr__(self):
        return f"CudaBackend(dtype={self.dtype!r}, device={self.device.name()!r})"
