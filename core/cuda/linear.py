"""Matrix products: x @ w.T (+ b) as a GEMV for a few tokens (gemv.cu, with epilogues: an activation, a gated
pair, a residual add, a folded norm); for the rows of a batched decode step (GEMV_MAX_T < M <= SKINNY_MAX_M,
half-precision weights) on skinny.cu's tensor-core kernel, up to three products of x a launch; else as a GEMM:
cuBLAS through ctypes (cublas.py) when found, or our own WMMA GEMM (gemm.cu; gemm_f32.cu for float32 weights).

At one decode token (fused kernels, fold on) linear() returns a Lazy "linear": add_norm (norm_rope.py) runs it
with the residual add in its epilogue; any other use computes it then. A norm left pending by deferred.py is
folded into the GEMV's reduction (folded_norm). `gemm` ("auto", "own", "cublas") may be switched between
operations; a graph capture (batched decode steps) uses cuBLAS only once its handle has its fixed workspace.
A weight kept quantized (QTensor) goes to qlinear.py instead.
"""

from __future__ import annotations

from ..errors import DeviceError
from . import cublas
from .elementwise import GEMV_ACT_MAX
from .geometry import (CUBLAS_WORKSPACE, GEMV_MAX_T, GEMV_THREADS, SK_COUNTERS, SK_SUB, SKINNY_MAX_M, gemv_geometry,
                       grid1, skinny_geometry)
from .tensors import DTensor, Lazy, QTensor


