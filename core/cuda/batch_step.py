"""Batched decode steps replayed as CUDA graphs: the backend's room for batch_graph.py (which explains the graphs),
so that the engine can ask any backend for `batch_step` and fall back to an eager forward when it has none.
"""

from __future__ import annotations

from .batch_graph import BatchGraphs
from .decode import free_at_exit


class BatchGraphMixin:
    """CudaBackend's batched-step graphs (see the module docstring).

    State (the facade gives it its first value): _batch_graphs, the BatchGraphs, made on first use; cleared by
    clear_graphs() (decode.py)."""

    def batch_step(self, forward, W, c, ids, cache, batch, rope):
        """A decode-only batched step replayed as a CUDA graph: float32 logits [rows, V] on the GPU, or None when
        the step is not one a graph serves (the engine then runs forward eagerly)."""
        if self._batch_graphs is None:
            self._batch_graphs = BatchGraphs(self)
            free_at_exit(self)
        return self._batch_graphs.step(forward, W, c, ids, cache, batch, rope)

    def clear_batch_graphs(self) -> None:
        """Destroy every captured batched step (clear_graphs calls this)."""
        if self._batch_graphs is not None:
            self._batch_graphs.clear()

    def batch_graph_stats(self) -> dict:
        """Counts for tests and benchmarks: graphs held, replays so far, shapes that could not be captured."""
        g = self._batch_graphs
        return {"graphs": len(g.graphs), "replays": g.replays, "failed": len(g.failed)} if g is not None else \
            {"graphs": 0, "replays": 0, "failed": 0}
