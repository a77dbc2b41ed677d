"""tokenizer.json that makes the Rust `tokenizers` library panic or abort, and text it cannot take (issue 17).

A panic reaches Python as pyo3's PanicException, a BaseException: it used to escape every `except Exception`, and
Rust printed its report to stderr. Each case here is a TokenizerError naming the file and the cause, with nothing
else on stderr; the CLI rows (exit 1, one line) are in tests/test_errors.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import TokenizerError
from core.tokenizer import Tokenizer, _rust

from tinyckpt import DEMO_TOKENIZER

REPO = Path(__file__).resolve().parents[1]


def tokenizer_dir(tmp_path: Path, **edit) -> Path:
    """A directory holding the demo tokenizer.json with top-level keys replaced by `edit`."""
    d = json.loads(DEMO_TOKENIZER.read_text())
    d.update(edit)
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    return tmp_path


CATASTROPHIC = {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False}
UNKNOWN_SPECIAL = {"type": "TemplateProcessing", "special_tokens": {},
                   "single": [{"SpecialToken": {"id": "<nope>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"Sequence": {"id": "A", "type_id": 0}}]}


def test_panic_at_load_is_a_tokenizer_error_and_stderr_stays_clean(tmp_path, capfd):
    d = tokenizer_dir(tmp_path, normalizer={"type": "Precompiled", "precompiled_charsmap": "AAAA"})
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot be read as a tokenizers file \(PanicException: "
                                             r"Precompiled: .*precompiled_charsmap"):
        Tokenizer.from_dir(d)
    assert capfd.readouterr().err == ""  # Rust's panic report is in the error, not on stderr


def test_panic_of_the_files_own_rules_shows_at_load(tmp_path):
    """A post-processor naming a token the vocabulary lacks panics on every encode: found by the probe at load."""
    with pytest.raises(TokenizerError, match=r"cannot encode the text \(PanicException: no entry found for key\)"):
        Tokenizer.from_dir(tokenizer_dir(tmp_path, post_processor=UNKNOWN_SPECIAL))


def test_panic_at_encode_is_a_tokenizer_error(tmp_path, capfd):
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path, pre_tokenizer=CATASTROPHIC))
    assert tok.encode("a 1")  # most text is fine
    with pytest.raises(TokenizerError, match=r"cannot encode the text \(PanicException: .*retry-limit-in-match over"):
        tok.encode("a" * 60 + "b")
    assert capfd.readouterr().err == ""
    assert tok.decode(tok.encode("after the panic")).startswith("after")  # still usable


@pytest.mark.parametrize("ids", [[-1], [2 ** 64], [10 ** 30]])
def test_ids_beyond_the_rust_types_are_tokenizer_errors(ids):
    tok = Tokenizer.from_dir(DEMO_TOKENIZER.parent / "demo" / "llama")
    with pytest.raises(TokenizerError, match="cannot decode token ids"):
        tok.decode(ids)


@pytest.mark.parametrize("text, where", [("ab\udcffc", "U+DCFF (the byte 0xff, which is not UTF-8) at character 2"),
                                         ("\ud800", "U+D800 at character 0")])
def test_text_that_is_not_unicode_is_a_tokenizer_error(text, where):
    tok = Tokenizer.from_dir(DEMO_TOKENIZER.parent / "demo" / "llama")
    with pytest.raises(TokenizerError, match=re.escape(f"the text holds the lone surrogate {where}")):
        tok.encode(text)
    with pytest.raises(TokenizerError, match="must be a str, got bytes"):
        tok.encode(b"hi")


# (padding, truncation) a file may set: Rust's allocator aborts the process on the first, the second panics.
RUNAWAY = {
    "padding": {"strategy": {"Fixed": 10 ** 12}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                "pad_type_id": 0, "pad_token": "x"},
    "truncation": {"max_length": 2, "stride": 5, "strategy": "LongestFirst", "direction": "Right"},
}


@pytest.mark.parametrize("key", list(RUNAWAY))
def test_padding_and_truncation_of_the_file_are_ignored(tmp_path, key):
    """As transformers does by default. A padding to 10**12 used to abort the whole process (no exception to catch:
    run in a child), and a truncation stride >= max_length to panic."""
    d = tokenizer_dir(tmp_path, **{key: RUNAWAY[key]})
    code = (f"from core.tokenizer import Tokenizer; t = Tokenizer.from_dir({str(d)!r}); "
            f"ids = t.encode('hello world how are you'); print(len(ids), t.decode(ids))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and r.stdout.split(" ", 1)[1].strip() == "hello world how are you", r.stderr[-2000:]
    assert int(r.stdout.split()[0]) < 20


def test_stderr_written_during_a_call_that_succeeds_is_kept(tmp_path, capfd):
    assert _rust(tmp_path, "x", lambda: os.write(2, b"a warning of the library\n")) > 0
    assert capfd.readouterr().err == "a warning of the library\n"


def test_tokenizer_file_over_the_bound_is_refused_unread(tmp_path):
    f = tmp_path / "tokenizer.json"
    f.write_text("{}")
    os.truncate(f, (256 << 20) + 1)  # sparse
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is 268435457 bytes, over the 256 MiB"):
        Tokenizer.from_dir(tmp_path)
    f.write_bytes(b'{"version": "\xff"}')
    with pytest.raises(TokenizerError, match=r"not UTF-8: byte 0xff at offset 13"):
        Tokenizer.from_dir(tmp_path)
