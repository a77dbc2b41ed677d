"""Chat templates with transformers' `apply_chat_template` semantics, and multi-turn conversations.

A checkpoint's chat template is found where transformers looks for it: `chat_template.jinja`, else
`chat_template` in tokenizer_config.json (a string, or a list of named templates of which "default"
is used), else `chat_template.json`. It is rendered in a sandboxed Jinja environment set up like
transformers' (trim_blocks, lstrip_blocks, loop controls, `{% generation %}` blocks, a `tojson` that
does not escape HTML, `raise_exception`, `strftime_now`), with `messages`, `add_generation_prompt`,
`tools`, `documents` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables;
the result is tokenized without adding special tokens, since the template writes them.
jinja2 is the optional extra `chat` (pip install 'archkit[chat]').

>>> chat = Chat(core.load("Qwen3-0.6B"), system="Answer in one sentence.")  # doctest: +SKIP
>>> for piece in chat.stream("What is a tensor?"): print(piece, end="")    # doctest: +SKIP
>>> chat.send("And a matrix?")  # the whole reply; chat.messages holds the conversation  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from .config import read_json
from .errors import ChatTemplateError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
JINJA_HINT = "pip install 'archkit[chat]' (or jinja2>=3.1)"


def find_template(path: str | Path) -> tuple[str, Path]:
    """(template source, file it came from) for checkpoint dir `path`; ChatTemplateError if it has none."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8"), path / "chat_template.jinja"
    cfg_file = path / "tokenizer_config.json"
    t = read_json(cfg_file, "tokenizer_config.json").get("chat_template") if cfg_file.is_file() else None
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if "default" not in named:
            raise ChatTemplateError(f"{cfg_file}: chat_template lists {sorted(map(str, named))} but no 'default'")
        t = named["default"]
    if isinstance(t, str):
        return t, cfg_file
    legacy = path / "chat_template.json"
    if legacy.is_file() and isinstance(read_json(legacy, "chat_template.json").get("chat_template"), str):
        return read_json(legacy, "chat_template.json")["chat_template"], legacy
    raise ChatTemplateError(f"{path}: no chat template (looked for chat_template.jinja, 'chat_template' in "
                            "tokenizer_config.json, chat_template.json); use `archkit generate` for plain completion")


def special_tokens(path: str | Path) -> dict[str, str]:
    """bos_token, eos_token, ... as tokenizer_config.json names them (strings or {"content": ...})."""
    f = Path(path) / "tokenizer_config.json"
    cfg = read_json(f, "tokenizer_config.json") if f.is_file() else {}
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
        """
        import jinja2

        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.tokens, **kwargs}
        try:
            return self._template.render(messages=msgs, tools=variables.pop("tools", None),
                                         documents=variables.pop("documents", None),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: the chat template failed: {e}") from None


def _compile(source: str, origin: str):
    try:
        import jinja2
        import jinja2.ext
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

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{origin}: chat template line {e.lineno}: {e.message}") from None


class Chat:
    """A multi-turn conversation with a loaded model through its chat template.

    Each turn renders the whole conversation with add_generation_prompt=True, generates until an EOS
    id (generation_config.json's, e.g. <|im_end|>) or a stop string, and appends the reply.
    """

    def __init__(self, model, system: str | None = None, template: ChatTemplate | None = None):
        self.model = model
        self.template = template or ChatTemplate.from_dir(model.path)
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system message)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """Token ids of the conversation so far, ending with the assistant header."""
        text = self.template.render(self.messages, add_generation_prompt=True)
        return self.model._tokenizer().encode(text, add_special_tokens=False)

    def stream(self, user: str, **kw) -> Iterator[str]:
        """Send `user`, yield the reply as text pieces (keywords as Model.generate); the reply joins the history.

        If generation fails (context overflow, ...) the user message is taken back out.
        """
        self.messages.append({"role": "user", "content": user})
        reply = []
        try:
            ids = self.prompt_ids()
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

