"""Launch geometry: the tile sizes, threads and shared memory of the kernels, as constants and pure functions.

Each number mirrors a macro of a .cu file, named beside it. tests/test_cuda_compile.py builds attn_decode_step
against decode_step_geometry (its static_assert fires exactly past 48 KB), and tests/test_cuda_rooms.py reads
the macros' defaults out of the .cu files and checks that every gemv.cu build gemv_geometry asks for is one
CI compiles (modules.variants).
"""

from __future__ import annotations

from .tensors import ITEMSIZE

CUBLAS_WORKSPACE = 32 << 20  # bytes of the cuBLAS handle's fixed workspace (NVIDIA's advice for Hopper: 32 MiB)
GEMV_MAX_T = 4        # gemv.cu handles up to this many tokens per weight read; more go to the GEMM
GEMV_ROWS, GEMV_THREADS = 4, 128  # gemv.cu gemv_rows / gemv_gated: output rows and threads per block
# gemv_q.cu (quantized weights), by weight kind: (QTHREADS threads a block, QROWS output rows a block, QUNROLL pieces
# a thread has in flight per row, QWORDS_<kind> 32-bit words a piece), passed to its build (qgemv_defines); the
# file's defaults are int4's. int4 reads 8-byte pieces: ~10% less time a Qwen3-8B layer than 16-byte ones on an H100
# (tools/qgemv_probe.py, BENCHMARKS.md); int8 saw no difference, and fp8 (no QFOLD) reads 16 bytes
QGEO = {"int4": (128, 4, 2, 2), "int8": (128, 4, 2, 4), "fp8": (128, 4, 2, 4)}
# gemv_q.cu QFOLD: the integer kinds' GEMVs take the scale out of the inner loop and multiply x by (u - z) s unrounded
# (qlayout.dense(p, rounded=False)); fp8's, and every other reader's, by the weight rounded to the scale type
QFOLD = True
# gemv_qtc.cu: one-token int4 / int8 GEMVs on tensor cores, QTC_WARPS warps a block of 16 rows splitting K in steps
# of QTC_STEP codes (16 words a row), taken where every step lies in one scale group and the staged x fits
# QTC_SMEM_LIMIT (the dynamic shared memory every sm_80+ card grants a block)
QTC_WARPS = 8
QTC_STEP = {"int4": 128, "int8": 64}
QTC_SMEM_LIMIT = 99 * 1024
NORM_VPT = 2          # norm.cu norm_reg: float4 values per thread kept in registers
PREFILL_NQ, PREFILL_BK = 16, 32  # attention.cu: queries per block, keys per tile
TC_FQ, TC_FK, TC_NW = 64, 64, 4  # attention_tc.cu: queries per block, keys per tile, warps (TC_SMEM_BYTES there)
MOE_ROWS, MOE_THREADS, ROUTE_WARPS = 4, 128, 4  # moe.cu: rows and threads per GEMV block; tokens per route block
ROUTE_MAX_GROUPS = 32  # moe.cu: expert groups a group-limited moe_route scores (one a lane)
PAGED_NQ = 16          # paged_attn.cu PP_NQ: queries per prefill block (the backend cuts segments into such tiles)
PAGED_MAX_GROUP = 16   # paged_attn.cu GROUP bound: query heads per decode block
PAGED_MAX_DH = 256     # paged_attn.cu HEAD_DIM bound (shared memory); capabilities.py refuses larger heads
PAGED_SPLIT_KEYS = 64  # fewest keys a decode slice takes (two 32-key tiles: below that the merge costs more)
PAGED_SMEM_LIMIT = 99 * 1024  # dynamic shared memory every sm_80+ card grants a block (sm_86 / sm_89: 99 KB)


def qgemv_defines(kind: str) -> dict[str, int]:
    """The geometry macros of gemv_q.cu's build for weights of `kind` (QGEO); the launches use the same numbers."""
    threads, rows, unroll, _ = QGEO[kind]
    # every kind's words a piece: one build holds all kinds' kernels, so kinds of one geometry share it
    return {"QTHREADS": threads, "QROWS": rows, "QUNROLL": unroll, "QWORDS_INT4": QGEO["int4"][3],
            "QWORDS_INT8": QGEO["int8"][3], "QFOLD": int(QFOLD)}


