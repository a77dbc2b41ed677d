// The matrix product of a batched decode step: y [M, N] = x [M, K] @ w [N, K]^T (+ b) for a few rows
// (GEMV_MAX_T < M <= 64; issue 15), on tensor cores, reading every weight once.
//
// Why not cuBLAS: at these shapes (M = 8-64 rows, N and K of 2,048-14,336) the product is a weight stream with a
// little arithmetic on the side, 2M FLOPs a weight; cuBLAS's kernels moved TinyLlama's 2.2 GB a step at 55% (M = 16)
// and 64% (M = 64) of an H100's copy bandwidth, and the backend first rounded x to the weight type in a separate
// kernel before each product (BENCHMARKS.md, issue 15). Here the weights go from global memory straight into
// mma.sync operands (no shared memory, no ldmatrix), x is rounded to the weight type as the operands are built, and up
// to three products of the same x (q, k, v; gate, up) share one launch.
//
// Fragments (PTX ISA, mma.m16n8k16, 16-bit A and B): lane l = 4 g + t holds A rows g and g + 8, B column g, C rows
// g, g + 8 and columns 2 t, 2 t + 1. Which k an operand slot stands for is free as long as A and B agree, so lane t
// reads 8 consecutive k, 8 t .. 8 t + 7 of a 32-k sub-step, as one 16-byte load of each of its two weight rows and
// the same 8 columns of each of its x rows (two 16-byte shared-memory loads of float32, packed into 4 registers of
// the weight type): register i (two k) feeds product i / 2, slot pair 2 t (i even) or 2 t + 8 (i odd). A warp owns
// 16 weight rows (one A tile) and all the x rows (SK_NT tiles of 8).
//
// A block (SK_WARPS warps, 16 SK_WARPS rows) takes one slice of K (`kslice` columns) in chunks of SK_KC = 32 SK_SUB
// columns: x's next chunk is copied to shared memory (float32, cp.async, double-buffered; rows past M and columns
// past K zero) while the current one is used, and the next chunk's weights (SK_SUB sub-steps of both rows) are
// loaded into registers before the current chunk's products. (A first version staged x with plain loads and stores
// before streaming the weights: each thread's dozens of dependent L2 round trips made batched decode steps 1.12x
// (16 rows) and 1.74x (64 rows) as long as with cuBLAS on an H100, BENCHMARKS.md.) Grids whose row tiles
// alone cannot fill the card split K (gridDim.y > 1): each block writes its partial sums, and the block that
// finishes a tile last (a counter per tile, left at zero for the next launch) adds the slices in order, so the result
// does not depend on timing. fp32 accumulation; x rounded to the weight type exactly as the cuBLAS path rounds it.
#include "common.cuh"

#ifndef SK_NT
#define SK_NT 2  // tiles of 8 x rows: the build takes M <= 8 SK_NT
#endif
#ifndef SK_WARPS
#define SK_WARPS 4  // warps a block, 16 weight rows each
#endif
#ifndef SK_SUB
#define SK_SUB 4  // 32-k sub-steps of weight loads a warp has in flight
#endif
#define SK_ROWS (16 * SK_WARPS)
#define SK_KC (32 * SK_SUB)  // columns a chunk
#define SK_XS (SK_KC + 4)    // floats a staged x row: a stride of 16 bytes mod 128, so a quarter-warp's 16-byte reads
                             // (two rows, four lanes 32 bytes apart each) fall in distinct banks
static_assert(WDTYPE == 1 || WDTYPE == 2, "skinny.cu: half-precision weights only (float32 takes the SIMT GEMM)");
static_assert(SK_NT >= 1 && SK_NT <= 8 && SK_WARPS >= 1 && SK_WARPS <= 8 && SK_SUB >= 1 && SK_SUB <= 8,
              "SK_NT, SK_WARPS, SK_SUB in [1, 8]");

__device__ __forceinline__ void sk_mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
#if WDTYPE == 1
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// 16 bytes of global memory to shared memory, asynchronously; src_bytes 0 writes zeros (and reads nothing).
__device__ __forceinline__ void sk_cp16(void* dst, const void* src, int src_bytes) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}

