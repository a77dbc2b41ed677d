"""The model: one forward pass written against backend operations, and the generation loop.

Nothing here knows a family: every difference comes from the ModelConfig (built from the spec) and
from which roles the checkpoint provided (a bias is added where a bias was loaded).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import numpy as np

from .backend import Weights
from .config import ModelConfig
from .errors import ContextOverflowError, GenerationError, TokenizerError
from .rope import RopeConfig, RopeTable
from .sampling import SamplingParams, sample


@attrs.define
class Step:
    """What every block of one forward call needs: the backend and its weights, the config, the KV cache, the
    first position, the number of tokens, and the rope table for this sequence length (None without RoPE).

    A plugin's own layer function (ModelSpec.attention_block / mlp_block) receives it as `step`.
    """

    be: Any
    W: Weights
    c: ModelConfig
    cache: Any
    start: int
    T: int
    rope: RopeTable | None


def forward(be, W, c: ModelConfig, ids: np.ndarray, cache, start: int, rope: RopeConfig | None, all_logits: bool):
    """Run tokens `ids` [T] at positions start..start+T-1 through the model, filling `cache`.

    Returns float32 logits [T, V] (all_logits) or [1, V] for the last position, on the host.
    """
    T = len(ids)
    s = Step(be, W, c, cache, start, T, rope.table(c.head_dim, start + T) if rope is not None else None)
    x = be.embed(W.globals["embed"], ids, c.embed_scale)
    if c.positions == "learned":
        x = be.add_positions(x, W.globals["pos_embed"], start)
    h = _layers(s, x)
    if not all_logits:
        h = h[T - 1:]
    logits = be.linear(h, W.lm_head(), W.globals.get("lm_head.bias"))
    if c.logit_multiplier is not None:
        logits = be.scale(logits, c.logit_multiplier)
    if c.logit_softcap is not None:
        logits = be.soft_cap(logits, c.logit_softcap)
    return be.to_host(logits)


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
    q = q.reshape(T, c.num_heads, c.head_dim)
    k, v = k.reshape(T, c.num_kv_heads, c.head_dim), v.reshape(T, c.num_kv_heads, c.head_dim)
    fused = None  # the per-head RMSNorm a backend may fuse with RoPE and the cache write (Qwen3)
    if c.qk_norm in ("head", "per_head"):
        if c.qk_norm == "head" and c.norm == "rmsnorm" and "q_norm.bias" not in L and s.rope is not None:
            fused = (L["q_norm.weight"], L["k_norm.weight"], c.norm_eps, c.norm_offset)
        else:
            q, k = (be.head_norm(t, L[r + ".weight"], c.norm_eps, c.norm_offset, L.get(r + ".bias"), c.norm)
                    for t, r in ((q, "q_norm"), (k, "k_norm")))
    if s.rope is not None:
        q = be.rope_cache_write(q, k, v, s.cache, i, s.start, s.rope, fused)
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
    y = be.moe(h, L["router.weight"], L.get("router.bias"), L.get("experts.gate.weight"), L["experts.up.weight"],
               L["experts.down.weight"], c.moe_routing,
               tuple(L.get(f"experts.{r}.bias") for r in ("gate", "up", "down")))
    if c.shared_expert_intermediate_size:
        shared = dense_block(s, L, i, h, prefix="shared.")
        if "shared_gate.weight" in L:
            shared = be.sigmoid_gate(shared, be.linear(h, L["shared_gate.weight"]))
        y = be.add(y, shared)
    return y


class Model:
    """A loaded model: `logits`, `generate`, `stream`, and text helpers when a tokenizer is present.

    Attributes: `spec` (the family's ModelSpec), `config` (the ModelConfig read from config.json),
    `device` ("cpu" or "cuda"), `dtype`, `tokenizer` (None without tokenizer.json), `eos_token_ids`,
    `path`, and `detected` (how the family was chosen; None when given by name).

    >>> model = core.load("path/to/ckpt")                       # doctest: +SKIP
    >>> model                                                   # doctest: +SKIP
    <archkit Model llama from 'path/to/ckpt': 16 layers, hidden 2048, 32/8 heads, vocab 128256, numpy float32>
    >>> model.spec.name, model.config.num_layers, model.device  # doctest: +SKIP
    ('llama', 16, 'cpu')
    >>> ids = model.tokenizer.encode("The capital of France is")  # doctest: +SKIP
    >>> model.logits(ids).shape                                 # doctest: +SKIP
    (6, 128256)
    >>> model.tokenizer.decode(model.generate(ids, max_new_tokens=5))  # doctest: +SKIP
    ' Paris. It is the'
    """

    def __init__(self, spec, config: ModelConfig, backend, weights, tokenizer=None, eos_token_ids=(),
                 path=None, detected=None, device: str = "cpu"):
        self.spec, self.config, self.backend, self.weights = spec, config, backend, weights
        self.tokenizer, self.eos_token_ids, self.path, self.detected = tokenizer, tuple(eos_token_ids), path, detected
        self.device = device

    def __repr__(self):
        c = self.config
        return (f"<archkit Model {self.spec.name} from {str(self.path)!r}: {c.num_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_heads}/{c.num_kv_heads} heads, vocab {c.vocab_size}, {self.backend.name} {self.backend.dtype}>")

    @property
    def inv_freq(self) -> RopeConfig | None:
        """The `rope` argument core.model.forward takes for this model (its RopeConfig; None without RoPE)."""
        return self.config.rope

    @property
    def dtype(self) -> str:
        return self.backend.dtype

    def _check_ids(self, ids) -> np.ndarray:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if arr.size == 0:
            raise GenerationError("empty prompt: generation needs at least one token id")
        if arr.ndim != 1:
            raise GenerationError(f"token ids must be a 1-D sequence, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise GenerationError(f"token ids must be integers, got {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self.config.vocab_size)]
        if bad.size:
            raise GenerationError(f"token id {int(bad[0])} is out of range [0, {self.config.vocab_size})")
        return arr.astype(np.int64)

    def _check_context(self, n: int, what: str) -> None:
        limit = self.config.context_limit
        if n > limit:
            why = "max_position_embeddings" if limit == self.config.max_position_embeddings else \
                "max_position_embeddings times the dynamic rope factor"
            raise ContextOverflowError(f"{what} needs {n} positions but the model's context is {limit} ({why})")

    def logits(self, ids) -> np.ndarray:
        """float32 logits [len(ids), vocab] of a full forward pass over `ids` (no cache reuse)."""
        ids = self._check_ids(ids)
        self._check_context(len(ids), f"a prompt of {len(ids)} tokens")
        with self.backend.session():
            cache = self.backend.new_cache(self.config, len(ids))
            return forward(self.backend, self.weights, self.config, ids, cache, 0, self.config.rope, all_logits=True)

    def stream(self, ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: Iterable[str] | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        """Yield new token ids one at a time (see generate for the parameters).

        >>> for t in model.stream(ids, max_new_tokens=16): print(model.tokenizer.decode([t]), end="")  # doctest: +SKIP
        """
        ids = self._check_ids(ids)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed).validate()
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        self._check_context(len(ids) + max_new_tokens, f"a prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens}")
        stops = [s for s in (stop or []) if s]
        if stops and self.tokenizer is None:
            raise TokenizerError(f"{self.path}: stop strings need tokenizer.json, which this checkpoint lacks")
        return self._stream(ids, max_new_tokens, params, stops, stop_at_eos)

    def _stream(self, ids, max_new_tokens, params, stops, stop_at_eos) -> Iterator[int]:
        if max_new_tokens == 0:
            return
        # The backend's session spans the whole generation: on the GPU it owns the model's KV cache
        # (another thread waits; the same thread starting a second generation gets a clear error).
        with self.backend.session():
            yield from self._generate(ids, max_new_tokens, params, stops, stop_at_eos)

    def _generate(self, ids, max_new_tokens, params, stops, stop_at_eos) -> Iterator[int]:
        rng = np.random.default_rng(params.seed)
        cache = self.backend.new_cache(self.config, len(ids) + max_new_tokens)
        seen = list(ids)
        text, dec = "", (self.tokenizer.stream() if stops else None)
        # Greedy without a repetition penalty needs no logits on the host: the backend picks the id.
        greedy, nxt = params.greedy and params.repetition_penalty == 1.0, None
        logits = forward(self.backend, self.weights, self.config, ids, cache, 0, self.config.rope, all_logits=False)[-1]
        tok = sample(logits, params, rng, np.asarray(seen))
        # A backend that picks ids on its device may run steps ahead of this loop (decode_ids); steps past
        # a stop are then computed and dropped (their cache positions lie beyond the tokens returned).
        ahead = getattr(self.backend, "decode_ids", None)
        picks = None
        if ahead is not None and max_new_tokens > 1:
            picks = ahead(forward, self.weights, self.config, tok, cache, len(ids), self.config.rope,
                          max_new_tokens - 1, params, seen=seen + [tok], seed=lambda: int(rng.integers(2**63)))
        try:
            for step in range(max_new_tokens):
                if step:
                    tok = next(picks) if picks is not None else (
                        nxt if nxt is not None else sample(logits, params, rng, np.asarray(seen)))
                seen.append(tok)
                yield tok
                if stop_at_eos and tok in self.eos_token_ids:
                    return
                if dec is not None:
                    delta = dec.push(tok)
                    text += delta
                    # a new match ends inside the delta, however long the delta (one token can be 100+ chars)
                    if delta and any(s in text[-(len(s) - 1 + len(delta)):] for s in stops):
                        return
                if picks is None and step + 1 < max_new_tokens:
                    pos = len(seen) - 1
                    out = self.backend.decode(forward, self.weights, self.config, tok, cache, pos, self.config.rope, greedy)
                    nxt, logits = (out, None) if greedy else (None, out)
        finally:
            if picks is not None:
                picks.close()  # waits for steps still in flight

    def generate(self, ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Iterable[str] | None = None, stop_at_eos: bool = True) -> list[int]:
        """New token ids after the prompt `ids`.

        temperature 0 is greedy; otherwise sampling with optional top_k / top_p, reproducible with `seed`.
        Stops after max_new_tokens, after an EOS id (included in the result), or once the decoded text
        contains one of the `stop` strings (the token that completed it is included).

        >>> model.generate(model.tokenizer.encode("Hello"), max_new_tokens=8)  # doctest: +SKIP
        """
        return list(self.stream(ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, stop_at_eos))

    def _tokenizer(self):
        if self.tokenizer is None:
            raise TokenizerError(f"{self.path}: tokenizer.json not found (text in/out needs it; use token ids instead)")
        return self.tokenizer

    def stream_text(self, prompt: str, **kw) -> Iterator[str]:
        """Yield text pieces as they are generated from `prompt` (stop strings are cut off).

        >>> for piece in model.stream_text("def fib(n):", max_new_tokens=64, stop=["\\n\\n"]):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        tok = self._tokenizer()
        ids = tok.encode(prompt)
        if not ids:
            raise GenerationError(f"empty prompt: {prompt!r} encodes to no tokens; generation needs at least one token")
        yield from self.stream_text_ids(ids, **kw)

    def stream_text_ids(self, ids, **kw) -> Iterator[str]:
        """Yield the text generated after the prompt token `ids`, piece by piece (stop strings cut off).

        Never emits half a UTF-8 character, and holds back text that could still become a stop string.
        """
        tok = self._tokenizer()
        dec, text, stops = tok.stream(), "", [s for s in kw.get("stop") or [] if s]
        hold = max((len(s) - 1 for s in stops), default=0)  # a stop string may be completed by the next piece
        emitted = 0
        for t in self.stream(ids, **kw):
            text += dec.push(t)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            if len(text) - hold > emitted:
                yield text[emitted:len(text) - hold]
                emitted = len(text) - hold
        text += dec.flush()
        if len(text) > emitted:
            yield text[emitted:]

    def generate_text(self, prompt: str, **kw) -> str:
        """The text generated after `prompt` (same keywords as generate).

        >>> model.generate_text("Once upon a time", max_new_tokens=20, temperature=0.8, seed=0)  # doctest: +SKIP
        """
        return "".join(self.stream_text(prompt, **kw))