def qtc_smem(kind: str, kp: int, warps: int = QTC_WARPS) -> int:
    """Bytes of dynamic shared memory gemv_qtc.cu's block of `warps` warps takes for rows of kp codes (its layout: B
    fragments, the steps' x sums, the cross-warp sums of two tiles, sigma's scratch)."""
    nsteps = -(-kp // QTC_STEP[kind])
    return nsteps * (8 if kind == "int4" else 4) * 64 + 4 * (2 * nsteps + warps * 2 * 16 + warps + 1)


def qgemv_rounds(kind: str) -> bool:
    """Whether gemv_q.cu's GEMV for weights of `kind` multiplies by the weight rounded to the scale type (as the
    reference dequantization and every other kernel do) rather than by (u - z) s unrounded (QFOLD, integer kinds)."""
    return kind == "fp8" or not QFOLD


def grid1(n: int, block: int = 256) -> tuple:
    """A 1-D grid of `block`-thread blocks over n elements for the grid-stride kernels (at most 8,192 blocks)."""
    return (max(1, min((n + block - 1) // block, 8192)), 1, 1)


def decode_step_geometry(Dh: int, g: int, dtype: str) -> tuple[int, int, int]:
    """(threads per block, static shared memory in bytes, fewest keys a slice takes) of attn_decode_step
    (attention.cu) for head size Dh and group g, mirroring the kernel's DS_* macros: it has no build beyond
    48 KB (large GQA groups take the two-kernel path), and the backend launches it with this many threads."""
    es = ITEMSIZE[dtype]
    vec = 16 // es
    row = Dh * es
    tk = 64 if row <= 128 else 32 if row <= 256 else 16 if row <= 512 else 8
    threads = 256 if g * Dh >= 256 else 64 if g * Dh <= 64 else -(-g * Dh // 32) * 32
    nch = Dh // vec if Dh % vec == 0 else Dh
    sp = 1
    while sp * 2 <= 32 and sp * 2 * tk * g <= threads and nch % (sp * 2) == 0:
        sp *= 2
    kpad = Dh + vec * sp if Dh % vec == 0 else Dh + 1
    dhw = -(-row // 16) * 16 // es
    smem = (2 * tk * kpad * es + 2 * tk * Dh * es + 2 * dhw * es + 4 * (g * Dh + g * tk + 3 * g)
            + 4 * (4 * Dh + 2 * ((Dh + 1) // 2)) + 16)
    return threads, smem, min(tk, 32)


def gemv_geometry(K: int, M: int, dtype: str, qkv: bool = False, gated: bool = False) -> tuple:
    """(output rows per block, extra gemv.cu defines) for a GEMV over K features and M tokens of a weight
    of `dtype`."""
    # Each GEMV lets the next kernel launch as soon as all its blocks run (gemv.cu GEMV_EARLY_LAUNCH), except
    # the q/k/v product (the only three-output one), whose successor is the decode attention: launched that
    # early, its K/V prefetch slowed 4,096-position decode 0.94x; the others made decode 1.05x at 128
    # positions (TinyLlama / Qwen3-0.6B, H200, one run each; NOTES.md round 4).
    geo = {"GEMV_EARLY_LAUNCH": 0} if qkv else {}
    if M == 1 and K <= 1024:
        # one 16-byte chunk per thread per row: 8 rows a block keep 8 loads in flight (as 4 rows x 2 chunks
        # at K = 2048) and halve the blocks' x reads (Qwen3-0.6B decode 1.02x, traced; NOTES.md round 4)
        return 8, dict(geo, GEMV_ROWS=8, GEMV_UNROLL=1)
    if M == 1:
        # Every weight load a thread makes is issued before the wait when one pass of the block covers the
        # row: with 2 chunks a pass, Qwen3-0.6B's down projection (K = 3,072) took its last third after the
        # wait, an HBM round trip on the critical path (3.6 us there against 1.6 for the o projection,
        # whose bytes are 2/3 of it, NOTES.md round 5; Qwen3-0.6B decode 1.035x, GPT-2 1.02x, BENCHMARKS.md
        # item 19). Capped at 16 loads in flight a thread (registers).
        vec = 16 // ITEMSIZE[dtype]
        unroll = -(-K // (vec * GEMV_THREADS))
        if 2 < unroll <= 4 and (2 if gated else 1) * GEMV_ROWS * unroll <= 16:
            return GEMV_ROWS, dict(geo, GEMV_UNROLL=unroll)
    return GEMV_ROWS, geo


SKINNY_MAX_M = 64      # skinny.cu: the most rows of x a launch takes (8 SK_NT with SK_NT <= 8); more go to cuBLAS
SK_SUB = 4             # skinny.cu SK_SUB: 32-column sub-steps a chunk (SK_KC = 32 SK_SUB columns)
SK_COUNTERS = 1 << 16  # tile counters the backend keeps for skinny.cu (a split launch has at most this many tiles)


def skinny_geometry(M: int, K: int, Ns, sms: int) -> tuple[int, int, int, int, int]:
    """(SK_NT, SK_WARPS, kslice, slices, dynamic shared memory in bytes) of skinny_linear for M rows of x over K
    columns and the products' output sizes Ns, on `sms` multiprocessors. x rows go in tiles of 8 (SK_NT); blocks of
    4 warps (64 weight rows) for up to 16 rows of x, 8 warps (128) above, so a block reads at most as many bytes of x
    as of weights; K is cut into slices (whole chunks, at least 256 columns) only until the grid has ~3 blocks a
    multiprocessor. Shared memory: two chunks of x in float32 (SK_XS floats a row)."""
    nt = 1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8
    warps = 4 if nt <= 2 else 8
    kc = 32 * SK_SUB
    tiles = sum(-(-n // (16 * warps)) for n in Ns)
    want = max(1, -(-3 * sms // max(tiles, 1)))
    kchunks = -(-K // kc) * kc
    kslice = min(max(-(-(-(-K // want)) // kc) * kc, 256), kchunks)
    slices = -(-K // kslice)
    if slices > 1 and tiles > SK_COUNTERS:
        slices, kslice = 1, kchunks
    return nt, warps, kslice, slices, 2 * 8 * nt * (kc + 4) * 4


def paged_decode_geometry(Dh: int, g: int) -> tuple[int, int, int, int]:
    """(query heads per block GROUP, blocks per kv head, threads, dynamic shared memory in bytes) of
    paged_attn_decode for head size Dh and GQA group g, mirroring its PD_* macros. A group of up to 16 heads is
    one block (each staged key tile serves all of them); a larger one is cut into equal chunks."""
    chunks = -(-g // PAGED_MAX_GROUP)
    group = -(-g // chunks)
    threads = 256 if group * Dh >= 1024 else 128
    tk = 32 if Dh <= 128 else 16
    if Dh % 4 == 0:  # float4 reads of the keys (PD_KST): a row stride of 4 (mod 8) float4s
        kst = Dh + 4 if Dh % 8 == 0 else Dh + 8
    else:
        kst = Dh + 2 if Dh % 2 else Dh + 1
    return group, chunks, threads, 4 * (group * Dh + tk * kst + tk * Dh + group * tk + 3 * group)


def paged_prefill_smem(Dh: int) -> int:
    """Dynamic shared memory in bytes of paged_attn_prefill (its PP_SMEM_FLOATS) for head size Dh."""
    kst = Dh + 2 if Dh % 2 else Dh + 1
    return 4 * (PAGED_NQ * Dh + 32 * kst + 32 * Dh)


def paged_splits(blocks: int, keys: int, sms: int) -> int:
    """Slices of the keys per decode (row, kv head) block: enough for ~4 blocks per multiprocessor (a block's
    tile loads are not double-buffered, so other resident blocks hide their latency), each slice at least
    PAGED_SPLIT_KEYS keys, at most 64. `blocks` is the grid without splitting, `keys` the longest row's keys."""
    want = -(-4 * sms // max(blocks, 1))
    return max(1, min(64, want, -(-keys // PAGED_SPLIT_KEYS)))
