// LayerNorm and RMSNorm over rows, optionally fused with the residual add that precedes them:
//   s = x + delta (written to xsum), y = norm(s) * (offset + w) (+ b).
// Also serves per-head RMSNorm (rows = T * heads, D = head_dim), and head_norm the other per-head norms (LayerNorm,
// biases, a gain per head). Variance is two-pass in fp32, as torch.
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
    pdl_wait();
    pdl_launch();
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

// norm_reg: the same op for rows with D % 4 == 0 and 16-byte aligned rows, D <= 4 * NORM_VPT * 1024: the
// row is read once with float4 loads and kept in registers (NORM_VPT float4 per thread), so a row costs one
// load round trip and the block reductions instead of two or three passes over memory. One block per row,
// blockDim.x >= D / (4 * NORM_VPT). Decode (one row) is latency-bound: this shortens the critical path.
#ifndef NORM_VPT
#define NORM_VPT 2
#endif
static_assert(NORM_VPT >= 1 && NORM_VPT <= 8, "NORM_VPT must be in [1, 8]");

extern "C" __global__ void norm_reg(float* __restrict__ y,            // float32 [R, D]
                                    float* __restrict__ xsum,         // float32 [R, D] x + delta, or NULL
                                    const float* __restrict__ x,      // float32 [R, D]
                                    const float* __restrict__ delta,  // float32 [R, D] or NULL
                                    const wt* __restrict__ w,         // wt [D]
                                    const wt* __restrict__ b,         // wt [D] or NULL (LayerNorm bias)
                                    int R, int D, int rms, float eps, float offset) {
    pdl_wait();
    pdl_launch();
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= R) return;
    int n4 = D / 4;
    const float4* xr = reinterpret_cast<const float4*>(x + (size_t)r * D);
    const float4* dr = delta ? reinterpret_cast<const float4*>(delta + (size_t)r * D) : nullptr;
    float4* sr = xsum ? reinterpret_cast<float4*>(xsum + (size_t)r * D) : nullptr;
    float4 v[NORM_VPT];
    float sum = 0.f, sumsq = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_VPT; ++j) {
        int c = threadIdx.x + j * blockDim.x;
        v[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (c < n4) {
            v[j] = xr[c];
            if (dr) {
                float4 d = dr[c];
                v[j].x += d.x, v[j].y += d.y, v[j].z += d.z, v[j].w += d.w;
            }
            if (sr) sr[c] = v[j];
        }
        sum += (v[j].x + v[j].y) + (v[j].z + v[j].w);
        sumsq += (v[j].x * v[j].x + v[j].y * v[j].y) + (v[j].z * v[j].z + v[j].w * v[j].w);
    }
    float mean = 0.f, var;
    if (rms) {
        var = block_sum(sumsq, scratch) / D;
    } else {
        mean = block_sum(sum, scratch) / D;
        float dev = 0.f;
#pragma unroll
        for (int j = 0; j < NORM_VPT; ++j)
            if (threadIdx.x + j * blockDim.x < n4) {
                float a = v[j].x - mean, bb = v[j].y - mean, c = v[j].z - mean, d = v[j].w - mean;
                dev += (a * a + bb * bb) + (c * c + d * d);
            }
        var = block_sum(dev, scratch) / D;
    }
    float inv = 1.f / sqrtf(var + eps);
    float4* yr = reinterpret_cast<float4*>(y + (size_t)r * D);
#pragma unroll
    for (int j = 0; j < NORM_VPT; ++j) {
        int c = threadIdx.x + j * blockDim.x;
        if (c >= n4) continue;
        float o[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            o[e] = (o[e] - mean) * inv * (offset + to_f(w[4 * c + e]));
            if (b) o[e] += to_f(b[4 * c + e]);
        }
        yr[c] = make_float4(o[0], o[1], o[2], o[3]);
    }
}

// head_norm: RMSNorm or LayerNorm of each head of x [T, H, Dh] over Dh (row r = t * H + head), with a gain and a
// LayerNorm bias shared by the heads ([Dh], wstride 0) or one per head ([H, Dh], wstride Dh). One warp per row;
// two-pass variance in fp32, as norm_rows. (Shared RMSNorm gains without a bias, Qwen3's, go to norm_rows.)
extern "C" __global__ void head_norm(float* __restrict__ y,        // float32 [R, Dh], R = T * H
                                     const float* __restrict__ x,  // float32 [R, Dh]
                                     const wt* __restrict__ w,     // wt [Dh] or [H, Dh]
                                     const wt* __restrict__ b,     // wt like w (LayerNorm bias), or NULL
                                     int R, int H, int Dh,
                                     int wstride,                  // 0: w and b shared; Dh: one row per head
                                     int rms,                      // 1 RMSNorm, 0 LayerNorm
                                     float eps, float offset) {    // weight applied as (offset + w)
    pdl_wait();
    pdl_launch();
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= R) return;  // (whole warps: r is the warp's)
    const float* xr = x + (size_t)r * Dh;
    const size_t wo = (size_t)(r % H) * wstride;
    float mean = 0.f, var;
    if (rms) {
        float ss = 0.f;
        for (int d = lane; d < Dh; d += 32) ss += xr[d] * xr[d];
        var = warp_sum(ss) / Dh;
    } else {
        float sum = 0.f;
        for (int d = lane; d < Dh; d += 32) sum += xr[d];
        mean = warp_sum(sum) / Dh;
        float dev = 0.f;
        for (int d = lane; d < Dh; d += 32) dev += (xr[d] - mean) * (xr[d] - mean);
        var = warp_sum(dev) / Dh;
    }
    const float inv = 1.f / sqrtf(var + eps);
    float* yr = y + (size_t)r * Dh;
    for (int d = lane; d < Dh; d += 32) {
        float o = (xr[d] - mean) * inv * (offset + to_f(w[wo + d]));
        if (b) o += to_f(b[wo + d]);
        yr[d] = o;
    }
}
