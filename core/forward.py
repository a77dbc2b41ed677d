"""The forward pass: every layer written once against backend operations (core/backend_api.py).

Nothing here knows a family: every difference comes from the ModelConfig (built from the spec) and
from which roles the checkpoint provided (a bias is added where a bias was loaded).
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from .backend import Weights
from .config import ModelConfig
from .paged import Batch
from .rope import RopeConfig, RopeTable


@attrs.define
class Step:
    """What every block of one forward call needs: the backend and its weights, the config, the KV cache, the
    first position (or a core.paged.Batch when the rows belong to several sequences: pass it on to the backend's
    rope/cache/attention ops as the position argument), the number of tokens, and the rope table for this
    sequence length (None without RoPE); rope_sliding, the sliding-window layers' own table where the model has
    one (ModelConfig.sliding_rope), else None: `step.table(i)` picks layer i's.

    A plugin's own layer function (ModelSpec.attention_block / mlp_block) receives it as `step`.
    """

    be: Any
    W: Weights
    c: ModelConfig
    cache: Any
    start: Any  # int, or a core.paged.Batch
    T: int
    rope: RopeTable | None
    rope_sliding: RopeTable | None = None

    def table(self, layer: int) -> RopeTable | None:
        """The rope table of `layer` (None: no RoPE there, a NoPE layer or a model without RoPE)."""
        if layer in self.c.nope_layers:
            return None
        return self.rope_sliding if self.rope_sliding is not None and self.c.sliding_layer(layer) else self.rope


def forward(be, W, c: ModelConfig, ids: np.ndarray, cache, start, rope: RopeConfig | None, all_logits: bool,
            host: bool = True):
    """Run tokens `ids` [T] at positions start..start+T-1 through the model, filling `cache`.

    `start` is an int for one sequence, or a core.paged.Batch for rows of many sequences (then `cache` is the
    backend's paged cache, and without all_logits the rows returned are the batch's logit_rows).
    Returns float32 logits [T, V] (all_logits) or [1, V] for the last position, on the host; with host=False the
    backend's tensor (the engine then picks greedy rows where the logits are, backend.argmax_rows).
    """
    T = len(ids)
    batch = start if isinstance(start, Batch) else None
    end = batch.max_len if batch is not None else start + T
    table = rope.table(c.head_dim, end) if rope is not None else None
    if batch is not None and rope is not None and rope.dynamic:  # each sequence's table follows its own length
        batch.tables = [rope.table(c.head_dim, g.start + g.n) for g in batch.segments]
    sliding = c.sliding_rope.table(c.head_dim, end) if c.sliding_rope is not None and rope is not None else None
    s = Step(be, W, c, cache, start, T, table, sliding)
    x = be.embed(W.globals["embed"], ids, c.embed_scale)
    if c.positions == "learned":
        x = be.add_positions(x, W.globals["pos_embed"], start)
    h = _layers(s, x)
    if batch is not None and not all_logits:
        if not batch.logit_rows.size:  # every row continues a prompt: no logits wanted this step
            return np.zeros((0, c.vocab_size), np.float32)
        h = be.rows(h, batch.logit_rows)
    elif not all_logits:
        h = h[T - 1:]
    logits = be.linear(h, W.lm_head(), W.globals.get("lm_head.bias"))
    if c.logit_multiplier is not None:
        logits = be.scale(logits, c.logit_multiplier)
    if c.logit_softcap is not None:
        logits = be.soft_cap(logits, c.logit_softcap)
    return be.to_host(logits) if host else logits


def _layers(s: Step, x):
    """Every layer as its spec composes it; returns the final-normed hidden states [T, D].

    A sublayer's output stays pending until the next norm, so that a backend can fuse the residual add
    with that norm (add_norm).
    """
    c, be, attend = s.c, s.be, _attention_fn(s.c)
    pending = None
    for i, L in enumerate(s.W.layers):
        mlp = c.mlp_block or (moe_block if c.sparse_layer(i) else dense_block)
        x, h = _enter(s, x, pending, L, "attn_norm")
        if c.block == "sequential":
            pending = _leave(s, L, "post_attn_norm", attend(s, L, i, h))
            x, h = _enter(s, x, pending, L, "mlp_norm")
            pending = _leave(s, L, "post_mlp_norm", mlp(s, L, i, h))
        else:  # parallel: both sublayers read the same residual, their outputs are added together
            h2 = h if c.block == "parallel_shared_norm" or c.norm_placement == "post" else _norm(s, x, L, "mlp_norm")
            a = _leave(s, L, "post_attn_norm", attend(s, L, i, h))
            pending = be.add(a, _leave(s, L, "post_mlp_norm", mlp(s, L, i, h2)))
    G = s.W.globals
    _, h = be.add_norm(x, pending, G["final_norm.weight"], G.get("final_norm.bias"), c.norm_eps, c.norm, c.norm_offset)
    return h


def _attention_fn(c: ModelConfig):
    """The attention sublayer function: the spec's own, or the standard one."""
    return c.attention_block or attention_block


