"""Mixture of experts: moe(x, router_w, router_b, gate, up, down, routing, biases, select_bias) as core.ops.moe, on
the GPU.

The router's logits are an ordinary product (linear.py); moe_route (moe.cu) turns each token's row into its top_k
expert ids (int32) and weights (float32) in device memory, choosing by score + select_bias (float32 [E], the one
weight loading keeps in float32) within the best groups when routing is group-limited (at most ROUTE_MAX_GROUPS
groups). Then:

- A few tokens (T <= MOE_DECODE_T: decode, and every captured graph step): two grouped GEMVs that read only the
  selected experts' weights, each block reading its expert id from device memory, so nothing depends on the host
  and a captured decode step replays correctly for any routing. moe_gate_up (moe_up without a gate) writes
  h [T, k, I] = w * act(gate x + bg) * (up x + bu); moe_down sums the k experts' down projections (and their
  weighted biases) per output row in one block, atomics-free. A decode token reads k * 3 * I * D expert weights:
  exactly the active experts' bytes (core/bench_shapes.py bytes_per_token).
- Many tokens (prefill, never captured): the ids are copied to the host and the tokens grouped per expert, because
  each expert's tokens then go through the existing matrix products (cuBLAS / our GEMM, linear.py), which read an
  expert's weights once for all of its tokens, where a grouped GEMV would read them once per token; a prefill is
  not replayed as a graph, so the one host round trip a layer costs little. Per expert with tokens: moe_gather
  (its rows of x), gated_linear / linear_act, the down product, and moe_scatter_add (its weighted output added to
  its tokens' rows; a token picks an expert at most once, so a launch writes each element once). Experts go in
  ascending id order, the reference's order of summation.

Expert weights are the stacked [E, out, in] tensors loading makes (experts.*.weight), biases [E, out]. A quantized
checkpoint's experts may instead be stacked QTensors (qlayout.py's stacked layout, loading.py): decode then takes
moe_q.cu's versions of the grouped GEMVs, which dequantize the selected experts in registers and so read only their
quantized bytes (x staged to the weights' padded width; h's rows as long as the down product's padded width, zero
past I); gate and up go through one kernel when they share a layout, and when they do not (one dense, or two
layouts) both are dequantized, every expert, for moe.cu's kernel: correct, slow, and not what loading makes of a
checkpoint quantized in one scheme. Prefill hands each expert's slice (QTensor.expert) to the products as any
quantized weight (qlinear.py: dequantized for the GEMM).
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceError
from .geometry import GEMV_MAX_T, MOE_ROWS, MOE_THREADS, ROUTE_MAX_GROUPS, ROUTE_WARPS, grid1
from .modules import DTYPE_CODES
from .tensors import DTensor, Lazy, QTensor

MOE_DECODE_T = GEMV_MAX_T  # up to this many tokens take the grouped GEMVs; more are grouped per expert
SCORINGS = {"softmax": 0, "sigmoid": 1}
MAX_GRID_Y = 65535
# PyCUDA argument formats of moe_q.cu's kernels (the same for each kind; tests/test_quant_moe_room.py checks them
# against the preprocessed source)
Q_FORMATS = {"moe_q_up": "P" * 12 + "i" * 10, "moe_q_down": "P" * 8 + "i" * 8}


class MoeMixin:
    """CudaBackend's mixture of experts (see the module docstring).

    Uses the backend's dtype, capture, drv and stream; alloc() / from_host() / to_host() (memory.py), kernel() /
    launch() / check() (launch.py), flush_pending() (deferred.py), linears() / gated_linear() / linear_act()
    (linear.py), qstaged() / qdense() (qlinear.py), act_code() (elementwise.py)."""

    def moe(self, x, router_w, router_b, gate, up, down, routing, biases=(None, None, None), select_bias=None):
        """Mixture of experts on x [T, D] (core.ops.moe; routing: core.config.MoeRouting; select_bias: float32 [E],
        added to the scores that choose the experts) → float32 [T, D]."""
        if isinstance(x, Lazy):  # a norm left for the next GEMV: the experts read it too, so compute it once
            x = x.materialize()
        bg, bu, bd = biases if biases is not None else (None, None, None)
        E, I, D, k = self._moe_check(x, router_w, router_b, gate, up, down, routing, bg, bu, bd, select_bias)
        T = x.size // D if D else 0
        act = self.act_code(routing.activation)
        out_shape = x.shape
        x = x.reshape(T, D)
        if T == 0:
            return self.alloc(out_shape)
        small = T <= MOE_DECODE_T and T * k <= MAX_GRID_Y
        if self.capture is not None and not small:
            raise DeviceError(f"moe: {T} tokens x top_k {k} cannot be captured in a decode graph (the grouped GEMV "
                              f"takes at most {MOE_DECODE_T} tokens and {MAX_GRID_Y} token-expert pairs)")
        self.flush_pending()
        logits = self.linears(x, [(router_w, router_b)])[0]
        ids, wts = self.moe_route(logits, routing, select_bias)
        if small:
            y = self._moe_decode(x, ids, wts, gate, up, down, bg, bu, bd, act, T, E, I, D, k)
        else:
            y = self._moe_grouped(x, ids, wts, gate, up, down, bg, bu, bd, routing.activation, T, E, D, k)
        return y.reshape(out_shape)

    def moe_route(self, logits: DTensor, routing, select_bias=None) -> tuple:
        """(int32 ids [T, k], float32 weights [T, k]) of the router logits [T, E] (moe_route in moe.cu): scores by
        routing.scoring, the top routing.top_k (ties to the lower id) by score + select_bias (float32 [E] or None)
        within the best routing.topk_groups of routing.groups groups, their scores renormalised if asked, times
        routed_scale."""
        E, k = logits.shape[-1], int(routing.top_k)
        self._route_check(routing, E, select_bias)
        T = logits.size // E if E else 0
        ids, wts = self.alloc((T, k), "int32"), self.alloc((T, k))
        if T:
            fn = self.kernel("moe.cu", "moe_route", "PPPPiiiiifii")
            self.launch("moe(route)", fn, (-(-T // ROUTE_WARPS), 1, 1), (32 * ROUTE_WARPS, 1, 1), ids, wts, logits,
                        select_bias, T, E, k, SCORINGS[routing.scoring], int(bool(routing.renormalize)),
                        float(np.float32(routing.routed_scale)), int(routing.groups), int(routing.topk_groups))
        return ids, wts

    @staticmethod
    def _route_check(routing, E: int, select_bias) -> None:
        """A DeviceError naming what moe_route cannot do: the scoring, top_k, the groups, the selection bias."""
        if routing.scoring not in SCORINGS:
            raise DeviceError(f"moe: router scoring {routing.scoring!r} has no CUDA kernel (supported: "
                              f"{sorted(SCORINGS)})")
        k, G, kept = int(routing.top_k), int(routing.groups), int(routing.topk_groups)
        if not 1 <= k <= E:
            raise DeviceError(f"moe: top_k={k} must be in [1, {E}] (the router has {E} experts)")
        if G < 1 or E % G or not 1 <= kept <= G or k > kept * (E // G):
            raise DeviceError(f"moe: groups={G}, topk_groups={kept} must split the {E} experts into whole groups and "
                              f"keep at least top_k={k} experts")
        if kept < G and G > ROUTE_MAX_GROUPS:
            raise DeviceError(f"moe: group-limited routing over {G} groups has no CUDA kernel (at most "
                              f"{ROUTE_MAX_GROUPS}: one a lane)")
        if select_bias is not None and (getattr(select_bias, "dtype", None) != "float32"
                                        or tuple(select_bias.shape) != (E,)):
            raise DeviceError(f"moe: router.select_bias is {getattr(select_bias, 'dtype', None)} "
                              f"{list(select_bias.shape)} (expected float32 [{E}], as loading keeps it: "
                              f"core.spec.FLOAT32_ROLES)")

    def _moe_check(self, x, router_w, router_b, gate, up, down, routing, bg, bu, bd, select_bias=None) -> tuple:
        """(E, I, D, top_k) after checking every shape and dtype; a DeviceError naming what does not fit."""
        D = x.shape[-1]
        if up is None or down is None or router_w is None:
            raise DeviceError("moe: the router weight and the experts' up and down weights are required")
        if up.ndim != 3 or down.ndim != 3:
            raise DeviceError(f"moe: expert weights must be stacked [E, out, in] (experts.up.weight is "
                              f"{list(up.shape)}, experts.down.weight {list(down.shape)})")
        E, I = up.shape[0], up.shape[1]
        want = {"router.weight": (router_w, (E, D)), "router.bias": (router_b, (E,)),
                "experts.gate.weight": (gate, (E, I, D)), "experts.up.weight": (up, (E, I, D)),
                "experts.down.weight": (down, (E, D, I)), "experts.gate.bias": (bg, (E, I)),
                "experts.up.bias": (bu, (E, I)), "experts.down.bias": (bd, (E, D))}
        bad = [f"{role} is {list(t.shape)} (expected {list(shape)})" for role, (t, shape) in want.items()
               if t is not None and tuple(t.shape) != shape]
        bad += [f"{role} is {t.dtype} (the backend's weights are {self.dtype})" for role, (t, _) in want.items()
                if t is not None and not isinstance(t, QTensor) and t.dtype != self.dtype]
        bad += [f"{role} is quantized (only the expert weights may be, unpermuted)" for role, (t, _) in want.items()
                if isinstance(t, QTensor) and (not role.startswith("experts.") or role.endswith(".bias") or t.perm)]
        if x.dtype != "float32":
            bad.append(f"x is {x.dtype}, not float32")
        if bad:
            raise DeviceError(f"moe with x {list(x.shape)}: " + "; ".join(bad))
        self._route_check(routing, E, select_bias)
        return E, I, D, int(routing.top_k)

    def _moe_decode(self, x, ids, wts, gate, up, down, bg, bu, bd, act, T, E, I, D, k) -> DTensor:
        """The grouped GEMVs for a few tokens (module docstring): device-side from the ids on, graph-capturable;
        moe_q.cu's for quantized experts."""
        qdown = isinstance(down, QTensor)
        H = down.kp if qdown else I  # h's row: what the down product reads
        if isinstance(up, QTensor) and (gate is None or isinstance(gate, QTensor)
                                        and gate.layout_key() == up.layout_key()):
            h = self._moe_q_up(x, ids, wts, gate, up, bg, bu, act, T, E, I, H, k)
        else:
            gate, up = (self.qdense(w) if isinstance(w, QTensor) else w for w in (gate, up))
            h = self._moe_up(x, ids, wts, gate, up, bg, bu, act, T, E, I, D, k)
            if H != I:
                h = self.qstaged(h.reshape(T * k, I), T * k, down)
        y = self.alloc((T, D))
        if qdown:
            fn = self.kernel("moe_q.cu", f"moe_q_down_{down.kind}", Q_FORMATS["moe_q_down"],
                             SDTYPE=DTYPE_CODES[down.sdtype])
            if D:
                self.launch("moe(down)(quantized)", fn, (-(-D // MOE_ROWS), T, 1), (MOE_THREADS, 1, 1), y, h, ids, wts,
                            down.q, down.s, down.z, bd, k, E, D, down.kp, down.lg, down.G, down.srow, down.strides[1])
            return y
        fn = self.kernel("moe.cu", "moe_down", "PPPPPPiiii")
        if D:
            self.launch("moe(down)", fn, (-(-D // MOE_ROWS), T, 1), (MOE_THREADS, 1, 1), y, h, ids, wts, down, bd,
                        k, E, I, D)
        return y

    def _moe_up(self, x, ids, wts, gate, up, bg, bu, act, T, E, I, D, k) -> DTensor:
        """moe.cu's moe_gate_up (moe_up without a gate): h [T, k, I] from dense experts."""
        h = self.alloc((T, k, I))
        gated = gate is not None
        fn = self.kernel("moe.cu", "moe_gate_up" if gated else "moe_up", "PPPPPPPPiiiii")
        if I:
            self.launch("moe(gate_up)" if gated else "moe(up)", fn, (-(-I // MOE_ROWS), T * k, 1), (MOE_THREADS, 1, 1),
                        h, x, ids, wts, gate if gated else None, bg if gated else None, up, bu, k, E, I, D, act)
        return h

    def _moe_q_up(self, x, ids, wts, gate, up, bg, bu, act, T, E, I, H, k) -> DTensor:
        """moe_q.cu's moe_q_gate_up (moe_q_up without a gate): h [T, k, H] from quantized experts sharing a layout,
        rows zero past I; x staged to their padded width first when it is not that already."""
        xs = self.qstaged(x, T, up)
        h = self.alloc((T, k, H))
        gated = gate is not None
        name = "gate_up" if gated else "up"
        fn = self.kernel("moe_q.cu", f"moe_q_{name}_{up.kind}", Q_FORMATS["moe_q_up"], SDTYPE=DTYPE_CODES[up.sdtype])
        g = (gate.q, gate.s, gate.z, bg) if gated else (None, None, None, None)
        if H:
            self.launch(f"moe({name})(quantized)", fn, (-(-H // MOE_ROWS), T * k, 1), (MOE_THREADS, 1, 1), h, xs, ids,
                        wts, *g, up.q, up.s, up.z, bu, k, E, I, H, up.kp, up.lg, up.G, up.srow, up.strides[1], act)
        return h

    def _moe_grouped(self, x, ids, wts, gate, up, down, bg, bu, bd, kind, T, E, D, k) -> DTensor:
        """Many tokens (prefill, not captured): tokens grouped per expert on the host, each expert's rows through
        the ordinary matrix products, the weighted results added back (module docstring)."""
        flat = self.to_host(ids).reshape(-1).astype(np.int64)  # waits for the router: prefill only
        if flat.size and (flat.min() < 0 or flat.max() >= E):
            raise DeviceError(f"moe: the router picked expert ids outside [0, {E}) (NaN router logits?)")
        order = np.argsort(flat, kind="stable")  # (token, slot) pairs grouped by expert, tokens ascending
        counts = np.bincount(flat, minlength=E)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        tok = self.from_host((order // k).astype(np.int32))
        slot = self.from_host(order.astype(np.int32))
        y = self.alloc((T, D))
        self.check(lambda: self.drv.memset_d32_async(y.ptr, 0, T * D, self.stream), "moe(zero)")
        gather = self.kernel("moe.cu", "moe_gather", "PPPqi")
        scatter = self.kernel("moe.cu", "moe_scatter_add", "PPPPPqi")
        for e in np.nonzero(counts)[0]:
            e, a, n = int(e), int(starts[e]), int(counts[e])
            te, se = tok[a:a + n], slot[a:a + n]
            xe = self.alloc((n, D))
            self.launch("moe(gather)", gather, grid1(n * D), (256, 1, 1), xe, x, te, n, D)
            wu, be_u = self._expert(up, e), self._expert(bu, e)
            if gate is not None:
                he = self.gated_linear(xe, self._expert(gate, e), self._expert(bg, e), wu, be_u, kind)
            else:
                he = self.linear_act(xe, wu, be_u, kind)
            ye = self.linears(he, [(self._expert(down, e), self._expert(bd, e))])[0]
            self.launch("moe(scatter_add)", scatter, grid1(n * D), (256, 1, 1), y, ye, te, se, wts, n, D)
        return y

    @staticmethod
    def _expert(w, e: int):
        """Expert e's slice of a stacked [E, ...] weight (a view; QTensor.expert of a quantized one), or None."""
        if isinstance(w, QTensor):
            return w.expert(e)
        return None if w is None else w[e:e + 1].reshape(w.shape[1:])
