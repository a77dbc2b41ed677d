"""OpenAI's request and response shapes for `archkit serve`: JSON bodies in, engine requests out, and the
completion objects and stream chunks built from the tokens that come back. No HTTP here (core/serve_app.py).

Every field is type-checked here, so that a wrong type is a 400 naming the field rather than an exception deep
in the engine; ranges are the library's own (core.sampling.SamplingParams.validate, Model.resolve_request), so the
server accepts exactly what `model.generate` accepts. A parameter the request leaves out takes the
checkpoint's generation_config.json value, else archkit's default (greedy) — as `archkit generate` does, and
unlike OpenAI's default temperature of 1.

Extensions beyond OpenAI's fields (as vLLM names them): `top_k`, `min_p`, `repetition_penalty`, and
`return_token_ids` (each choice, and each stream chunk, carries the generated token ids as `token_ids`).
"""

from __future__ import annotations

import re

import attrs

from .engine import QueueFullError
from .errors import ChatTemplateError, ContextOverflowError, GenerationError, ServeError, TokenizerError, brief
from .sampling import SamplingParams

MAX_CHOICES = 128  # prompts x n in one request: each is an engine request
MAX_STOPS = 16
MAX_LOGPROBS = 20  # the engine's limit on alternatives per token
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: what the context leaves)
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI floors log-probabilities the same way
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status.

    Raised while handling a request and turned into the response by core/serve_app.py; never leaves the server.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body of the response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_error(e: BaseException, input_param: str) -> APIError:
    """The APIError for an exception raised while parsing or queueing a request (`input_param`: the field that
    holds the input, "prompt" or "messages", named when the message names no parameter itself)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(503, f"{e}; retry later", "server_error", None, "queue_full", {"Retry-After": "1"})
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), param=input_param, code="context_length_exceeded")
    if isinstance(e, (GenerationError, ChatTemplateError, TokenizerError)):
        m = re.match(r"(?:engine )?([a-z_]+)=", str(e))
        return APIError(400, str(e), param=m.group(1) if m else input_param)
    if isinstance(e, ServeError):
        return APIError(503, str(e), "server_error", None, "unavailable")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


@attrs.frozen
class EngineRequest:
    """One choice of one prompt, ready for Engine.add."""

    prompt: tuple
    params: SamplingParams
    max_new_tokens: int
    stops: tuple = ()
    logprobs: int | None = None  # alternatives per token; None = no log-probabilities


@attrs.frozen
class Job:
    """A parsed /v1/completions or /v1/chat/completions request: its engine requests (prompt-major: choice
    p * n + i is choice i of prompt p) and how to answer."""

    chat: bool
    requests: tuple
    prompt_lengths: tuple  # one per prompt (usage counts each prompt once, whatever n)
    n: int
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    return_token_ids: bool = False

    @property
    def input_param(self) -> str:
        return "messages" if self.chat else "prompt"


class ServedModel:
    """What the protocol needs of the served model: its public name, the Model, its chat template (or why it
    has none), how many positions one request may use (context and KV pool), and token strings for logprobs."""

    def __init__(self, model, name: str, capacity: int, template=None, template_error: str | None = None):
        self.model, self.name, self.capacity = model, name, capacity
        self.template, self.template_error = template, template_error
        self._token_strs: dict[int, str] = {}

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def token_str(self, token: int) -> str:
        """The text of one token as logprobs show it (special tokens spelled out)."""
        s = self._token_strs.get(token)
        if s is None:
            s = self._token_strs[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return s


# -- requests -------------------------------------------------------------------------------------------
class _Fields:
    """Typed reads of a JSON body's fields; a wrong type is a 400 naming the field."""

    def __init__(self, body):
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}")
        self.body = body

    def _get(self, name: str, ok, what: str, default=None):
        v = self.body.get(name)
        if v is None:
            return default
        if not ok(v):
            raise APIError(400, f"'{name}' must be {what}, got {brief(v, 60)} ({_json_type(v)})", param=name)
        return v

    def integer(self, name: str, default=None, lo: int | None = None, hi: int | None = None):
        v = self._get(name, _is_int, "an integer", default)
        if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            rng = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
            raise APIError(400, f"'{name}'={v} must be {rng}", param=name)
        return v

    def number(self, name: str, default=None):
        return self._get(name, lambda v: _is_int(v) or isinstance(v, float), "a number", default)

    def boolean(self, name: str, default: bool = False) -> bool:
        return self._get(name, lambda v: isinstance(v, bool), "true or false", default)

    def string(self, name: str, default=None):
        return self._get(name, lambda v: isinstance(v, str), "a string", default)

    def obj(self, name: str):
        return self._get(name, lambda v: isinstance(v, dict), "an object", None)

    def stop(self) -> list | None:
        v = self.body.get("stop")
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise APIError(400, f"'stop' must be a string or a list of strings, got {brief(v, 60)}", param="stop")
        if len(items) > MAX_STOPS:
            raise APIError(400, f"'stop' holds {len(items)} strings; at most {MAX_STOPS} are allowed", param="stop")
        return items

    def unsupported(self, name: str, allowed=lambda v: False, why: str = "") -> None:
        v = self.body.get(name)
        if v is not None and not allowed(v):
            raise APIError(400, f"'{name}'={brief(v, 60)} is not supported by archkit serve{why}", param=name)


