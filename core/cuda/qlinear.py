"""Products with weights kept quantized (QTensor, issue 16): linear.py hands every product whose weight is one here.

- A few tokens (M <= GEMV_MAX_T: decode): gemv_q.cu's GEMVs, which read the packed words and dequantize in
  registers: up to 3 weights sharing a layout (q, k, v) in one launch, an activation in the epilogue (linear_act), or
  gate and up together with act(gate) * up (gated_linear). x is staged first (qstage) when the kernel cannot read it
  as it is: an act-order weight's permutation, K short of the padded row, a row not 16-byte aligned. With the qtc
  switch (ARCHKIT_CUDA_QTC=1), one token of int4 / int8 gate and up goes to gemv_qtc.cu's tensor-core form of
  qgemv_gated instead (use_qtc), where each group of scales holds whole steps of K and the staged x fits the block's
  shared memory.
- More tokens (prefill): the weight is dequantized into a pooled scratch buffer of the backend's dtype (qdequant_*,
  the dense weight loading would have made, bit for bit) and the product goes to the GEMM as any dense one does
  (cuBLAS or ours, linear.py). Dequantized tiles fed straight to tensor cores would save that round trip, which
  also makes a batched decode step of more than GEMV_MAX_T rows (core.engine) read more bytes than an fp16 weight.

Not fused here, unlike the dense GEMVs (linear.py): a norm left pending (deferred.py) is computed before the product,
and the residual add of add_norm runs in the norm kernel, since no Lazy "linear" is made for a QTensor.
"""

from __future__ import annotations

from ..errors import DeviceError
from .elementwise import GEMV_ACT_MAX
from .geometry import (GEMV_MAX_T, QGEO, QTC_SMEM_LIMIT, QTC_STEP, QTC_WARPS, grid1, qgemv_defines,
                       qtc_smem)
from .modules import DTYPE_CODES
from .tensors import DTensor, Lazy, QTensor

# PyCUDA argument formats of gemv_q.cu's kernels (the same for each kind; tests/test_quant_layout.py checks them
# against the preprocessed source)
FORMATS = {"qgemv": "Piiiiii" + "PPPPPi" * 3, "qgemv_gated": "PPiiiiiii" + "PPPP" * 2, "qdequant": "PPPPPiiiiii",
           "qstage": "PPPiii"}


