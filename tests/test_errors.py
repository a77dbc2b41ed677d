"""Every row of the README's "What bad input gets" table (docs/bad-input.md), one test each.

Each row builds a small damaged checkpoint with numpy alone (tinyckpt), then checks three things:
the library raises the row's error type (an ArchkitError); its message names the offender (file, tensor,
key, plugin, token id) and the rule; and `python -m core ...` prints exactly that as one stderr line
`archkit: error: ...` with exit code 1 and no traceback.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

import core
from core.errors import (AmbiguousArchitectureError, ArchkitError, CheckpointError, ConfigError,
                         ContextOverflowError, GenerationError, TokenizerError, UnknownArchitectureError,
                         UnsupportedDtypeError, WeightsError)

import fakeplugins
from fakeplugins import assert_one_line_error, cli
from tinyckpt import (DEMO_TOKENIZER, LLAMA_CONFIG, edit_header, edit_json, last_tensor, llama_shapes, read_raw,
                      write_checkpoint, write_raw)


@attrs.define
class Case:
    """One row: the library call that must fail, how, and the CLI arguments that hit the same input."""

    error: type
    fragments: list[str]  # the offender and the rule, each must appear in the message
    call: Callable[[], object]
    cli: list
    site: Path | None = None  # extra plugins for the CLI (fakeplugins)
    env: dict | None = None  # extra environment for the CLI


ROWS: dict[str, Callable[[Path], Case]] = {}


def row(fn):
    ROWS[fn.__name__] = fn
    return fn


def load(path, **kw):
    return core.load(path, device="cpu", quiet=True, **kw)


def inspect(path, error, *fragments) -> Case:
    return Case(error, list(fragments), lambda: load(path), ["inspect", path])


def ckpt(tmp: Path, cfg=None, **kw) -> Path:
    return write_checkpoint(tmp / "ckpt", cfg, **kw)


def sharded(tmp: Path) -> Path:
    return write_checkpoint(tmp / "ckpt", shards=3)


# -- the directory ------------------------------------------------------------------------------
@row
def path_missing(tmp):
    return inspect(tmp / "nowhere", CheckpointError, "nowhere", "no such checkpoint directory")


@row
def path_not_a_directory(tmp):
    f = tmp / "model.bin"
    f.write_bytes(b"\0" * 16)
    return inspect(f, CheckpointError, "model.bin", "not a directory")


@row
def no_weights(tmp):
    p = tmp / "ckpt"
    p.mkdir()
    (p / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    return inspect(p, CheckpointError, str(p), "no weights")


@row
def weights_not_a_regular_file(tmp):
    # A directory (or FIFO) named model.safetensors: refused up front, never opened (a FIFO would block).
    p = tmp / "ckpt"
    p.mkdir()
    (p / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (p / "model.safetensors").mkdir()
    return inspect(p, CheckpointError, "model.safetensors", "not a regular file")


# -- safetensors files --------------------------------------------------------------------------
@row
def truncated_before_header(tmp):
    p = ckpt(tmp)
    (p / "model.safetensors").write_bytes(b"\x10\0\0")
    return inspect(p, CheckpointError, "model.safetensors", "truncated", "no header length")


@row
def truncated_body(tmp):
    p = ckpt(tmp)
    f = p / "model.safetensors"
    name = last_tensor(f)
    f.write_bytes(f.read_bytes()[:-10])
    return inspect(p, CheckpointError, "model.safetensors", repr(name), "outside the data")


@row
def header_not_json(tmp):
    p = ckpt(tmp)
    f = p / "model.safetensors"
    header, data = read_raw(f)
    h = json.dumps(header).encode()
    write_raw(f, b"\xff" + h[1:], data)
    return inspect(p, CheckpointError, "model.safetensors", "header is not valid JSON")


@row
def header_length_absurd(tmp):
    p = ckpt(tmp)
    f = p / "model.safetensors"
    header, data = read_raw(f)
    write_raw(f, header, data, length=1 << 60)
    return inspect(p, CheckpointError, "model.safetensors", f"header length {1 << 60}", "absurd")


@row
def tensor_offsets_out_of_bounds(tmp):
    p = ckpt(tmp)
    f = p / "model.safetensors"
    header, data = read_raw(f)
    name = "model.layers.1.mlp.up_proj.weight"
    header[name]["data_offsets"][1] += 1 << 40
    write_raw(f, header, data)
    return inspect(p, CheckpointError, "model.safetensors", repr(name), "outside the data")


@row
def tensor_offsets_overlap(tmp):
    # A tensor whose span runs into the next one's bytes: the safetensors format forbids aliasing (no
    # polyglot files), and so do we.
    p = ckpt(tmp)
    f = p / "model.safetensors"
    header, data = read_raw(f)
    a = "model.layers.0.mlp.up_proj.weight"
    b, e = header[a]["data_offsets"]
    header[a]["shape"][0] *= 2
    header[a]["data_offsets"] = [b, b + 2 * (e - b)]
    nxt = min((k for k in header if k != "__metadata__" and header[k]["data_offsets"][0] == e))
    write_raw(f, header, data)
    return inspect(p, CheckpointError, "model.safetensors", repr(nxt), f"overlaps {a!r}", "no gaps or overlaps")


@row
def unsupported_dtype_f8(tmp):
    p = ckpt(tmp)
    name = "model.layers.0.self_attn.q_proj.weight"

    def to_f8(h):  # F8_E4M3 is one byte per element: the same bytes describe 4x the elements
        h[name]["dtype"] = "F8_E4M3"
        h[name]["shape"] = [h[name]["shape"][0] * 4, h[name]["shape"][1]]
    edit_header(p / "model.safetensors", to_f8)
    return inspect(p, UnsupportedDtypeError, repr(name), "'F8_E4M3'", "archkit reads only")


@row
def unsupported_dtype_i64(tmp):
    from safetensors.numpy import load_file, save_file

    p = ckpt(tmp)
    f = p / "model.safetensors"
    t = load_file(str(f))
    t["model.norm.weight"] = np.arange(16, dtype=np.int64)
    save_file(t, str(f))
    return inspect(p, UnsupportedDtypeError, "'model.norm.weight'", "'I64'", "archkit reads only")


# -- model.safetensors.index.json ---------------------------------------------------------------
@row
def index_not_json(tmp):
    p = sharded(tmp)
    (p / "model.safetensors.index.json").write_text('{"weight_map": {')
    return inspect(p, CheckpointError, "model.safetensors.index.json", "not valid JSON")


@row
def index_weight_map_wrong_type(tmp):
    p = sharded(tmp)
    edit_json(p / "model.safetensors.index.json", lambda d: d.update(weight_map=["model-00001-of-00003.safetensors"]))
    return inspect(p, CheckpointError, "model.safetensors.index.json", "'weight_map' must map tensor names")


@row
def index_names_missing_shard(tmp):
    p = sharded(tmp)
    (p / "model-00002-of-00003.safetensors").unlink()
    return inspect(p, CheckpointError, "'model-00002-of-00003.safetensors'", "is missing")


@row
def index_tensor_not_in_its_shard(tmp):
    p = sharded(tmp)
    edit_json(p / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({"model.layers.1.mlp.down_proj.weight": "model-00001-of-00003.safetensors"}))
    return inspect(p, CheckpointError, "'model.layers.1.mlp.down_proj.weight'", "'model-00001-of-00003.safetensors'",
                   "does not hold it")


def _escape(tmp: Path, target: str) -> Case:
    p = sharded(tmp)
    edit_json(p / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({"model.norm.weight": target}))
    return inspect(p, CheckpointError, repr(target), "escapes the checkpoint directory")


@row
def index_shard_absolute(tmp):
    outside = write_checkpoint(tmp / "other") / "model.safetensors"
    return _escape(tmp, str(outside))


@row
def index_shard_dotdot(tmp):
    write_checkpoint(tmp / "other")
    return _escape(tmp, "../other/model.safetensors")


@row
def index_shard_symlink_outside(tmp):
    outside = write_checkpoint(tmp / "other") / "model.safetensors"
    case = _escape(tmp, "link.safetensors")
    (tmp / "ckpt" / "link.safetensors").symlink_to(outside)
    return case


# -- config.json / generation_config.json -------------------------------------------------------
@row
def config_not_json(tmp):
    p = ckpt(tmp)
    (p / "config.json").write_text("{'hidden_size': 16}")
    return inspect(p, ConfigError, "config.json", "not valid JSON")


@row
def config_not_an_object(tmp):
    p = ckpt(tmp)
    (p / "config.json").write_text("[1, 2]")
    return inspect(p, ConfigError, "config.json", "must be a JSON object")


@row
def config_missing_required_key(tmp):
    p = ckpt(tmp)
    edit_json(p / "config.json", lambda d: d.pop("hidden_size"))
    return inspect(p, ConfigError, "config.json", "'hidden_size'", "required", "missing")


def _config_value(tmp, key, value, *fragments):
    p = ckpt(tmp)
    edit_json(p / "config.json", lambda d: d.update({key: value}))
    return inspect(p, ConfigError, "config.json", *fragments)


@row
def config_zero_layers(tmp):
    return _config_value(tmp, "num_hidden_layers", 0, "num_hidden_layers=0", "must be an integer in [1,")


@row
def config_negative_size(tmp):
    return _config_value(tmp, "hidden_size", -16, "hidden_size=-16", "must be an integer in [1,")


@row
def config_billion_layers(tmp):
    return _config_value(tmp, "num_hidden_layers", 10**9, "num_hidden_layers=1000000000", "must be an integer in [1,")


@row
def config_size_not_integer(tmp):
    return _config_value(tmp, "intermediate_size", 32.5, "intermediate_size=32.5", "must be an integer")


@row
def config_size_infinite(tmp):
    p = ckpt(tmp)
    text = (p / "config.json").read_text().replace('"hidden_size": 16', '"hidden_size": Infinity')
    (p / "config.json").write_text(text)
    return inspect(p, ConfigError, "config.json", "hidden_size=inf", "must be an integer")


@row
def config_heads_not_dividing(tmp):
    return _config_value(tmp, "num_key_value_heads", 3, "num_attention_heads=4", "num_key_value_heads=3",
                         "not a multiple")


@row
def config_rope_theta_nan(tmp):
    p = ckpt(tmp)
    text = (p / "config.json").read_text().replace('"rope_theta": 10000.0', '"rope_theta": NaN')
    (p / "config.json").write_text(text)
    return inspect(p, ConfigError, "config.json", "rope_theta=nan", "finite number > 1")


# Special token ids outside the vocabulary are not bad input: transformers loads them, and so do we, ignoring
# them with a warning (tests/test_genconfig.py).


@row
def generation_config_value_out_of_range(tmp):
    p = ckpt(tmp, tokenizer=True, generation_config={"do_sample": True, "top_p": 1.5})
    return Case(ConfigError, ["generation_config.json", "top_p=1.5", "must be in (0, 1]"],
                lambda: load(p), ["generate", p, "--prompt", "hi", "--device", "cpu"])


@row
def generation_config_not_json(tmp):
    p = ckpt(tmp)
    (p / "generation_config.json").write_text("eos_token_id = 2")
    return inspect(p, ConfigError, "generation_config.json", "not valid JSON")


# -- tensors vs config --------------------------------------------------------------------------
@row
def tensor_shapes_disagree_with_config(tmp):
    # Every problem in one error: 6 MLP matrices of the wrong shape, one tensor missing, one unexpected.
    p = ckpt(tmp)
    edit_json(p / "config.json", lambda d: d.update(intermediate_size=48))
    f = p / "model.safetensors"
    edit_header(f, lambda h: h.update({"model.layers.1.extra.weight": h.pop("model.layers.1.input_layernorm.weight")}))
    wrong = [n for n, s in llama_shapes(LLAMA_CONFIG).items() if "mlp" in n]
    assert len(wrong) == 6
    # `inspect` reports weights on stdout as part of its report; `generate` fails with the one-line error.
    return Case(WeightsError, ["1 missing: model.layers.1.input_layernorm.weight", "1 unexpected: model.layers.1.extra.weight",
                               "6 with the wrong shape", *wrong, "expected [48, 16]"],
                lambda: load(p), ["generate", p, "--prompt", "hi", "--device", "cpu"])


# -- which architecture -------------------------------------------------------------------------
@row
def unknown_architecture(tmp):
    p = ckpt(tmp)
    edit_json(p / "config.json", lambda d: d.update(architectures=["NoSuchForCausalLM"], model_type="nosuch"))
    return inspect(p, UnknownArchitectureError, "'NoSuchForCausalLM'", "'nosuch'", "no registered architecture matches")


@row
def unknown_architecture_by_name(tmp):
    p = ckpt(tmp)
    return Case(UnknownArchitectureError, ["unknown architecture 'nosuch'", "registered: ", "llama"],
                lambda: load(p, arch="nosuch"), ["inspect", p, "--arch", "nosuch"])


@row
def ambiguous_architecture(tmp):
    site = fakeplugins.install(tmp / "site", "llamaclone", fakeplugins.CLONE)
    reg = _discover(site)
    p = ckpt(tmp)
    return Case(AmbiguousArchitectureError, ["ambiguous architecture", "llama and llamaclone", "pass arch="],
                lambda: load(p, registry=reg), ["inspect", p], site)


@row
def api_incompatible_plugin(tmp):
    # The plugin that would have claimed the checkpoint was refused (api_version 99): named in the load error.
    site = fakeplugins.install(tmp / "site", "newapi", fakeplugins.INVALID, field="api_version", value=99)
    reg = _discover(site, allow=["newapi", "gpt2"])
    p = ckpt(tmp)
    return Case(UnknownArchitectureError, ["no registered architecture matches", "broken plugins: newapi (",
                                           "api_version 99 is not supported"],
                lambda: load(p, registry=reg), ["inspect", p], site, {"ARCHKIT_PLUGINS": "newapi,gpt2"})


def _discover(site: Path, allow=None):
    import sys
    sys.path.insert(0, str(site))
    try:
        return core.Registry.discover(allow=allow)
    finally:
        sys.path.remove(str(site))


# -- generation ---------------------------------------------------------------------------------
def _tok_ckpt(tmp, **cfg) -> Path:
    vocab = HFTokenizer.from_file(str(DEMO_TOKENIZER)).get_vocab_size()
    return ckpt(tmp, {**LLAMA_CONFIG, "vocab_size": vocab, **cfg}, tokenizer=True)


@row
def token_id_out_of_range(tmp):
    # The checkpoint's tokenizer knows more tokens than its model: the first id past the vocabulary is named.
    p = ckpt(tmp, tokenizer=True)
    ids = HFTokenizer.from_file(str(DEMO_TOKENIZER)).encode("hello world").ids
    bad = next(i for i in ids if i >= 256)
    return Case(GenerationError, [f"token id {bad}", "out of range [0, 256)"],
                lambda: load(p).generate(ids), ["generate", p, "--prompt", "hello world", "--device", "cpu"])


@row
def token_id_negative(tmp):
    p = ckpt(tmp)
    return Case(GenerationError, ["token id -1", "out of range [0, 256)"], lambda: load(p).logits([3, -1]), None)


@row
def empty_prompt(tmp):
    p = _tok_ckpt(tmp)
    assert HFTokenizer.from_file(str(DEMO_TOKENIZER)).encode("").ids == []
    return Case(GenerationError, ["empty prompt", "''", "at least one token"],
                lambda: load(p).generate_text(""), ["generate", p, "--prompt", "", "--device", "cpu"])


@row
def empty_prompt_ids(tmp):
    p = ckpt(tmp)
    return Case(GenerationError, ["empty prompt", "at least one token"], lambda: load(p).generate([]), None)


@row
def prompt_plus_new_tokens_beyond_context(tmp):
    p = _tok_ckpt(tmp)
    n = len(HFTokenizer.from_file(str(DEMO_TOKENIZER)).encode("hi").ids)
    return Case(ContextOverflowError, [f"a prompt of {n} tokens plus max_new_tokens=100", f"needs {n + 100} positions",
                                       "context is 64 (max_position_embeddings)"],
                lambda: load(p).generate_text("hi", max_new_tokens=100),
                ["generate", p, "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "100"])


def _sampling(tmp, flag, value, kw, *fragments):
    p = _tok_ckpt(tmp)
    return Case(GenerationError, list(fragments), lambda: load(p).generate([1, 2], **kw),
                ["generate", p, "--prompt", "hi", "--device", "cpu", flag, str(value)])


@row
def temperature_negative(tmp):
    return _sampling(tmp, "--temperature", -1.0, {"temperature": -1.0}, "temperature=-1.0", "must be 0 (greedy) or a number in")


@row
def top_p_zero(tmp):
    return _sampling(tmp, "--top-p", 0.0, {"temperature": 1.0, "top_p": 0.0}, "top_p=0.0", "must be in (0, 1]")


@row
def top_p_above_one(tmp):
    return _sampling(tmp, "--top-p", 1.5, {"temperature": 1.0, "top_p": 1.5}, "top_p=1.5", "must be in (0, 1]")


@row
def top_k_negative(tmp):
    return _sampling(tmp, "--top-k", -1, {"temperature": 1.0, "top_k": -1}, "top_k=-1", "integer >= 0")


@row
def max_new_tokens_negative(tmp):
    return _sampling(tmp, "--max-new-tokens", -5, {"max_new_tokens": -5}, "max_new_tokens=-5", "integer >= 0")


# -- tokenizer.json -----------------------------------------------------------------------------
@row
def tokenizer_missing(tmp):
    p = ckpt(tmp)
    return Case(TokenizerError, ["tokenizer.json", "not found"], lambda: load(p).generate_text("hi"),
                ["generate", p, "--prompt", "hi", "--device", "cpu"])


@row
def tokenizer_corrupt(tmp):
    p = ckpt(tmp)
    (p / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    return Case(TokenizerError, ["tokenizer.json", "cannot be read as a tokenizers file"], lambda: load(p),
                ["generate", p, "--prompt", "hi", "--device", "cpu"])


# -- issue 17: numbers the config feeds into arithmetic ------------------------------------------
@row
def config_rope_factor_denormal(tmp):
    return _config_value(tmp, "rope_scaling", {"rope_type": "linear", "factor": 1e-320}, "rope_scaling.factor",
                         "got 1e-320", "finite number in [1e-06, 1e+06]")


@row
def config_sliding_window_huge(tmp):
    p = ckpt(tmp)
    edit_json(p / "config.json", lambda d: d.update(architectures=["MistralForCausalLM"], model_type="mistral",
                                                    sliding_window=2 ** 63))
    return inspect(p, ConfigError, "config.json", "sliding_window=9223372036854775808", "[1, 2147483648]")


@row
def config_norm_eps_denormal(tmp):
    return _config_value(tmp, "rms_norm_eps", 1e-320, "rms_norm_eps=1e-320", "must be a number in [1e-20, 1)")


# -- issue 17: resources --------------------------------------------------------------------------
@row
def weights_symlink_outside(tmp):
    outside = write_checkpoint(tmp / "other") / "model.safetensors"
    p = ckpt(tmp)
    (p / "model.safetensors").unlink()
    (p / "model.safetensors").symlink_to(outside)
    return inspect(p, CheckpointError, "model.safetensors", "weights file escapes the checkpoint directory",
                   str(outside.resolve()))


def _oversized(p: Path, name: str, limit: int, error, *fragments) -> Case:
    """`name` made one byte over `limit` (sparse: the test writes no gigabytes, and archkit must not read them)."""
    os.truncate(p / name, limit + 1)
    return inspect(p, error, name, f"{limit + 1} bytes, over the {limit >> 20} MiB", *fragments)


@row
def config_json_too_large(tmp):
    return _oversized(ckpt(tmp), "config.json", 16 << 20, ConfigError)


@row
def index_json_too_large(tmp):
    return _oversized(sharded(tmp), "model.safetensors.index.json", 64 << 20, CheckpointError)


@row
def generation_config_too_large(tmp):
    return _oversized(ckpt(tmp, generation_config={"eos_token_id": 2}), "generation_config.json", 16 << 20, ConfigError)


@row
def tokenizer_json_too_large(tmp):
    return _oversized(ckpt(tmp, tokenizer=True), "tokenizer.json", 256 << 20, TokenizerError)


@row
def tensor_name_huge(tmp):
    p = ckpt(tmp)
    f = p / "model.safetensors"
    edit_header(f, lambda h: h.update({"x" * 20_000_000: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}))
    return inspect(p, CheckpointError, "tensor name 'xxxx", "has 20000000 characters; at most 512 are allowed")


@row
def tensor_count_absurd(tmp):
    p = ckpt(tmp)
    f = p / "model.safetensors"
    header, data = read_raw(f)
    end = len(data)
    header.update({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [end, end]} for i in range(1 << 17)})
    write_raw(f, header, data)
    return inspect(p, CheckpointError, "model.safetensors", "holds more than 131072 tensors")


# -- issue 17: tokenizers that panic, and text that is not Unicode ------------------------------
def _tokenizer(tmp, **edit) -> Path:
    p = ckpt(tmp, tokenizer=True)
    edit_json(p / "tokenizer.json", lambda d: d.update(edit))
    return p


@row
def tokenizer_panics_at_load(tmp):
    p = _tokenizer(tmp, normalizer={"type": "Precompiled", "precompiled_charsmap": "AAAA"})
    return inspect(p, TokenizerError, "tokenizer.json", "cannot be read as a tokenizers file", "PanicException",
                   "precompiled_charsmap")


@row
def tokenizer_post_processor_unknown_token(tmp):
    p = _tokenizer(tmp, post_processor={"type": "TemplateProcessing", "special_tokens": {},
                                        "single": [{"SpecialToken": {"id": "<nope>", "type_id": 0}},
                                                   {"Sequence": {"id": "A", "type_id": 0}}],
                                        "pair": [{"Sequence": {"id": "A", "type_id": 0}}]})
    return inspect(p, TokenizerError, "tokenizer.json", "cannot encode the text", "PanicException")


@row
def tokenizer_panics_at_encode(tmp):
    p = _tokenizer(tmp, pre_tokenizer={"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated",
                                       "invert": False})
    prompt = "a" * 60 + "b"  # backtracks past Oniguruma's retry limit: a panic in the Rust library
    return Case(TokenizerError, ["tokenizer.json", "cannot encode the text", "retry-limit-in-match"],
                lambda: load(p).generate_text(prompt, max_new_tokens=1),
                ["generate", p, "--prompt", prompt, "--device", "cpu", "--max-new-tokens", "1"])


@row
def prompt_not_utf8(tmp):
    p = ckpt(tmp, tokenizer=True)
    prompt = "ab\udcffc"  # how Python hands over argv holding the byte 0xff, which is not UTF-8
    return Case(TokenizerError, ["tokenizer.json", "U+DCFF", "the byte 0xff", "at character 2"],
                lambda: load(p).generate_text(prompt, max_new_tokens=1),
                ["generate", p, "--prompt", prompt, "--device", "cpu", "--max-new-tokens", "1"])


# -- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, tmp_path):
    case = ROWS[name](tmp_path)
    with pytest.raises(case.error) as ei:
        case.call()
    msg = str(ei.value)
    assert isinstance(ei.value, ArchkitError)
    assert "\n" not in msg, msg
    assert len(msg) < 1000, msg[:2000]  # names and values are cut, whatever the input holds
    for f in case.fragments:
        assert f in msg, (f, msg)
    if case.cli is not None:
        assert_one_line_error(cli(*case.cli, site=case.site, env=case.env), *case.fragments)


def test_every_row_is_documented():
    """docs/bad-input.md has a row for every case tested here (by its test id), and no stale ones."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad-input.md").read_text()
    ids = {line.split("`")[1] for line in doc.splitlines() if line.startswith("| `")}
    from test_quant_errors import ROWS as QUANTIZED  # the "Quantized checkpoints" section's rows are tested there
    assert set(ROWS) | {"unreadable"} | set(QUANTIZED) == ids


