"""tokenizer.json through the `tokenizers` library, with incremental detokenization for streaming."""

from __future__ import annotations

from pathlib import Path

from .errors import TokenizerError


class Tokenizer:
    """Text ↔ token ids for one checkpoint."""

    def __init__(self, tok, path: Path):
        self._tok, self.path = tok, path

    @classmethod
    def from_dir(cls, path: str | Path, required: bool = False) -> "Tokenizer | None":
        """Load `path`/tokenizer.json; None if absent (TokenizerError if required or corrupt)."""
        from tokenizers import Tokenizer as HFTokenizer

        f = Path(path) / "tokenizer.json"
        if not f.exists():
            if required:
                raise TokenizerError(f"{f}: not found (text in/out needs the checkpoint's tokenizer.json)")
            return None
        if not f.is_file():  # a FIFO would block the read
            raise TokenizerError(f"{f}: not a regular file")
        try:
            return cls(HFTokenizer.from_file(str(f)), f)
        except Exception as e:  # the Rust side raises plain Exception for every parse error
            raise TokenizerError(f"{f}: cannot be read as a tokenizers file ({str(e).splitlines()[0][:200]})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (with the tokenizer's own BOS/EOS template when add_special_tokens)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def stream(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        """A decoder that turns ids pushed one at a time into text deltas."""
        return IncrementalDecoder(self, skip_special_tokens)


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
