// Tensor-core matrix product for prefill: y[m, n] = sum_k x[m, k] * w[n, k] + b[n], x float32, w fp16/bf16.
// WMMA 16x16x16 fragments with fp32 accumulation. x is rounded to w's type as it is staged in shared
// memory (what a half-precision framework does to its activations). Tiles BM x BN x BK, 8 warps in a
// 2 x 4 grid, each owning a 64 x 32 piece; the next K tile is fetched into registers while the current one
// is multiplied (double-buffered shared memory, one barrier per K step). Any M, N, K: edges are zero-filled.
#include <mma.h>
#include "common.cuh"

static_assert(WDTYPE != 0, "gemm.cu is the half-precision tensor-core path; float32 uses gemm_f32.cu");

#ifndef BM
#define BM 128
#endif
#ifndef BN
#define BN 128
#endif
#define BK 32
#define LDS (BK + 8)  // padded row (80 bytes): keeps WMMA's 32-byte pointer alignment, spreads banks
static_assert(BM == 128 && BN == 128, "the warp layout below assumes 128 x 128 tiles");

using namespace nvcuda;

// Two blocks per SM (<= 128 registers) so one block's loads overlap the other's math.
extern "C" __global__ void __launch_bounds__(256, 2)
gemm(float* __restrict__ y,        // float32 [M, N]
     const float* __restrict__ x,  // float32 [M, K]
     const wt* __restrict__ w,     // wt [N, K]
     const wt* __restrict__ b,     // wt [N] or NULL
     int M, int N, int K) {
    __shared__ __align__(128) wt As[2][BM][LDS];
    __shared__ __align__(128) wt Bs[2][BN][LDS];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 2, wn = warp & 3;  // this warp's 64 x 32 piece
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const bool avec = (K % 4 == 0) && aligned16(x);
    const bool bvec = (K % 8 == 0) && aligned16(w);

    // Per thread: 4 float4 of A (rows tid/8 + 32 i, cols (tid%8)*4) and 2 x 8 wt of B (rows tid/4 + 64 i).
    float4 ra[4];
    uint4 rb[2];
    auto fetch = [&](int k0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int r = (tid >> 3) + 32 * i, c = (tid & 7) * 4, gm = m0 + r, gk = k0 + c;
            if (avec && gm < M && gk + 3 < K) {
                ra[i] = *reinterpret_cast<const float4*>(x + (size_t)gm * K + gk);
            } else {
                float v[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) v[e] = (gm < M && gk + e < K) ? x[(size_t)gm * K + gk + e] : 0.f;
                ra[i] = make_float4(v[0], v[1], v[2], v[3]);
            }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            int r = (tid >> 2) + 64 * i, c = (tid & 3) * 8, gn = n0 + r, gk = k0 + c;
            if (bvec && gn < N && gk + 7 < K) {
                rb[i] = __ldg(reinterpret_cast<const uint4*>(w + (size_t)gn * K + gk));
            } else {
                union { uint4 u; wt h[8]; } v;  // a union keeps the 16-byte alignment of the vector
#pragma unroll
                for (int e = 0; e < 8; ++e) v.h[e] = (gn < N && gk + e < K) ? w[(size_t)gn * K + gk + e] : from_f<wt>(0.f);
                rb[i] = v.u;
            }
        }
    };
    auto stash = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int r = (tid >> 3) + 32 * i, c = (tid & 7) * 4;
            union { uint2 u; wt h[4]; } v;
            v.h[0] = from_f<wt>(ra[i].x), v.h[1] = from_f<wt>(ra[i].y), v.h[2] = from_f<wt>(ra[i].z), v.h[3] = from_f<wt>(ra[i].w);
            *reinterpret_cast<uint2*>(&As[buf][r][c]) = v.u;
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            int r = (tid >> 2) + 64 * i, c = (tid & 3) * 8;
            *reinterpret_cast<uint4*>(&Bs[buf][r][c]) = rb[i];
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    const int ktiles = (K + BK - 1) / BK;
    fetch(0);
    stash(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
        const int cur = kt & 1;
        if (kt + 1 < ktiles) fetch((kt + 1) * BK);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, wt, wmma::row_major> fa[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, wt, wmma::col_major> fb[2];
#pragma unroll
            for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &As[cur][wm * 64 + i * 16][kk], LDS);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[cur][wn * 32 + j * 16][kk], LDS);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        if (kt + 1 < ktiles) stash(cur ^ 1);
        __syncthreads();
    }

    // Epilogue through a per-warp 16 x 16 float scratch (reusing As): bias, bounds, store.
    float* scratch = reinterpret_cast<float*>(&As[0][0][0]) + warp * 256;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            int gm0 = m0 + wm * 64 + i * 16, gn0 = n0 + wn * 32 + j * 16;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                int idx = lane + 32 * e, r = idx >> 4, c = idx & 15, gm = gm0 + r, gn = gn0 + c;
                if (gm < M && gn < N) y[(size_t)gm * N + gn] = scratch[idx] + (b ? to_f(b[gn]) : 0.f);
            }
            __syncwarp();
        }
    }
}
