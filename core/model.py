"""The model: a loaded checkpoint and its generation loop (the forward pass itself is core/forward.py).

Nothing here knows a family: every difference comes from the ModelConfig (built from the spec) and
from which roles the checkpoint provided.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from .config import ModelConfig
from .errors import ContextOverflowError, GenerationError, TokenizerError
# Step, forward and the standard blocks stay importable from here: plugins and docs name core.model.Step.
from .forward import Step, attention_block, dense_block, forward, moe_block  # noqa: F401
from .rope import RopeConfig
from .sampling import SamplingParams, sample

__all__ = ["Model", "Step", "attention_block", "dense_block", "forward", "moe_block"]


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
