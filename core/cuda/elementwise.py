"""Elementwise and embedding ops: embed / add_positions (embed.cu), add, activations, gated activations,
soft-capping, clamping, scalar multiples and per-token sigmoid gates (elementwise.cu), each a grid-stride kernel (or
a block per token for the embedding).
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceError
from ..paged import Batch
from .geometry import grid1
from .tensors import DTensor, Lazy

# common.cuh ACT_*: every name in core.spec.ACTIVATIONS (gelu_fast is the tanh gelu written another way, swish
# is silu)
ACT_CODES = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "gelu": 1, "silu": 2, "swish": 2, "relu": 3,
             "quick_gelu": 4, "relu2": 5}
GEMV_ACT_MAX = 3  # common.cuh ACT_GEMV_MAX: the GEMV epilogues take codes up to this (linear.py runs others unfused)


class ElementwiseMixin:
    """CudaBackend's elementwise and embedding ops (see the module docstring).

    Uses the backend's capture; alloc() / from_host() (memory.py), kernel() / launch() / start_dev()
    (launch.py), gemv_rows() (linear.py), paged_add_positions() (paged.py)."""

    def _embed(self, op, table, ids_dev, x, scale, start, T) -> DTensor:
        D = table.shape[1]
        out = self.alloc((T, D))
        fn = self.kernel("embed.cu", "embed", "PPPPfiPii")
        self.launch(op, fn, (T, 1, 1), (min(256, 32 * -(-D // 32)), 1, 1),
                    out, table, ids_dev, x, float(1.0 if scale is None else scale), start, self.start_dev(), T, D)
        return out

    def embed(self, table: DTensor, ids, scale: float | None = None) -> DTensor:
        """table[ids] (* scale) → float32 [T, D]."""
        if self.capture is not None:  # the token id lives in the graph's input buffer
            return self._embed("embed", table, self.capture.ids, None, scale, 0, self.capture.ids.shape[0])
        ids_dev = self.from_host(np.asarray(ids, dtype=np.int32))
        return self._embed("embed", table, ids_dev, None, scale, 0, ids_dev.shape[0])

    def add_positions(self, x: DTensor, table: DTensor, start: int) -> DTensor:
        """x [T, D] + table[start:start+T] (learned absolute positions); a core.paged.Batch as `start`: each row's
        own position (paged.py)."""
        if isinstance(start, Batch):
            return self.paged_add_positions(x, table, start)
        return self._embed("add_positions", table, None, x, None, start, x.shape[0])

    def add(self, a: DTensor, b: DTensor) -> DTensor:
        """a + b. Either may be a Lazy (a pending GEMV or norm: the parallel blocks add their two sublayer
        outputs). One that is a pending GEMV (one decode token) is run with the other added in its epilogue, as
        add_norm does with the residual (the same fp32 sum); any other Lazy is computed first (launch reads .ptr)."""
        for lin, other in ((b, a), (a, b)):
            if isinstance(lin, Lazy) and lin.pending and lin.kind == "linear" and lin.shape == other.shape:
                if isinstance(other, Lazy):
                    other = other.materialize()
                src, w, bias = lin.args
                return self.gemv_rows(src, [(w, bias)], -1, "linear+add(gemv)", resid=other)[0]
        out = self.alloc(a.shape)
        fn = self.kernel("elementwise.cu", "add", "PPPq")
        self.launch("add", fn, grid1(a.size), (256, 1, 1), out, a, b, a.size)
        return out

    def soft_cap(self, x: DTensor, cap: float) -> DTensor:
        """cap * tanh(x / cap)."""
        y = self.alloc(x.shape)
        fn = self.kernel("elementwise.cu", "soft_cap", "PPqf")
        self.launch("soft_cap", fn, grid1(x.size), (256, 1, 1), y, x, x.size, float(cap))
        return y

    def clamp(self, x: DTensor, lo: float, hi: float) -> DTensor:
        """x clamped to [lo, hi], the bounds rounded to float32 (as the reference); a NaN stays NaN."""
        y = self.alloc(x.shape)
        fn = self.kernel("elementwise.cu", "clamp", "PPqff")
        self.launch("clamp", fn, grid1(x.size), (256, 1, 1), y, x, x.size, float(lo), float(hi))
        return y

    def scale(self, x: DTensor, s: float) -> DTensor:
        """x * s, s rounded to float32 (as the reference and torch)."""
        y = self.alloc(x.shape)
        fn = self.kernel("elementwise.cu", "scale", "PPqf")
        self.launch("scale", fn, grid1(x.size), (256, 1, 1), y, x, x.size, float(s))
        return y

    def sigmoid_gate(self, y: DTensor, g: DTensor) -> DTensor:
        """y [T, N] * sigmoid(g [T, 1]): one gate value per token."""
        N = y.shape[-1]
        if g.size * N != y.size:
            raise DeviceError(f"sigmoid_gate: a gate of shape {list(g.shape)} does not give one value per row of "
                              f"{list(y.shape)}")
        out = self.alloc(y.shape)
        fn = self.kernel("elementwise.cu", "sigmoid_gate", "PPPqi")
        self.launch("sigmoid_gate", fn, grid1(y.size), (256, 1, 1), out, y, g, y.size, N)
        return out

    def act(self, x: DTensor, kind: str) -> DTensor:
        y = self.alloc(x.shape)
        fn = self.kernel("elementwise.cu", "act", "PPqi")
        self.launch(f"act({kind})", fn, grid1(x.size), (256, 1, 1), y, x, x.size, self.act_code(kind))
        return y

    def gated_act(self, gate: DTensor, up: DTensor, kind: str) -> DTensor:
        """act(gate) * up."""
        y = self.alloc(gate.shape)
        fn = self.kernel("elementwise.cu", "gated_act", "PPPqi")
        self.launch(f"gated_act({kind})", fn, grid1(gate.size), (256, 1, 1), y, gate, up, gate.size,
                    self.act_code(kind))
        return y

    @staticmethod
    def act_code(kind: str) -> int:
        """The activation code the kernels take (common.cuh ACT_*) for `kind`; a DeviceError if none."""
        if kind not in ACT_CODES:
            raise DeviceError(f"activation {kind!r} has no CUDA kernel (supported: {list(ACT_CODES)})")
        return ACT_CODES[kind]
