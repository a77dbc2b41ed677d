// float32 matrix product (the fp32 dtype's prefill path): y[m, n] = sum_k x[m, k] * w[n, k] + b[n].
// Classic shared-memory tiling: 64 x 64 output tile, BK = 16, 256 threads each computing 4 x 4 outputs.
// fp32 FMA throughout (no TF32), so results stay within float32 rounding of the numpy reference.
#include "common.cuh"

static_assert(WDTYPE == 0, "gemm_f32.cu multiplies float32 weights; fp16/bf16 use gemm.cu");

#define TM 64
#define TN 64
#define TK 16

extern "C" __global__ void __launch_bounds__(256)
gemm_f32(float* __restrict__ y,        // float32 [M, N]
         const float* __restrict__ x,  // float32 [M, K]
         const float* __restrict__ w,  // float32 [N, K]
         const float* __restrict__ b,  // float32 [N] or NULL
         int M, int N, int K) {
    __shared__ float As[TK][TM + 4];  // transposed: As[k][m]
    __shared__ float Bs[TK][TN + 4];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += TK) {
        // 64 x 16 of each operand: 4 elements per thread, consecutive threads along k for coalescing.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int idx = tid + 256 * i, r = idx >> 4, c = idx & 15, gk = k0 + c;
            As[c][r] = (m0 + r < M && gk < K) ? x[(size_t)(m0 + r) * K + gk] : 0.f;
            Bs[c][r] = (n0 + r < N && gk < K) ? w[(size_t)(n0 + r) * K + gk] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TK; ++k) {
            float a[4], bb[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) bb[j] = Bs[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], bb[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int gm = m0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int gn = n0 + tx + 16 * j;
            if (gm < M && gn < N) y[(size_t)gm * N + gn] = acc[i][j] + (b ? b[gn] : 0.f);
        }
    }
}
