"""The backend contract: every operation core.model calls on a backend, written down once.

NumpyBackend (core/backend.py) is the reference and CudaBackend (core/cuda/backend.py) the GPU one; both are
checked against this protocol by tests/test_backend_api.py (the CUDA one without importing PyCUDA). A backend
may fuse operations as long as each has a numpy reference in core.ops.

Notation: T tokens, D hidden size, H query heads, Hkv key/value heads, Dh head size, V vocabulary, K a
product's input features, N its outputs. `Tensor` is whatever the backend holds (a numpy array; a DTensor on
the GPU); activations are float32 and weights are stored in the backend's `dtype`. A new operation is one
entry here (its signature and a one-line docstring), then its method in NumpyBackend and in a CUDA room.

Optional, looked up with getattr: decode_ids (by the model: decode steps whose ids are picked on the device),
paged_kv_tokens(config, block_size) (by the engine: how many KV positions its default pool should hold),
batch_step(forward, W, c, ids, cache, batch, rope) (by the engine: a decode-only batched step from a captured
graph, or None to run forward),
sample_rows(logits, rows, rope) (by the engine: (ids int64 [R], non-finite bool [R]) for logits [R, V] left on the
device and R tuples (key, params, seed, counter, tokens), each row sampled as the backend's decode_ids would: key
names the request from step to step, seed keys its draws, counter is the position of the token fed this step and
tokens every id it has seen, prompt and output; or None where decode_ids would decline, to sample on the host),
load_weights(spec, plan) (by core.load: a backend that reads its own slices of the checkpoint, core/tp_numpy.py),
and the pair quantized_nbytes(q, role, config) / convert_quantized(q, role) (by core.load: a backend that keeps a
quantized checkpoint's weights as stored, core/cuda/loading.py: bytes it will hold for core.quant.QuantizedTensor q,
or an expert role's core.quant.QuantizedStack, or None to take it dense; then the weight itself, or None to take it
dense after all).

Every op that takes `start` (add_positions, rope, rope_cache_write, cache_write, attention) also takes a
core.paged.Batch there: rows of several sequences, each at its own positions, over the paged cache.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .backend import Cache, Weights

Tensor = Any  # a backend's tensor: numpy float32 array (NumpyBackend), DTensor or Lazy (CudaBackend)


@runtime_checkable
class Backend(Protocol):
    """What core.model.forward, Model and core.load call on a backend; see the module docstring for notation."""

    name: str   # short name shown in Model's repr: "numpy", "cuda"
    dtype: str  # weight (and KV cache) precision: "float32", "float16" or "bfloat16"

    # -- loading and lifetime
    def begin_loading(self, config, numel: int, quantized_bytes: int = 0) -> None:
        """Before the first convert: the ModelConfig, the dense weights' element count, bytes of those kept quantized."""

    def convert(self, bits, stored: str, role: str) -> Tensor:
        """Checkpoint bits (stored "F32"/"F16"/"BF16", any shape) → a weight in `dtype` (FLOAT32_ROLES: float32)."""

    def finish_loading(self, weights: Weights) -> None:
        """After the last convert (the CUDA backend preallocates its KV cache here)."""

    def release(self, weights: Weights) -> None:
        """Free every weight (weights' dicts are emptied), caches and device memory."""

    def session(self):
        """A context manager held around each forward or generation (one at a time per model)."""

    def new_cache(self, config, length: int) -> Cache:
        """A KV cache of `length` positions: per layer k and v, each [Hkv, length, Dh]."""

    def new_paged_cache(self, config, num_blocks: int, block_size: int):
        """Block pools of num_blocks x block_size positions per layer for k and v (core/paged.py's batched steps)."""

    def rows(self, x: Tensor, idx) -> Tensor:
        """x [T, N] rows at idx (int [R]) → [R, N] (a batched step's rows whose logits are returned)."""

    def to_host(self, x: Tensor):
        """x as a float32 numpy array of the same shape (waits for the device)."""

    def argmax_rows(self, x: Tensor):
        """(ids int64 [R], non-finite bool [R]) numpy arrays for logits x [R, V]: each row's argmax and flag."""

    def decode(self, forward, W: Weights, c, token: int, cache: Cache, start: int, rope, greedy: bool = False):
        """Logits float32 [V] of `token` at `start` (rope: the RopeConfig or None), or with greedy its argmax id."""

    # -- primitive operations (numpy references in core.ops)
    def embed(self, table: Tensor, ids, scale: float | None = None) -> Tensor:
        """table [V, D] rows at ids (int [T]), times scale → float32 [T, D]."""

    def add_positions(self, x: Tensor, table: Tensor, start: int) -> Tensor:
        """x [T, D] + table [P, D] rows start..start+T-1 → float32 [T, D]."""

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        """a + b, float32 of one shape."""

    def linear(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        """x [..., K] @ w [N, K].T (+ b [N]) → float32 [..., N]."""

    def linears(self, x: Tensor, pairs) -> tuple:
        """(linear(x, w, b) for (w, b) in pairs): products of one x, e.g. q, k, v."""

    def linear_act(self, x: Tensor, w: Tensor, b: Tensor | None, kind: str) -> Tensor:
        """act(linear(x, w, b)), activation `kind` (core.ops.ACT) → float32 [..., N]."""

    def gated_linear(self, x: Tensor, wg: Tensor, bg, wu: Tensor, bu, kind: str) -> Tensor:
        """act(linear(x, wg, bg)) * linear(x, wu, bu) → float32 [..., N]."""

    def norm(self, x: Tensor, w, b, eps: float, kind: str, offset: float = 0.0) -> Tensor:
        """RMSNorm (x * (w + offset)) or LayerNorm (w, b) over x [..., D] → float32."""

    def add_norm(self, x: Tensor, delta: Tensor, w, b, eps: float, kind: str, offset: float = 0.0) -> tuple:
        """(x + delta, norm(x + delta)), float32 [T, D] each."""

    def head_norm(self, x: Tensor, w: Tensor, eps: float, offset: float = 0.0, b=None, kind: str = "rmsnorm") -> Tensor:
        """norm(·) of each head of x [T, H, Dh] over Dh, w (and b) [Dh] shared or [H, Dh] per head → float32."""

    def act(self, x: Tensor, kind: str) -> Tensor:
        """Activation `kind` (core.ops.ACT) of every element → float32, x's shape."""

    def gated_act(self, gate: Tensor, up: Tensor, kind: str) -> Tensor:
        """act(gate) * up, float32 of one shape."""

    def rope(self, x: Tensor, start: int, table) -> Tensor:
        """RoPE of x [T, H, Dh] at positions start.. with a core.rope.RopeTable (core.ops.rope) → float32."""

    def rope_cache_write(self, q: Tensor, k: Tensor, v: Tensor, cache: Cache, layer: int, start: int, table,
                         qk_norm=None) -> Tensor:
        """rope(q [T, H, Dh]) returned; rope(k [T, Hkv, Dh]) and v cached; qk_norm (wq, wk, eps, offset) first."""

    def cache_write(self, cache: Cache, layer: int, k: Tensor, v: Tensor, start: int) -> None:
        """Store k, v [T, Hkv, Dh] at cache positions start..start+T-1 of `layer`."""

    def attention(self, q: Tensor, cache: Cache, layer: int, start: int, scale: float, window=None,
                  softcap=None) -> Tensor:
        """Causal GQA attention of q [T, H, Dh] over cache positions 0..start+T-1 → float32 [T, H, Dh]."""

    def soft_cap(self, x: Tensor, cap: float) -> Tensor:
        """cap * tanh(x / cap), float32, x's shape (final logit soft-capping)."""

    def clamp(self, x: Tensor, lo: float, hi: float) -> Tensor:
        """x clamped to [lo, hi] (bounds rounded to float32), x's shape; a NaN stays NaN (qkv_clip)."""

    def scale(self, x: Tensor, s: float) -> Tensor:
        """x * s with s rounded to float32, x's shape (embedding, residual-branch and logit multipliers)."""

    def sigmoid_gate(self, y: Tensor, g: Tensor) -> Tensor:
        """y [T, N] * sigmoid(g [T, 1]) → float32 [T, N] (a per-token gate: Qwen2-MoE's shared expert)."""

    def moe(self, x: Tensor, router_w: Tensor, router_b, gate, up: Tensor, down: Tensor, routing,
            biases=(None, None, None), select_bias=None) -> Tensor:
        """Mixture of experts on x [T, D] (core.ops.moe): router [E, D], experts [E, out, in], select_bias [E] → float32."""

    # -- a plugin's own operations (core/custom_ops.py)
    def custom(self, op, *args: Tensor, **scalars) -> Tensor:
        """CustomOp `op` on tensors args and scalars: numpy runs op.reference, CUDA op.launch → float32 tensor."""
