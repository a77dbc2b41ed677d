"""A process that used the CUDA backend exits cleanly (core/cuda/memory.py stop_pool_at_exit).

PyCUDA pops its context in an exit hook; a DeviceMemoryPool still holding blocks when the interpreter tears it down
after that aborts the process ("terminate called after throwing an instance of 'pycuda::error' ...
explicit_context_dependent failed", inducer/pycuda#74), which the GPU logs showed at the end of every engine run.
The hook is checked on a fake backend here; the GPU test runs the engine in a child process and reads its exit.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.cuda import memory
from core.load import cuda_available

ROOT = Path(__file__).resolve().parents[1]


class _Pool:
    def __init__(self):
        self.stopped = 0

    def stop_holding(self):
        self.stopped += 1


class _Backend:
    def __init__(self):
        self.pool = _Pool()


def test_the_exit_hook_stops_the_pool_and_outlives_no_backend(monkeypatch):
    hooks = []
    monkeypatch.setattr(memory.atexit, "register", lambda fn, *a: hooks.append((fn, a)))
    be = _Backend()
    memory.stop_pool_at_exit(be)
    assert len(hooks) == 1
    fn, args = hooks[0]
    fn(*args)
    assert be.pool.stopped == 1
    pool = be.pool
    del be
    gc.collect()
    fn(*args)  # the backend is gone: the hook holds it only weakly and does nothing
    assert pool.stopped == 1


OK, WHY = cuda_available()


@pytest.mark.gpu
@pytest.mark.skipif(not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")
def test_an_engine_run_on_cuda_exits_with_status_zero():
    code = textwrap.dedent("""
        import core
        from core.demo import demo_checkpoint
        model = core.load(demo_checkpoint("llama"), device="cuda", quiet=True)
        ids = model.tokenizer.encode("def main():")
        outs = model.generate([ids, ids[:3], ids + ids], max_new_tokens=6, temperature=0)
        assert len(outs) == 3 and all(outs), outs
        print("generated")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "generated" in r.stdout, (r.returncode, r.stderr[-2000:])
    assert "terminate called" not in r.stderr, r.stderr[-2000:]