def parse_completion(body, served: ServedModel) -> Job:
    """The Job of a /v1/completions body (prompt: a string, token ids, or a list of either); raises APIError."""
    f = _Fields(body)
    _check_model(f, served)
    f.unsupported("echo", lambda v: v is False)
    f.unsupported("suffix")
    f.unsupported("logit_bias", lambda v: v == {})
    if "prompt" not in body:
        raise APIError(400, "'prompt' is required", param="prompt")
    prompts = _completion_prompts(body["prompt"], served)
    logprobs = f.integer("logprobs", None, 0, MAX_LOGPROBS)
    n = _n(f, len(prompts))
    max_tokens = f.integer("max_tokens", f.integer("max_completion_tokens", COMPLETION_MAX_TOKENS, 1), 1)
    requests = _requests(served, f, prompts, n, lambda ids: max_tokens, logprobs, "prompt")
    return Job(False, requests, tuple(len(p) for p in prompts), n, *_stream(f), logprobs is not None,
               f.boolean("return_token_ids"))


def parse_chat(body, served: ServedModel) -> Job:
    """The Job of a /v1/chat/completions body, its messages rendered by the checkpoint's chat template (as
    transformers' apply_chat_template(..., add_generation_prompt=True)); raises APIError."""
    f = _Fields(body)
    _check_model(f, served)
    for name in ("tools", "functions"):
        f.unsupported(name, lambda v: v == [], " (no tool calling)")
    f.unsupported("tool_choice", lambda v: v == "none", " (no tool calling)")
    f.unsupported("response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")
    f.unsupported("logit_bias", lambda v: v == {})
    f.unsupported("audio")
    if served.template is None:
        raise APIError(400, served.template_error or "this model has no chat template", param="messages",
                       code="chat_template_missing")
    ids = _chat_prompt(body.get("messages"), served)
    want_logprobs = f.boolean("logprobs")
    top = f.integer("top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    n = _n(f, 1)
    given = f.integer("max_completion_tokens", f.integer("max_tokens", None, 1), 1)
    room = lambda p: given if given is not None else _room(p, served)  # noqa: E731
    requests = _requests(served, f, [ids], n, room, (top or 0) if want_logprobs else None, "messages")
    return Job(True, requests, (len(ids),), n, *_stream(f), want_logprobs, f.boolean("return_token_ids"))


def _check_model(f: _Fields, served: ServedModel) -> None:
    name = f.string("model")
    if name is None:
        raise APIError(400, "'model' is required (GET /v1/models lists it)", param="model")
    if name != served.name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{served.name}'", param="model",
                       code="model_not_found")


def _n(f: _Fields, prompts: int) -> int:
    n = f.integer("n", 1, 1, MAX_CHOICES)
    best_of = f.integer("best_of", None, 1)
    if best_of is not None and best_of != n:
        raise APIError(400, f"'best_of'={best_of} is not supported (only best_of equal to n={n})", param="best_of")
    if n * prompts > MAX_CHOICES:
        raise APIError(400, f"{prompts} prompts x n={n} choices is more than {MAX_CHOICES} in one request", param="n")
    return n


def _stream(f: _Fields) -> tuple[bool, bool]:
    stream = f.boolean("stream")
    opts = f.obj("stream_options")
    if opts is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    usage = (opts or {}).get("include_usage", False)
    if not isinstance(usage, bool):
        raise APIError(400, f"'stream_options.include_usage' must be true or false, got {brief(usage, 60)}",
                       param="stream_options")
    return stream, usage


