// LayerNorm and RMSNorm over rows, optionally fused with the residual add that precedes them:
//   s = x + delta (written to xsum), y = norm(s) * (offset + w) (+ b).
// Also serves per-head RMSNorm (rows = T * heads, D = head_dim). Variance is two-pass in fp32, as torch.
#include "common.cuh"

// One block per row; the row is re-read from global memory (L1/L2-resident) in each pass.
extern "C" __global__ void norm_rows(float* __restrict__ y,            // float32 [R, D]
                                     float* __restrict__ xsum,         // float32 [R, D] x + delta, or NULL
                                     const float* __restrict__ x,      // float32 [R, D]
                                     const float* __restrict__ delta,  // float32 [R, D] or NULL
                                     const wt* __restrict__ w,         // wt [D]
                                     const wt* __restrict__ b,         // wt [D] or NULL (LayerNorm bias)
                                     int R, int D,
                                     int rms,                          // 1 RMSNorm, 0 LayerNorm
                                     float eps, float offset) {        // weight applied as (offset + w)
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= R) return;
    const float* xr = x + (size_t)r * D;
    const float* dr = delta ? delta + (size_t)r * D : nullptr;
    float* sr = xsum ? xsum + (size_t)r * D : nullptr;
    float sum = 0.f, sumsq = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = xr[d];
        if (dr) v += dr[d];
        if (sr) sr[d] = v;
        sum += v;
        sumsq += v * v;
    }
    float mean = 0.f, var;
    if (rms) {
        var = block_sum(sumsq, scratch) / D;
    } else {
        mean = block_sum(sum, scratch) / D;
        float dev = 0.f;
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            float v = xr[d];
            if (dr) v += dr[d];
            dev += (v - mean) * (v - mean);
        }
        var = block_sum(dev, scratch) / D;
    }
    float inv = 1.f / sqrtf(var + eps);
    float* yr = y + (size_t)r * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = xr[d];
        if (dr) v += dr[d];
        float o = (v - mean) * inv * (offset + to_f(w[d]));
        if (b) o += to_f(b[d]);
        yr[d] = o;
    }
}
