"""GPTQ calibration for `archkit quantize --calibrate TEXT` (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Algorithm 1), in numpy on the CPU.

Round-to-nearest quantizes each weight on its own. GPTQ quantizes a matrix W [N, K] one input column at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse of the layer's
input Hessian H = 2 X^T X (X: the inputs the layer saw on calibration text), which minimises ||W X - Q X||^2 rather
than ||W - Q||^2. The scale of a group is measured (min-max, as round-to-nearest does) on the group's columns as they
stand when its first column is reached, i.e. after the error of the groups before it was spread onto them: what
GPTQ's reference code does without act-order. The output is the same (q, scale, zero point) that round-to-nearest
gives, so the checkpoint written is the same compressed-tensors format, read by the same readers.

The Hessians come from one pass of the unquantized model over the calibration text (every layer sees the fp32
model's activations, not those of the layers quantized before it: the one-shot variant, cheaper, and what a single
forward pass on the CPU allows). Experts of a mixture-of-experts layer are reached through the `moe` op, not through
a linear the recorder sees: they keep round-to-nearest.
"""

from __future__ import annotations

import numpy as np

from ..checkpoint import to_float32
from ..errors import QuantizationError
from .pack import round_to

DAMP = 0.01        # dampening: this fraction of the mean diagonal of H is added to it (GPTQ's default)
BLOCK = 128        # columns per lazy-batch update (GPTQ's default; results do not depend on it)
WINDOW = 512       # calibration tokens per forward pass


def hessians(model, names_by_array: dict[int, str], windows) -> dict[str, tuple[np.ndarray, int]]:
    """{tensor name: (X^T X float64 [K, K], rows)} over every input row each weight saw while `model` (a loaded
    numpy-backend Model) ran the token windows; names_by_array maps id(loaded weight array) to its tensor name."""
    be = model.backend
    acc: dict[str, list] = {}

    def record(x, *ws):
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        for name in {names_by_array.get(id(w)) for w in ws} - {None}:  # a fused tensor's parts: counted once
            a = acc.setdefault(name, [np.zeros((x.shape[1], x.shape[1])), 0])
            a[0] += x.T @ x
            a[1] += x.shape[0]

    real = {k: getattr(be, k) for k in ("linear", "linears", "linear_act", "gated_linear")}

    def linear(x, w, b=None):
        record(x, w)
        return real["linear"](x, w, b)

    def linears(x, pairs):
        record(x, *(w for w, _ in pairs))
        return real["linears"](x, pairs)

    def linear_act(x, w, b, kind):
        record(x, w)
        return real["linear_act"](x, w, b, kind)

    def gated_linear(x, wg, bg, wu, bu, kind):
        record(x, wg, wu)
        return real["gated_linear"](x, wg, bg, wu, bu, kind)

    be.linear, be.linears, be.linear_act, be.gated_linear = linear, linears, linear_act, gated_linear
    try:
        for ids in windows:
            model.logits(ids)
    finally:
        for k in real:
            delattr(be, k)  # the class's methods again
    return {n: (h, rows) for n, (h, rows) in acc.items()}


def gptq_int(w: np.ndarray, xtx: np.ndarray, bits: int, group: int, symmetric: bool, scale_dtype: str,
             damp: float | None = None):
    """GPTQ of w [N, K] (float32) with the input Gram matrix xtx = X^T X [K, K]: returns what rtn_int returns,
    (q int8 [N, K], scale bits [N, G] in scale_dtype, zero point int8 [N, G] or None), W ≈ (q - z) * s per group."""
    n, k = w.shape
    g = k if group == -1 else group
    if k % g:
        raise QuantizationError(f"GPTQ: group size {g} does not divide the {k} input columns")
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    W = w.astype(np.float64).copy()
    H = 2.0 * np.asarray(xtx, np.float64)
    dead = np.diag(H) == 0  # inputs that were always zero: their weights cannot matter, so they are zeroed
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += (DAMP if damp is None else damp) * np.mean(np.diag(H))
    try:  # the upper Cholesky factor of H^-1, as GPTQ's reference uses it
        Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    except np.linalg.LinAlgError:
        raise QuantizationError("GPTQ: the calibration Hessian is not positive definite even after dampening "
                                "(pass more calibration text)") from None
    Q = np.zeros((n, k), np.int8)
    Z = None if symmetric else np.zeros((n, k // g), np.int8)
    S_bits = None
    s = z = None
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        E = np.zeros((n, b1 - b0))
        for i in range(b0, b1):
            if i % g == 0:  # a new group: its scale from its columns as they stand now
                s, z, s_b = _group_scale(W[:, i:i + g], bits, symmetric, scale_dtype)
                if S_bits is None:
                    S_bits = np.zeros((n, k // g), s_b.dtype)
                S_bits[:, i // g] = s_b
                if Z is not None:
                    Z[:, i // g] = z
            col = W[:, i]
            # rounded in float32 as round-to-nearest rounds (with no error to spread, the two agree exactly)
            q = np.clip(np.rint(col.astype(np.float32) / s.astype(np.float32)) + (0 if z is None else z), qmin, qmax)
            Q[:, i] = q
            deq = (q - (0 if z is None else z)) * s
            err = (col - deq) / Hinv[i, i]
            W[:, i + 1:b1] -= np.outer(err, Hinv[i, i + 1:b1])
            E[:, i - b0] = err
        W[:, b1:] -= E @ Hinv[b0:b1, b1:]
    return Q, S_bits, Z


def _group_scale(x: np.ndarray, bits: int, symmetric: bool, scale_dtype: str):
    """(scale float64 [N], zero point [N] or None, scale bits [N]) of columns x [N, g] by the min-max observer,
    the scale rounded to its stored dtype (quantize.rtn_int's rule)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = x.astype(np.float32)  # float32 arithmetic, as quantize.rtn_int's
    lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
    s = np.maximum(-lo, hi) / ((qmax - qmin) / 2) if symmetric else (hi - lo) / (qmax - qmin)
    s_bits = round_to(np.where(s > 0, s, 1.0), scale_dtype)
    s = to_float32(s_bits, scale_dtype)
    z = None if symmetric else np.clip(np.rint(qmin - lo / s), qmin, qmax)
    return s.astype(np.float64), z, s_bits


def calibration_windows(tokenizer, text: str, tokens: int, window: int = WINDOW) -> list[list[int]]:
    """The first `tokens` token ids of `text`, cut into windows of `window`; QuantizationError if there are none."""
    ids = tokenizer.encode(text)[:tokens]
    if len(ids) < 2:
        raise QuantizationError(f"the calibration text gives {len(ids)} tokens; GPTQ needs some text to measure on")
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]
