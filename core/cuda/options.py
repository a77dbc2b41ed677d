"""The CUDA backend's switches, read from the environment in this one place.

    ARCHKIT_CUDA_POISON=1   NaN-fill every fresh activation buffer and KV cache (an unwritten element shows)
    ARCHKIT_CUDA_SYNC=1     synchronise after every launch (an asynchronous error is pinned to its op)
    ARCHKIT_CUDA_GRAPHS=0   decode without CUDA graphs
    ARCHKIT_CUDA_FUSED=0    the previous one-op-per-kernel decode path
    ARCHKIT_CUDA_PDL=0      no programmatic dependent launch in decode graphs
    ARCHKIT_CUDA_FOLD=0     run the norm kernels instead of folding them into the GEMVs
    ARCHKIT_CUDA_FOLD_LN=1  fold LayerNorm too
    ARCHKIT_CUDA_GEMM=auto|own|cublas   prefill matrix products
    ARCHKIT_CUDA_ATTN=tc|simt           prefill attention
    ARCHKIT_CUDA_QTC=1      one-token int4 / int8 gate-and-up GEMVs on tensor cores (gemv_qtc.cu; see below)
    ARCHKIT_CUDA_SKINNY=1   batched decode products (5-64 rows) on skinny.cu instead of cuBLAS (see below)

CudaBackend copies the record into plain attributes of the same names (be.fused, be.gemm, ...), which
benchmarks and tests may flip on a live backend; graph.py captures a step anew when one changes. Where
cuBLAS is looked for ($ARCHKIT_CUBLAS, a library path rather than a switch) is cublas.py's business.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import attrs

from ..errors import DeviceError


@attrs.frozen
class Options:
    """Backend switches; the defaults are what an empty environment gives."""

    poison: bool = False     # NaN-fill fresh activations and KV caches (CudaBackend(poison=...) overrides)
    sync_each: bool = False  # synchronise after every launch
    graphs: bool = True      # decode steps replayed as CUDA graphs (graph.py)
    # Fused decode kernels (issue 4: multi-row GEMV with epilogues, register norms, RoPE + cache write); off runs
    # the previous one-op-per-kernel path (benchmarks compare the two).
    fused: bool = True
    pdl: bool = True         # programmatic dependent launch inside decode graphs (pdl.py); the backend needs sm_90+
    # At one decode token: RMSNorm folded into the GEMV that reads it, the residual add into the GEMV whose
    # result is added (Lazy, deferred.py); off runs the norm kernels.
    fold: bool = True
    # LayerNorm folds too (gemv_*_ln) but is off by default: on an H200 it made GPT-2 decode 0.92x (its extra
    # sums cost registers, 116 vs 72 a thread, in the 77 MB tied output GEMV).
    fold_ln: bool = False
    # Prefill matrix products (T > GEMV_MAX_T): cuBLAS through ctypes (cublas.py) when a libcublas is found
    # ("auto": 2.8x / 3.0x our WMMA GEMM at 2,048 tokens on an H200, NOTES.md round 2), else our WMMA GEMM;
    # "own" / "cublas" force one, and "cublas" without a library is an error.
    gemm: str = "auto"
    # Prefill attention (T > 1): the tensor-core kernel (attention_tc.cu, "tc") for half-precision caches and
    # head sizes that are multiples of 16, else (or with "simt") the SIMT kernel.
    attn: str = "tc"
    # One-token gate-and-up GEMVs of int4 / int8 weights on tensor cores (gemv_qtc.cu) where their groups and K
    # allow (qlinear.py). Off by default: the kernel is right (tests/test_cuda_quant.py) but stages x in every block,
    # and on an H100 it was faster than gemv_q.cu only for the gated product (Qwen3-8B gate_up 33.8 us against 42.8)
    # and slower for the others; the gated-only choice has not been timed end to end (BENCHMARKS.md).
    qtc: bool = False
    # Products of GEMV_MAX_T < M <= SKINNY_MAX_M rows of half-precision weights (batched decode steps, issue 15) on
    # skinny.cu's tensor-core kernel instead of cuBLAS (or our GEMM). Off by default: it is right
    # (tests/test_cuda_skinny.py) but both versions timed so far were slower than cuBLAS on an H100 (BENCHMARKS.md).
    skinny: bool = False

    def __attrs_post_init__(self):
        if self.gemm not in ("auto", "own", "cublas"):
            raise DeviceError(f"ARCHKIT_CUDA_GEMM={self.gemm!r}: choose 'auto', 'own' or 'cublas'")
        if self.attn not in ("tc", "simt"):
            raise DeviceError(f"ARCHKIT_CUDA_ATTN={self.attn!r}: choose 'tc' or 'simt'")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Options:
        """The switches as the environment (os.environ unless given) sets them; a DeviceError names a bad value."""
        env = os.environ if environ is None else environ
        return cls(poison=env.get("ARCHKIT_CUDA_POISON") == "1",
                   sync_each=env.get("ARCHKIT_CUDA_SYNC") == "1",
                   graphs=env.get("ARCHKIT_CUDA_GRAPHS", "1") != "0",
                   fused=env.get("ARCHKIT_CUDA_FUSED", "1") != "0",
                   pdl=env.get("ARCHKIT_CUDA_PDL", "1") != "0",
                   fold=env.get("ARCHKIT_CUDA_FOLD", "1") != "0",
                   fold_ln=env.get("ARCHKIT_CUDA_FOLD_LN") == "1",
                   gemm=env.get("ARCHKIT_CUDA_GEMM", "auto"),
                   attn=env.get("ARCHKIT_CUDA_ATTN", "tc"),
                   qtc=env.get("ARCHKIT_CUDA_QTC") == "1",
                   skinny=env.get("ARCHKIT_CUDA_SKINNY") == "1")
