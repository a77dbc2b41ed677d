"""The numpy reference for every operation the model uses: short, plain, fp32.

These functions are the oracle for the CUDA kernels' property tests; keep them obviously right.
Shapes: T tokens, D hidden, H query heads, Hkv key/value heads, Dh head size, S cache length.
"""

from __future__ import annotations

import math

import numpy as np

from .rope import RopeTable


def embed(table: np.ndarray, ids: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Rows of table [V, D] at ids [T] → [T, D] float32, times `scale` (as float32) if given."""
    x = table[ids].astype(np.float32)
    return x * np.float32(scale) if scale is not None else x


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x [T, in] @ w[out, in].T (+ b [out]) → [T, out]."""
    y = x @ w.T
    return y + b if b is not None else y


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float, offset: float = 0.0) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, as torch); weight applied as (offset + w) (Nemotron's 1.0)."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * (offset + w)
    return y + b if b is not None else y


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, offset: float = 0.0) -> np.ndarray:
    """RMSNorm over the last axis; weight applied as (offset + w). Works per head on [T, H, Dh]."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (offset + w)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GPT-2's gelu_new (= torch gelu approximate='tanh')."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))  # x*x*x: numpy float32 x**3 is a slow pow


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact gelu, 0.5 x (1 + erf(x / sqrt 2)), via math.erf (numpy has no erf)."""
    from math import erf, sqrt
    return (0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float64])(x / sqrt(2.0)))).astype(x.dtype)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x)."""
    return x / (1.0 + np.exp(-x))


def relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0)."""
    return np.maximum(x, 0)


