"""What the `archkit` subcommands share: argument types, the sampling flags and their checks, loading a model
with a progress bar, tables. (core/cli.py builds the parser and runs the commands; core/cli_chat.py the chat.)"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .log import logger
from .progress import ProgressBar

CHAT_COMMANDS = """commands:
  /help          this help
  /reset         forget the conversation (the --system message stays)
  /save FILE     write the conversation to FILE as JSON: [{"role": ..., "content": ...}, ...]
  /exit, /quit   end the chat (so do Ctrl-D, and Ctrl-C at the prompt twice)
input:
  a line ending in \\ continues on the next line; a line starting with \"\"\" opens a block
  that ends at a line ending with \"\"\"; //text sends /text as a message
  Ctrl-C during a reply stops it and drops that turn from the conversation
"""

SAMPLE_ONLY_FLAGS = (("--top-k", "top_k"), ("--top-p", "top_p"), ("--min-p", "min_p"), ("--seed", "seed"))


def _count(s: str) -> int:
    """argparse type: an integer >= 0 (a bad value is a usage error, exit 2)."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {s!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} must be >= 0")
    return n


def _positive_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    n = _count(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def _unescape(s: str) -> str:
    r"""'\n\n' typed in a shell → two newlines (only \n, \t and \\ are escapes)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], s)


def _given_sampling(args) -> dict:
    """The sampling keywords as given on the command line; None = not given (the checkpoint's default applies)."""
    return dict(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens)


def _check_sampling(args) -> None:
    """Reject out-of-range sampling flags before anything is loaded or printed (GenerationError, exit 1)."""
    from .sampling import SamplingParams

    given = {k: v for k, v in _given_sampling(args).items() if v is not None and k != "max_new_tokens"}
    penalties = {k: v for k in ("presence_penalty", "frequency_penalty") if (v := getattr(args, k)) is not None}
    SamplingParams(seed=args.seed, **given, **penalties).validate()


def _sampling(args, model, prompt_len: int) -> dict:
    """generate()'s keywords: the flags given, else the checkpoint's generation defaults, else the command's."""
    kw = model.generation_defaults.resolve(_given_sampling(args), prompt_len, model.config.context_limit)
    if kw["max_new_tokens"] is None:
        kw["max_new_tokens"] = args.default_max_new_tokens
    kw.update(seed=args.seed, stop=args.stop, presence_penalty=args.presence_penalty,
              frequency_penalty=args.frequency_penalty)
    return {k: v for k, v in kw.items() if v is not None}


def _warn_if_greedy(args, model) -> None:
    """transformers warns when sampling flags come with greedy decoding (they change nothing); so do we."""
    ignored = [flag for flag, key in SAMPLE_ONLY_FLAGS if getattr(args, key) is not None]
    temperature = model.generation_defaults.resolve(_given_sampling(args))["temperature"]
    if not ignored or temperature:
        return
    why = ("--greedy" if args.greedy else "--temperature" if args.temperature is not None
           else "generation_config.json" if temperature == 0 else "the default")
    logger.warning("%s change%s nothing with greedy decoding (temperature 0 from %s); give --temperature > 0 to sample",
                   ", ".join(ignored), "s" if len(ignored) == 1 else "", why)


def _checkpoint(args) -> Path:
    """The checkpoint directory of generate / chat: PATH (a directory or hub id), else --arch's demo model."""
    from .hub import resolve

    if args.path is not None:
        return resolve(args.path, args.revision)
    from .demo import DATA, demo_checkpoint
    path = demo_checkpoint(args.arch)
    if DATA not in path.parents:
        shipped = ", ".join(sorted(d.parent.name for d in (DATA / "demo").glob("*/config.json")))
        print(f"archkit: note: no trained demo model ships for {args.arch!r}; this one has random weights, "
              f"so its text is noise (trained demos: {shipped})", file=sys.stderr)
    return path


def _load(args, path):
    """core.load for a command, with a progress bar; "auto" device choice is logged by core.load (main shows it)."""
    from .load import load

    return load(path, arch=args.arch, dtype=args.dtype, device=args.device, progress=ProgressBar())


def _table(header, rows) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    for r in [tuple(header)] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
