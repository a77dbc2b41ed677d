"""Fuzzing the loader (issue 5, item 2): mutated safetensors headers and bytes, index.json and config.json.

Property, for every mutated checkpoint: `core.load` either raises an archkit error (ArchkitError), or
succeeds with exactly the weights the files hold, as read by an independent parser (tinyckpt.read_raw:
json + byte slicing), role by role and bit for bit. Never another exception, never a hang (an alarm after
HANG_S seconds), never a traced host allocation beyond what the files justify (PEAK_FACTOR x their size +
PEAK_SLACK: a loader that trusted a forged shape or length would allocate far more).

The base checkpoints are tiny llama-layout ones written with numpy (one F32 file; three F16 shards with
an index). ARCHKIT_FUZZ_EXAMPLES=N runs N examples per test instead of the default (see docs/fuzzing.md).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import core
from core.errors import ArchkitError

from tinyckpt import LLAMA_CONFIG, read_raw, role_of, write_checkpoint

EXAMPLES = int(os.environ.get("ARCHKIT_FUZZ_EXAMPLES", "300"))
HANG_S = 20
PEAK_FACTOR, PEAK_SLACK = 4, 4 << 20
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

CFG = {**LLAMA_CONFIG, "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
       "num_key_value_heads": 1, "max_position_embeddings": 16}
OUTCOMES: collections.Counter = collections.Counter()  # for the long run's report


def _snapshot(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


class Bases(dict):
    def __repr__(self):  # hypothesis prints the arguments of a failing example: keep the bytes out of it
        return f"<base checkpoints {sorted(self)}>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name → {file name: bytes} of each unmutated base checkpoint."""
    root = tmp_path_factory.mktemp("fuzz-bases")
    return Bases({"single-f32": _snapshot(write_checkpoint(root / "single", CFG)),
                  "sharded-f16": _snapshot(write_checkpoint(root / "sharded", CFG, shards=3, dtype=np.float16))})


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if OUTCOMES and os.environ.get("ARCHKIT_FUZZ_EXAMPLES"):
        print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())))


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no `except Exception` in the loader can swallow it."""


def _alarm(signum, frame):
    raise Hang(f"core.load took longer than {HANG_S} s")


def check(files: dict[str, bytes], test: str) -> str:
    """Write `files` to a fresh directory, load it, check the property; return the outcome."""
    d = Path(tempfile.mkdtemp(prefix="archkit-fuzz-"))
    try:
        for name, raw in files.items():
            (d / name).write_bytes(raw)
        outcome = _load_and_check(d, sum(len(b) for b in files.values()))
    finally:
        shutil.rmtree(d)
    OUTCOMES[f"{test}: {outcome}"] += 1
    return outcome


def _load_and_check(d: Path, nbytes: int) -> str:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    tracemalloc.start()
    try:
        model = core.load(d, device="cpu", quiet=True)
    except ArchkitError as e:
        return type(e).__name__
    except Exception as e:  # the property: nothing but archkit errors
        raise AssertionError(f"core.load raised {type(e).__name__}: {e}") from e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        assert peak <= PEAK_FACTOR * nbytes + PEAK_SLACK, f"load allocated {peak} bytes for {nbytes} bytes of files"
    assert_weights_match_files(model, d)
    try:
        with np.errstate(all="ignore"):  # mutated weights may overflow: values are not the point, running is
            assert model.logits([0]).shape == (1, model.config.vocab_size)
    except ArchkitError:
        pass
    return "loaded"


ORACLE_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def assert_weights_match_files(model, d: Path) -> None:
    """Every loaded role equals, bit for bit, the tensor the files hold under its name (independent reader),
    and every tensor of the files that names a role was loaded (except a tied model's lm_head copy)."""
    stored: dict[tuple, np.ndarray] = {}
    for f in d.glob("*.safetensors"):
        try:
            header, data = read_raw(f)
        except ValueError:
            continue  # a shard archkit did not read (not in the index)
        for name, meta in header.items():
            where = role_of(name) if isinstance(meta, dict) else None
            if where is None:
                continue
            b, e = meta["data_offsets"]
            x = np.frombuffer(data[b:e], ORACLE_DTYPES[meta["dtype"]]).reshape(meta["shape"])
            stored[where] = (x.astype(np.uint32) << 16).view(np.float32) if meta["dtype"] == "BF16" else x.astype(np.float32)
    loaded = {(r, None): t for r, t in model.weights.globals.items()}
    loaded.update({(r, i): t for i, layer in enumerate(model.weights.layers) for r, t in layer.items()})
    expected = set(stored) - ({("lm_head", None)} if model.config.tie_word_embeddings else set())
    assert set(loaded) == expected
    for key, t in loaded.items():
        assert t.dtype == np.float32 and t.shape == stored[key].shape, key
        assert np.array_equal(t.view(np.uint32), stored[key].view(np.uint32)), f"{key}: loaded values differ from the file"


# -- strategies ---------------------------------------------------------------------------------
class S:
    """Strategies, grouped in one namespace."""

    json_scalar = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats()
                   | st.text(max_size=12) | st.sampled_from([0, -1, 1, 2, 3, 4, 8, 16, 2 ** 31, 2 ** 63, 2 ** 64, 10 ** 9]))
    json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                              max_leaves=8)
    dtype = st.sampled_from(["F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2", "I64", "I8", "U8", "BOOL", "", "f32"]) | json_value
    dim = st.sampled_from([0, 1, 2, 4, 8, 16, 32, 2 ** 31, 2 ** 62, 2 ** 63, 2 ** 64, -1]) | st.integers(-5, 300)
    shape = st.lists(dim, max_size=4) | st.lists(dim, min_size=60, max_size=80) | json_value
    offset = st.integers(-10, 20_000) | st.sampled_from([2 ** 32, 2 ** 63, 2 ** 64, -(2 ** 63)])
    offsets = st.lists(offset, min_size=2, max_size=2) | st.lists(offset, max_size=3) | json_value
    shard_name = st.sampled_from([
        "", ".", "..", "/", "model.safetensors", "../ckpt/model-00001-of-00003.safetensors", "/etc/passwd",
        "/dev/zero", "sub/model-00001-of-00003.safetensors", "a\x00b.safetensors", "x" * 300, "x/" * 2100 + "y",
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
        "model-00004-of-00003.safetensors", "config.json",
    ]) | st.text(max_size=20) | json_value


