// Rotary position embedding of the first R dims of each head (dims R..Dh-1 pass through). For i < R/2 at
// position p, a = p * inv_freq[i] (fp32 product, as transformers), c = cos(a) * scale, s = sin(a) * scale, and the
// pair (j1, j2) = (i, i + R/2) (rotate-half: GPT-NeoX / HF Llama) or (2i, 2i + 1) (interleaved: GPT-J):
//   y[j1] = x[j1] c - x[j2] s, y[j2] = x[j2] c + x[j1] s.
// inv_freq carries any frequency scaling (linear, llama3, yarn, dynamic, longrope) already; scale is the table's
// cos / sin multiplier (transformers' attention_scaling; 1 is exact, so a plain table computes what it did).
#include "common.cuh"

// One block per (token, head); threads stride over the R/2 pairs, then over the pass-through dims. Accurate
// sincosf: angles reach 1e5 rad.
extern "C" __global__ void rope(float* __restrict__ y,               // float32 [T, H, Dh]
                                const float* __restrict__ x,         // float32 [T, H, Dh]
                                const float* __restrict__ inv_freq,  // float32 [R / 2]
                                int start,                           // position of token 0 (if start_dev is NULL)
                                const int* __restrict__ start_dev,   // int32 [1] or NULL (graph capture)
                                int T, int H, int Dh,
                                int R,                               // rotated dims: even, <= Dh
                                int interleaved,                     // 1: pairs (2i, 2i+1); 0: (i, i + R/2)
                                float scale) {                       // cos and sin multiplied by it
    pdl_wait();
    pdl_launch();
    int t = blockIdx.x / H;
    if (t >= T) return;
    int h = R / 2;
    float p = (float)(start_pos(start, start_dev) + t);
    const float* xr = x + (size_t)blockIdx.x * Dh;
    float* yr = y + (size_t)blockIdx.x * Dh;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        c *= scale;
        s *= scale;
        const int j1 = interleaved ? 2 * i : i, j2 = interleaved ? 2 * i + 1 : i + h;
        float x1 = xr[j1], x2 = xr[j2];
        yr[j1] = x1 * c - x2 * s;
        yr[j2] = x2 * c + x1 * s;
    }
    for (int d = R + threadIdx.x; d < Dh; d += blockDim.x) yr[d] = xr[d];
}

// rope_kv: rotate-half RoPE over the whole head (R = Dh, scale 1: the backend sends other tables to the rope
// kernel above) on q and k fused with the KV-cache write (and, optionally, the per-head RMSNorm of q and k
// that comes before RoPE in QK-norm models), one launch instead of up to five:
//   qo = rope(norm_q(q)); cache k[:, pos] = rope(norm_k(k)), cache v[:, pos] = v, in the cache's type.
// One warp per (token, head) over the H query heads then the Hkv key heads; lanes stride over the Dh/2
// pairs. The norm is RMSNorm with weight (offset + w), as norm_rows does for head_norm.
extern "C" __global__ void rope_kv(float* __restrict__ qo,             // float32 [T, H, Dh]
                                   const float* __restrict__ q,        // float32 [T, H, Dh]
                                   const float* __restrict__ k,        // float32 [T, Hkv, Dh]
                                   const float* __restrict__ v,        // float32 [T, Hkv, Dh]
                                   wt* __restrict__ kc,                // wt [Hkv, S, Dh]
                                   wt* __restrict__ vc,                // wt [Hkv, S, Dh]
                                   const float* __restrict__ inv_freq, // float32 [Dh / 2]
                                   const wt* __restrict__ qn,          // wt [Dh] q-norm weight, or NULL (no norm)
                                   const wt* __restrict__ kn,          // wt [Dh] k-norm weight (with qn)
                                   float eps, float offset,
                                   int start,                          // position of token 0 (if start_dev is NULL)
                                   const int* __restrict__ start_dev,  // int32 [1] or NULL (graph capture)
                                   int T, int H, int Hkv, int S, int Dh) {  // start + T <= S, Dh even
    pdl_wait();
    pdl_launch();
    int lane = threadIdx.x & 31;
    int head = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int t = blockIdx.y;
    if (head >= H + Hkv || t >= T) return;
    int h = Dh / 2, pos = start_pos(start, start_dev) + t;
    bool isq = head < H;
    int hk = head - H;
    const float* src = isq ? q + ((size_t)t * H + head) * Dh : k + ((size_t)t * Hkv + hk) * Dh;
    const wt* nw = isq ? qn : kn;
    float inv = 1.f;
    if (qn) {
        float ss = 0.f;
        for (int d = lane; d < Dh; d += 32) ss += src[d] * src[d];
        inv = 1.f / sqrtf(warp_sum(ss) / Dh + eps);
    }
    size_t ci = ((size_t)hk * S + pos) * Dh;
    for (int i = lane; i < h; i += 32) {
        float x1 = src[i], x2 = src[i + h];
        if (qn) {
            x1 = x1 * inv * (offset + to_f(nw[i]));
            x2 = x2 * inv * (offset + to_f(nw[i + h]));
        }
        float s, c;
        sincosf((float)pos * inv_freq[i], &s, &c);
        float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
        if (isq) {
            float* dst = qo + ((size_t)t * H + head) * Dh;
            dst[i] = y1;
            dst[i + h] = y2;
        } else {
            const float* vs = v + ((size_t)t * Hkv + hk) * Dh;
            kc[ci + i] = from_f<wt>(y1);
            kc[ci + i + h] = from_f<wt>(y2);
            vc[ci + i] = from_f<wt>(vs[i]);
            vc[ci + i + h] = from_f<wt>(vs[i + h]);
        }
    }
}
