// Batched steps over the paged KV cache (core/paged.py, core/cuda/paged.py): the T rows of a step belong to
// several sequences, so every row carries its own position and its own cache slot, uploaded once per step.
// Here: RoPE at per-row positions fused with the write into the paged pools (and the optional per-head RMSNorm
// before it), learned positions at per-row positions, and the gather of the rows whose logits a step returns.
// The attention over the pools is paged_attn.cu.
//
// None of these kernels is launched inside a captured decode graph (batched steps run uncaptured), so they
// neither wait for nor trigger programmatic dependent launches.
#include "common.cuh"

// One warp per (row, head) over the H query heads, then the Hkv key heads (a row's value is written by the warp
// of its key head); lanes stride over the R/2 rotated pairs, then over the dims that pass through. For each head:
//   x' = norm(x)              RMSNorm with gain (offset + g) when qn != NULL (Qwen3-style q/k norm), else x
//   y  = rope(x', pos[row])   pairs (i, i + R/2) or, interleaved, (2i, 2i + 1); angle pos * inv_freq[table][i]
//                             (an fp32 product, as transformers), cos and sin times `scale`; dims R.. pass
// Query heads go to qo; key heads to kp at the row's slot, rounded to the pool type, and v copied to vp.
// With H == 0 it is the cache write of k and v (then R == 0: nothing rotates); with Hkv == 0 it is rope() alone.
// Same arithmetic as rope_kv and rope (rope.cu), so a row gets what a solo run computes for it.
extern "C" __global__ void paged_rope_kv(float* __restrict__ qo,             // float32 [T, H, Dh] (NULL if H == 0)
                                         const float* __restrict__ q,        // float32 [T, H, Dh] (NULL if H == 0)
                                         const float* __restrict__ k,        // float32 [T, Hkv, Dh] (NULL: Hkv == 0)
                                         const float* __restrict__ v,        // float32 [T, Hkv, Dh] (NULL: Hkv == 0)
                                         wt* __restrict__ kp,                // wt [num_blocks, Hkv, bs, Dh]: keys
                                         wt* __restrict__ vp,                // wt [num_blocks, Hkv, bs, Dh]: values
                                         const float* __restrict__ inv_freq, // float32 [tables, R / 2]; NULL if R == 0
                                         const int* __restrict__ row_table,  // int32 [T]: each row's table, or NULL (0)
                                         const int* __restrict__ pos,        // int32 [T]: each row's position
                                         const int* __restrict__ slot,       // int32 [T]: block * bs + pos % bs
                                         const wt* __restrict__ qn,          // wt [Dh] q-norm gain, or NULL (no norm)
                                         const wt* __restrict__ kn,          // wt [Dh] k-norm gain (with qn)
                                         float eps, float offset,
                                         int T, int H, int Hkv, int Dh, int bs,
                                         int R,                              // rotated dims: even, <= Dh
                                         int interleaved, float scale) {
    const int lane = threadIdx.x & 31;
    const int heads = H + Hkv;
    const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= (long long)T * heads) return;
    const int t = (int)(w / heads), head = (int)(w % heads);
    const bool isq = head < H;
    const int hk = head - H;
    const float* src = isq ? q + ((size_t)t * H + head) * Dh : k + ((size_t)t * Hkv + hk) * Dh;
    const wt* gain = isq ? qn : kn;
    float inv = 1.f;
    if (qn) {
        float ss = 0.f;
        for (int d = lane; d < Dh; d += 32) ss += src[d] * src[d];
        inv = 1.f / sqrtf(warp_sum(ss) / Dh + eps);  // as rope_kv and norm_rows
    }
    float* yq = isq ? qo + ((size_t)t * H + head) * Dh : nullptr;
    wt* yk = isq ? nullptr : kp + paged_row(slot[t], hk, Hkv, bs, Dh);
    const int half = R / 2;
    const float p = (float)pos[t];
    const float* f = R ? inv_freq + (size_t)(row_table ? row_table[t] : 0) * half : nullptr;
    for (int i = lane; i < half; i += 32) {
        const int j1 = interleaved ? 2 * i : i, j2 = interleaved ? 2 * i + 1 : i + half;
        float x1 = src[j1], x2 = src[j2];
        if (qn) {
            x1 = x1 * inv * (offset + to_f(gain[j1]));
            x2 = x2 * inv * (offset + to_f(gain[j2]));
        }
        float s, c;
        sincosf(p * f[i], &s, &c);  // accurate: angles reach 1e5 rad
        c *= scale;
        s *= scale;
        const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
        if (isq) {
            yq[j1] = y1;
            yq[j2] = y2;
        } else {
            yk[j1] = from_f<wt>(y1);
            yk[j2] = from_f<wt>(y2);
        }
    }
    for (int d = R + lane; d < Dh; d += 32) {
        const float x = qn ? src[d] * inv * (offset + to_f(gain[d])) : src[d];
        if (isq) yq[d] = x;
        else yk[d] = from_f<wt>(x);
    }
    if (!isq) {
        const float* vs = v + ((size_t)t * Hkv + hk) * Dh;
        wt* yv = vp + paged_row(slot[t], hk, Hkv, bs, Dh);
        for (int d = lane; d < Dh; d += 32) yv[d] = from_f<wt>(vs[d]);
    }
}

// Learned absolute positions at per-row positions: out[t] = x[t] + table[pos[t]]. One block per row; threads
// stride over D. (embed.cu's embed does the same for one sequence, positions start..start+T-1.)
extern "C" __global__ void paged_add_positions(float* __restrict__ out,      // float32 [T, D]
                                               const float* __restrict__ x,  // float32 [T, D]
                                               const wt* __restrict__ table, // wt [P, D], every pos[t] < P
                                               const int* __restrict__ pos,  // int32 [T]
                                               int T, int D) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const wt* tr = table + (size_t)pos[t] * D;
    const float* xr = x + (size_t)t * D;
    float* o = out + (size_t)t * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) o[d] = xr[d] + to_f(tr[d]);
}

// out[r] = x[idx[r]] for float32 rows of N values: the rows whose logits a batched step returns (their last
// tokens), gathered before the output projection so that it runs on R rows, not T. One block per output row.
extern "C" __global__ void gather_rows(float* __restrict__ out,      // float32 [R, N]
                                       const float* __restrict__ x,  // float32 [T, N]
                                       const int* __restrict__ idx,  // int32 [R], each in [0, T)
                                       int R, int N) {
    const int r = blockIdx.x;
    if (r >= R) return;
    const float* src = x + (size_t)idx[r] * N;
    float* dst = out + (size_t)r * N;
    if (N % 4 == 0 && aligned16(src) && aligned16(dst)) {
        const float4* s4 = reinterpret_cast<const float4*>(src);
        float4* d4 = reinterpret_cast<float4*>(dst);
        for (int i = threadIdx.x; i < N / 4; i += blockDim.x) d4[i] = s4[i];
    } else {
        for (int i = threadIdx.x; i < N; i += blockDim.x) dst[i] = src[i];
    }
}
