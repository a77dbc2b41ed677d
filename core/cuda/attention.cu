// Causal attention with grouped-query heads over the head-major KV cache, fp32 softmax and accumulation.
//   q [T, H, Dh] at positions start..start+T-1; query t sees keys 0..start+t; query head h reads kv head
//   h / (H / Hkv). With a sliding window W > 0 it sees only keys start+t-W+1..start+t; with softcap c > 0
//   scores s become c * tanh(s / c) before the mask. Scores use the online (running max) softmax, so no
//   T x S matrix is ever stored.
// attn_prefill: T > 1. A block takes 16 queries of one head and walks 32-key tiles staged in shared
//   memory as fp32; in each tile lane j owns key j (its score for each of the warp's 4 queries), then
//   every lane accumulates its Dh/32 output dims over the tile's keys.
// attn_decode + attn_combine: T == 1 (split-KV, "flash-decoding"): each block reduces one slice of the
//   keys to (max, sum, unnormalised output); the combine kernel merges the slices.
#include "common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
static_assert(HEAD_DIM >= 1 && HEAD_DIM <= 512, "HEAD_DIM must be in [1, 512]");

#define DH HEAD_DIM
#define DPL ((DH + 31) / 32)  // output dims per lane
#define NWARP 4
#define QPW 4                 // queries per warp (prefill)
#define NQ (NWARP * QPW)      // queries per block (prefill)
#define BK 32                 // keys per tile: one per lane
#define DHP (DH % 2 ? DH + 2 : DH + 1)  // odd row stride: lane j reading row j, column d hits distinct banks

// Shared memory for attn_prefill in floats: q (scaled) [NQ][DH], K [BK][DHP], V [BK][DH].
#define PREFILL_SMEM_FLOATS (NQ * DH + BK * DHP + BK * DH)

