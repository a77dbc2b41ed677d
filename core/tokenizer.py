"""tokenizer.json through the `tokenizers` library, with incremental detokenization for streaming.

`tokenizers` is Rust. A malformed file, or text its rules cannot handle (a pre-tokenizer regex that backtracks
without end, a post-processor naming an unknown token), makes it panic: Rust prints the panic to stderr and
Python gets pyo3's PanicException, a BaseException that `except Exception` does not catch. Every call into the
library goes through `_rust`, which turns any failure into a TokenizerError and keeps that print off stderr,
so the CLI still fails with one line.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from .config import read_bounded
from .errors import TokenizerError

MAX_FILE = 256 << 20  # bytes of tokenizer.json read at most; the largest real ones (256k-token vocabularies) are ~35 MB
PROBE = "a 1"  # encoded and decoded at load, so that a file whose own rules fail does so there, not mid-chat


class Tokenizer:
    """Text ↔ token ids for one checkpoint."""

    def __init__(self, tok, path: Path):
        self._tok, self.path = tok, path

    @classmethod
    def from_dir(cls, path: str | Path, required: bool = False) -> "Tokenizer | None":
        """Load `path`/tokenizer.json; None if absent (TokenizerError if required, corrupt or too large)."""
        from tokenizers import Tokenizer as HFTokenizer

        f = Path(path) / "tokenizer.json"
        if not f.exists():
            if required:
                raise TokenizerError(f"{f}: not found (text in/out needs the checkpoint's tokenizer.json)")
            return None
        text = _read(f)
        tok = cls(_rust(f, "cannot be read as a tokenizers file", HFTokenizer.from_str, text), f)
        # transformers applies neither by default; and a file's padding to 10**12 would make Rust's allocator
        # abort the whole process at the first encode, which no exception handler survives
        tok._tok.no_padding()
        tok._tok.no_truncation()
        tok.decode(tok.encode(PROBE, add_special_tokens=True), skip_special_tokens=False)
        return tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (with the tokenizer's own BOS/EOS template when add_special_tokens)."""
        _check_text(text, self.path)
        return _rust(self.path, "cannot encode the text", lambda: self._tok.encode(
            text, add_special_tokens=bool(add_special_tokens)).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        ids = list(ids)
        return _rust(self.path, "cannot decode token ids", self._tok.decode, ids, bool(skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """The id of `token` in the vocabulary, or None."""
        return _rust(self.path, f"cannot look up token {token!r:.80}", self._tok.token_to_id, token)

    def stream(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        """A decoder that turns ids pushed one at a time into text deltas."""
        return IncrementalDecoder(self, skip_special_tokens)


def _read(f: Path) -> str:
    """The text of tokenizer file `f`, refused before reading when it is not a regular file or is over MAX_FILE."""
    raw = read_bounded(f, f.name, MAX_FILE, TokenizerError)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{f}: cannot be read as a tokenizers file (not UTF-8: byte {raw[e.start]:#04x} at "
                             f"offset {e.start})") from None


def _check_text(text, path: Path) -> None:
    """TokenizerError unless `text` is a str of valid Unicode.

    A byte that is not UTF-8 in argv or stdin reaches Python as a lone surrogate (surrogateescape), which the
    Rust side refuses with a bare TypeError; say what and where instead.
    """
    if not isinstance(text, str):
        raise TokenizerError(f"{path}: text to encode must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = text[e.start]
        byte = f" (the byte {ord(c) - 0xDC00:#04x}, which is not UTF-8)" if 0xDC80 <= ord(c) <= 0xDCFF else ""
        raise TokenizerError(f"{path}: the text holds the lone surrogate U+{ord(c):04X}{byte} at character {e.start}; "
                             f"the tokenizer reads valid Unicode text only") from None


_QUIET_LOCK = threading.Lock()
_quiet_file = None  # where fd 2 points during a call into Rust; reused, emptied after each call
_quiet_pid = None  # the process that made it: a forked child must not share (and truncate) its parent's


def _rust(path: Path, what: str, fn, *args):
    """fn(*args), a call into the Rust library; any failure (a panic included) becomes TokenizerError(what)."""
    global _quiet_file, _quiet_pid
    with _QUIET_LOCK:
        try:
            if _quiet_file is None or _quiet_pid != os.getpid():
                _quiet_file, _quiet_pid = tempfile.TemporaryFile(), os.getpid()
            saved = os.dup(2)
        except OSError:  # no stderr to protect (closed fd 2) or no temporary file: call it plainly
            saved = None
        if saved is not None:
            os.dup2(_quiet_file.fileno(), 2)
        panicked = False
        try:
            return fn(*args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001  PanicException derives from BaseException, not Exception
            panicked = True
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            kind = "" if type(e) is Exception else f"{type(e).__name__}: "  # the Rust side's parse errors are plain
            raise TokenizerError(f"{path}: {what} ({kind}{msg})") from None
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
                _release(panicked)


def _release(drop: bool) -> None:
    """Hand what reached fd 2 during the call back to stderr, unless the call failed: then it is the panic's
    report, whose first line is in the TokenizerError (another thread's stderr in that instant goes with it)."""
    fd = _quiet_file.fileno()
    if os.fstat(fd).st_size == 0:
        return
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = [] if drop else iter(lambda: os.read(fd, 1 << 16), b"")
    try:
        for chunk in chunks:
            os.write(2, chunk)
    except OSError:
        pass
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)


class IncrementalDecoder:
    """Text deltas for ids arriving one by one, never splitting a UTF-8 character.

    Byte-level BPE can cut a character across tokens; decoding such a prefix yields U+FFFD. We decode a
    short window (from `prefix` to the end), and only emit once the text no longer ends in U+FFFD, so
    what is emitted is always what the full decode will contain. Decoding a window that starts a few
    tokens back keeps tokenizers' space-merging rules (SentencePiece "▁") right.
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids up to here have been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes (possibly "")."""
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a dangling partial character comes out as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""
