"""`archkit chat`: the conversation loop, its /commands, and reading turns from a terminal or a pipe."""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

from .cli_common import CHAT_COMMANDS, _check_sampling, _checkpoint, _load, _sampling, _warn_if_greedy


def cmd_chat(args) -> int:
    from .chat import Chat, ChatTemplate
    from .checkpoint import Checkpoint

    _check_sampling(args)
    path = _checkpoint(args)
    Checkpoint(path)  # a missing or malformed directory is reported as such, not as "no chat template"
    template = ChatTemplate.from_dir(path)  # no template or no jinja2: fail before reading any weights
    model = _load(args, path)
    _warn_if_greedy(args, model)
    chat = Chat(model, system=args.system, template=template)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"archkit chat: {model.spec.name} from {args.path or path}; /help lists the commands, /exit or "
              "Ctrl-D ends", file=sys.stderr)
    return _chat_loop(chat, args, interactive)


def _chat_loop(chat, args, interactive: bool) -> int:
    """Read turns and commands until the end of input, /exit, or Ctrl-C twice at the prompt."""
    read = _read_terminal() if interactive else _read_pipe
    interrupted = False  # the last thing the user did was Ctrl-C: another one at the prompt ends the chat
    while True:
        try:
            text = _read_turn(read)
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            if interrupted:
                print(file=sys.stderr)
                return 0
            interrupted = True
            print("\n(Ctrl-C again, /exit or Ctrl-D ends the chat)", file=sys.stderr)
            continue
        interrupted = False
        command = text.strip()
        if command.startswith("/") and not command.startswith("//"):
            if _chat_command(chat, command):
                return 0
            continue
        if command.startswith("//"):
            text = text.lstrip()[1:]  # //text sends /text
        if not text.strip():
            continue
        interrupted = _chat_turn(chat, args, text, interactive)


def _chat_command(chat, command: str) -> bool:
    """Run a /command (True: end the chat). An unknown one is an error line, never a message to the model."""
    name, _, rest = command.partition(" ")
    if name in ("/exit", "/quit"):
        return True
    if name == "/help":
        print(CHAT_COMMANDS, end="", file=sys.stderr)
    elif name == "/reset":
        chat.reset()
        print("archkit: conversation reset" + (" (the system message stays)" if chat.system else ""), file=sys.stderr)
    elif name == "/save" and rest.strip():
        f = Path(rest.strip()).expanduser()
        try:
            f.write_text(json.dumps(chat.messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"archkit: error: /save: cannot write {str(f)!r} ({e.strerror or e})", file=sys.stderr)
        else:
            print(f"archkit: saved {len(chat.messages)} messages to {f}", file=sys.stderr)
    elif name == "/save":
        print("archkit: error: /save needs a file name: /save FILE", file=sys.stderr)
    else:
        known = difflib.get_close_matches(name, ["/help", "/reset", "/save", "/exit", "/quit"], n=1)
        hint = f"did you mean {known[0]}? " if known else ""
        print(f"archkit: error: unknown command {name!r} ({hint}/help lists them; //text sends /text as a message)",
              file=sys.stderr)
    return False


def _chat_turn(chat, args, text: str, interactive: bool) -> bool:
    """Send one user turn and stream the reply; True if Ctrl-C stopped it (the turn is then dropped)."""
    from .errors import GenerationError

    out = sys.stdout
    reply = None
    try:
        # the prompt this turn will have, for defaults that depend on its length (max_length, the context)
        rendered = chat.template.render(chat.messages + [{"role": "user", "content": text}])
        prompt_len = len(chat.model._tokenizer().encode(rendered, add_special_tokens=False))
        reply = chat.stream(text, **_sampling(args, chat.model, prompt_len))
        for piece in reply:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        if not interactive:
            raise
        if reply is not None:
            reply.close()  # if the interrupt landed here, not inside the generator: Chat takes the user turn back
        out.write("\n")
        print("archkit: reply stopped; that turn is dropped (Ctrl-C again ends the chat)", file=sys.stderr)
        return True
    except GenerationError as e:  # typically the conversation outgrew the context: say so, keep going
        if not interactive:
            raise
        print(f"archkit: error: {e} (/reset starts over)", file=sys.stderr)
        return False
    out.write("\n")
    out.flush()
    return False


def _read_turn(read) -> str:
    """One user turn from read(prompt): a line, lines joined by a trailing backslash, or a \"\"\" block."""
    line = read("> ")
    if line.lstrip().startswith('"""'):
        body = line.lstrip()[3:]
        lines = []
        while not body.rstrip().endswith('"""'):
            lines.append(body)
            try:
                body = read("... ")
            except EOFError:  # an unclosed block at the end of input is still a turn
                return "\n".join(lines)
        lines.append(body.rstrip()[:-3])
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = read("... ")
        except EOFError:
            line = ""
    return "\n".join(lines + [line])


def _read_pipe(prompt: str) -> str:
    """read() for piped input: the next line without its newline; EOFError at the end."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line[:-1] if line.endswith("\n") else line


def _read_terminal():
    """read() for a terminal: input() with line editing and history where readline exists."""
    try:
        import readline  # noqa: F401  (arrow keys and history in input())
    except ImportError:
        pass
    return input