@st.composite
def header_edit(draw, header: dict):
    """One structural edit of a parsed safetensors header (in place)."""
    names = [k for k in header if k != "__metadata__"]
    name = draw(st.sampled_from(names)) if names else "x"
    op = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "drop", "rename", "swap", "add", "metadata", "whole"]))
    if op in ("dtype", "shape", "offsets") and not isinstance(header.get(name), dict):
        header[name] = {}  # an earlier edit replaced the entry
    if op == "dtype":
        header[name]["dtype"] = draw(S.dtype)
    elif op == "shape":
        header[name]["shape"] = draw(S.shape)
    elif op == "offsets":
        header[name]["data_offsets"] = draw(S.offsets)
    elif op == "entry":
        header[name] = draw(S.json_value)
    elif op == "drop":
        header.pop(name, None)
    elif op == "rename":
        new = draw(st.sampled_from(names + ["lm_head.weight", "model.layers.7.mlp.up_proj.weight", "__metadata__"]) | st.text(max_size=30))
        header[new] = header.pop(name, None)
    elif op == "swap" and len(names) > 1:
        other = draw(st.sampled_from(names))
        if not (isinstance(header.get(name), dict) and isinstance(header.get(other), dict)):
            return header
        header[name]["data_offsets"], header[other]["data_offsets"] = header[other].get("data_offsets"), header[name].get("data_offsets")
    elif op == "add":
        header[draw(st.text(max_size=30))] = {"dtype": draw(S.dtype), "shape": draw(S.shape), "data_offsets": draw(S.offsets)}
    elif op == "metadata":
        header["__metadata__"] = draw(S.json_value)
    elif op == "whole":
        return draw(S.json_value)
    return header


@st.composite
def mutated_header_file(draw, raw: bytes) -> bytes:
    header, data = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]]), raw[8 + struct.unpack("<Q", raw[:8])[0]:]
    for _ in range(draw(st.integers(1, 3))):
        header = draw(header_edit(header)) if isinstance(header, dict) else draw(S.json_value)
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 9))
    if draw(st.integers(0, 19)) == 0:
        text = draw(DEEP)
    length = draw(st.sampled_from(["right", "right", "right", "off", "any"]))
    n = len(text) if length == "right" else len(text) + draw(st.integers(-16, 16)) if length == "off" else \
        draw(st.integers(0, 2 ** 64 - 1))
    return struct.pack("<Q", max(n, 0)) + text + data


@st.composite
def mutated_bytes(draw, raw: bytes, region: str) -> bytes:
    """Byte-level damage: overwrite, truncate, insert or append; `region` biases where."""
    b = bytearray(raw)
    n = struct.unpack("<Q", raw[:8])[0]
    lo, hi = (0, 8 + n) if region == "header" else (8 + n, len(b)) if region == "body" else (0, len(b))
    for _ in range(draw(st.integers(1, 4))):
        op = "overwrite" if region == "body" else draw(st.sampled_from(["overwrite", "truncate", "insert", "append"]))
        pos = draw(st.integers(lo, max(lo, min(hi, len(b)) - 1)))
        if op == "overwrite" and pos < len(b):
            chunk = draw(st.binary(min_size=1, max_size=8))
            end = min(pos + len(chunk), hi if region == "body" else len(b))
            b[pos:end] = chunk[:end - pos]
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            b += draw(st.binary(min_size=1, max_size=64))
    return bytes(b)


def _pick_file(draw, files: dict[str, bytes], suffix: str) -> str:
    return draw(st.sampled_from(sorted(n for n in files if n.endswith(suffix))))


# -- the tests ----------------------------------------------------------------------------------
def test_unmutated_bases_load(bases):
    """The oracle agrees with archkit on the intact checkpoints (else every test below is vacuous)."""
    for files in bases.values():
        assert check(files, "base") == "loaded"