class QuantLinearMixin:
    """CudaBackend's products with quantized weights (see the module docstring).

    Uses alloc() (memory.py), kernel() / launch() (launch.py), linear() / linears() (linear.py), act() / gated_act()
    / act_code() (elementwise.py)."""

    def qlinears(self, x, pairs) -> tuple:
        """(x @ w.T (+ b) for (w, b) in pairs) where some w are QTensors: those sharing a layout in one GEMV launch
        each (3 at most) for a few tokens, else each dequantized for the GEMM; the dense ones through linears()."""
        x, K, M = self._qinput(x, pairs, "linear")
        out: list = [None] * len(pairs)
        dense = [i for i, (w, _) in enumerate(pairs) if not isinstance(w, QTensor)]
        if dense:
            for i, y in zip(dense, self.linears(x, [pairs[i] for i in dense])):
                out[i] = y
        groups: dict = {}
        for i, (w, _) in enumerate(pairs):
            if isinstance(w, QTensor):
                groups.setdefault(w.layout_key(), []).append(i)
        for idx in groups.values():
            for j in range(0, len(idx), 3):
                part = idx[j:j + 3]
                ys = self._qproducts(x, M, [pairs[i] for i in part], -1, "linear(qgemv)")
                for i, y in zip(part, ys):
                    out[i] = y
        return tuple(out)

    def qlinear_act(self, x, w: QTensor, b, kind: str):
        """act(x @ w.T (+ b)) for a QTensor w: the activation in the GEMV's epilogue for a few tokens (codes up to
        GEMV_ACT_MAX), else after the product."""
        x, K, M = self._qinput(x, [(w, b)], f"linear_act({kind})")
        code = self.act_code(kind)
        if M == 0 or M > GEMV_MAX_T or code > GEMV_ACT_MAX:
            return self.act(self.qlinears(x, [(w, b)])[0], kind)
        return self._qgemv(x, M, [(w, b)], code, f"linear_act({kind})(qgemv)")[0]

    def qgated(self, x, wg, bg, wu, bu, kind: str):
        """act(x @ wg.T (+ bg)) * (x @ wu.T (+ bu)) where wg or wu is a QTensor: one GEMV reading both for a few
        tokens when they share a layout (and no act-order), else two products and gated_act."""
        x, K, M = self._qinput(x, [(wg, bg), (wu, bu)], f"gated_linear({kind})")
        code = self.act_code(kind)
        if (M == 0 or M > GEMV_MAX_T or code > GEMV_ACT_MAX or not isinstance(wg, QTensor)
                or not isinstance(wu, QTensor) or wg.layout_key() != wu.layout_key() or wg.shape != wu.shape):
            return self.gated_act(*self.qlinears(x, [(wg, bg), (wu, bu)]), kind)
        N = wg.shape[0]
        y = self.alloc(x.shape[:-1] + (N,))
        xs = self.qstaged(x, M, wg)
        fn, threads, rows, smem = self._qgemv_kernel("qgemv_gated", wg, M)
        if N:
            self.launch(f"gated_linear({kind})(qgemv)", fn, (-(-N // rows), 1, 1), (threads, 1, 1), y, xs, M,
                        wg.kp, wg.lg, wg.G, wg.srow, code, N, wg.q, wg.s, wg.z, bg, wu.q, wu.s, wu.z, bu, shared=smem)
        return y

    def use_qtc(self, base: str, w: QTensor, M: int) -> bool:
        """Whether gemv_qtc.cu (tensor cores) takes the GEMV `base` of M tokens of weight w: the qtc switch on (off
        by default: options.py), the gated form (the only one it made faster on an H100: BENCHMARKS.md), one token,
        int4 / int8, every step of QTC_STEP codes inside one scale group, the staged x within QTC_SMEM_LIMIT."""
        step = QTC_STEP.get(w.kind)
        return (base == "qgemv_gated" and bool(getattr(self, "qtc", False)) and M == 1 and step is not None
                and (w.G == 1 or w.lg >= step.bit_length() - 1) and qtc_smem(w.kind, w.kp) <= QTC_SMEM_LIMIT)

    def _qgemv_kernel(self, base: str, w: QTensor, M: int, **extra):
        """(kernel, threads, rows a block, dynamic shared bytes) of the GEMV `base` (qgemv / qgemv_gated) for M
        tokens of weight w: gemv_qtc.cu's where use_qtc, else gemv_q.cu's."""
        if self.use_qtc(base, w, M):
            fn = self.kernel("gemv_qtc.cu", f"{base}_tc_{w.kind}", FORMATS[base], SDTYPE=DTYPE_CODES[w.sdtype],
                             QTC_WARPS=QTC_WARPS, **extra)
            smem = qtc_smem(w.kind, w.kp)
            if smem > 48 * 1024 and getattr(fn, "_smem", 0) < smem:
                fn.set_attribute(self.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                fn._smem = smem
            return fn, 32 * QTC_WARPS, 16, smem
        fn = self.kernel("gemv_q.cu", f"{base}_{w.kind}", FORMATS[base], **self._qdefines(w, M), **extra)
        return fn, QGEO[w.kind][0], QGEO[w.kind][1], 0

    def qdense(self, w: QTensor) -> DTensor:
        """w dequantized into a pooled buffer [N, K] of the backend's dtype (act-order columns back in place): the
        weight a dense load makes from the same checkpoint, for the GEMM of many tokens. A stack of experts comes
        out [E, N, K], one launch an expert (moe.py, when its pair of weights cannot share a quantized kernel)."""
        out = self.alloc(w.shape, self.dtype)
        N, K = w.shape[-2:]
        kw = w.kp * (4 if w.kind == "int4" else 8) // 32  # words a row
        fn = self.kernel("gemv_q.cu", f"qdequant_{w.kind}", FORMATS["qdequant"], **self._qdefines(w, GEMV_MAX_T))
        parts = [(w.expert(e), out[e:e + 1]) for e in range(w.shape[0])] if w.ndim == 3 else [(w, out)]
        for we, oe in parts:
            if N and K:
                self.launch("linear(dequantize)", fn, grid1(N * kw), (256, 1, 1), oe, we.q, we.s, we.z, we.perm, N, K,
                            w.kp, w.lg, w.G, w.srow)
        return out

    def _qinput(self, x, pairs, op: str):
        """(x computed if it was left pending, K, M), every weight checked against K."""
        if isinstance(x, Lazy):
            x = x.materialize()
        K = x.shape[-1]
        for w, _ in pairs:
            if w.shape[1] != K:
                raise DeviceError(f"{op}: x has {K} features but the weight is {list(w.shape)}")
        return x, K, (x.size // K if K else 0)

    def _qproducts(self, x, M: int, pairs, act: int, op: str) -> list:
        """x @ w.T (+ b) for QTensors sharing a layout (at most 3): the GEMV, or each dequantized for the GEMM."""
        if M == 0:
            return [self.alloc(x.shape[:-1] + (w.shape[0],)) for w, _ in pairs]
        if M <= GEMV_MAX_T:
            return self._qgemv(x, M, pairs, act, op)
        return [self.linear(x, self.qdense(w), b) for w, b in pairs]

    def _qdefines(self, w: QTensor, M: int) -> dict:
        return {"SDTYPE": DTYPE_CODES[w.sdtype], "GEMV_MAX_T": 1 if M == 1 else GEMV_MAX_T, **qgemv_defines(w.kind)}

    def qstaged(self, x, M: int, w: QTensor):
        """x [M, K] as the quantized GEMVs read it for weight w (gemv_q.cu, moe_q.cu): [M, kp] float32, 16-byte
        aligned, permuted for an act-order weight, zero past K (a new buffer when x is not that already)."""
        K = x.shape[-1]
        if not w.perm and w.kp == K and x.ptr % 16 == 0:
            return x
        xs = self.alloc((M, w.kp))
        fn = self.kernel("gemv_q.cu", "qstage", FORMATS["qstage"], **self._qdefines(w, M))
        self.launch("linear(qstage)", fn, grid1(M * w.kp), (256, 1, 1), xs, x, w.perm, M, K, w.kp)
        return xs

    def _qgemv(self, x, M: int, pairs, act: int, op: str) -> list:
        """One qgemv launch for up to 3 QTensors sharing a layout (QTensor.layout_key), activation `act` (-1: none)."""
        w0 = pairs[0][0]
        xs = self.qstaged(x, M, w0)
        segs, ys = [], []
        for w, b in pairs:
            ys.append(self.alloc(x.shape[:-1] + (w.shape[0],)))
            segs += [ys[-1], w.q, w.s, w.z, b, w.shape[0]]
        segs += [None, None, None, None, None, 0] * (3 - len(pairs))
        # as gemv_geometry: the q/k/v product (three outputs) triggers the next launch only after its loads
        early = {"GEMV_EARLY_LAUNCH": 0} if len(pairs) == 3 else {}
        fn, threads, rows, smem = self._qgemv_kernel("qgemv", w0, M, **early)
        blocks = sum(-(-w.shape[0] // rows) for w, _ in pairs)
        if blocks:
            self.launch(op, fn, (blocks, 1, 1), (threads, 1, 1), xs, M, w0.kp, w0.lg, w0.G, w0.srow, act, *segs,
                        shared=smem)
        return ys
