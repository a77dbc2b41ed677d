"""Chat templates with transformers' `apply_chat_template` semantics, and multi-turn conversations.

A checkpoint's chat template is found where transformers looks for it: `chat_template.jinja`, else
`chat_template` in tokenizer_config.json (a string, or a list of named templates of which "default"
is used), else `chat_template.json`. It is rendered in a sandboxed Jinja environment set up like
transformers' (trim_blocks, lstrip_blocks, loop controls, `{% generation %}` blocks, a `tojson` that
does not escape HTML, `raise_exception`, `strftime_now`), with `messages`, `add_generation_prompt`,
`tools`, `documents` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables;
the result is tokenized without adding special tokens, since the template writes them.
jinja2 is the optional extra `chat` (pip install 'archkit[chat]').

A template is untrusted text from a downloaded checkpoint. Besides Jinja's sandbox (no attribute escapes), it
is bounded: the source to MAX_TEMPLATE bytes; a render to RENDER_SECONDS (checked on every line of Python that
runs for it, template and filters alike) and MAX_OUTPUT characters (the output, and every string, list or
integer an operator, `~`, a filter or a method builds along the way, which is where Python would run in C for
as long as it likes: `2 ** 10 ** 10`, `'x' * 10 ** 10`, `'x'|center(10 ** 10)`). Crossing a bound, and any
error inside the template, is a ChatTemplateError naming it.

>>> chat = Chat(core.load("Qwen3-0.6B"), system="Answer in one sentence.")  # doctest: +SKIP
>>> for piece in chat.stream("What is a tensor?"): print(piece, end="")    # doctest: +SKIP
>>> chat.send("And a matrix?")  # the whole reply; chat.messages holds the conversation  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from .config import read_bounded, read_json
from .errors import ChatBusyError, ChatTemplateError, brief as _brief

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
JINJA_HINT = "pip install 'archkit[chat]' (or jinja2>=3.1)"
MAX_TEMPLATE = 1 << 20  # bytes of template source; real ones are under 50 KB
RENDER_SECONDS = 5.0  # a real template renders in milliseconds
MAX_OUTPUT = 16 << 20  # characters of any string a render builds: ~4M tokens, past every context
MAX_ITEMS = 1 << 20  # items of a list or tuple that + or * builds
MAX_INT_BITS = 1 << 16  # bits of an integer that ** or * builds (~20,000 digits)
_HUGE_WIDTH = re.compile(r"%[-#0 +]*(\d{8,}|\d*\.\d{8,})")  # printf widths of 10**7 and more ('*' ones are args)
_HUGE_FIELD = re.compile(r"\{[^{}]*\d{8,}[^{}]*\}")  # the same in str.format fields
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")  # str.format taking a width from its arguments: '{:{}}'
# Filters and str methods whose integer arguments are sizes of what they build in C
SIZE_ARGS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "truncate", "wordwrap", "batch",
                       "slice"})


def find_template(path: str | Path) -> tuple[str, Path]:
    """(template source, file it came from) for checkpoint dir `path`; ChatTemplateError if it has none."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return _read_template(path / "chat_template.jinja"), path / "chat_template.jinja"
    cfg_file = path / "tokenizer_config.json"
    t = read_json(cfg_file, "tokenizer_config.json", ChatTemplateError).get("chat_template") if cfg_file.is_file() else None
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if "default" not in named:
            raise ChatTemplateError(f"{cfg_file}: chat_template lists {_brief(sorted(map(str, named)))} but no 'default'")
        t = named["default"]
    if isinstance(t, str):
        return t, cfg_file
    legacy = path / "chat_template.json"
    if legacy.is_file():
        t = read_json(legacy, "chat_template.json", ChatTemplateError).get("chat_template")
        if isinstance(t, str):
            return t, legacy
    raise ChatTemplateError(f"{path}: no chat template (looked for chat_template.jinja, 'chat_template' in "
                            "tokenizer_config.json, chat_template.json); use `archkit generate` for plain completion")