// Two float32 as the weight type's pair in one register (low half first), each rounded to nearest as from_f rounds.
__device__ __forceinline__ uint32_t sk_pack(float lo, float hi) {
#if WDTYPE == 1
    const __half2 h = __floats2half2_rn(lo, hi);
#else
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
#endif
    return *reinterpret_cast<const uint32_t*>(&h);
}

// Weight loads stream past L1: each weight is read once a launch.
__device__ __forceinline__ uint4 sk_load(const wt* p) {
    uint4 u;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w) : "l"(p));
    return u;
}

// The SK_SUB sub-steps of weight rows g and g + 8 from k (relative to the block's slice start) on; zero past the
// slice's kl columns or the product's rows.
__device__ __forceinline__ void sk_fetch(uint4 (&a)[SK_SUB], uint4 (&b)[SK_SUB], const wt* wa, const wt* wb, bool ra,
                                         bool rb, int k, int kl, int t) {
#pragma unroll
    for (int u = 0; u < SK_SUB; ++u) {
        const int c = k + 32 * u;  // sub-step u's first column (wa, wb already point 8 t further)
        const bool in = c + 8 * t < kl;  // all 8 of the lane's columns or none: kl is a multiple of 8
        a[u] = ra && in ? sk_load(wa + c) : make_uint4(0, 0, 0, 0);
        b[u] = rb && in ? sk_load(wb + c) : make_uint4(0, 0, 0, 0);
    }
}