def _completion_prompts(value, served: ServedModel) -> list[list[int]]:
    if isinstance(value, str):
        return [_encode(value, served, "prompt")]
    if isinstance(value, list) and value:
        if all(_is_int(t) for t in value):
            return [_check_ids(value, served, "prompt")]
        if all(isinstance(s, str) for s in value):
            return [_encode(s, served, f"prompt[{i}]") for i, s in enumerate(value)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
            return [_check_ids(p, served, f"prompt[{i}]") for i, p in enumerate(value)]
    raise APIError(400, f"'prompt' must be a string, a list of strings, a list of token ids or a list of lists of "
                        f"token ids, got {brief(value, 60)}", param="prompt")


def _encode(text: str, served: ServedModel, where: str) -> list[int]:
    ids = served.tokenizer.encode(text)  # with the tokenizer's own BOS, as model.generate_text encodes
    if not ids:
        raise APIError(400, f"{where}={brief(text, 60)} encodes to no tokens; generation needs at least one", param="prompt")
    return ids


def _check_ids(ids: list, served: ServedModel, where: str) -> list[int]:
    vocab = served.model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"{where}: token id {bad[0]} is out of range [0, {vocab})", param="prompt")
    return list(ids)


def _chat_prompt(messages, served: ServedModel) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, f"'messages' must be a non-empty list of messages, got {brief(messages, 60)}", param="messages")
    msgs = [_message(m, i) for i, m in enumerate(messages)]
    try:
        text = served.template.render(msgs, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    ids = served.tokenizer.encode(text, add_special_tokens=False)  # the template writes the special tokens
    if not ids:
        raise APIError(400, "the messages render to an empty prompt", param="messages")
    return ids


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content', got {brief(m, 60)}", param=where)
    role = m.get("role")
    if role not in ROLES:
        raise APIError(400, f"{where}.role={brief(role, 60)} must be one of {list(ROLES)}", param=f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text has a meaning to a text model
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.content[{j}] must be a text part ({{'type': 'text', 'text': ...}}); "
                                    f"got {brief(part, 60)}", param=f"{where}.content")
            parts.append(part["text"])
        content = "".join(parts)
    elif content is not None and not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string or a list of text parts, got {brief(content, 60)}",
                       param=f"{where}.content")
    # Chat templates know "system"; OpenAI's newer "developer" role means the same to them.
    return {**m, "role": "system" if role == "developer" else role, "content": content}


def _room(prompt: list, served: ServedModel) -> int:
    """Chat's default max_tokens: whatever the context leaves after the prompt."""
    left = served.capacity - len(prompt)
    if left < 1:
        raise APIError(400, f"This model's maximum context length is {served.capacity} tokens. However, your messages "
                            f"resulted in {len(prompt)} tokens. Please reduce the length of the messages.",
                       param="messages", code="context_length_exceeded")
    return left


def _requests(served: ServedModel, f: _Fields, prompts: list, n: int, max_tokens, logprobs, param: str) -> tuple:
    seed = f.integer("seed")
    top_k = f.integer("top_k")
    kw = dict(temperature=f.number("temperature"), top_p=f.number("top_p"),
              top_k=None if top_k == -1 else top_k,  # vLLM's clients send -1 for "off"
              min_p=f.number("min_p"), repetition_penalty=f.number("repetition_penalty"),
              presence_penalty=f.number("presence_penalty"), frequency_penalty=f.number("frequency_penalty"),
              seed=seed, stop=f.stop())
    out = []
    for ids in prompts:
        m = max_tokens(ids)
        if len(ids) + m > served.capacity:
            what = "messages" if param == "messages" else "prompt"
            raise APIError(400, f"This model's maximum context length is {served.capacity} tokens. However, you "
                                f"requested {len(ids) + m} tokens ({len(ids)} in the {what}, {m} for the completion). "
                                f"Please reduce the length of the {what} or completion.", param=param,
                           code="context_length_exceeded")
        try:
            r = served.model.resolve_request({**kw, "max_new_tokens": m}, len(ids))
            for i in range(n):  # choice i samples from seed + i: n choices, n different but reproducible draws
                params = r.params if seed is None else attrs.evolve(r.params, seed=seed + i).validate()
                out.append(EngineRequest(tuple(ids), params, r.max_new_tokens, r.stops, logprobs))
        except GenerationError as e:
            raise from_error(e, param) from None
    return tuple(out)


# -- responses ------------------------------------------------------------------------------------------
class TextCutter:
    """The text of a stream of token ids as it may be shown: never half a UTF-8 character, cut before the first
    stop string, and holding back a tail that could still become one (as Model.stream_text_ids)."""

    def __init__(self, tokenizer, stops: tuple):
        self.decoder, self.stops = tokenizer.stream(), tuple(stops)
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.text, self.emitted, self.cut = "", 0, False

    def push(self, token: int) -> str:
        """Add one token; return the text it lets out (possibly "")."""
        if self.cut:
            return ""
        self.text += self.decoder.push(token)
        return self._release(self.hold)

    def finish(self) -> str:
        """No more tokens: return whatever was held back."""
        if self.cut:
            return ""
        self.text += self.decoder.flush()
        return self._release(0)

    def _release(self, hold: int) -> str:
        at = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        end = at if at >= 0 else len(self.text) - hold
        self.cut = at >= 0
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