def _read_template(f: Path) -> str:
    """The text of a .jinja template file, refused unread when over MAX_TEMPLATE bytes."""
    raw = read_bounded(f, "the chat template", MAX_TEMPLATE, ChatTemplateError)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatTemplateError(f"{f}: the chat template is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                                f"{e.start})") from None


def special_tokens(path: str | Path) -> dict[str, str]:
    """bos_token, eos_token, ... as tokenizer_config.json names them (strings or {"content": ...})."""
    f = Path(path) / "tokenizer_config.json"
    cfg = read_json(f, "tokenizer_config.json", ChatTemplateError) if f.is_file() else {}
    out = {}
    for name in SPECIAL_TOKENS:
        v = cfg.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[name] = v
    return out


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, tokens: dict[str, str] | None = None, origin: str = "chat template"):
        if not isinstance(source, str):
            raise ChatTemplateError(f"{origin}: the chat template must be a str, got {type(source).__name__}")
        if len(source.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE:
            raise ChatTemplateError(f"{origin}: the chat template is over the bound of {MAX_TEMPLATE} bytes")
        self.source, self.tokens, self.origin = source, dict(tokens or {}), origin
        self._template = _compile(source, origin)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTemplate":
        """The template of checkpoint dir `path` (see find_template)."""
        source, origin = find_template(path)
        return cls(source, special_tokens(path), str(origin))

    def __repr__(self):
        return f"ChatTemplate(from {self.origin!r}, {len(self.source)} characters)"

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

        add_generation_prompt appends the header that starts an assistant turn, as transformers does.
        Keys whose value is None are dropped from each message first (transformers does too).
        Raises ChatTemplateError when the template fails, or crosses a bound (see the module docstring).
        """
        if not isinstance(messages, (list, tuple)):
            raise ChatTemplateError(f"{self.origin}: messages must be a list of dicts, got {type(messages).__name__}")
        bad = next((m for m in messages if not isinstance(m, dict)), None)
        if bad is not None:
            raise ChatTemplateError(f"{self.origin}: messages must be a list of dicts, got one of type "
                                    f"{type(bad).__name__}")
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.tokens, **kwargs}
        variables.update(messages=msgs, tools=variables.get("tools"), documents=variables.get("documents"),
                         add_generation_prompt=add_generation_prompt)
        return _bounded(self.origin, "failed", lambda: _join(self._template.generate(**variables)))


class _Exceeded(BaseException):
    """A render bound was crossed. Not an Exception, so that no `except Exception` in Jinja's runtime or in a
    filter can swallow it; _bounded turns it into a ChatTemplateError."""


def _join(chunks) -> str:
    """The template's output chunks joined, stopping once they pass MAX_OUTPUT characters."""
    out, n = [], 0
    for c in chunks:
        n += len(c)
        if n > MAX_OUTPUT:
            raise _Exceeded(f"the output passed the bound of {MAX_OUTPUT} characters")
        out.append(c)
    return "".join(out)


def _bounded(origin: str, what: str, fn, lines: bool = True):
    """fn() under the time bound, with every failure (a bound, a template error, ZeroDivisionError, OverflowError,
    RecursionError, MemoryError, ...) raised as one ChatTemplateError. lines=False checks the time at calls only
    (and at each step of a generator), which is enough for compiling and several times cheaper."""
    deadline = time.monotonic() + RENDER_SECONDS
    ticks = 0
    ours = _render_code()

    def tracer(frame, event, arg):
        # Called for every Python line and call of the render in this thread: Jinja compiles a template to Python,
        # so nested loops cannot run past the deadline; C calls are bounded by the checks on their sizes. Only the
        # template's, Jinja's and this module's frames are traced: code that merely runs meanwhile (a gc callback,
        # a __del__) must not have the exception raised inside it, where Python would print and ignore it.
        nonlocal ticks
        if not frame.f_code.co_filename.startswith(ours):
            return None
        ticks += 1
        if not ticks & 63 and time.monotonic() > deadline:
            raise _Exceeded(f"it ran longer than the bound of {RENDER_SECONDS:g} s")
        return tracer if lines else None

    previous = sys.gettrace()  # a debugger's or coverage's; it misses the render's lines, and gets them back after
    sys.settrace(tracer)
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except _Exceeded as e:
        raise ChatTemplateError(f"{origin}: the chat template {what}: {e}") from None
    except ChatTemplateError:
        raise
    except Exception as e:  # noqa: BLE001  every error a template can cause is the template's
        raise ChatTemplateError(f"{origin}: the chat template {what}: {_describe(e)}") from None
    finally:
        sys.settrace(previous)


@functools.lru_cache(maxsize=1)
def _render_code() -> tuple[str, ...]:
    """File name prefixes of the code a render runs: compiled templates, Jinja, MarkupSafe, the standard modules its
    filters call (wordwrap, lipsum, tojson), this module."""
    import jinja2
    import markupsafe
    import random
    import textwrap

    return ("<template>", str(Path(jinja2.__file__).parent), str(Path(markupsafe.__file__).parent),
            str(Path(json.__file__).parent), textwrap.__file__, random.__file__, __file__)


def _describe(e: Exception) -> str:
    """One line for an error raised inside a template: Jinja's own messages as they are, others with their type."""
    import jinja2

    try:
        text = " ".join(str(e).split())[:300]
    except Exception:  # noqa: BLE001
        text = ""
    return text if isinstance(e, jinja2.TemplateError) and text else f"{type(e).__name__}: {text}".rstrip(": ")


def _check_format(fmt: str, args, style: str) -> None:
    """Refuse a '%' or str.format format whose field widths (written in it, or taken from `args`) pass MAX_OUTPUT."""
    if (_HUGE_WIDTH if style == "%" else _HUGE_FIELD).search(fmt):
        raise _Exceeded(f"{'%' if style == '%' else 'str.format'} formatting with a field width over the bound of "
                        f"{MAX_OUTPUT}")
    if ("*" in fmt) if style == "%" else bool(_NESTED_FIELD.search(fmt)):
        for v in args:
            _check_int(v, f"{'%' if style == '%' else 'str.format'} formatting")


def _check_int(v, what: str) -> None:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_OUTPUT:
        raise _Exceeded(f"{what} was given {_brief(v, 40)}, over the bound of {MAX_OUTPUT}")


def _check_size(x) -> None:
    """A str over MAX_OUTPUT characters, a list over MAX_ITEMS items or an int over MAX_INT_BITS bits is refused."""
    if isinstance(x, str) and len(x) > MAX_OUTPUT:
        raise _Exceeded(f"a string of {len(x)} characters passed the bound of {MAX_OUTPUT}")
    if isinstance(x, (list, tuple)) and len(x) > MAX_ITEMS:
        raise _Exceeded(f"a list of {len(x)} items passed the bound of {MAX_ITEMS}")
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise _Exceeded(f"an integer of {x.bit_length()} bits passed the bound of {MAX_INT_BITS}")


def _binop(op: str, a, b):
    """a `op` b for the operators Python would otherwise run in C without bound: the size of the result is
    estimated from the operands and refused past the bounds before anything is computed."""
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b))
    if op == "**" and ints and b > 0 and abs(a) > 1 and abs(a).bit_length() * b > MAX_INT_BITS:
        raise _Exceeded(f"{_brief(a, 20)} ** {_brief(b, 20)} would have about {abs(a).bit_length() * b} bits, over the "
                        f"bound of {MAX_INT_BITS}")
    if op == "*":
        if ints and a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise _Exceeded(f"a product of {a.bit_length() + b.bit_length()} bits passed the bound of {MAX_INT_BITS}")
        seq, n = (a, b) if isinstance(b, int) else (b, a)
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > (
                MAX_OUTPUT if isinstance(seq, str) else MAX_ITEMS):
            raise _Exceeded(f"repeating {len(seq)} items {_brief(n, 20)} times passes the bound of "
                            f"{MAX_OUTPUT if isinstance(seq, str) else MAX_ITEMS}")
    if op == "%" and isinstance(a, str):
        _check_format(a, b if isinstance(b, tuple) else (b,), "%")
    if op == "+" and isinstance(a, (str, list, tuple)) and isinstance(b, (str, list, tuple)):
        limit = MAX_OUTPUT if isinstance(a, str) else MAX_ITEMS
        if len(a) + len(b) > limit:
            raise _Exceeded(f"a concatenation of {len(a) + len(b)} items passes the bound of {limit}")
    return _OPS[op](a, b)