// Keys [k0, k0 + n) of one kv head into shared memory as fp32 (K rows padded to DHP).
__device__ __forceinline__ void stage_kv(float* ks, float* vs, const wt* kh, const wt* vh, int k0, int n) {
    if (DH % VEC == 0) {
        constexpr int CPR = DH / VEC;  // 16-byte chunks per row
        for (int c = threadIdx.x; c < n * CPR; c += blockDim.x) {
            int j = c / CPR, d = (c % CPR) * VEC;
            float f[VEC];
            load_vec(kh + (size_t)(k0 + j) * DH + d, f);
#pragma unroll
            for (int e = 0; e < VEC; ++e) ks[j * DHP + d + e] = f[e];
            load_vec(vh + (size_t)(k0 + j) * DH + d, f);
#pragma unroll
            for (int e = 0; e < VEC; ++e) vs[j * DH + d + e] = f[e];
        }
    } else {
        for (int c = threadIdx.x; c < n * DH; c += blockDim.x) {
            int j = c / DH, d = c % DH;
            ks[j * DHP + d] = to_f(kh[(size_t)(k0 + j) * DH + d]);
            vs[j * DH + d] = to_f(vh[(size_t)(k0 + j) * DH + d]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(NWARP * 32)
attn_prefill(float* __restrict__ out,      // float32 [T, H, Dh]
             const float* __restrict__ q,  // float32 [T, H, Dh]
             const wt* __restrict__ kc,    // wt [Hkv, S, Dh]
             const wt* __restrict__ vc,    // wt [Hkv, S, Dh]
             int start, const int* __restrict__ start_dev,  // position of query 0 (device value if given)
             int T, int H, int Hkv, int S, float scale,   // start + T <= S
             int window, float softcap) {                  // 0: no sliding window / no soft-capping
    extern __shared__ float smem[];
    float* qs = smem;
    float* ks = qs + NQ * DH;
    float* vs = ks + BK * DHP;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int h = blockIdx.y, hk = h / (H / Hkv), t0 = blockIdx.x * NQ;
    const int st = start_pos(start, start_dev);
    const wt* kh = kc + (size_t)hk * S * DH;
    const wt* vh = vc + (size_t)hk * S * DH;

    for (int c = threadIdx.x; c < NQ * DH; c += blockDim.x) {
        int i = c / DH, t = t0 + i;
        qs[c] = t < T ? q[((size_t)t * H + h) * DH + c % DH] * scale : 0.f;
    }
    const int tw = t0 + warp * QPW;                       // this warp's first query
    const int wlast = min(tw + QPW, T) - 1;               // its last valid query (< tw if none)
    const int nkeys = st + min(t0 + NQ, T);               // keys this block needs (end)
    const int kfirst = window > 0 ? max(0, st + t0 - window + 1) / BK * BK : 0;  // (start, tile-aligned)
    float m[QPW], l[QPW], o[QPW][DPL];
#pragma unroll
    for (int a = 0; a < QPW; ++a) {
        m[a] = -INFINITY;
        l[a] = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[a][i] = 0.f;
    }

    for (int k0 = kfirst; k0 < nkeys; k0 += BK) {
        const int n = min(BK, nkeys - k0);
        __syncthreads();  // previous tile fully consumed (and q staged, first time)
        stage_kv(ks, vs, kh, vh, k0, n);
        __syncthreads();
        if (wlast < tw || k0 > st + wlast) continue;  // no query of this warp sees this tile
        if (window > 0 && k0 + n - 1 <= st + tw - window) continue;

        float s[QPW];
#pragma unroll
        for (int a = 0; a < QPW; ++a) s[a] = 0.f;
        if (lane < n) {
            const float* kr = ks + lane * DHP;
            const float* qw = qs + warp * QPW * DH;
#pragma unroll 8
            for (int d = 0; d < DH; ++d) {
                float kv = kr[d];
#pragma unroll
                for (int a = 0; a < QPW; ++a) s[a] = fmaf(qw[a * DH + d], kv, s[a]);
            }
        }
        float p[QPW];
#pragma unroll
        for (int a = 0; a < QPW; ++a) {
            int t = tw + a;
            int key = k0 + lane;
            bool ok = t < T && lane < n && key <= st + t && (window <= 0 || key > st + t - window);
            float sc = ok ? (softcap > 0.f ? softcap * tanhf(s[a] / softcap) : s[a]) : -INFINITY;
            float mn = fmaxf(m[a], warp_max(sc));
            if (mn == -INFINITY) { p[a] = 0.f; continue; }  // nothing seen yet (warp-uniform)
            float alpha = expf(m[a] - mn);                  // 0 while m is still -inf
            p[a] = ok ? expf(sc - mn) : 0.f;
            l[a] = l[a] * alpha + warp_sum(p[a]);
            m[a] = mn;
#pragma unroll
            for (int i = 0; i < DPL; ++i) o[a][i] *= alpha;
        }
        for (int j = 0; j < n; ++j) {
            float v[DPL];
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                int d = lane + 32 * i;
                v[i] = d < DH ? vs[j * DH + d] : 0.f;
            }
#pragma unroll
            for (int a = 0; a < QPW; ++a) {
                float pj = __shfl_sync(0xffffffffu, p[a], j);
#pragma unroll
                for (int i = 0; i < DPL; ++i) o[a][i] = fmaf(pj, v[i], o[a][i]);
            }
        }
    }
#pragma unroll
    for (int a = 0; a < QPW; ++a) {
        int t = tw + a;
        if (t >= T) break;
        float inv = 1.f / l[a];
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            int d = lane + 32 * i;
            if (d < DH) out[((size_t)t * H + h) * DH + d] = o[a][i] * inv;
        }
    }
}

// One block per (head, slice of keys); warps take 32-key tiles in turn, lane j scoring key j straight from
// the cache (q in shared memory), then the block merges its warps. part: [H, nsplit, 2 + Dh] holding
// (max, sum of exp, unnormalised output) per slice; a slice with no keys stores (-inf, 0, 0).
extern "C" __global__ void __launch_bounds__(NWARP * 32)
attn_decode(float* __restrict__ part,     // float32 [H, nsplit, 2 + Dh]
            const float* __restrict__ q,  // float32 [1, H, Dh]
            const wt* __restrict__ kc,    // wt [Hkv, S, Dh]
            const wt* __restrict__ vc,    // wt [Hkv, S, Dh]
            int start, const int* __restrict__ start_dev,  // position of the query (device value if given)
            int H, int Hkv, int S, float scale,            // start + 1 <= S
            int window, float softcap) {                   // 0: no sliding window / no soft-capping
    __shared__ float qs[DH];
    __shared__ float wm[NWARP], wl[NWARP], wo[NWARP][DH];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int h = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y, hk = h / (H / Hkv);
    const int n = start_pos(start, start_dev) + 1;
    const int lo = window > 0 ? max(0, n - window) : 0;  // first key in the window
    const int chunk = ((n - lo + nsplit - 1) / nsplit + BK - 1) / BK * BK;
    const int c0 = lo + split * chunk, c1 = min(n, c0 + chunk);
    const wt* kh = kc + (size_t)hk * S * DH;
    const wt* vh = vc + (size_t)hk * S * DH;
    for (int d = threadIdx.x; d < DH; d += blockDim.x) qs[d] = q[(size_t)h * DH + d] * scale;
    __syncthreads();

    float m = -INFINITY, l = 0.f, o[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[i] = 0.f;
    for (int k0 = c0 + warp * BK; k0 < c1; k0 += NWARP * BK) {
        const int nk = min(BK, c1 - k0), key = k0 + lane;
        float s = -INFINITY;
        if (lane < nk) {
            const wt* kr = kh + (size_t)key * DH;
            float acc = 0.f;
            if (DH % VEC == 0) {
#pragma unroll 4
                for (int d = 0; d < DH; d += VEC) {
                    float f[VEC];
                    load_vec(kr + d, f);
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc = fmaf(qs[d + e], f[e], acc);
                }
            } else {
                for (int d = 0; d < DH; ++d) acc = fmaf(qs[d], to_f(kr[d]), acc);
            }
            s = softcap > 0.f ? softcap * tanhf(acc / softcap) : acc;
        }
        float mn = fmaxf(m, warp_max(s));  // finite: lane 0 always holds a key
        float alpha = expf(m - mn);
        float p = lane < nk ? expf(s - mn) : 0.f;
        l = l * alpha + warp_sum(p);
        m = mn;
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[i] *= alpha;
        for (int j = 0; j < nk; ++j) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            const wt* vr = vh + (size_t)(k0 + j) * DH;
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                int d = lane + 32 * i;
                if (d < DH) o[i] = fmaf(pj, to_f(vr[d]), o[i]);
            }
        }
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
        int d = lane + 32 * i;
        if (d < DH) wo[warp][d] = o[i];
    }
    __syncthreads();
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NWARP; ++w) M = fmaxf(M, wm[w]);
    float* pr = part + ((size_t)h * nsplit + split) * (2 + DH);
    float f[NWARP], L = 0.f;
#pragma unroll
    for (int w = 0; w < NWARP; ++w) {
        f[w] = M == -INFINITY ? 0.f : expf(wm[w] - M);
        L += wl[w] * f[w];
    }
    if (threadIdx.x == 0) { pr[0] = M; pr[1] = L; }
    for (int d = threadIdx.x; d < DH; d += blockDim.x) {
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < NWARP; ++w) acc += wo[w][d] * f[w];
        pr[2 + d] = acc;
    }
}

