"""Fuzzing the text side (issue 17): mutated tokenizer.json files and hostile chat templates.

Properties. A mutated tokenizer.json either loads or raises TokenizerError; a tokenizer that loads encodes any text
(lone surrogates, long runs of one character) to ids or raises TokenizerError, and decodes any ids (negative, past
the vocabulary, past 2**64) to text or raises TokenizerError. A chat template, mutated from a real one or built
from hostile pieces (huge powers and repeats, nested loops, recursion, wide formats, doubling strings), renders to
a str within the output bound or raises ChatTemplateError. Never another exception, never a Rust panic escaping
as PanicException, never a hang (an alarm after HANG_S seconds; templates run under a 0.1 s render bound here).

ARCHKIT_FUZZ_EXAMPLES=N runs N examples per test instead of the default (see docs/fuzzing.md).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import core.chat
from core.chat import ChatTemplate
from core.errors import ChatTemplateError, TokenizerError
from core.tokenizer import Tokenizer

from tinyckpt import DEMO_TOKENIZER

EXAMPLES = int(os.environ.get("ARCHKIT_FUZZ_EXAMPLES", "150"))
HANG_S = 20
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
OUTCOMES: collections.Counter = collections.Counter()


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so nothing under test can swallow it."""


def _alarm(signum, frame):
    raise Hang(f"took longer than {HANG_S} s")