# -- unreadable: chmod does not stop root -------------------------------------------------------
@pytest.mark.parametrize("what", [".", "model.safetensors", "config.json"])
def test_unreadable(tmp_path, what):
    p = ckpt(tmp_path)
    target = p / what
    target.chmod(0)
    try:
        try:
            (target / "config.json" if target.is_dir() else target).open("rb").close()
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 000 does not block reads")
        except PermissionError:
            pass
        with pytest.raises((CheckpointError, ConfigError)) as ei:
            load(p)
        assert "not readable" in str(ei.value) or "cannot read" in str(ei.value), str(ei.value)
        assert_one_line_error(cli("inspect", p), what if what != "." else str(p))
    finally:
        target.chmod(0o755)


# -- validated before any allocation ------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10**9), ("vocab_size", 10**12),
                                        ("hidden_size", 1 << 40), ("intermediate_size", 1 << 40)])
def test_absurd_config_rejected_before_allocation(tmp_path, key, value):
    p = ckpt(tmp_path)
    edit_json(p / "config.json", lambda d: d.update({key: value}))
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=f"{key}={value}"):
            load(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"{peak} bytes allocated before rejecting {key}={value}"


# -- every number the config feeds into arithmetic is bounded (issue 17) ----------------------------
NUMBER_KEYS = [("llama", "rms_norm_eps"), ("mistral", "sliding_window"), ("gemma2", "attn_logit_softcapping"),
               ("gemma2", "final_logit_softcapping"), ("gemma2", "query_pre_attn_scalar"), ("gemma2", "sliding_window"),
               ("llama", "rope_theta"), ("llama", "max_position_embeddings"), ("llama", "hidden_size")]


@pytest.mark.parametrize("family, key", NUMBER_KEYS)
@pytest.mark.parametrize("value", [1e-320, -1e-320, 1e30, 10 ** 30, 2 ** 63, 10 ** 400, 1e300, float("nan"), -0.0])
def test_config_numbers_are_bounded(family, key, value):
    """None of these values is usable for any of these keys: each is a ConfigError naming the key and its rule
    (1e-320 used to be 0 in float32 and the logits NaN; 2**63 an OverflowError in numpy)."""
    from core.config import ModelConfig

    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_hf(core.default_registry()[family].spec, {**LLAMA_CONFIG, key: value})
    assert f"{key}=" in str(ei.value) and "must be" in str(ei.value), str(ei.value)
    assert len(str(ei.value)) < 300


def test_mlp_only_layers_cannot_repeat_without_end():
    from core.config import ModelConfig

    raw = {**LLAMA_CONFIG, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 8, "mlp_only_layers": [0] * 100_000}
    with pytest.raises(ConfigError, match="mlp_only_layers has 100000 entries for 2 layers"):
        ModelConfig.from_hf(core.default_registry()["qwen3_moe"].spec, raw)


@pytest.mark.parametrize("shards", [1, 3])
def test_hub_cache_symlinks_into_blobs_are_allowed(tmp_path, shards):
    """The Hugging Face cache keeps files in models--o--n/blobs/ and links them from snapshots/<rev>/: that layout
    loads; a link from the snapshot to anywhere else does not (issue 17)."""
    src = write_checkpoint(tmp_path / "src", shards=shards)
    repo = tmp_path / "hub" / "models--o--n"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        (blobs / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"sha-{f.name}")
    assert load(snap).config.num_layers == LLAMA_CONFIG["num_hidden_layers"]
    weights = sorted(snap.glob("*.safetensors"))[0]
    weights.unlink()
    weights.symlink_to(src / weights.name)
    with pytest.raises(CheckpointError, match="escapes the checkpoint directory"):
        load(snap)