// Merge the slices of attn_decode: one block per head.
extern "C" __global__ void attn_combine(float* __restrict__ out,         // float32 [1, H, Dh]
                                        const float* __restrict__ part,  // float32 [H, nsplit, 2 + Dh]
                                        int H, int nsplit) {
    const int h = blockIdx.x;
    const float* ph = part + (size_t)h * nsplit * (2 + DH);
    float M = -INFINITY;
    for (int s = 0; s < nsplit; ++s) M = fmaxf(M, ph[s * (2 + DH)]);
    float L = 0.f;
    for (int s = 0; s < nsplit; ++s) {
        float ms = ph[s * (2 + DH)];
        if (ms != -INFINITY) L += ph[s * (2 + DH) + 1] * expf(ms - M);
    }
    for (int d = threadIdx.x; d < DH; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < nsplit; ++s) {
            float ms = ph[s * (2 + DH)];
            if (ms != -INFINITY) acc += ph[s * (2 + DH) + 2 + d] * expf(ms - M);
        }
        out[(size_t)h * DH + d] = acc / L;
    }
}

// ---------------------------------------------------------------------------------------------------------
// attn_decode_gqa: T == 1 in ONE launch (issue 4). The previous pair above walks the keys from global memory
// one V row at a time (a dependent load per key: ~14-22 us per layer at 128 positions on an H200, traced)
// and re-reads each kv head once per query head. Here a block owns one kv head and its GROUP query heads
// and a slice of the keys; each 64-key tile of K and V is staged in shared memory by 16-byte loads issued
// together (one memory latency per tile), scores and P V come from shared memory, and the block that
// finishes its kv head last (a counter per kv head) merges the slices' (max, sum, output) and writes the
// result, so no second kernel runs. The slices split the live keys evenly, read from device memory, so a
// graph captured once serves every position: at short contexts most blocks find no keys and only count in.
#ifndef GROUP
#define GROUP 1
#endif
#define DG_THREADS 128
#define DG_TK (DH * (int)sizeof(wt) <= 256 ? 64 : DH * (int)sizeof(wt) <= 512 ? 32 : 16)  // keys per tile
#define DG_VEC_OK (DH % VEC == 0)
#define DG_KPAD (DG_VEC_OK ? DH + VEC : DH + 1)  // K rows padded by 16 bytes: 8 lanes of a phase, 8 banks apart
#define DG_NOUT ((GROUP * DH + DG_THREADS - 1) / DG_THREADS)  // (head, dim) outputs per thread
#define DG_HSTEP (DG_THREADS / DG_TK)                        // heads apart in one thread's scores
#define DG_HPT ((GROUP + DG_HSTEP - 1) / DG_HSTEP)           // heads per thread in the scores
#define DG_MAXSPLIT 64
#ifndef DG_MINCHUNK
#define DG_MINCHUNK DG_TK  // fewest keys a slice takes (more slices only when each gets at least this many)
#endif
static_assert(GROUP * DH <= 2048 && GROUP <= 128, "attn_decode_gqa: GROUP * HEAD_DIM must be <= 2048 (the backend falls back)");
// backend._decode_gqa_smem mirrors this total; beyond 48 KB the backend takes attn_decode + attn_combine
static_assert(DG_TK * DG_KPAD * sizeof(wt) + DG_TK * DH * sizeof(wt) + 4 * (GROUP * DH + GROUP * DG_TK + 3 * GROUP
              + GROUP * DG_MAXSPLIT) + 16 <= 48 * 1024, "attn_decode_gqa: shared memory over 48 KB for this GROUP");