class ChoiceState:
    """One choice as its engine request produces tokens: the text so far, tokens, log-probabilities, the end."""

    def __init__(self, index: int, job: Job, served: ServedModel):
        self.index, self.job, self.served = index, job, served
        self.cutter = TextCutter(served.tokenizer, job.requests[index].stops)
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cached_tokens = 0
        self.lp_offset = 0  # completions' text_offset of the next token
        self.started = False  # chat streams announce the assistant role in a choice's first chunk

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, out) -> dict | None:
        """Take one core.engine.StepOutput; return the stream chunk's choice for it (None: nothing to send, or
        not streaming)."""
        piece, toks, lps = "", [], []
        if out.token is not None:
            toks = [out.token]
            self.tokens.append(out.token)
            piece = self.cutter.push(out.token)
            if out.logprob is not None:
                lps = [out.logprob]
                self.logprobs.append(out.logprob)
        if out.finish_reason is not None:
            piece += self.cutter.finish()
            self.finish_reason, self.error = out.finish_reason, out.request.error
            self.cached_tokens = out.request.cached_tokens
        self.pieces.append(piece)
        extra = bool(toks) and (self.job.logprobs or self.job.return_token_ids)
        if not self.job.stream or not (piece or extra or out.finish_reason is not None
                                       or (self.job.chat and not self.started)):
            return None
        return self._choice(piece, toks, lps, out.finish_reason, stream=True)

    def final(self) -> dict:
        """The choice of a non-streamed response."""
        self.lp_offset = 0
        return self._choice("".join(self.pieces), self.tokens, self.logprobs, self.finish_reason, stream=False)

    def _choice(self, text: str, toks: list, lps: list, finish: str | None, stream: bool) -> dict:
        job = self.job
        if job.chat:
            msg = {"role": "assistant", "content": text}
            if stream:
                msg = {"content": text} if self.started else msg
                self.started = True
            c = {"index": self.index, "delta" if stream else "message": msg,
                 "logprobs": {"content": [self._chat_logprob(lp) for lp in lps], "refusal": None}
                 if job.logprobs else None, "finish_reason": finish}
        else:
            c = {"index": self.index, "text": text, "logprobs": self._completion_logprobs(lps) if job.logprobs else None,
                 "finish_reason": finish}
        if job.return_token_ids:
            c["token_ids"] = list(toks)
            if not stream:
                c["prompt_token_ids"] = list(job.requests[self.index].prompt)
        return c

    def _completion_logprobs(self, lps: list) -> dict:
        tokens = [self.served.token_str(lp.token) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(self.lp_offset)
            self.lp_offset += len(t)
        return {"tokens": tokens, "token_logprobs": [_lp(lp.logprob) for lp in lps],
                "top_logprobs": [{self.served.token_str(t): _lp(v) for t, v in lp.top} for lp in lps],
                "text_offset": offsets}

    def _chat_logprob(self, lp) -> dict:
        def entry(token, value):
            s = self.served.token_str(token)
            return {"token": s, "logprob": _lp(value), "bytes": list(s.encode("utf-8"))}
        return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def usage(job: Job, states: list) -> dict:
    """OpenAI's usage object: each prompt counted once (cached tokens: its first choice's prefix-cache hit)."""
    prompt = sum(job.prompt_lengths)
    completion = sum(len(s.tokens) for s in states)
    cached = sum(states[p * job.n].cached_tokens for p in range(len(job.prompt_lengths)))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def response(job: Job, served: ServedModel, rid: str, created: int, states: list) -> dict:
    """The non-streamed completion or chat completion object."""
    return {"id": rid, "object": "chat.completion" if job.chat else "text_completion", "created": created,
            "model": served.name, "choices": [s.final() for s in states], "usage": usage(job, states),
            "system_fingerprint": None}


def chunk(job: Job, served: ServedModel, rid: str, created: int, choices: list, usage: dict | None = None) -> dict:
    """One streamed chunk (choices: their stream form; with stream_options.include_usage every chunk has a
    `usage` key, null but in the last one, whose choices are empty)."""
    c = {"id": rid, "object": "chat.completion.chunk" if job.chat else "text_completion", "created": created,
         "model": served.name, "choices": choices, "system_fingerprint": None}
    if job.include_usage:
        c["usage"] = usage
    return c


def _lp(v: float) -> float:
    return max(float(v), LOGPROB_FLOOR)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


