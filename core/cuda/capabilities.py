"""Which parts of the architecture vocabulary the CUDA kernels implement today.

The numpy backend runs every capability (it is the reference); the CUDA backend refuses, before a byte is
uploaded, a model that needs one its kernels do not have, naming each, rather than running it approximately
(begin_loading, loading.py, calls missing_capabilities).

Implemented, so not listed: every block layout (sequential, parallel, parallel_shared_norm) and norm placement
(pre, post, sandwich); q/k norms of every scope (head, per_head, projection) and kind (RMSNorm, LayerNorm with
bias); every rope type and table (partial rotary, interleaved pairs, a cos/sin scale, tables that change with
the length); the embedding, residual, attention and logit multipliers; every activation in core.spec.ACTIVATIONS;
a plugin's own layer functions (they call the Backend protocol's ops) and custom ops.
"""

from __future__ import annotations

from .elementwise import ACT_CODES


def missing_capabilities(c) -> list[str]:
    """The capabilities `c` (a ModelConfig) needs that the CUDA backend lacks, as short phrases."""
    need = []
    if c.activation not in ACT_CODES:
        need.append(f"activation {c.activation!r}")
    return need
