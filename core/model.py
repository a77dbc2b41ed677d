"""The model: a loaded checkpoint and its generation loop (the forward pass itself is core/forward.py).

Nothing here knows a family: every difference comes from the ModelConfig (built from the spec) and
from which roles the checkpoint provided.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs
import numpy as np

from .config import ModelConfig
from .errors import ContextOverflowError, GenerationError, NonFiniteLogitsError, TokenizerError
# Step, forward and the standard blocks stay importable from here: plugins and docs name core.model.Step.
from .forward import Step, attention_block, dense_block, forward, moe_block  # noqa: F401
from .rope import RopeConfig
from .sampling import SamplingParams, logprobs as token_logprobs, sample

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
                 path=None, detected=None, device: str = "cpu", generation_defaults=None):
        from .genconfig import GenerationDefaults

        self.spec, self.config, self.backend, self.weights = spec, config, backend, weights
        self.tokenizer, self.eos_token_ids, self.path, self.detected = tokenizer, tuple(eos_token_ids), path, detected
        self.device = device
        self.generation_defaults = generation_defaults if generation_defaults is not None else GenerationDefaults()

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
        if ids is None or isinstance(ids, (str, bytes, dict)):
            raise GenerationError(f"token ids must be a sequence of integers, got {type(ids).__name__}"
                                  + (" (text goes to generate_text / stream_text)" if isinstance(ids, str) else ""))
        try:
            arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        except (TypeError, ValueError) as e:  # not iterable, or ragged
            raise GenerationError(f"token ids must be a 1-D sequence of integers ({e})") from None
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

    def stream(self, ids, max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
               seed: int | None = None, stop: str | Iterable[str] | None = None, stop_at_eos: bool = True, *,
               min_p: float | None = None, presence_penalty: float | None = None,
               frequency_penalty: float | None = None, logprobs: int | None = None, engine=None):
        """Yield new tokens one at a time (see generate for the parameters): ids (ints), or with `logprobs`
        core.sampling.TokenLogprob objects. For a list of prompts, yields (prompt index, token) pairs in the
        order the engine produces them.

        >>> for t in model.stream(ids, max_new_tokens=16): print(model.tokenizer.decode([t]), end="")  # doctest: +SKIP
        """
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, seed=seed, stop=stop, stop_at_eos=stop_at_eos, min_p=min_p,
                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logprobs=logprobs)
        if _is_batch(ids):
            return self._stream_many(list(ids), kw, engine)
        if engine is not None:  # one prompt through an engine: its prefix cache serves (and keeps) the prompt
            return (t for _, t in self._stream_many([ids], kw, engine))
        ids = self._check_ids(ids)
        r = self.resolve_request(kw, len(ids))
        self._check_context(len(ids) + r.max_new_tokens,
                            f"a prompt of {len(ids)} tokens plus max_new_tokens={r.max_new_tokens}")
        if r.stops and self.tokenizer is None:
            raise TokenizerError(f"{self.path}: stop strings need tokenizer.json, which this checkpoint lacks")
        return self._stream(ids, r)

    def resolve_request(self, kw: dict, prompt_len: int) -> "ResolvedRequest":
        """One request's settings from generate's keywords (None = not given): the caller's values, else the
        checkpoint's generation_config.json, else ours. Validated (GenerationError naming the parameter); returns
        a ResolvedRequest (params, max_new_tokens, stops, stop_at_eos, logprobs). The server uses it too."""
        d = getattr(self, "generation_defaults", None)
        if d is not None:  # generation_config.json fills what the caller left None (core/genconfig.py)
            kw = d.resolve(kw, prompt_len, self.config.context_limit)
        temperature = kw.get("temperature")
        temperature = 0.0 if temperature is None else temperature
        max_new = kw.get("max_new_tokens")
        max_new = 32 if max_new is None else max_new
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 0:
            raise GenerationError(f"max_new_tokens={max_new!r} must be an integer >= 0")
        rp = kw.get("repetition_penalty")
        params = SamplingParams(temperature, kw.get("top_k"), kw.get("top_p"), 1.0 if rp is None else rp,
                                kw.get("seed"), kw.get("min_p"), kw.get("presence_penalty") or 0.0,
                                kw.get("frequency_penalty") or 0.0).validate()
        lp = kw.get("logprobs")
        if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= 20):
            raise GenerationError(f"logprobs={lp!r} must be an integer in [0, 20] (the alternatives returned per token)")
        return ResolvedRequest(params, max_new, _stops(kw.get("stop")), bool(kw.get("stop_at_eos", True)), lp)

    def _stream(self, ids, r: "ResolvedRequest"):
        if r.max_new_tokens == 0:
            return
        # The backend's session spans the whole generation: on the GPU it owns the model's KV cache
        # (another thread waits; the same thread starting a second generation gets a clear error).
        with self.backend.session():
            yield from self._generate(ids, r)

    def _generate(self, ids, r: "ResolvedRequest"):
        params, max_new_tokens, stops, stop_at_eos = r.params, r.max_new_tokens, r.stops, r.stop_at_eos
        rng = np.random.default_rng(params.seed)
        cache = self.backend.new_cache(self.config, len(ids) + max_new_tokens)
        seen, out = list(ids), []
        text, dec = "", (self.tokenizer.stream() if stops else None)
        # Greedy with nothing to apply to the logits needs them not on the host: the backend picks the id.
        plain = params.repetition_penalty == 1.0 and params.processors_only_repetition and r.logprobs is None
        greedy, nxt = params.greedy and plain, None
        logits = forward(self.backend, self.weights, self.config, ids, cache, 0, self.config.rope, all_logits=False)[-1]
        tok = sample(logits, params, rng, np.asarray(seen), out, step=0)
        # A backend that picks ids on its device may run steps ahead of this loop (decode_ids); steps past
        # a stop are then computed and dropped (their cache positions lie beyond the tokens returned). Its
        # sampler implements temperature, top-k, top-p and the repetition penalty; anything more samples here.
        ahead = getattr(self.backend, "decode_ids", None)
        picks = None
        if ahead is not None and max_new_tokens > 1 and params.processors_only_repetition and r.logprobs is None:
            picks = ahead(forward, self.weights, self.config, tok, cache, len(ids), self.config.rope,
                          max_new_tokens - 1, params, seen=seen + [tok], seed=lambda: int(rng.integers(2**63)))
        try:
            for step in range(max_new_tokens):
                if step:
                    try:
                        tok = next(picks) if picks is not None else (
                            nxt if nxt is not None else sample(logits, params, rng, np.asarray(seen), out, step=step))
                    except NonFiniteLogitsError as e:
                        raise e.at_step(step) from None
                lp = token_logprobs(logits, tok, r.logprobs) if r.logprobs is not None else None
                seen.append(tok)
                out.append(tok)
                yield tok if lp is None else lp
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
                    try:
                        o = self.backend.decode(forward, self.weights, self.config, tok, cache, pos, self.config.rope,
                                                greedy)
                    except NonFiniteLogitsError as e:
                        raise e.at_step(step + 1) from None
                    nxt, logits = (o, None) if greedy else (None, o)
        finally:
            if picks is not None:
                picks.close()  # waits for steps still in flight

    def generate(self, ids, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: str | Iterable[str] | None = None, stop_at_eos: bool = True, *,
                 min_p: float | None = None, presence_penalty: float | None = None,
                 frequency_penalty: float | None = None, logprobs: int | None = None, engine=None) -> list:
        """New token ids after the prompt `ids` — or, for a list of prompts, one such list per prompt.

        temperature 0 is greedy; otherwise sampling with optional top_k / top_p / min_p, reproducible with `seed`;
        repetition_penalty (transformers') and presence_penalty / frequency_penalty (OpenAI's) apply in both.
        A parameter left None takes the checkpoint's generation_config.json value (do_sample=false means
        greedy), else the default above (greedy, 32 new tokens). Stops after max_new_tokens, after an EOS id
        (included in the result), or once the decoded text contains one of the `stop` strings (a str is one
        stop string; the token that completed it is included). `logprobs=k` returns core.sampling.TokenLogprob
        objects (the token, its log-probability and the k most likely alternatives) instead of ids.

        Many prompts: `ids` is a list of prompts; every parameter is one value for all or a list with one value
        per prompt (stop: a list of lists). They run together through a core.engine.Engine (continuous
        batching over a paged KV cache; pass `engine=` to reuse one and keep its prefix cache). Each prompt's
        tokens are those it would get alone (a sampled prompt with its own seed, too).

        >>> model.generate(model.tokenizer.encode("Hello"), max_new_tokens=8)  # doctest: +SKIP
        >>> model.generate([[1, 2, 3], [4, 5]], max_new_tokens=8, seed=[1, 2], temperature=0.7)  # doctest: +SKIP
        """
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, seed=seed, stop=stop, stop_at_eos=stop_at_eos, min_p=min_p,
                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logprobs=logprobs)
        if _is_batch(ids):
            prompts = list(ids)
            outs = [[] for _ in prompts]
            for i, t in self._stream_many(prompts, kw, engine):
                outs[i].append(t)
            return outs
        return list(self.stream(ids, engine=engine, **kw))

    # -- many prompts ---------------------------------------------------------------------------------
    def engine(self, **config):
        """A core.engine.Engine on this model (keywords: core.engine.EngineConfig fields)."""
        from .engine import Engine, EngineConfig
        return Engine(self, EngineConfig(**config))

    def _stream_many(self, prompts: list, kw: dict, engine):
        """(prompt index, token) pairs of many prompts; every argument is checked now, before the first token."""
        plan = self._prepare_many(prompts, kw, engine)
        return self._run_many(*plan)

    def _prepare_many(self, prompts: list, kw: dict, engine):
        if not prompts:
            raise GenerationError("an empty list of prompts: give at least one prompt")
        n = len(prompts)
        per = {k: _per_prompt(k, v, n) for k, v in kw.items()}
        checked = [self._check_ids(p) for p in prompts]  # every prompt is checked before anything runs
        settings = [self.resolve_request({k: v[i] for k, v in per.items()}, len(checked[i])) for i in range(n)]
        if engine is None and not hasattr(self.backend, "new_paged_cache"):
            # no batched path on this backend: the same results, one prompt after another
            for i, (ids, r) in enumerate(zip(checked, settings)):
                self._check_context(len(ids) + r.max_new_tokens,
                                    f"prompt {i}: {len(ids)} tokens plus max_new_tokens={r.max_new_tokens}")
            return None, checked, settings
        from .engine import Engine
        if engine is not None and not isinstance(engine, Engine):
            raise GenerationError(f"engine={engine!r:.80} must be a core.engine.Engine (model.engine(...))")
        eng = engine if engine is not None else self.engine()
        if eng.model is not self:
            raise GenerationError("engine= belongs to another model")
        for i, (ids, r) in enumerate(zip(checked, settings)):  # what could never run fails before anything runs
            eng.check(ids, r.max_new_tokens, f"prompt {i}: ")
        return eng, checked, settings

    def _run_many(self, eng, checked, settings):
        if eng is None:
            for i, (ids, r) in enumerate(zip(checked, settings)):
                for t in self._stream(ids, r):
                    yield i, t
            return
        events = []
        reqs = []
        todo = list(enumerate(zip(checked, settings)))[::-1]
        try:
            while todo or any(not q.finished for q in reqs):
                # prompts join as the queue has room: a list longer than max_waiting is fed, not refused
                while todo and len(eng.waiting) < eng.config.max_waiting:
                    i, (ids, r) = todo.pop()
                    cb = (lambda out, i=i: events.append((i, out)))
                    reqs.append(eng.add(ids, r.params, r.max_new_tokens, r.stops, r.stop_at_eos, r.logprobs,
                                        callback=cb))
                eng.step()
                for i, out in events:
                    if out.request.error is not None:
                        raise out.request.error
                    if out.token is not None:
                        yield i, (out.token if out.logprob is None else out.logprob)
                events.clear()
        finally:
            for q in reqs:
                eng.abort(q)  # a consumer that stops early frees the blocks

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
        dec, text, stops = tok.stream(), "", _stops(kw.get("stop"))
        hold = max((len(s) - 1 for s in stops), default=0)  # a stop string may be completed by the next piece
        emitted = 0
        for t in self.stream(ids, **kw):
            text += dec.push(getattr(t, "token", t))  # a TokenLogprob when logprobs= is given
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


@attrs.frozen
class ResolvedRequest:
    """What one generation runs with, every default applied (Model.resolve_request)."""

    params: SamplingParams
    max_new_tokens: int
    stops: tuple
    stop_at_eos: bool
    logprobs: int | None


def _stops(stop) -> tuple:
    """Stop strings as a tuple: a str is one stop string (not its characters); None is none."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    try:
        items = list(stop)
    except TypeError:
        raise GenerationError(f"stop={stop!r} must be a string or a list of strings") from None
    bad = [s for s in items if not isinstance(s, str)]
    if bad:
        raise GenerationError(f"stop strings must be str, got {bad[0]!r} ({type(bad[0]).__name__})")
    return tuple(s for s in items if s)


def _is_batch(ids) -> bool:
    """True for several prompts: a 2-D array, or a list/tuple whose first item is itself a sequence."""
    if isinstance(ids, np.ndarray):
        return ids.ndim == 2
    if isinstance(ids, (list, tuple)) and ids:
        return isinstance(ids[0], (list, tuple, np.ndarray))
    return False


def _per_prompt(name: str, value, n: int) -> list:
    """A keyword's value for each of n prompts: a list of n values (stop: a list of n lists/str/None), or one for all."""
    if name == "stop":  # per prompt: n entries, each None or a list (a list of str is one list for all prompts)
        per = isinstance(value, (list, tuple)) and len(value) == n and n > 0 and \
            all(v is None or isinstance(v, (list, tuple)) for v in value)
    else:
        per = isinstance(value, (list, tuple))
    if not per:
        return [value] * n
    if len(value) != n:
        raise GenerationError(f"{name} has {len(value)} values for {n} prompts (give one value, or one per prompt)")
    return list(value)
