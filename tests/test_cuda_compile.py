"""CI (no GPU): every CUDA kernel compiles with nvcc for Ampere (sm_80) and Hopper (sm_90).

Each file is built with every -D set the runtime uses (core.cuda.modules.variants) and the same flags
and include path (core.cuda.modules.nvcc_options), so what CI builds is what runs on the card.
"""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.cuda import modules

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")


def test_every_kernel_file_has_variants():
    files = modules.kernel_files()
    assert "attention.cu" in files and "gemm.cu" in files
    for name in files:
        assert modules.variants(name), f"{name} has no compile variants"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", modules.kernel_files())
def test_compiles(name, arch, tmp_path):
    def build(job):
        i, defines = job
        cmd = [NVCC, "-cubin", f"-arch={arch}", f"-I{modules.HERE}", *modules.nvcc_options(defines),
               str(modules.HERE / name), "-o", str(tmp_path / f"out{i}.cubin")]
        return defines, subprocess.run(cmd, capture_output=True, text=True)

    # the variants of a file at once on every core (CI's two): nvcc runs are independent processes
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for defines, r in pool.map(build, enumerate(modules.variants(name))):
            assert r.returncode == 0, f"{name} {defines} for {arch}:\n{r.stderr}"
            assert "warning" not in r.stderr.lower(), f"{name} {defines} for {arch} warns:\n{r.stderr}"


@pytest.mark.parametrize("dtype,Dh,g", [("float16", 128, 8), ("float16", 128, 16), ("float32", 64, 16),
                                        ("float32", 64, 20), ("bfloat16", 256, 8), ("float16", 64, 32)])
def test_decode_attention_group_limit_matches_the_kernel(dtype, Dh, g, tmp_path):
    """The backend's shared-memory estimate for attn_decode_step (it falls back to the two-kernel path above
    48 KB) agrees with what the kernel can be built for: the .cu's static_assert fires exactly past it."""
    from core.cuda.geometry import decode_step_geometry

    defines = {"WDTYPE": modules.DTYPE_CODES[dtype], "HEAD_DIM": Dh, "GROUP": g}
    cmd = [NVCC, "-cubin", "-arch=sm_90", f"-I{modules.HERE}", *modules.nvcc_options(defines),
           str(modules.HERE / "attention.cu"), "-o", str(tmp_path / "out.cubin")]
    builds = subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    assert builds == (decode_step_geometry(Dh, g, dtype)[1] <= 48 * 1024)