def bounded(fn):
    """fn() under the hang alarm."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if OUTCOMES and os.environ.get("ARCHKIT_FUZZ_EXAMPLES"):
        print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())))


# -- tokenizer.json -----------------------------------------------------------------------------------------------
def _small_base() -> dict:
    """A byte-level BPE of a few hundred tokens with every kind of component set (parsing it takes no time)."""
    from tokenizers import Tokenizer as HF, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = HF(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def read_file(path):\n    return open(path).read()", "Return the number of items."] * 20,
                            trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return json.loads(tok.to_str())


REGEXES = ["(a|aa)+$", "(a|a?)+b", "\\s+", "[", "(?<=x)y", "", "\\p{L}+", "((((((((((a*)*)*)*)*)*)*)*)*)*)*$"]
COMPONENTS = {
    "normalizer": [None, {"type": "NFC"}, {"type": "Lowercase"}, {"type": "Precompiled", "precompiled_charsmap": "AAAA"},
                   {"type": "Replace", "pattern": {"String": ""}, "content": "xx"},
                   {"type": "Replace", "pattern": {"Regex": st.sampled_from(REGEXES)}, "content": "y"},
                   {"type": "Sequence", "normalizers": [{"type": "NFKC"}] * 50}, {"type": "Prepend", "prepend": "▁"}],
    "pre_tokenizer": [None, {"type": "Whitespace"}, {"type": "Digits", "individual_digits": True},
                      {"type": "Split", "pattern": {"Regex": st.sampled_from(REGEXES)}, "behavior": "Isolated",
                       "invert": st.booleans()},
                      {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
                      {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}],
    "post_processor": [None, {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                       {"type": "TemplateProcessing", "special_tokens": {},
                        "single": [{"SpecialToken": {"id": st.sampled_from(["<nope>", "<s>"]), "type_id": 0}},
                                   {"Sequence": {"id": "A", "type_id": 0}}],
                        "pair": [{"Sequence": {"id": "A", "type_id": 0}}]},
                       {"type": "BertProcessing", "sep": ["</s>", st.integers(-1, 2 ** 33)], "cls": ["<s>", 1]}],
    "decoder": [None, {"type": "ByteLevel"}, {"type": "Strip", "content": " ", "start": st.integers(0, 2 ** 63),
                                              "stop": st.integers(0, 2 ** 63)},
                {"type": "CTC", "pad_token": "", "word_delimiter_token": "", "cleanup": True},
                {"type": "Replace", "pattern": {"Regex": st.sampled_from(REGEXES)}, "content": "z"},
                {"type": "Sequence", "decoders": [{"type": "Fuse"}] * 100}],
    "padding": [None, {"strategy": {"Fixed": st.integers(0, 10 ** 13)}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": st.integers(0, 2 ** 32), "pad_type_id": 0, "pad_token": "<unk>"}],
    "truncation": [None, {"max_length": st.integers(0, 10 ** 12), "stride": st.integers(0, 10 ** 12),
                          "strategy": "LongestFirst", "direction": "Right"}],
}
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


def _realize(draw, x):
    """A component template with its strategies drawn."""
    if isinstance(x, st.SearchStrategy):
        return draw(x)
    if isinstance(x, dict):
        return {k: _realize(draw, v) for k, v in x.items()}
    if isinstance(x, list):
        return [_realize(draw, v) for v in x]
    return x


@st.composite
def mutated_tokenizer(draw, base: dict) -> bytes:
    d = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["component", "component", "model", "vocab", "added", "json", "bytes"]))
        if op == "component":
            key = draw(st.sampled_from(sorted(COMPONENTS)))
            d[key] = _realize(draw, draw(st.sampled_from(COMPONENTS[key])))
        elif op == "model" and isinstance(d.get("model"), dict):
            d["model"][draw(st.sampled_from(["type", "unk_token", "dropout", "byte_fallback", "merges", "vocab",
                                             "continuing_subword_prefix", "fuse_unk"]))] = draw(JSON)
        elif op == "vocab" and isinstance(d.get("model"), dict) and isinstance(d["model"].get("vocab"), dict):
            d["model"]["vocab"][draw(st.text(max_size=4))] = draw(st.integers(-2, 2 ** 33))
        elif op == "added":
            d["added_tokens"] = [{"id": draw(st.integers(-1, 2 ** 33)), "content": draw(st.text(max_size=4)),
                                  "single_word": draw(st.booleans()), "lstrip": draw(st.booleans()),
                                  "rstrip": draw(st.booleans()), "normalized": draw(st.booleans()), "special": True}]
        elif op == "json":
            d[draw(st.sampled_from(["model", "normalizer", "decoder", "version", "added_tokens"]))] = draw(JSON)
        else:
            text = json.dumps(d).encode()
            pos = draw(st.integers(0, len(text)))
            return text[:pos] + draw(st.binary(max_size=4)) + text[pos + draw(st.integers(0, 4)):]
    return json.dumps(d).encode()


TEXT = (st.text(max_size=40) | st.sampled_from(["a" * 60 + "b", "a" * 3000 + "c", "ab\udcffc", "\ud800", "", " " * 500,
                                                "<s></s><unk>", "123 456", "é" * 100]))
IDS = st.lists(st.integers(-5, 400) | st.sampled_from([2 ** 31, 2 ** 32, 2 ** 64, -(2 ** 63)]), max_size=12)


class Bases(dict):
    def __repr__(self):  # hypothesis prints the arguments of a failing example: keep the files out of it
        return f"<base tokenizers {sorted(self)}>"


@pytest.fixture(scope="module")
def tokenizer_bases():
    return Bases({"small-bpe": _small_base(), "demo": json.loads(DEMO_TOKENIZER.read_text())})


def _tokenize(raw: bytes, texts, ids) -> str:
    with tempfile.TemporaryDirectory(prefix="archkit-fuzz-tok-") as d:
        (Path(d) / "tokenizer.json").write_bytes(raw)
        try:
            tok = Tokenizer.from_dir(d)
        except TokenizerError:
            return "TokenizerError at load"
    outcome = "loaded"
    for text in texts:
        try:
            got = tok.encode(text)
            assert isinstance(got, list) and all(isinstance(i, int) for i in got)
        except TokenizerError:
            outcome = "TokenizerError at encode"
    try:
        assert isinstance(tok.decode(ids), str)
    except TokenizerError:
        outcome += ", at decode"
    return outcome


@fuzz
@given(data=st.data(), which=st.sampled_from(["small-bpe", "demo"]), texts=st.lists(TEXT, min_size=1, max_size=3),
       ids=IDS)
def test_fuzz_tokenizer_json(tokenizer_bases, data, which, texts, ids):
    raw = data.draw(mutated_tokenizer(tokenizer_bases[which]))
    try:
        outcome = bounded(lambda: _tokenize(raw, texts, ids))
    except TokenizerError:
        raise
    except Exception as e:  # noqa: BLE001  the property: TokenizerError or success, nothing else
        raise AssertionError(f"{type(e).__name__}: {e}") from e
    OUTCOMES[f"tokenizer: {outcome}"] += 1


# -- chat templates -----------------------------------------------------------------------------------------------
REAL = [  # after the hub's: ChatML (Qwen) and Llama 3
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
]
NUMBER = st.sampled_from([0, 1, 2, -1, 10, 64, 10 ** 5, 10 ** 7, 10 ** 10, 10 ** 18, 2 ** 63, 10 ** 400]) | st.integers(-50, 50)
SEQ = st.sampled_from(["'x'", "messages", "range(100000)", "(range(1000)|list)", "'ab' * 3", "[1, 2]", "lipsum(2)",
                       "messages[0].content"])


@st.composite
def expression(draw, depth=0):
    kind = draw(st.sampled_from(["num", "seq", "binop", "filter", "method", "concat", "cmp"] if depth < 3 else ["num", "seq"]))
    if kind == "num":
        return str(draw(NUMBER))
    if kind == "seq":
        return draw(SEQ)
    if kind == "binop":
        op = draw(st.sampled_from(["**", "*", "+", "%", "//", "/", "-"]))
        return f"({draw(expression(depth + 1))} {op} {draw(expression(depth + 1))})"
    if kind == "filter":
        f = draw(st.sampled_from(["center", "indent", "truncate", "wordwrap", "batch", "slice", "join", "replace('x', 'xx')",
                                  "format", "tojson", "list", "length", "sum", "sort", "unique", "string", "int",
                                  "round", "reverse", "first", "trim", "title", "wordcount"]))
        arg = "" if "(" in f or draw(st.booleans()) else f"({draw(expression(depth + 1))})"
        return f"({draw(expression(depth + 1))}|{f}{arg})"
    if kind == "method":
        m = draw(st.sampled_from(["center", "ljust", "zfill", "replace", "join", "split", "format", "expandtabs"]))
        return f"('{draw(st.sampled_from(['x', '{}', '{:>99999999999}', '%s']))}'.{m}({draw(expression(depth + 1))}))"
    if kind == "cmp":
        return f"({draw(expression(depth + 1))} > {draw(expression(depth + 1))})"
    return f"({draw(expression(depth + 1))} ~ {draw(expression(depth + 1))})"


@st.composite
def statement(draw, depth=0):
    kind = draw(st.sampled_from(["out", "for", "if", "set", "double", "macro", "text"] if depth < 2 else ["out", "text"]))
    if kind == "out":
        return "{{ " + draw(expression()) + " }}"
    if kind == "for":
        return f"{{% for i{depth} in {draw(SEQ)} %}}{draw(statement(depth + 1))}{{% endfor %}}"
    if kind == "if":
        return f"{{% if {draw(expression())} %}}{draw(statement(depth + 1))}{{% endif %}}"
    if kind == "set":
        return f"{{% set v = {draw(expression())} %}}{{{{ v }}}}"
    if kind == "double":
        return ("{% set ns = namespace(s='x') %}{% for i in range(" + str(draw(st.integers(1, 70))) + ") %}"
                "{% set ns.s = ns.s " + draw(st.sampled_from(["~", "+"])) + " ns.s %}{% endfor %}{{ ns.s|length }}")
    if kind == "macro":
        return "{% macro m(a) %}{{ m(a) }}{% endmacro %}{{ m(1) }}"
    return draw(st.text(max_size=10))


@st.composite
def hostile_template(draw) -> str:
    if draw(st.booleans()):
        return "".join(draw(st.lists(statement(), min_size=1, max_size=4)))
    t = draw(st.sampled_from(REAL))  # a real template with pieces spliced in or cut
    pos = draw(st.integers(0, len(t)))
    piece = draw(statement() | st.text(max_size=6) | st.sampled_from(["{{", "{%", "%}", "}}", "{#", "'", '"']))
    return t[:pos] + piece + t[pos + draw(st.integers(0, 8)):]


MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": st.text(max_size=30)}), min_size=1, max_size=4)


@fuzz
@given(source=hostile_template(), messages=MESSAGES)
def test_fuzz_chat_template(monkeypatch, source, messages):
    monkeypatch.setattr(core.chat, "RENDER_SECONDS", 0.1, raising=False)
    try:
        out = bounded(lambda: ChatTemplate(source, {"bos_token": "<s>"}).render(messages))
    except ChatTemplateError as e:
        assert "\n" not in str(e) and len(str(e)) < 1000, str(e)[:2000]
        OUTCOMES["chat template: ChatTemplateError"] += 1
        return
    except Exception as e:  # noqa: BLE001  the property: ChatTemplateError or a bounded string, nothing else
        raise AssertionError(f"{type(e).__name__}: {e}") from e
    assert isinstance(out, str) and len(out) <= getattr(core.chat, "MAX_OUTPUT", 16 << 20)
    OUTCOMES["chat template: rendered"] += 1