def _norm(s: Step, x, L, role: str):
    c = s.c
    return s.be.norm(x, L[role + ".weight"], L.get(role + ".bias"), c.norm_eps, c.norm, c.norm_offset)


def _enter(s: Step, x, pending, L, role: str):
    """(residual, sublayer input): the pending output added, then normed where the placement has input norms."""
    c, be = s.c, s.be
    if c.norm_placement == "post":
        x = x if pending is None else be.add(x, pending)
        return x, x
    if pending is None:
        return x, _norm(s, x, L, role)
    return be.add_norm(x, pending, L[role + ".weight"], L.get(role + ".bias"), c.norm_eps, c.norm, c.norm_offset)


def _leave(s: Step, L, role: str, y):
    """A sublayer's output as it joins the residual: normed where the checkpoint has that norm (post-norm,
    sandwich), times the residual multiplier where the config has one."""
    if role + ".weight" in L:
        y = _norm(s, y, L, role)
    if s.c.residual_multiplier is not None:
        y = s.be.scale(y, s.c.residual_multiplier)
    return y


def attention_block(s: Step, L, i: int, h):
    """Self-attention of layer i on h [T, D] (q/k/v projections, q/k norm, RoPE, KV cache, o projection)."""
    c, be, T = s.c, s.be, s.T
    q, k, v = be.linears(h, [(L[r + ".weight"], L.get(r + ".bias")) for r in ("q", "k", "v")])
    if c.qk_norm == "projection":
        q, k = _norm(s, q, L, "q_norm"), _norm(s, k, L, "k_norm")
    if c.qkv_clip is not None:  # after the projection-wide q/k norm, as OLMoE (OLMo 1 and DBRX have none)
        q, k, v = (be.clamp(t, -c.qkv_clip, c.qkv_clip) for t in (q, k, v))
    q = q.reshape(T, c.num_heads, c.head_dim)
    k, v = k.reshape(T, c.num_kv_heads, c.head_dim), v.reshape(T, c.num_kv_heads, c.head_dim)
    rope = s.table(i)  # None on a NoPE layer: q and k go to the cache as projected (and normed)
    fused = None  # the per-head RMSNorm a backend may fuse with RoPE and the cache write (Qwen3)
    if c.qk_norm in ("head", "per_head"):
        if c.qk_norm == "head" and c.norm == "rmsnorm" and "q_norm.bias" not in L and rope is not None:
            fused = (L["q_norm.weight"], L["k_norm.weight"], c.norm_eps, c.norm_offset)
        else:
            q, k = (be.head_norm(t, L[r + ".weight"], c.norm_eps, c.norm_offset, L.get(r + ".bias"), c.norm)
                    for t, r in ((q, "q_norm"), (k, "k_norm")))
    if rope is not None:
        q = be.rope_cache_write(q, k, v, s.cache, i, s.start, rope, fused)
    else:
        be.cache_write(s.cache, i, k, v, s.start)
    o = be.attention(q, s.cache, i, s.start, c.attn_scale, window=c.window(i), softcap=c.attn_softcap)
    return be.linear(o.reshape(T, c.q_dim), L["o.weight"], L.get("o.bias"))


def dense_block(s: Step, L, i: int, h, prefix: str = ""):
    """The MLP of layer i on h [T, D]: gated (down(act(gate h) * up h)) or plain (down(act(up h)))."""
    c, be, p = s.c, s.be, prefix
    if c.mlp == "gated":
        y = be.gated_linear(h, L[p + "gate.weight"], L.get(p + "gate.bias"), L[p + "up.weight"], L.get(p + "up.bias"),
                            c.activation)
    else:
        y = be.linear_act(h, L[p + "up.weight"], L.get(p + "up.bias"), c.activation)
    return be.linear(y, L[p + "down.weight"], L.get(p + "down.bias"))


def moe_block(s: Step, L, i: int, h):
    """A mixture-of-experts MLP on h [T, D]: the routed experts (the `moe` op), plus the shared expert, which a
    sigmoid of shared_gate(h) scales where the checkpoint has that gate."""
    c, be = s.c, s.be
    # the selection bias is passed only where loaded: a backend (or a wrapper of `moe`) from before it still works
    select = {"select_bias": L["router.select_bias"]} if "router.select_bias" in L else {}
    y = be.moe(h, L["router.weight"], L.get("router.bias"), L.get("experts.gate.weight"), L["experts.up.weight"],
               L["experts.down.weight"], c.moe_routing,
               tuple(L.get(f"experts.{r}.bias") for r in ("gate", "up", "down")), **select)
    if c.shared_expert_intermediate_size:
        shared = dense_block(s, L, i, h, prefix="shared.")
        if "shared_gate.weight" in L:
            shared = be.sigmoid_gate(shared, be.linear(h, L["shared_gate.weight"]))
        y = be.add(y, shared)
    return y