class LinearMixin:
    """CudaBackend's matrix products (see the module docstring).

    State (the facade gives it its first value): _cublas, the loaded library; _cublas_handle, made on first
    use, destroyed by close_cublas(); _cublas_ws, its fixed workspace (freed with it); _sk_count, skinny.cu's tile
    counters (made on first use, kept with the backend). Uses the backend's dtype, fused, fold, gemm, skinny,
    capture and stream; sm_count() (attention.py);
    alloc() (memory.py), kernel() / launch() / after_op() (launch.py), folded_norm() (deferred.py),
    act() / gated_act() / act_code() (elementwise.py)."""

    def linear(self, x: DTensor, w: DTensor, b: DTensor | None = None) -> DTensor:
        """x [..., K] @ w[N, K].T (+ b) → float32 [..., N]: GEMV for a few tokens, else a tiled GEMM.

        At one token (fused kernels, folding on) the result is a Lazy: it is computed when first read (or by
        add_norm with the residual add folded in), from x as it is then; activations are never written in place."""
        if isinstance(w, QTensor):
            return self.qlinears(x, [(w, b)])[0]
        K, N = x.shape[-1], w.shape[0]
        if w.shape[1] != K:
            raise DeviceError(f"linear: x has {K} features but the weight is {list(w.shape)}")
        M = x.size // K if K else 0
        if M == 0:  # a batched step whose rows all continue a prompt returns no logits rows (paged.py rows)
            return self.alloc(x.shape[:-1] + (N,))
        if self._use_skinny(x, [(w, b)]):
            return self._skinny_linears(x, [(w, b)])[0]
        if M <= GEMV_MAX_T and self.fused:
            if self.fold and M == 1 and w.shape[0]:  # add_norm may fold the residual add into it
                return Lazy(x.shape[:-1] + (N,), "linear", (x, w, b), lambda: self.linears(x, [(w, b)])[0])
            return self.linears(x, [(w, b)])[0]
        if M > GEMV_MAX_T and self._use_cublas(M, K):
            return self._cublas_linears(x, [(w, b)])[0]
        y = self.alloc(x.shape[:-1] + (N,))
        if M <= GEMV_MAX_T:
            fn = self.kernel("gemv.cu", "gemv", "PPPPiii", GEMV_MAX_T=GEMV_MAX_T)
            self.launch("linear(gemv)", fn, (-(-N // 8), 1, 1), (256, 1, 1), y, x, w, b, M, N, K)
        elif self.dtype == "float32":
            fn = self.kernel("gemm_f32.cu", "gemm_f32", "PPPPiii")
            self.launch("linear(gemm_f32)", fn, (-(-N // 64), -(-M // 64), 1), (256, 1, 1), y, x, w, b, M, N, K)
        else:
            fn = self.kernel("gemm.cu", "gemm", "PPPPiii")
            self.launch("linear(gemm)", fn, (-(-N // 128), -(-M // 128), 1), (256, 1, 1), y, x, w, b, M, N, K)
        return y

    def linears(self, x: DTensor, pairs) -> tuple:
        """(x @ w.T (+ b) for (w, b) in pairs): for a few tokens one GEMV launch covers up to 3 products."""
        if any(isinstance(w, QTensor) for w, _ in pairs):
            return self.qlinears(x, pairs)
        K = x.shape[-1]
        M = x.size // K if K else 0
        if self._use_skinny(x, pairs):
            outs = []
            for i in range(0, len(pairs), 3):
                outs += self._skinny_linears(x, pairs[i:i + 3])
            return tuple(outs)
        if M > GEMV_MAX_T and self._use_cublas(M, K):
            return tuple(self._cublas_linears(x, pairs))
        if M > GEMV_MAX_T or not self.fused:
            return tuple(self.linear(x, w, b) for w, b in pairs)
        outs = []
        for i in range(0, len(pairs), 3):
            outs += self.gemv_rows(x, pairs[i:i + 3], -1, "linear(gemv)")
        return tuple(outs)

    def gemv_rows(self, x, pairs, act: int, op: str, resid=None) -> list:
        """One gemv_rows launch for up to 3 products of x (pairs of (w, b)), with activation `act` (-1: none)
        and, given `resid`, the residual added; a pending norm of x is folded in."""
        K = x.shape[-1]
        M = x.size // K if K else 0
        x, g, lb, eps, off, suffix = self.folded_norm(x)
        segs, ys = [], []
        for w, b in pairs:
            if w.shape[1] != K:
                raise DeviceError(f"{op}: x has {K} features but the weight is {list(w.shape)}")
            ys.append(self.alloc(x.shape[:-1] + (w.shape[0],)))
            segs += [ys[-1], w, b, w.shape[0]]
        segs += [None, None, None, 0] * (3 - len(pairs))
        rows, geo = gemv_geometry(K, M, self.dtype, qkv=len(pairs) == 3)
        blocks = sum(-(-w.shape[0] // rows) for w, _ in pairs)
        fn = self.kernel("gemv.cu", "gemv_rows" + suffix, "PiiiPPffP" + "PPPi" * 3,
                         GEMV_MAX_T=1 if M == 1 else GEMV_MAX_T, **geo)
        if blocks:
            self.launch(op, fn, (blocks, 1, 1), (GEMV_THREADS, 1, 1), x, M, K, act, g, lb, float(eps), float(off),
                        resid, *segs)
        return ys

    def linear_act(self, x: DTensor, w: DTensor, b, kind: str) -> DTensor:
        """act(x @ w.T (+ b)): the activation as the GEMV's epilogue for a few tokens (codes the GEMV knows,
        elementwise.GEMV_ACT_MAX; the others run the product, then the act kernel)."""
        if isinstance(w, QTensor):
            return self.qlinear_act(x, w, b, kind)
        M = x.size // x.shape[-1] if x.shape[-1] else 0
        if M > GEMV_MAX_T or not self.fused or self.act_code(kind) > GEMV_ACT_MAX:
            return self.act(self.linear(x, w, b), kind)
        return self.gemv_rows(x, [(w, b)], self.act_code(kind), f"linear_act({kind})")[0]

    def gated_linear(self, x: DTensor, wg: DTensor, bg, wu: DTensor, bu, kind: str) -> DTensor:
        """act(x @ wg.T (+ bg)) * (x @ wu.T (+ bu)): for a few tokens one GEMV reads both weights."""
        if isinstance(wg, QTensor) or isinstance(wu, QTensor):
            return self.qgated(x, wg, bg, wu, bu, kind)
        K, N = x.shape[-1], wg.shape[0]
        M = x.size // K if K else 0
        if M > GEMV_MAX_T or not self.fused or self.act_code(kind) > GEMV_ACT_MAX:
            return self.gated_act(*self.linears(x, [(wg, bg), (wu, bu)]), kind)
        if wg.shape[1] != K or wu.shape != wg.shape:
            raise DeviceError(f"gated_linear: x has {K} features, gate {list(wg.shape)}, up {list(wu.shape)}")
        y = self.alloc(x.shape[:-1] + (N,))
        x, g, lb, eps, off, suffix = self.folded_norm(x)
        rows, geo = gemv_geometry(K, M, self.dtype, gated=True)
        fn = self.kernel("gemv.cu", "gemv_gated" + suffix, "PPPPPPiiiiPPff", GEMV_MAX_T=1 if M == 1 else GEMV_MAX_T, **geo)
        if N:
            self.launch(f"gated_linear({kind})", fn, (-(-N // rows), 1, 1), (GEMV_THREADS, 1, 1),
                        y, x, wg, bg, wu, bu, M, N, K, self.act_code(kind), g, lb, float(eps), float(off))
        return y

    def _use_skinny(self, x: DTensor, pairs) -> bool:
        """Whether these products of x go to skinny.cu: the switch on, GEMV_MAX_T < M <= SKINNY_MAX_M rows, half-
        precision weights of x's width (a multiple of 8 columns: 16-byte rows), x and weights 16-byte aligned; inside
        a graph capture only once its counters exist (made by the shape's eager first step)."""
        K = x.shape[-1]
        M = x.size // K if K else 0
        if not (self.skinny and self.dtype != "float32" and GEMV_MAX_T < M <= SKINNY_MAX_M and K % 8 == 0):
            return False
        if x.dtype != "float32" or (self.capture is not None and self._sk_count is None) or x.ptr % 16:
            return False
        return all(not isinstance(w, QTensor) and w.dtype == self.dtype and w.ndim == 2 and w.shape[1] == K
                   and w.ptr % 16 == 0 for w, _ in pairs)

    def _skinny_linears(self, x: DTensor, pairs) -> list:
        """x @ w.T (+ b) for up to three (w, b) in one skinny_linear launch (skinny.cu; geometry.skinny_geometry):
        x rounded to the weight type as the tensor-core operands are built, fp32 accumulation, the bias added in the
        epilogue."""
        K = x.shape[-1]
        M = x.size // K
        Ns = [w.shape[0] for w, _ in pairs]
        nt, warps, kslice, slices, smem = skinny_geometry(M, K, Ns, self.sm_count())
        ys = [self.alloc(x.shape[:-1] + (n,)) for n in Ns]
        tiles = sum(-(-n // (16 * warps)) for n in Ns)
        if not tiles:
            return ys
        if self._sk_count is None:  # (on the first use, whether split or not: a capture takes skinny.cu only after)
            c = self.mem_alloc(4 * SK_COUNTERS, "skinny.cu's tile counters")
            self.drv.memset_d32(c, 0, SK_COUNTERS)
            self._sk_count = DTensor(c, int(c), (SK_COUNTERS,), "int32")
        part = self.alloc((slices, tiles, 8 * nt, 16 * warps)) if slices > 1 else None
        segs = []
        for (w, b), y, n in zip(pairs, ys, Ns):
            segs += [y, w, b, n]
        segs += [None, None, None, 0] * (3 - len(pairs))
        fn = self.kernel("skinny.cu", "skinny_linear", "Piii" + "PP" + "PPPi" * 3, SK_NT=nt, SK_WARPS=warps,
                         SK_SUB=SK_SUB)
        if smem > 48 * 1024 and getattr(fn, "_smem", 0) < smem:  # (8 tiles of x rows: 67 KB, opted into)
            fn.set_attribute(self.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            fn._smem = smem
        self.launch("linear(skinny)", fn, (tiles, slices, 1), (32 * warps, 1, 1), x, M, K, kslice, part,
                    self._sk_count, *segs, shared=smem)
        return ys

    def cublas_lib(self):
        """The loaded cuBLAS (core/cuda/cublas.py), or None under "auto" when there is none; a DeviceError
        saying what was tried when it was asked for by name."""
        if self._cublas is None:
            ok, why = cublas.available()
            if not ok:
                if self.gemm == "auto":
                    return None
                raise DeviceError(f"the cuBLAS GEMM was asked for (ARCHKIT_CUDA_GEMM=cublas) but {why}")
            self._cublas = cublas.load()
        return self._cublas

    def _use_cublas(self, M: int, K: int) -> bool:
        """Whether a product of M > GEMV_MAX_T rows goes to cuBLAS. Inside a graph capture (batched decode steps,
        batch_graph.py) only once the handle exists with its fixed workspace: cuBLAS then allocates nothing, so
        the captured call replays with the buffers it was captured with."""
        if self.capture is not None and self._cublas_ws is None:
            return False
        return self.gemm in ("auto", "cublas") and M > 0 and K > 0 and self.cublas_lib() is not None

    def cublas_op(self, op: str, call) -> None:
        """Run one cuBLAS call (an op on the backend's stream, like launch(): named for errors, synced under
        ARCHKIT_CUDA_SYNC=1; profilers wrap this method)."""
        call()
        self.after_op(op)

    def _cublas_linears(self, x: DTensor, pairs) -> list:
        """x @ w.T (+ b) for (w, b) in pairs through cublasGemmEx: x is rounded to the weight type once (as our
        GEMM does when it stages x), the product accumulates and is written in fp32, bias added after."""
        K = x.shape[-1]
        M = x.size // K
        if self._cublas_handle is None:
            ws = self.mem_alloc(CUBLAS_WORKSPACE, "the cuBLAS workspace")
            try:
                self._cublas_handle, fixed = self.cublas_lib().create(self.stream.handle, int(ws), CUBLAS_WORKSPACE)
            except BaseException:
                ws.free()
                raise
            if fixed:
                self._cublas_ws = ws
            else:  # (a cuBLAS without cublasSetWorkspace: it keeps its own, and no capture includes it)
                ws.free()
        h = self._cublas_handle
        if self.dtype == "float32":
            xa = x
        else:
            xa = self.alloc((M, K), self.dtype)
            fn = self.kernel("elementwise.cu", "to_wt", "PPq")
            self.launch("linear(cublas:round)", fn, grid1(M * K), (256, 1, 1), xa, x, M * K)
        outs = []
        for w, b in pairs:
            N = w.shape[0]
            if w.shape[1] != K:
                raise DeviceError(f"linear: x has {K} features but the weight is {list(w.shape)}")
            y = self.alloc(x.shape[:-1] + (N,))
            if N:
                self.cublas_op("linear(cublas)",
                               lambda: self._cublas.linear(h, y.ptr, xa.ptr, w.ptr, M, N, K, self.dtype))
                if b is not None:
                    fn = self.kernel("elementwise.cu", "add_bias", "PPqi")
                    self.launch("linear(cublas:bias)", fn, grid1(M * N), (256, 1, 1), y, b, M * N, N)
            outs.append(y)
        return outs

    def close_cublas(self) -> None:
        """Destroy the cuBLAS handle, if one was made (release)."""
        if self._cublas_handle is not None:
            handle, self._cublas_handle = self._cublas_handle, None
            try:
                self._cublas.destroy(handle)
            except DeviceError:
                pass
        if self._cublas_ws is not None:
            ws, self._cublas_ws = self._cublas_ws, None
            ws.free()
