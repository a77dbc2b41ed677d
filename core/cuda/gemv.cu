// Matrix-vector product for decode (and other few-token calls): y[t, n] = sum_k x[t, k] * w[n, k] + b[n].
// Batch-1 decode reads every weight once per token, so this kernel is bound by memory bandwidth: one
// warp per output row, 128-bit weight loads, several loads in flight per lane, fp32 accumulation.
#include "common.cuh"

#ifndef GEMV_MAX_T
#define GEMV_MAX_T 4  // tokens handled per weight read; the backend routes larger T to the GEMM
#endif
#ifndef GEMV_WARPS
#define GEMV_WARPS 8  // rows per block
#endif
static_assert(GEMV_MAX_T >= 1 && GEMV_MAX_T <= 16, "GEMV_MAX_T must be in [1, 16]");
static_assert(GEMV_WARPS >= 1 && GEMV_WARPS <= 32, "GEMV_WARPS must be in [1, 32]");

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv(float* __restrict__ y,        // float32 [T, N]
     const float* __restrict__ x,  // float32 [T, K]
     const wt* __restrict__ w,     // wt [N, K]
     const wt* __restrict__ b,     // wt [N] or NULL
     int T, int N, int K) {        // T <= GEMV_MAX_T
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= N) return;
    const wt* wr = w + (size_t)row * K;
    float acc[GEMV_MAX_T];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_T; ++t) acc[t] = 0.f;
    // Rows of x are float4-aligned when K is a multiple of VEC (>= 4) and x itself is.
    bool vec = (K % VEC == 0) && aligned16(wr) && aligned16(x);
    if (vec) {
#pragma unroll 4
        for (int k = lane * VEC; k < K; k += 32 * VEC) {
            float wf[VEC];
            load_vec(wr + k, wf);
#pragma unroll
            for (int t = 0; t < GEMV_MAX_T; ++t) {
                if (t < T) {
                    const float4* xp = reinterpret_cast<const float4*>(x + (size_t)t * K + k);
#pragma unroll
                    for (int e = 0; e < VEC / 4; ++e) {
                        float4 xv = xp[e];
                        acc[t] += wf[4 * e] * xv.x + wf[4 * e + 1] * xv.y + wf[4 * e + 2] * xv.z + wf[4 * e + 3] * xv.w;
                    }
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            float wv = to_f(wr[k]);
#pragma unroll
            for (int t = 0; t < GEMV_MAX_T; ++t)
                if (t < T) acc[t] += wv * x[(size_t)t * K + k];
        }
    }
    float bias = (b && lane == 0) ? to_f(b[row]) : 0.f;
#pragma unroll
    for (int t = 0; t < GEMV_MAX_T; ++t) {
        if (t < T) {
            float v = warp_sum(acc[t]);
            if (lane == 0) y[(size_t)t * N + row] = v + bias;
        }
    }
}