@fuzz
@given(data=st.data(), which=st.sampled_from(["single-f32", "sharded-f16"]))
def test_fuzz_safetensors_header(bases, data, which):
    files = dict(bases[which])
    f = _pick_file(data.draw, files, ".safetensors")
    files[f] = data.draw(mutated_header_file(files[f]))
    check(files, "header")


@fuzz
@given(data=st.data(), which=st.sampled_from(["single-f32", "sharded-f16"]),
       region=st.sampled_from(["header", "anywhere"]))
def test_fuzz_safetensors_bytes(bases, data, which, region):
    files = dict(bases[which])
    f = _pick_file(data.draw, files, ".safetensors")
    files[f] = data.draw(mutated_bytes(files[f], region))
    check(files, "bytes")


@fuzz
@given(data=st.data(), which=st.sampled_from(["single-f32", "sharded-f16"]))
def test_fuzz_safetensors_body(bases, data, which):
    """Damage only the tensor bytes: the headers still hold, so the load must succeed, with the new values."""
    files = dict(bases[which])
    f = _pick_file(data.draw, files, ".safetensors")
    files[f] = data.draw(mutated_bytes(files[f], "body"))
    assert check(files, "body") == "loaded"


@st.composite
def mutated_index(draw, raw: bytes) -> bytes:
    d = json.loads(raw)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["shard", "shard", "drop", "add", "weight_map", "key", "bytes", "deep"]))
        wm = d.get("weight_map") if isinstance(d, dict) else None
        if op in ("shard", "drop") and isinstance(wm, dict) and wm:
            name = draw(st.sampled_from(sorted(wm)))
            if op == "shard":
                wm[name] = draw(S.shard_name)
            else:
                del wm[name]
        elif op == "add" and isinstance(wm, dict):
            wm[draw(st.text(max_size=20))] = draw(S.shard_name)
        elif op == "weight_map" and isinstance(d, dict):
            d["weight_map"] = draw(S.json_value)
        elif op == "key" and isinstance(d, dict):
            d[draw(st.sampled_from(["metadata", "weight_map", "x"]))] = draw(S.json_value)
        elif op == "bytes":
            text = json.dumps(d).encode()
            pos = draw(st.integers(0, len(text)))
            return text[:pos] + draw(st.binary(max_size=4)) + text[pos + draw(st.integers(0, 4)):]
        elif op == "deep":
            return draw(DEEP)
    return json.dumps(d).encode()


@fuzz
@given(data=st.data())
def test_fuzz_index_json(bases, data):
    files = dict(bases["sharded-f16"])
    files["model.safetensors.index.json"] = data.draw(mutated_index(files["model.safetensors.index.json"]))
    check(files, "index.json")


DEEP = st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"[" * 1000 + b"]" * 1000])


CONFIG_KEYS = sorted(set(CFG) | {"head_dim", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "bos_token_id",
                                 "eos_token_id", "partial_rotary_factor", "sliding_window"})
SIZE_LIKE = st.sampled_from([0, -1, 1, 2, 3, 4, 8, 16, 32, 2 ** 31, 10 ** 9, 10 ** 400, 8.0, 8.5, "8", True, None, [8],
                             float("nan"), float("inf"), -float("inf")])


@st.composite
def mutated_config(draw, raw: bytes) -> bytes:
    d = json.loads(raw)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "drop", "rope", "whole", "bytes", "deep"]))
        if op == "set":
            d[draw(st.sampled_from(CONFIG_KEYS))] = draw(SIZE_LIKE | S.json_value)
        elif op == "drop":
            d.pop(draw(st.sampled_from(CONFIG_KEYS)), None)
        elif op == "rope":
            d["rope_scaling"] = {"rope_type": draw(st.sampled_from(["default", "linear", "llama3", "yarn", "dynamic"])),
                                 "factor": draw(SIZE_LIKE), "low_freq_factor": draw(SIZE_LIKE),
                                 "high_freq_factor": draw(SIZE_LIKE), "original_max_position_embeddings": draw(SIZE_LIKE)}
        elif op == "whole":
            d = draw(S.json_value)
        elif op == "deep":
            return draw(DEEP)
        else:
            text = json.dumps(d).encode()
            pos = draw(st.integers(0, len(text)))
            return text[:pos] + draw(st.binary(max_size=4)) + text[pos + draw(st.integers(0, 4)):]
        if not isinstance(d, dict):
            break
    return json.dumps(d).encode()


@fuzz
@given(data=st.data(), which=st.sampled_from(["single-f32", "sharded-f16"]),
       gen=st.none() | st.dictionaries(st.sampled_from(["eos_token_id", "bos_token_id", "pad_token_id"]),
                                       st.integers(-3, 40) | st.lists(st.integers(-3, 40), max_size=3) | S.json_value))
def test_fuzz_config_json(bases, data, which, gen):
    files = dict(bases[which])
    files["config.json"] = data.draw(mutated_config(files["config.json"]))
    if gen is not None:
        files["generation_config.json"] = json.dumps(gen).encode()
    check(files, "config.json")