extern "C" __global__ void __launch_bounds__(DG_THREADS)
attn_decode_gqa(float* __restrict__ out,      // float32 [1, H, Dh], H = Hkv * GROUP
                float* __restrict__ part,     // float32 [Hkv, nsplit, GROUP, 2 + Dh] scratch
                int* __restrict__ counter,    // int32 [Hkv]: 0 before the launch, left 0 after it
                const float* __restrict__ q,  // float32 [1, H, Dh]
                const wt* __restrict__ kc,    // wt [Hkv, S, Dh]
                const wt* __restrict__ vc,    // wt [Hkv, S, Dh]
                int start, const int* __restrict__ start_dev,  // position of the query (device value if given)
                int Hkv, int S, float scale,                   // start + 1 <= S; gridDim = (Hkv, nsplit <= 64)
                int window, float softcap) {                   // 0: no sliding window / no soft-capping
    pdl_wait();
    pdl_launch();
    __shared__ __align__(16) wt ks[DG_TK * DG_KPAD];
    __shared__ __align__(16) wt vs[DG_TK * DH];
    __shared__ __align__(16) float qs[GROUP * DH];
    __shared__ float ps[GROUP * DG_TK];
    __shared__ float ms[GROUP], ls[GROUP], al[GROUP];
    __shared__ float wsp[GROUP * DG_MAXSPLIT];
    __shared__ int is_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hk = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
    const int n = start_pos(start, start_dev) + 1;
    const int lo = window > 0 ? max(0, n - window) : 0;  // first key in the window
    const int chunk = max(DG_MINCHUNK, (n - lo + nsplit - 1) / nsplit);
    const int used = (n - lo + chunk - 1) / chunk;       // slices holding keys, >= 1
    const int c0 = lo + split * chunk, c1 = min(n, c0 + chunk);
    const wt* kh = kc + (size_t)hk * S * DH;
    const wt* vh = vc + (size_t)hk * S * DH;

    float o[DG_NOUT];
#pragma unroll
    for (int i = 0; i < DG_NOUT; ++i) o[i] = 0.f;
    if (split < used) {
        for (int i = tid; i < GROUP * DH; i += DG_THREADS) qs[i] = q[(size_t)hk * GROUP * DH + i] * scale;
        if (tid < GROUP) { ms[tid] = -INFINITY; ls[tid] = 0.f; }
        for (int k0 = c0; k0 < c1; k0 += DG_TK) {
            const int nk = min(DG_TK, c1 - k0);
            __syncthreads();  // the previous tile is consumed (and qs, ms, ls are set the first time)
            if (DG_VEC_OK) {
                constexpr int CPR = DH / VEC;
                for (int c = tid; c < DG_TK * CPR; c += DG_THREADS) {
                    int j = c / CPR, d = (c % CPR) * VEC;
                    uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);  // rows past the slice: zeros
                    if (j < nk) {
                        kv = __ldg(reinterpret_cast<const uint4*>(kh + (size_t)(k0 + j) * DH + d));
                        vv = __ldg(reinterpret_cast<const uint4*>(vh + (size_t)(k0 + j) * DH + d));
                    }
                    *reinterpret_cast<uint4*>(ks + j * DG_KPAD + d) = kv;
                    *reinterpret_cast<uint4*>(vs + j * DH + d) = vv;
                }
            } else {
                for (int c = tid; c < DG_TK * DH; c += DG_THREADS) {
                    int j = c / DH, d = c % DH;
                    ks[j * DG_KPAD + d] = j < nk ? kh[(size_t)(k0 + j) * DH + d] : from_f<wt>(0.f);
                    vs[j * DH + d] = j < nk ? vh[(size_t)(k0 + j) * DH + d] : from_f<wt>(0.f);
                }
            }
            __syncthreads();
            // scores: thread (key j, heads a0, a0 + DG_HSTEP, ...): each K chunk read from shared memory once
            // for all its heads, the heads' sums independent (no single long dependency chain)
            {
                const int j = tid % DG_TK, a0 = tid / DG_TK;
                float acc[DG_HPT];
#pragma unroll
                for (int h = 0; h < DG_HPT; ++h) acc[h] = 0.f;
                if (j < nk) {
                    const wt* kr = ks + j * DG_KPAD;
                    if (DG_VEC_OK) {
#pragma unroll 2
                        for (int d = 0; d < DH; d += VEC) {
                            uint4 u = *reinterpret_cast<const uint4*>(kr + d);
                            const wt* e = reinterpret_cast<const wt*>(&u);
#pragma unroll
                            for (int h = 0; h < DG_HPT; ++h) {
                                const int a = a0 + h * DG_HSTEP;
                                if (a < GROUP) {
                                    const float* qa = qs + a * DH + d;
#pragma unroll
                                    for (int x = 0; x < VEC; ++x) acc[h] = fmaf(qa[x], to_f(e[x]), acc[h]);
                                }
                            }
                        }
                    } else {
                        for (int d = 0; d < DH; ++d) {
                            const float kv = to_f(kr[d]);
#pragma unroll
                            for (int h = 0; h < DG_HPT; ++h) {
                                const int a = a0 + h * DG_HSTEP;
                                if (a < GROUP) acc[h] = fmaf(qs[a * DH + d], kv, acc[h]);
                            }
                        }
                    }
                }
#pragma unroll
                for (int h = 0; h < DG_HPT; ++h) {
                    const int a = a0 + h * DG_HSTEP;
                    if (a < GROUP)
                        ps[a * DG_TK + j] = j < nk ? (softcap > 0.f ? softcap * tanhf(acc[h] / softcap) : acc[h])
                                                   : -INFINITY;
                }
            }
            __syncthreads();
            // online softmax, one warp per head: the tile's max, the rescale of what came before, p = exp(s - m)
            for (int a = warp; a < GROUP; a += DG_THREADS / 32) {
                float mx = -INFINITY;
                for (int j = lane; j < DG_TK; j += 32) mx = fmaxf(mx, ps[a * DG_TK + j]);
                const float mo = ms[a], mn = fmaxf(mo, warp_max(mx));  // finite: the tile has a key
                float sum = 0.f;
                for (int j = lane; j < DG_TK; j += 32) {
                    float e = expf(ps[a * DG_TK + j] - mn);  // exp(-inf) = 0 for keys past the slice
                    ps[a * DG_TK + j] = e;
                    sum += e;
                }
                sum = warp_sum(sum);
                if (lane == 0) {
                    const float f = expf(mo - mn);  // 0 on the first tile (mo = -inf)
                    al[a] = f;
                    ls[a] = ls[a] * f + sum;
                    ms[a] = mn;
                }
            }
            __syncthreads();
            // P V: key-outer, the thread's outputs as independent accumulators; keys past nk are not visited
            {
                float* pa[DG_NOUT];
                const wt* vd[DG_NOUT];
#pragma unroll
                for (int i = 0; i < DG_NOUT; ++i) {
                    const int idx = min(tid + i * DG_THREADS, GROUP * DH - 1);  // clamped ones are not stored
                    pa[i] = ps + (idx / DH) * DG_TK;
                    vd[i] = vs + idx % DH;
                    o[i] *= al[idx / DH];
                }
#pragma unroll 4
                for (int j = 0; j < nk; ++j) {
#pragma unroll
                    for (int i = 0; i < DG_NOUT; ++i) o[i] = fmaf(pa[i][j], to_f(vd[i][j * DH]), o[i]);
                }
            }
        }
        __syncthreads();
        if (used == 1) {  // one slice holds every key: normalise and write; no merge, the counter untouched
#pragma unroll
            for (int i = 0; i < DG_NOUT; ++i) {
                const int idx = tid + i * DG_THREADS;
                if (idx < GROUP * DH) out[(size_t)hk * GROUP * DH + idx] = o[i] / ls[idx / DH];
            }
            return;
        }
        float* pr = part + ((size_t)hk * nsplit + split) * GROUP * (2 + DH);
        if (tid < GROUP) { pr[tid * (2 + DH)] = ms[tid]; pr[tid * (2 + DH) + 1] = ls[tid]; }
#pragma unroll
        for (int i = 0; i < DG_NOUT; ++i) {
            const int idx = tid + i * DG_THREADS;
            if (idx < GROUP * DH) pr[(idx / DH) * (2 + DH) + 2 + idx % DH] = o[i];
        }
    }
    if (used == 1) return;  // (block-uniform) the block with the keys wrote the result
    // the last block of this kv head to get here merges every slice (classic threadfence reduction)
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(counter + hk, 1) == nsplit - 1;
    __syncthreads();
    if (!is_last) return;
    if (tid == 0) counter[hk] = 0;  // ready for the next launch (graph replays reuse the counter)
    __threadfence();
    const float* ph = part + (size_t)hk * nsplit * GROUP * (2 + DH);
    for (int p = tid; p < GROUP * used; p += DG_THREADS) {
        const int a = p / used, s = p % used;
        wsp[a * DG_MAXSPLIT + s] = __ldcg(ph + ((size_t)s * GROUP + a) * (2 + DH));  // slice max
    }
    __syncthreads();
    for (int a = warp; a < GROUP; a += DG_THREADS / 32) {
        float M = -INFINITY;
        for (int s = lane; s < used; s += 32) M = fmaxf(M, wsp[a * DG_MAXSPLIT + s]);
        M = warp_max(M);
        float L = 0.f;
        for (int s = lane; s < used; s += 32) {
            float f = expf(wsp[a * DG_MAXSPLIT + s] - M);
            L += f * __ldcg(ph + ((size_t)s * GROUP + a) * (2 + DH) + 1);
            wsp[a * DG_MAXSPLIT + s] = f;
        }
        L = warp_sum(L);
        __syncwarp();
        for (int s = lane; s < used; s += 32) wsp[a * DG_MAXSPLIT + s] /= L;
    }
    __syncthreads();
    for (int idx = tid; idx < GROUP * DH; idx += DG_THREADS) {
        const int a = idx / DH, d = idx % DH;
        // unrolled, so that several slices' loads are in flight (one L2 round trip per slice otherwise:
        // ~20 us a layer at 4,096 positions and 33 slices, measured)
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        int s = 0;
        for (; s + 4 <= used; s += 4) {
            float v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) v[u] = __ldcg(ph + ((size_t)(s + u) * GROUP + a) * (2 + DH) + 2 + d);
#pragma unroll
            for (int u = 0; u < 4; ++u) acc[u] = fmaf(wsp[a * DG_MAXSPLIT + s + u], v[u], acc[u]);
        }
        for (; s < used; ++s)
            acc[0] = fmaf(wsp[a * DG_MAXSPLIT + s], __ldcg(ph + ((size_t)s * GROUP + a) * (2 + DH) + 2 + d), acc[0]);
        out[((size_t)hk * GROUP + a) * DH + d] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
}