_OPS = {"**": lambda a, b: a ** b, "*": lambda a, b: a * b, "%": lambda a, b: a % b, "+": lambda a, b: a + b}


def _concat(parts) -> str:
    """Jinja's `~` and block outputs, refused past MAX_OUTPUT characters (in C, "".join runs unseen otherwise)."""
    parts = [p if isinstance(p, str) else str(p) for p in parts]
    if sum(map(len, parts)) > MAX_OUTPUT:
        raise _Exceeded(f"a string of {sum(map(len, parts))} characters passed the bound of {MAX_OUTPUT}")
    return "".join(parts)


def _presize(name: str, target, args: tuple) -> tuple:
    """Refuse str.replace / str.join (method or filter) whose result would pass MAX_OUTPUT, from the sizes of
    their arguments, before C builds it. Returns the arguments to call with (join's items, made a list)."""
    if name == "replace" and isinstance(target, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        n = target.count(old) if old else len(target) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        size = len(target) + n * (len(new) - len(old))
    elif name == "join" and isinstance(target, str) and args:
        items = list(args[0])
        args = (items, *args[1:])
        size = len(target) * max(len(items) - 1, 0) + sum(len(i) if isinstance(i, str) else 0 for i in items)
    else:
        return args
    if size > MAX_OUTPUT:
        raise _Exceeded(f"{name} would build a string of {size} characters, over the bound of {MAX_OUTPUT}")
    return args


def _guarded_filter(name: str, f):
    """Filter `f` refusing sizes past MAX_OUTPUT (`center(10**10)` would allocate 10 GB in C), and a replace, join or
    format whose result would pass MAX_OUTPUT characters; its result is checked too."""
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # the context or environment, then the value

    @functools.wraps(f)
    def guarded(*args, **kwargs):
        if name in SIZE_ARGS:
            for v in (*args[skip:], *kwargs.values()):
                _check_int(v, f"filter {name!r}")
        if name == "format" and len(args) >= skip and isinstance(args[skip - 1], str):
            _check_format(args[skip - 1], (*args[skip:], *kwargs.values()), "%")
        elif name == "replace" and len(args) > skip:
            _presize("replace", str(args[skip - 1]), args[skip:])
        elif name == "join" and len(args) > skip - 1:
            sep = args[skip] if len(args) > skip else kwargs.get("d", "")
            items = _presize("join", sep if isinstance(sep, str) else "", (args[skip - 1],))[0]
            args = (*args[:skip - 1], items, *args[skip:])
        out = f(*args, **kwargs)
        _check_size(out)
        return out

    return guarded


def _compile(source: str, origin: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.compiler import CodeGenerator
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError(f"chat templates need jinja2, which is not installed: {JINJA_HINT}") from None

    class GenerationBlocks(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class BoundedCodeGenerator(CodeGenerator):
        """Compiles `a ~ b` to environment.bounded_concat, where Jinja would join the strings in C unchecked."""

        def visit_Concat(self, node, frame):
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with the operators, calls and joins that run in C held to the render bounds."""

        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset(_OPS)  # also keeps `2 ** 10 ** 10` from being folded at compile time
        bounded_concat = staticmethod(_concat)
        concat = staticmethod(_concat)  # block sets and macro bodies

        def call_binop(self, context, operator, left, right):
            out = _binop(operator, left, right)
            _check_size(out)
            return out

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (Jinja's own signature)
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            name, target = getattr(method, "__name__", "a function"), getattr(method, "__self__", None)
            if isinstance(target, str) and name in SIZE_ARGS:
                for v in (*args, *kwargs.values()):
                    _check_int(v, f"calling {name!r}")
            if isinstance(target, str) and name in ("format", "format_map"):
                values = (*args, *kwargs.values(), *(args[0].values() if name == "format_map" and args
                                                     and isinstance(args[0], dict) else ()))
                _check_format(target, values, "{}")
            args = _presize(name, target, args)
            out = ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
            _check_size(out)
            return out

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _guarded_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))

    def build():
        try:
            return env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{origin}: chat template line {e.lineno}: {_brief(e.message, 300)[1:-1]}") from None

    return _bounded(origin, "cannot be compiled", build, lines=False)  # compiling folds constants: bounded too


class Chat:
    """A multi-turn conversation with a loaded model through its chat template.

    Each turn renders the whole conversation with add_generation_prompt=True, generates until an EOS
    id (generation_config.json's, e.g. <|im_end|>) or a stop string, and appends the reply. A Chat holds one
    conversation: a turn started while another is under way (from another thread, or inside a stream() loop)
    raises ChatBusyError instead of interleaving the two.
    """

    def __init__(self, model, system: str | None = None, template: ChatTemplate | None = None):
        self.model = model
        self.template = template or ChatTemplate.from_dir(model.path)
        self.system = system
        self.messages: list[dict] = []
        self._lock = threading.Lock()  # guards _busy
        self._busy = False
        # Each turn's prompt is the previous turn's prompt and reply plus the new message: an engine's prefix
        # cache keeps their keys and values, so a turn computes only what is new. On the CPU, where prefill is
        # what a turn waits for. On the GPU a turn keeps the single-sequence path (decode as one CUDA graph per
        # step) and recomputes the prompt, which is fast there; a second, paged KV cache would double the memory.
        self._engine = model.engine(kv_tokens=model.config.context_limit + 64) \
            if model.device == "cpu" and hasattr(model.backend, "new_paged_cache") else None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system message)."""
        with self._turn("reset"):
            self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """Token ids of the conversation so far, ending with the assistant header."""
        text = self.template.render(self.messages, add_generation_prompt=True)
        return self.model._tokenizer().encode(text, add_special_tokens=False)

    def stream(self, user: str, **kw) -> Iterator[str]:
        """Send `user`, yield the reply as text pieces (keywords as Model.generate); the reply joins the history.

        If generation fails (context overflow, ...) the user message is taken back out.
        """
        with self._turn("stream"):
            self.messages.append({"role": "user", "content": user})
            reply = []
            try:
                ids = self.prompt_ids()
                if self._engine is not None:
                    kw.setdefault("engine", self._engine)
                for piece in self.model.stream_text_ids(ids, **kw):
                    reply.append(piece)
                    yield piece
            except BaseException:
                self.messages.pop()
                raise
            self.messages.append({"role": "assistant", "content": "".join(reply)})

    def send(self, user: str, **kw) -> str:
        """Send `user` and return the whole reply."""
        return "".join(self.stream(user, **kw))

    @contextlib.contextmanager
    def _turn(self, what: str):
        """Marks the conversation busy for the block, or raises ChatBusyError if it already is."""
        with self._lock:
            if self._busy:
                raise ChatBusyError(f"Chat.{what}() while another turn of this conversation is under way (another "
                                    f"thread, or a stream() not yet finished); a Chat holds one conversation: use "
                                    f"one Chat per thread, or finish the turn first")
            self._busy = True
        try:
            yield
        finally:
            with self._lock:
                self._busy = False