def relu2(x: np.ndarray) -> np.ndarray:
    """max(x, 0)² (Primer's squared ReLU; transformers' "relu2")."""
    r = np.maximum(x, 0)
    return r * r


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(1.702 x) (CLIP / OpenAI's "quick_gelu")."""
    return x / (1.0 + np.exp(np.float32(-1.702) * x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x))."""
    return 1.0 / (1.0 + np.exp(-x))


# transformers' ACT2FN names; gelu_fast is the same tanh approximation as gelu_new written another way.
ACT = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "gelu_fast": gelu_tanh, "gelu": gelu_erf,
       "quick_gelu": quick_gelu, "silu": silu, "swish": silu, "relu": relu, "relu2": relu2}


def moe(x: np.ndarray, router_w: np.ndarray, router_b: np.ndarray | None, gate: np.ndarray | None, up: np.ndarray,
        down: np.ndarray, top_k: int, scoring: str = "softmax", renormalize: bool = False, activation: str = "silu",
        routed_scale: float = 1.0, biases: tuple = (None, None, None), select_bias: np.ndarray | None = None,
        groups: int = 1, topk_groups: int = 1) -> np.ndarray:
    """Mixture of experts on x [T, D]: router [E, D] (+ [E]) → softmax or sigmoid scores → top_k experts per
    token (chosen by scores + select_bias [E] if given, within the best topk_groups of `groups` expert groups) →
    weights (the scores, renormalised to sum 1 if asked, times routed_scale) → sum of weight · expert(x), where
    expert e is down[e] @ (act(gate[e] @ x) * (up[e] @ x)) (gated) or down[e] @ act(up[e] @ x) (gate None).
    gate, up [E, I, D]; down [E, D, I]; biases (gate [E, I], up [E, I], down [E, D]) or None. Returns [T, D]."""
    top, w = moe_route(x, router_w, router_b, top_k, scoring, renormalize, routed_scale, select_bias, groups,
                       topk_groups)
    return moe_experts(x, top, w, gate, up, down, activation, biases)


def moe_route(x: np.ndarray, router_w: np.ndarray, router_b: np.ndarray | None, top_k: int, scoring: str = "softmax",
              renormalize: bool = False, routed_scale: float = 1.0, select_bias: np.ndarray | None = None,
              groups: int = 1, topk_groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """moe()'s router: each token's top_k experts [T, k] (ties go to the lower expert id) and their weights [T, k].

    The experts are chosen by choice = scores + select_bias (the scores alone without one); with topk_groups <
    groups, choice is first cut into `groups` contiguous groups, each scored by the sum of its two largest values,
    and the experts outside the topk_groups best groups (ties: the lower group id) are left out. The weights are
    the chosen experts' scores, without the bias."""
    logits = linear(x, router_w, router_b)
    if scoring == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
    else:
        scores = sigmoid(logits)
    choice = scores if select_bias is None else scores + select_bias
    if topk_groups < groups:
        g = -np.sort(-choice.reshape(len(choice), groups, choice.shape[-1] // groups), axis=-1)  # [T, G, E/G], desc.
        best = np.argsort(-(g[..., 0] + g[..., 1]), axis=-1, kind="stable")[:, :topk_groups]
        keep = np.zeros((len(choice), groups), bool)
        np.put_along_axis(keep, best, True, -1)
        choice = np.where(np.repeat(keep, choice.shape[-1] // groups, axis=-1), choice, -np.inf)
    top = np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]  # [T, k]
    w = np.take_along_axis(scores, top, -1)
    if renormalize:
        w = w / w.sum(-1, keepdims=True)
    return top, w * np.float32(routed_scale)


def moe_experts(x: np.ndarray, top: np.ndarray, w: np.ndarray, gate: np.ndarray | None, up: np.ndarray,
                down: np.ndarray, activation: str = "silu", biases: tuple = (None, None, None),
                first: int = 0) -> np.ndarray:
    """moe()'s experts: sum over each token's routed experts of weight · expert(x) → [T, D]. The stacked experts
    are ids first..first+len(up)-1 (an expert-parallel rank's share); routes to any other expert add nothing."""
    bg, bu, bd = biases
    out = np.zeros_like(x)
    for ex in np.unique(top):
        if not first <= ex < first + len(up):
            continue
        rows, slot = np.nonzero(top == ex)
        e = ex - first
        u = linear(x[rows], up[e], None if bu is None else bu[e])
        if gate is not None:
            a = ACT[activation](linear(x[rows], gate[e], None if bg is None else bg[e])) * u
        else:
            a = ACT[activation](u)
        y = linear(a, down[e], None if bd is None else bd[e])
        out[rows] += w[rows, slot][:, None] * y
    return out


def rope(x: np.ndarray, positions: np.ndarray, table) -> np.ndarray:
    """RoPE of x [T, H, Dh] at positions [T] with a RopeTable, or a bare inv_freq [R/2] (= RopeTable(inv_freq)).

    The first R = table.rotary_dim dims of each head rotate, the rest pass through. Pairs are (i, i + R/2)
    (rotate-half, Llama) or, if table.interleaved, (2i, 2i+1) (GPT-J); cos and sin are multiplied by table.scale.
    """
    if not isinstance(table, RopeTable):
        table = RopeTable(table)
    ang = positions.astype(np.float32)[:, None] * table.inv_freq[None, :]  # [T, R/2], fp32 as HF
    scale = np.float32(table.scale)  # as HF: the fp32 cos/sin times attention_scaling
    cos, sin = (np.cos(ang) * scale)[:, None, :], (np.sin(ang) * scale)[:, None, :]
    r = table.rotary_dim
    xr = x[..., :r]
    if table.interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    else:
        x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
        out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out if r == x.shape[-1] else np.concatenate([out, x[..., r:].astype(out.dtype)], axis=-1)


def clamp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """x clamped to [lo, hi] elementwise, a NaN left NaN (q, k and v under clip_qkv: OLMo 1, OLMoE, DBRX)."""
    return np.clip(x, lo, hi)


def soft_cap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap) (Gemma 2's logit soft-capping)."""
    return cap * np.tanh(x / cap)


ATTN_BLOCK = 1 << 24  # score elements per block of queries (64 MB in float32): memory O(T x block), not O(T^2)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, scale: float,
              window: int | None = None, softcap: float | None = None) -> np.ndarray:
    """Causal GQA attention of q [T, H, Dh] at positions start..start+T-1 over a cache k, v [Hkv, S, Dh].

    Query t, at position p = start+t, sees keys 0..p (S >= start+T); with a sliding `window` only the
    last `window` of them, p-window+1..p. Scores are q·k * scale, then soft_cap(·, softcap) if given,
    then masked. Returns [T, H, Dh].

    Queries go in blocks of rows, each block over only the keys it can see, so that a long prompt never
    holds its whole [T, T] score matrix (a 20k-token prompt would need GBs); each row's softmax is the same.
    """
    T, H, Dh = q.shape
    Hkv = k.shape[0]
    g = H // Hkv
    qh = q.reshape(T, Hkv, g, Dh).transpose(1, 2, 0, 3)  # [Hkv, g, T, Dh]
    rows = max(1, ATTN_BLOCK // (H * (start + T)))
    blocks = [_attention_rows(qh[:, :, t0:t0 + rows], k, v, start + t0, scale, window, softcap)
              for t0 in range(0, T, rows)]
    o = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=2)  # [Hkv, g, T, Dh]
    return o.transpose(2, 0, 1, 3).reshape(T, H, Dh)


def _attention_rows(qh: np.ndarray, k: np.ndarray, v: np.ndarray, first: int, scale: float,
                    window: int | None, softcap: float | None) -> np.ndarray:
    """attention() for queries qh [Hkv, g, R, Dh] at positions first..first+R-1 → [Hkv, g, R, Dh]."""
    R = qh.shape[2]
    lo = 0 if window is None else max(0, first - window + 1)  # keys before lo are outside every row's window
    hi = first + R
    s = (qh @ k[:, None, lo:hi].transpose(0, 1, 3, 2)) * scale  # [Hkv, g, R, hi - lo]
    if softcap is not None:
        s = soft_cap(s, softcap)
    qpos, kpos = (first + np.arange(R))[:, None], np.arange(lo, hi)[None, :]
    allowed = kpos <= qpos if window is None else (kpos <= qpos) & (kpos > qpos - window)
    s = np.where(allowed, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return p @ v[:, None, lo:hi]


def cache_write(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> None:
    """Store k, v [T, Hkv, Dh] into the caches [Hkv, S, Dh] at positions start..start+T-1 (in place)."""
    T = k.shape[0]
    k_cache[:, start:start + T] = k.transpose(1, 0, 2)
    v_cache[:, start:start + T] = v.transpose(1, 0, 2)
