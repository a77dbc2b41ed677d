"""Loading is all or nothing (issue 5, item 4): a failure at any tensor leaves no half-built model, frees
every tensor already converted, and the next load works.

The failures are real ones: a shard truncated on disk after its header was validated (as a file being
replaced under a running load would be), and a backend that fails on its Nth upload (as a device out of
memory would). Freed means: no converted tensor survives (weak references die) and traced host memory
returns to where it was before the load.
"""

from __future__ import annotations

import gc
import json
import os
import tracemalloc
import weakref

import numpy as np
import pytest

import core
import core.weights
from core.backend import NumpyBackend
from core.errors import CheckpointError, DeviceMemoryError, WeightsError

from tinyckpt import LLAMA_CONFIG, llama_shapes, write_checkpoint

# Big enough that a leaked tensor is visible in tracemalloc: embed and lm_head are 1 MiB each.
CFG = {**LLAMA_CONFIG, "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128}
N_TENSORS = len(llama_shapes(CFG))
NBYTES = sum(int(np.prod(s)) * 4 for s in llama_shapes(CFG).values())


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "ckpt", CFG, shards=3)


@pytest.fixture
def tracked(monkeypatch):
    """Weak references to every tensor the numpy backend converts, and how many reads happened."""
    refs, reads = [], []
    convert, read = NumpyBackend.convert, core.weights.read_tensor

    def tracking_convert(self, bits, stored, role):
        out = convert(self, bits, stored, role)
        refs.append(weakref.ref(out))
        return out

    def tracking_read(info):
        reads.append(info.name)
        return read(info)

    monkeypatch.setattr(NumpyBackend, "convert", tracking_convert)
    monkeypatch.setattr(core.weights, "read_tensor", tracking_read)
    return refs, reads


def load(path):
    return core.load(path, device="cpu", quiet=True)


def assert_failure_frees_everything(failing_load, refs) -> None:
    """Run `failing_load` (it asserts its own error and returns the ExceptionInfo). While that exception and
    its traceback are still alive, no converted tensor may be reachable (the traceback keeps every frame of
    the load alive, so this catches a half-built model or a tensor left in a local); once it is dropped,
    traced host memory must be back where it was."""
    failing_load()  # once to warm every import and cache, so the baseline below is the steady state
    refs.clear()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        excinfo = failing_load()
        gc.collect()
        alive = [r for r in refs if r() is not None]
        assert refs, "the failure should come after some tensors were converted"
        assert not alive, f"{len(alive)} of {len(refs)} converted tensors reachable from the error {excinfo.value}"
        del excinfo
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < NBYTES // 20, f"{after - before} bytes still held after the failed load"


@pytest.mark.parametrize("nth", [2, N_TENSORS // 2, N_TENSORS])
def test_truncated_shard_mid_load(ckpt, tracked, monkeypatch, nth):
    """A shard shrinks after its header was checked (replaced under a running load): the Nth read comes up short."""
    refs, reads = tracked
    tracking_read = core.weights.read_tensor
    shards = {f: f.read_bytes() for f in ckpt.glob("*.safetensors")}

    def truncating_read(info):
        if len(reads) == nth - 1:
            os.truncate(info.file, info.offset + 4)
        return tracking_read(info)

    def failing_load():
        for f, raw in shards.items():
            f.write_bytes(raw)
        reads.clear()
        with pytest.raises(CheckpointError, match=r"is truncated \(4 of \d+ bytes\)") as ei:
            load(ckpt)
        return ei

    monkeypatch.setattr(core.weights, "read_tensor", truncating_read)
    assert_failure_frees_everything(failing_load, refs)
    assert len(reads) == nth
    for f, raw in shards.items():
        f.write_bytes(raw)
    monkeypatch.setattr(core.weights, "read_tensor", tracking_read)
    assert np.isfinite(load(ckpt).logits([1, 2, 3])).all()  # and the next load works


@pytest.mark.parametrize("nth", [2, N_TENSORS // 2, N_TENSORS])
def test_backend_fails_on_nth_upload(ckpt, tracked, monkeypatch, nth):
    """A device running out of memory on its Nth upload: everything uploaded before is released."""
    refs, _ = tracked
    tracking_convert = NumpyBackend.convert
    calls = []

    def failing_convert(self, bits, stored, role):
        calls.append(role)
        if len(calls) == nth:
            raise DeviceMemoryError(f"out of memory uploading {role}: {bits.nbytes} bytes needed, 0 free")
        return tracking_convert(self, bits, stored, role)

    def failing_load():
        calls.clear()
        with pytest.raises(DeviceMemoryError, match="out of memory uploading") as ei:
            load(ckpt)
        return ei

    monkeypatch.setattr(NumpyBackend, "convert", failing_convert)
    assert_failure_frees_everything(failing_load, refs)
    monkeypatch.setattr(NumpyBackend, "convert", tracking_convert)
    assert np.isfinite(load(ckpt).logits([1, 2, 3])).all()


def test_shape_mismatch_reads_nothing(ckpt, tracked):
    """Every name and shape is checked from the headers: a mismatch fails before any tensor data is read."""
    refs, reads = tracked
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="with the wrong shape"):
        load(ckpt)
    assert reads == [] and refs == []


def test_next_model_loads_after_failure(tmp_path, ckpt):
    """A failed load leaves no state behind: a second, different checkpoint loads and matches a fresh load."""
    bad = write_checkpoint(tmp_path / "bad", CFG)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        load(bad)
    good = load(ckpt)
    ids = [5, 6, 7, 8]
    ref = load(ckpt).logits(ids)
    assert np.array_equal(good.logits(ids), ref)
