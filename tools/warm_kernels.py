"""Fill PyCUDA's on-disk cubin cache for kernel modules in parallel, before a device round.

A fresh device machine compiles each (file, defines) variant the first time a process asks for it, one nvcc run at a
time; a test file that draws many dtype x scale-type variants (tests/test_cuda_quant_moe.py: 9 of moe_q.cu, 18 of
gemv_q.cu) spends most of its time there. This runs the same compiles (core/cuda/modules.py's source, options and
include path; the arch the runtime would ask for) on every core at once, so the runtime's compile is a cache hit.

    python3 tools/warm_kernels.py [FILE.cu ...]      # default: every kernel file; needs PyCUDA and nvcc
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cuda import modules  # noqa: E402


def _arch() -> str:
    """sm_XY of GPU 0, as PyCUDA's compile() would derive it from the current context."""
    cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader", "-i", "0"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return "sm_" + cap.replace(".", "")


def _compile(job) -> tuple[str, float]:
    name, defines, arch = job
    from pycuda.compiler import compile as nvcc_compile

    t = time.perf_counter()
    nvcc_compile(modules.source(name), options=modules.nvcc_options(defines), include_dirs=modules.include_dirs(name),
                 no_extern_c=True, arch=arch)
    return f"{name} {defines}", time.perf_counter() - t


def main(argv: list[str]) -> int:
    """Compile the variants of the named files (all kernel files when none) on every core; print the slowest."""
    files = argv or modules.kernel_files()
    arch = _arch()
    jobs = [(f, d, arch) for f in files for d in modules.variants(f)]
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        done = sorted(pool.map(_compile, jobs), key=lambda r: -r[1])
    print(f"{len(jobs)} variants of {len(files)} files for {arch} in {time.perf_counter() - t:.0f} s "
          f"(slowest {done[0][1]:.0f} s: {done[0][0]})" if done else "nothing to compile")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