extern "C" __global__ void __launch_bounds__(32 * SK_WARPS, SK_WARPS > 4 ? 2 : 1)  // (8 warps: <= 128 registers)
skinny_linear(const float* __restrict__ x,  // float32 [M, K]
              int M, int K,
              int kslice,                   // columns of K per block (gridDim.y slices), a multiple of SK_KC
              float* __restrict__ part,     // float32 [gridDim.y, gridDim.x, 8 SK_NT, SK_ROWS]: slices > 1
              int* __restrict__ count,      // int32 [gridDim.x], zero; left at zero
              // up to three products of x, whose row tiles follow each other along gridDim.x:
              float* y0, const wt* w0, const wt* b0, int N0,  // float32 [M, N0]; wt [N0, K]; wt [N0] or null
              float* y1, const wt* w1, const wt* b1, int N1,
              float* y2, const wt* w2, const wt* b2, int N2) {
    extern __shared__ __align__(16) float sk_smem[];  // float32 [2][8 SK_NT][SK_XS]: x's chunks, double-buffered
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;

    // this tile's product
    int tile = blockIdx.x;
    float* y = y0; const wt* w = w0; const wt* b = b0; int N = N0;
    const int t0 = (N0 + SK_ROWS - 1) / SK_ROWS, t1 = (N1 + SK_ROWS - 1) / SK_ROWS;
    if (tile >= t0) {
        tile -= t0; y = y1; w = w1; b = b1; N = N1;
        if (tile >= t1) { tile -= t1; y = y2; w = w2; b = b2; N = N2; }
    }
    const int row = tile * SK_ROWS + 16 * warp + g;  // this lane's first weight row (the other is row + 8)
    const int k0 = blockIdx.y * kslice;
    const int kl = min(kslice, K - k0);  // columns of this slice (a multiple of 8: K is)
    const bool ra = row < N, rb = row + 8 < N;
    const wt* wa = w + (size_t)(ra ? row : 0) * K + k0 + 8 * t;
    const wt* wb = w + (size_t)(rb ? row + 8 : 0) * K + k0 + 8 * t;

    // chunk c of x (columns c SK_KC .. of the slice) into buffer c & 1: 16 bytes a copy, zeros past M and the slice
    auto stage = [&](int c) {
        float* buf = sk_smem + (c & 1) * (8 * SK_NT * SK_XS);
        for (int i = threadIdx.x; i < 8 * SK_NT * (SK_KC / 4); i += 32 * SK_WARPS) {
            const int m = i / (SK_KC / 4), col = 4 * (i % (SK_KC / 4));
            const int kc = c * SK_KC + col;
            const bool in = m < M && kc < kl;  // (kl % 8 == 0: four columns are all in or all out)
            sk_cp16(buf + m * SK_XS + col, in ? x + (size_t)m * K + k0 + kc : x, in ? 16 : 0);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };

    uint4 a[SK_SUB], bb[SK_SUB];
    sk_fetch(a, bb, wa, wb, ra, rb, 0, kl, t);
    stage(0);
    float acc[SK_NT][4];
#pragma unroll
    for (int j = 0; j < SK_NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    const int chunks = (kl + SK_KC - 1) / SK_KC;
    for (int c = 0; c < chunks; ++c) {
        if (c + 1 < chunks) {
            stage(c + 1);  // (its buffer was last read in chunk c - 1, before that chunk's closing barrier)
            asm volatile("cp.async.wait_group 1;" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        __syncthreads();  // chunk c is in shared memory, from every thread's copies
        uint4 na[SK_SUB], nb[SK_SUB];
        sk_fetch(na, nb, wa, wb, ra, rb, (c + 1) * SK_KC, kl, t);  // (zeros, no loads, past the slice)
        const float* xl = sk_smem + (c & 1) * (8 * SK_NT * SK_XS) + g * SK_XS + 8 * t;
#pragma unroll
        for (int u = 0; u < SK_SUB; ++u) {
            if (c * SK_KC + 32 * u < kl) {  // (uniform across the warp)
#pragma unroll
                for (int j = 0; j < SK_NT; ++j) {
                    const float4 x0 = *reinterpret_cast<const float4*>(xl + 8 * j * SK_XS + 32 * u);
                    const float4 x1 = *reinterpret_cast<const float4*>(xl + 8 * j * SK_XS + 32 * u + 4);
                    sk_mma(acc[j], a[u].x, bb[u].x, a[u].y, bb[u].y, sk_pack(x0.x, x0.y), sk_pack(x0.z, x0.w));
                    sk_mma(acc[j], a[u].z, bb[u].z, a[u].w, bb[u].w, sk_pack(x1.x, x1.y), sk_pack(x1.z, x1.w));
                }
            }
        }
#pragma unroll
        for (int u = 0; u < SK_SUB; ++u) { a[u] = na[u]; bb[u] = nb[u]; }
        __syncthreads();  // every warp is done with buffer c & 1 before chunk c + 2 is copied into it
    }

    // acc[j]: rows row (0, 1) and row + 8 (2, 3), x rows 8 j + 2 t and 8 j + 2 t + 1
    const int r16 = 16 * warp + g;  // the lane's row within the tile
    if (gridDim.y == 1) {
        const float ba = ra && b ? to_f(b[row]) : 0.f, bbias = rb && b ? to_f(b[row + 8]) : 0.f;
#pragma unroll
        for (int j = 0; j < SK_NT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int m = 8 * j + 2 * t + e;
                if (m < M) {
                    if (ra) y[(size_t)m * N + row] = acc[j][e] + ba;
                    if (rb) y[(size_t)m * N + row + 8] = acc[j][2 + e] + bbias;
                }
            }
        }
        return;
    }
    float* mine = part + ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * (8 * SK_NT * SK_ROWS);
#pragma unroll
    for (int j = 0; j < SK_NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int m = 8 * j + 2 * t + e;
            mine[m * SK_ROWS + r16] = acc[j][e];
            mine[m * SK_ROWS + r16 + 8] = acc[j][2 + e];
        }
    }
    __threadfence();  // the partial sums are visible before the counter says so
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(count + blockIdx.x, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int rows = min(SK_ROWS, N - tile * SK_ROWS);
    for (int i = threadIdx.x; i < M * SK_ROWS; i += 32 * SK_WARPS) {
        const int m = i / SK_ROWS, r = i % SK_ROWS;
        if (r >= rows) continue;
        float s = 0.f;
        for (int sl = 0; sl < (int)gridDim.y; ++sl)  // slices in order: the sum does not depend on who came last
            s += __ldcg(part + ((size_t)sl * gridDim.x + blockIdx.x) * (8 * SK_NT * SK_ROWS) + m * SK_ROWS + r);
        const int n = tile * SK_ROWS + r;
        y[(size_t)m * N + n] = s + (b ? to_f(b[n]) : 0.f);
    }
    if (threadIdx.x == 0) count[blockIdx.x] = 0;
}
