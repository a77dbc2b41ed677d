"""Which parts of the architecture vocabulary the CUDA kernels implement today.

The numpy backend runs every capability (it is the reference); the CUDA backend refuses, before a byte is
uploaded, a model that needs one its kernels do not have, naming each, rather than running it approximately
(begin_loading, loading.py, calls missing_capabilities).

Implemented, so not listed: every block layout (sequential, parallel, parallel_shared_norm) and norm placement
(pre, post, sandwich); q/k norms of every scope (head, per_head, projection) and kind (RMSNorm, LayerNorm with
bias); every rope type and table (partial rotary, interleaved pairs, a cos/sin scale, tables that change with
the length); the embedding, residual, attention and logit multipliers; q/k/v clamping (qkv_clip) and norms without
weights (norm_weight false: loaded as gains of ones); every activation in core.spec.ACTIVATIONS; every MoE router
(a selection bias, group-limited routing over up to ROUTE_MAX_GROUPS groups);
a plugin's own layer functions (they call the Backend protocol's ops) and custom ops.
"""

from __future__ import annotations

from .elementwise import ACT_CODES
from .geometry import PAGED_MAX_DH, ROUTE_MAX_GROUPS


def missing_capabilities(c) -> list[str]:
    """The capabilities `c` (a ModelConfig) needs that the CUDA backend lacks, as short phrases."""
    need = []
    if c.activation not in ACT_CODES:
        need.append(f"activation {c.activation!r}")
    if c.num_experts and c.moe_topk_groups < c.moe_groups and c.moe_groups > ROUTE_MAX_GROUPS:
        need.append(f"group-limited routing over {c.moe_groups} expert groups (moe_route scores up to "
                    f"{ROUTE_MAX_GROUPS})")
    return need


def missing_paged(c) -> list[str]:
    """What batched steps over the paged KV cache (paged.py, paged_attn.cu) cannot run for `c`, as short phrases:
    checked when an engine makes its cache (new_paged_cache), so such a model is refused before any step rather
    than computed wrongly. Everything else a model may use is row-wise (norms, products, MoE, activations) or
    has a batched kernel (RoPE of every table, q/k norms, learned positions, windows, soft-capping, GQA)."""
    need = []
    if c.head_dim > PAGED_MAX_DH:
        need.append(f"heads of {c.head_dim} dims (the paged attention takes up to {PAGED_MAX_DH})")
    # (up to PAGED_MAX_DH, every group size fits the shared memory of any sm_80+ card: geometry.PAGED_SMEM_LIMIT)
    if c.num_kv_heads < 1 or c.num_heads % c.num_kv_heads:
        need.append(f"{c.num_heads} query heads over {c.num_kv_heads} key/value heads (not a whole group each)")
    return need
