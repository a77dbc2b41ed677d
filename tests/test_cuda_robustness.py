"""GPU robustness (issue 5): out-of-memory at load and cache allocation, two models, two threads.

Checkpoints are synthesized from the specs (core.synth), so no torch is needed. Skips off-GPU.
"""

from __future__ import annotations

import threading

import pytest

import core
from core.errors import DeviceError, DeviceMemoryError
from core.load import cuda_available
from core.synth import make_config, write_checkpoint

OK, WHY = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"needs PyCUDA and a GPU: {WHY}")]
MiB = 1 << 20


def synth(path, arch="llama", std=0.1, **sizes):
    spec = core.default_registry()[arch].spec
    base = dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                max_position_embeddings=256)
    base.update(sizes)
    if arch == "gpt2":
        base.pop("num_kv_heads"), base.pop("intermediate_size")
    return write_checkpoint(spec, make_config(spec, **base), path, std=std)


def test_oom_during_load_names_bytes_and_the_process_goes_on(tmp_path):
    import pycuda.autoprimaryctx  # noqa: F401  (the context the backend uses; this test asks it for free memory first)
    import pycuda.driver as drv

    path = synth(tmp_path / "big", hidden_size=1024, num_layers=8, intermediate_size=4096, vocab_size=32000,
                 num_heads=16, num_kv_heads=4, std=0.02)  # ~190M parameters, ~380 MB in fp16
    free, _ = drv.mem_get_info()
    hog = drv.mem_alloc(free - 128 * MiB)  # leave less than the weights need
    try:
        with pytest.raises(DeviceMemoryError, match=r"needs? [\d,.]+ MiB.*[\d,.]+ MiB (free|of)"):
            core.load(path, device="cuda", dtype="float16", quiet=True)
        left, _ = drv.mem_get_info()
        assert left >= 96 * MiB, "a failed load must free what it allocated"
    finally:
        hog.free()
    m = core.load(path, device="cuda", dtype="float16", quiet=True)  # and the process carries on
    assert len(m.generate([1, 2, 3], max_new_tokens=4)) == 4


def test_kv_cache_that_cannot_fit_is_a_clear_error(tmp_path):
    # 2^24 positions x 8 layers x 4 kv heads x 128 x (k, v) x 2 bytes = 275 GB: more than any card has.
    path = synth(tmp_path / "long", max_position_embeddings=1 << 24, num_layers=8, num_kv_heads=4, num_heads=4,
                 hidden_size=512)
    with pytest.raises(DeviceMemoryError, match=r"needs? [\d,.]+ MiB"):
        core.load(path, device="cuda", dtype="float16", context=1 << 24, quiet=True)
    m = core.load(path, device="cuda", dtype="float16", context=512, quiet=True)
    assert len(m.generate([5, 6], max_new_tokens=3)) == 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    paths = [synth(d / "llama", "llama"), synth(d / "gpt2", "gpt2")]
    ref = [core.load(p, device="cpu", quiet=True) for p in paths]
    gpu = [core.load(p, device="cuda", dtype="float32", quiet=True) for p in paths]
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = [m.generate(prompt, max_new_tokens=24) for m in ref]
    return gpu, prompt, expected


def test_two_models_in_one_process_interleaved(pair):
    gpu, prompt, expected = pair
    streams = [m.stream(prompt, max_new_tokens=24) for m in gpu]
    got = [[], []]
    for a, b in zip(*streams):  # alternate one token from each model
        got[0].append(a)
        got[1].append(b)
    assert got == expected


def test_generate_from_two_threads_on_two_models(pair):
    gpu, prompt, expected = pair
    got, errors = [None, None], []

    def work(i):
        try:
            for _ in range(3):
                got[i] = gpu[i].generate(prompt, max_new_tokens=24)
        except Exception as e:  # reported below with its thread
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert got == expected


def test_same_model_interleaved_in_one_thread_refuses_clearly(pair):
    gpu, prompt, _ = pair
    first = gpu[0].stream(prompt, max_new_tokens=8)
    next(first)
    with pytest.raises(DeviceError, match="already generating"):
        gpu[0].generate(prompt, max_new_tokens=2)
    first.close()  # finishing (or closing) the first frees the model
    assert len(gpu[0].generate(prompt, max_new_tokens=2)) == 2


def test_same_model_from_two_threads_is_serialised(pair):
    gpu, prompt, expected = pair
    got = []
    threads = [threading.Thread(target=lambda: got.append(gpu[0].generate(prompt, max_new_tokens=24))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == [expected[0], expected[0]]
