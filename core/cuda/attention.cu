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
// attn_decode_step: T == 1 in ONE launch, optionally with the step's RoPE, per-head RMSNorm and KV-cache write
// folded in (issue 4, round 4; it replaces round 3's attn_decode_gqa).
//
// A block owns one kv head, its GROUP query heads and a slice of the live keys [lo, pos]; the slices split
// the keys evenly (the kernel reads the position from device memory, so a graph captured once serves every
// position) and the block that finishes its kv head last merges the slices' (max, sum, output).
// Latency is what matters at batch 1 (the whole cache of a 1B model at 128 positions is ~100 KB a layer), so:
//  - every key before `pos` was written by an earlier step, so its K/V rows are copied into shared memory
//    (cp.async, two 16-byte requests per lane in flight per row chunk) BEFORE griddepcontrol.wait: inside a
//    decode graph the copies overlap the QKV GEMV still running ahead of this kernel;
//  - with knew != NULL the block also does what rope_kv did: per-head RMSNorm (qn/kn) and RoPE (inv_freq) of its
//    query heads from the GEMV's raw q, and, in the block whose slice holds `pos`, of the new key, which it
//    stores in the cache (k rounded to the cache type, v copied) and uses directly. knew == NULL: q is final
//    (rotated already) and the cache holds the new key (written by the kernel before this one);
//  - tiles of DS_TK keys are double-buffered; a (key, head) dot product is split over SP lanes when the group
//    is small, so all DS_THREADS threads have work;
//  - (round 5) after the wait there is one round trip for every input (q, the new key and value land in shared
//    memory together; the RoPE angles and norm gains were staged before the wait), P V reads shared memory
//    4 keys and 2 dims at a time, and the merging block combines the slices online with their loads in flight
//    together, after one fence by one thread.
#ifndef GROUP
#define GROUP 1
#endif
#define DS_ROW (DH * (int)sizeof(wt))                                               // bytes per cached row
#define DS_TK (DS_ROW <= 128 ? 64 : DS_ROW <= 256 ? 32 : DS_ROW <= 512 ? 16 : 8)  // keys per tile (one stage)
#ifndef DS_THREADS  // the backend passes it (backend._decode_step_geometry); this is the same rule
#define DS_THREADS (GROUP * DH >= 256 ? 256 : GROUP * DH <= 64 ? 64 : (GROUP * DH + 31) / 32 * 32)
#endif
#define DS_NWARP (DS_THREADS / 32)
#define DS_VEC_OK (DH % VEC == 0)
#define DS_NCH (DS_VEC_OK ? DH / VEC : DH)  // 16-byte chunks (or scalars) per row
// fewest keys a slice takes (traced at 128 positions: 16 and 32 alike, 64 slower on Qwen3-0.6B; NOTES.md round 4)
#define DS_MINCHUNK (DS_TK < 32 ? DS_TK : 32)
__host__ __device__ constexpr int ds_sp() {  // lanes per (key, head) dot product: a power of two dividing the row's chunks
    int sp = 1;
    while (sp * 2 <= 32 && sp * 2 * DS_TK * GROUP <= DS_THREADS && DS_NCH % (sp * 2) == 0) sp *= 2;
    return sp;
}
#define DS_SP ds_sp()
// K rows padded by SP x 16 bytes: the SP lanes of a dot read adjacent chunks, rows land 4 x SP banks apart
#define DS_KPAD (DS_VEC_OK ? DH + VEC * DS_SP : DH + 1)
#define DS_NOUT ((GROUP * DH + DS_THREADS - 1) / DS_THREADS)  // (head, dim) outputs per thread
#define DS_DHW ((DH * (int)sizeof(wt) + 15) / 16 * 16 / (int)sizeof(wt))  // the new row, padded to 16 bytes
#define DS_MS (DS_NOUT >= 4 ? 4 : 16 / DS_NOUT)  // slices the merge loads at once, per output (3 loads each)
// P V: a thread owns DS_PW adjacent dims of one head (one 4-byte V load for two) and takes p four keys at a
// time, since P V is bound by shared-memory loads (it was one p and one V load per FMA)
#define DS_PW (DH % 2 == 0 ? 2 : 1)
#define DS_NU ((GROUP * DH / DS_PW + DS_THREADS - 1) / DS_THREADS)  // P V units per thread
static_assert(DS_THREADS % 32 == 0 && DS_THREADS >= 64 && DS_THREADS <= 256, "attn_decode_step: DS_THREADS");
static_assert(GROUP * DH <= 2048 && GROUP <= 128, "attn_decode_step: GROUP * HEAD_DIM must be <= 2048 (the backend falls back)");
// backend._decode_step_geometry mirrors this total; beyond 48 KB the backend takes attn_decode + attn_combine
static_assert(2 * DS_TK * DS_KPAD * sizeof(wt) + 2 * DS_TK * DH * sizeof(wt) + 2 * DS_DHW * sizeof(wt)
              + 4 * (GROUP * DH + GROUP * DS_TK + 3 * GROUP) + 4 * (4 * DH + 2 * ((DH + 1) / 2)) + 16 <= 48 * 1024,
              "attn_decode_step: shared memory over 48 KB for this GROUP");

// two adjacent cached values as floats (p 4-byte aligned for 16-bit types, 8 for float)
__device__ __forceinline__ void ds_load2(const __half* p, float& a, float& b) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(p));
    a = f.x, b = f.y;
}
__device__ __forceinline__ void ds_load2(const __nv_bfloat16* p, float& a, float& b) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    a = f.x, b = f.y;
}
__device__ __forceinline__ void ds_load2(const float* p, float& a, float& b) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    a = f.x, b = f.y;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Stage tile t of a slice (keys c0 + t DS_TK ..., ntile tiles, the slice ends at c1) into buffer t & 1 of ks / vs.
// Row `pos` is not in the cache before griddepcontrol.wait (this kernel or the one before writes it): `pre`
// skips it; later calls copy it from rowk / rowv, which the block has filled by then.
__device__ __forceinline__ void ds_issue(int t, bool pre, int ntile, int c0, int c1, int pos, wt* ks, wt* vs,
                                         const wt* rowk, const wt* rowv, const wt* kh, const wt* vh) {
    if (t >= ntile) return;
    const int tid = threadIdx.x;
    const int k0 = c0 + t * DS_TK, nk = min(DS_TK, c1 - k0);
    wt* kb = ks + (t & 1) * DS_TK * DS_KPAD;
    wt* vb = vs + (t & 1) * DS_TK * DH;
    if (DS_VEC_OK) {
        for (int c = tid; c < nk * DS_NCH; c += DS_THREADS) {
            const int j = c / DS_NCH, d = (c % DS_NCH) * VEC, key = k0 + j;
            if (key != pos) {
                cp_async16(kb + j * DS_KPAD + d, kh + (size_t)key * DH + d);
                cp_async16(vb + j * DH + d, vh + (size_t)key * DH + d);
            } else if (!pre) {
                *reinterpret_cast<uint4*>(kb + j * DS_KPAD + d) = *reinterpret_cast<const uint4*>(rowk + d);
                *reinterpret_cast<uint4*>(vb + j * DH + d) = *reinterpret_cast<const uint4*>(rowv + d);
            }
        }
    } else {
        for (int c = tid; c < nk * DH; c += DS_THREADS) {
            const int j = c / DH, d = c % DH, key = k0 + j;
            if (key != pos) {
                kb[j * DS_KPAD + d] = kh[(size_t)key * DH + d];
                vb[j * DH + d] = vh[(size_t)key * DH + d];
            } else if (!pre) {
                kb[j * DS_KPAD + d] = rowk[d];
                vb[j * DH + d] = rowv[d];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(DS_THREADS)
attn_decode_step(float* __restrict__ out,            // float32 [1, H, Dh], H = Hkv * GROUP
                 float* __restrict__ part,           // float32 [Hkv, nsplit, GROUP, 2 + Dh] scratch
                 int* __restrict__ counter,          // int32 [Hkv]: 0 before the launch, left 0 after it
                 const float* __restrict__ q,        // float32 [1, H, Dh]: final, or raw when knew != NULL
                 const float* __restrict__ knew,     // float32 [1, Hkv, Dh] raw new key, or NULL
                 const float* __restrict__ vnew,     // float32 [1, Hkv, Dh] new value (with knew)
                 wt* __restrict__ kc,                // wt [Hkv, S, Dh]
                 wt* __restrict__ vc,                // wt [Hkv, S, Dh]
                 const float* __restrict__ inv_freq, // float32 [Dh / 2], or NULL: no RoPE (with knew)
                 const wt* __restrict__ qn,          // wt [Dh] q-norm weight, or NULL (with knew)
                 const wt* __restrict__ kn,          // wt [Dh] k-norm weight (with qn)
                 float eps, float offset,
                 int start, const int* __restrict__ start_dev,  // position of the query (device value if given)
                 int Hkv, int S, float scale,                   // start + 1 <= S; gridDim = (Hkv, nsplit <= 64)
                 int window, float softcap) {                   // 0: no sliding window / no soft-capping
    __shared__ __align__(16) wt ks[2 * DS_TK * DS_KPAD];
    __shared__ __align__(16) wt vs[2 * DS_TK * DH];
    __shared__ __align__(16) wt rowk[DS_DHW];
    __shared__ __align__(16) wt rowv[DS_DHW];
    __shared__ __align__(16) float qs[GROUP * DH];
    __shared__ __align__(16) float ps[GROUP * DS_TK];
    __shared__ float ms[GROUP], ls[GROUP], al[GROUP];
    // the new key and value as the GEMV left them, and what RoPE and the norms need that no kernel writes
    // (staged before the wait): cos / sin at this position, the norm gains plus offset
    __shared__ float kraw[DH], vraw[DH], rcos[(DH + 1) / 2], rsin[(DH + 1) / 2], gq[DH], gk[DH];
    __shared__ int is_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hk = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
    // The position was written before this graph replay began (step_advance of the previous step, or the
    // host), never by the kernel ahead of this one: it may be read before the wait.
    const int pos = start_pos(start, start_dev), n = pos + 1;
    const int lo = window > 0 ? max(0, n - window) : 0;  // first key in the window
    const int chunk = max(DS_MINCHUNK, (n - lo + nsplit - 1) / nsplit);
    const int used = (n - lo + chunk - 1) / chunk;       // slices holding keys, >= 1
    const int c0 = lo + split * chunk, c1 = split < used ? min(n, c0 + chunk) : c0;
    const int ntile = (c1 - c0 + DS_TK - 1) / DS_TK;
    if (split >= used) return;  // no keys here (short contexts): the merge counts only the `used` slices
    const wt* kh = kc + (size_t)hk * S * DH;
    const wt* vh = vc + (size_t)hk * S * DH;

    ds_issue(0, true, ntile, c0, c1, pos, ks, vs, rowk, rowv, kh, vh);
    cp_async_commit();
    ds_issue(1, true, ntile, c0, c1, pos, ks, vs, rowk, rowv, kh, vh);
    cp_async_commit();
    pdl_launch();  // every block is resident: the next kernel may start issuing its weight loads
    const bool fuse = knew != nullptr, rot = fuse && inv_freq != nullptr, nrm = fuse && qn != nullptr;
    const int h2 = rot ? DH / 2 : DH;  // rotate-half pairs (i, i + DH/2), or single dims
    // Nothing here depends on the kernel before (the position came from the previous step): the angles and
    // the norm gains leave the critical path (they cost a round trip and sincosf after the wait; Qwen3-0.6B
    // ~1.5 us a layer, traced, NOTES.md round 5).
    if (rot)
        for (int i = tid; i < DH / 2; i += DS_THREADS) sincosf((float)pos * __ldg(inv_freq + i), &rsin[i], &rcos[i]);
    if (nrm)
        for (int d = tid; d < DH; d += DS_THREADS) { gq[d] = offset + to_f(qn[d]); gk[d] = offset + to_f(kn[d]); }
    pdl_wait();

    const bool owns_pos = split == used - 1;  // this slice ends with the new key
    {
        // One round trip for every input the previous kernels wrote: the group's q (final, or raw with fuse) and,
        // in the block holding pos, the new key and value (raw with fuse, else from the cache)
        const float* qh = q + (size_t)hk * GROUP * DH;
        for (int idx = tid; idx < GROUP * DH; idx += DS_THREADS) qs[idx] = fuse ? qh[idx] : qh[idx] * scale;
        if (owns_pos) {
            for (int d = tid; d < DH; d += DS_THREADS) {
                if (fuse) {
                    kraw[d] = knew[(size_t)hk * DH + d];
                    vraw[d] = vnew[(size_t)hk * DH + d];
                } else {  // the cache holds the new key already
                    rowk[d] = __ldcg(kh + (size_t)pos * DH + d);
                    rowv[d] = __ldcg(vh + (size_t)pos * DH + d);
                }
            }
        }
        __syncthreads();
        // with fuse: q (and the new key) normed and rotated as rope_kv does, q scaled, in place; a warp a head
        const int nh = fuse ? GROUP + (owns_pos ? 1 : 0) : 0;
        for (int a = warp; a < nh; a += DS_NWARP) {
            const bool isq = a < GROUP;
            float* x = isq ? qs + a * DH : kraw;
            const float* gn = isq ? gq : gk;
            float inv = 1.f;
            if (nrm) {
                float ss = 0.f;
                for (int d = lane; d < DH; d += 32) ss += x[d] * x[d];
                inv = 1.f / sqrtf(warp_sum(ss) / DH + eps);
                __syncwarp();  // every lane has read the row before any lane rewrites it below
            }
            for (int i = lane; i < h2; i += 32) {
                float x1 = x[i], x2 = rot ? x[i + h2] : 0.f;
                if (nrm) {
                    x1 = x1 * inv * gn[i];
                    if (rot) x2 = x2 * inv * gn[i + h2];
                }
                float y1 = x1, y2 = x2;
                if (rot) {
                    y1 = x1 * rcos[i] - x2 * rsin[i];
                    y2 = x2 * rcos[i] + x1 * rsin[i];
                }
                if (isq) {
                    x[i] = y1 * scale;
                    if (rot) x[i + h2] = y2 * scale;
                } else {
                    const size_t ci = ((size_t)hk * S + pos) * DH;
                    rowk[i] = kc[ci + i] = from_f<wt>(y1);
                    rowv[i] = vc[ci + i] = from_f<wt>(vraw[i]);
                    if (rot) {
                        rowk[i + h2] = kc[ci + i + h2] = from_f<wt>(y2);
                        rowv[i + h2] = vc[ci + i + h2] = from_f<wt>(vraw[i + h2]);
                    }
                }
            }
        }
        if (tid < GROUP) { ms[tid] = -INFINITY; ls[tid] = 0.f; }
        __syncthreads();  // rowk / rowv ready: tiles 0 and 1 went out before them, so fill in their pos row
        if (owns_pos && ntile <= 2) {
            const int t = ntile - 1, j = pos - (c0 + t * DS_TK);
            wt* kb = ks + (t & 1) * DS_TK * DS_KPAD + j * DS_KPAD;
            wt* vb = vs + (t & 1) * DS_TK * DH + j * DH;
            for (int d = tid; d < DH; d += DS_THREADS) { kb[d] = rowk[d]; vb[d] = rowv[d]; }
        }

        float o[DS_NU][DS_PW];
#pragma unroll
        for (int i = 0; i < DS_NU; ++i)
#pragma unroll
            for (int k = 0; k < DS_PW; ++k) o[i][k] = 0.f;
        for (int t = 0; t < ntile; ++t) {
            const int k0 = c0 + t * DS_TK, nk = min(DS_TK, c1 - k0);
            const wt* kb = ks + (t & 1) * DS_TK * DS_KPAD;
            const wt* vb = vs + (t & 1) * DS_TK * DH;
            cp_async_wait<1>();  // every group but the newest (tile t + 1) has landed
            __syncthreads();
            // scores: SP lanes per (key j, head a), each over every SP-th chunk of the row
            {
                constexpr int SP = DS_SP, NU = DS_TK * GROUP * SP;
                for (int base = 0; base < NU; base += DS_THREADS) {  // uniform trip count: shuffles below
                    const int u = base + tid, pair = u / SP, prt = u % SP;
                    const int j = pair % DS_TK, a = pair / DS_TK;
                    float acc0 = 0.f, acc1 = 0.f;
                    if (u < NU && j < nk) {
                        const wt* kr = kb + j * DS_KPAD;
                        const float* qa = qs + a * DH;
                        if (DS_VEC_OK) {
#pragma unroll 2
                            for (int c = prt; c < DS_NCH; c += SP) {
                                const uint4 uu = *reinterpret_cast<const uint4*>(kr + c * VEC);
                                const wt* e = reinterpret_cast<const wt*>(&uu);
                                const float4* q4 = reinterpret_cast<const float4*>(qa + c * VEC);  // 16-byte loads
#pragma unroll
                                for (int x = 0; x < VEC; x += 4) {
                                    const float4 qv = q4[x / 4];
                                    acc0 = fmaf(qv.x, to_f(e[x]), acc0);
                                    acc1 = fmaf(qv.y, to_f(e[x + 1]), acc1);
                                    acc0 = fmaf(qv.z, to_f(e[x + 2]), acc0);
                                    acc1 = fmaf(qv.w, to_f(e[x + 3]), acc1);
                                }
                            }
                        } else {
                            for (int d = prt; d < DH; d += SP) acc0 = fmaf(qa[d], to_f(kr[d]), acc0);
                        }
                    }
                    float acc = acc0 + acc1;
#pragma unroll
                    for (int m = SP / 2; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
                    if (u < NU && prt == 0)
                        ps[a * DS_TK + j] = j < nk ? (softcap > 0.f ? softcap * tanhf(acc / softcap) : acc) : -INFINITY;
                }
            }
            __syncthreads();
            // online softmax, one warp per head: the tile's max, the rescale of what came before, p = exp(s - m)
            for (int a = warp; a < GROUP; a += DS_NWARP) {
                float mx = -INFINITY;
                for (int j = lane; j < DS_TK; j += 32) mx = fmaxf(mx, ps[a * DS_TK + j]);
                const float mo = ms[a], mn = fmaxf(mo, warp_max(mx));  // finite: the tile has a key
                float sum = 0.f;
                for (int j = lane; j < DS_TK; j += 32) {
                    const float e = expf(ps[a * DS_TK + j] - mn);  // exp(-inf) = 0 for keys past the slice
                    ps[a * DS_TK + j] = e;
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
            // P V: key-outer, the thread's DS_PW-dim units as independent accumulators
            {
                const float* pa[DS_NU];
                const wt* vd[DS_NU];
#pragma unroll
                for (int i = 0; i < DS_NU; ++i) {
                    const int e = min((tid + i * DS_THREADS) * DS_PW, GROUP * DH - DS_PW);  // clamped: not stored
                    pa[i] = ps + (e / DH) * DS_TK;
                    vd[i] = vb + e % DH;
                    const float f = al[e / DH];
#pragma unroll
                    for (int k = 0; k < DS_PW; ++k) o[i][k] *= f;
                }
                int j = 0;
                for (; j + 4 <= nk; j += 4) {  // keys past nk hold stale rows: never read them (0 * NaN)
#pragma unroll
                    for (int i = 0; i < DS_NU; ++i) {
                        const float4 p4 = *reinterpret_cast<const float4*>(pa[i] + j);
                        const float pj[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
                        for (int jj = 0; jj < 4; ++jj) {
                            const wt* vr = vd[i] + (j + jj) * DH;
                            if (DS_PW == 2) {
                                float v0, v1;
                                ds_load2(vr, v0, v1);
                                o[i][0] = fmaf(pj[jj], v0, o[i][0]);
                                o[i][DS_PW - 1] = fmaf(pj[jj], v1, o[i][DS_PW - 1]);  // [1]; spelled so DS_PW 1 builds
                            } else {
                                o[i][0] = fmaf(pj[jj], to_f(vr[0]), o[i][0]);
                            }
                        }
                    }
                }
                for (; j < nk; ++j) {
#pragma unroll
                    for (int i = 0; i < DS_NU; ++i) {
                        const wt* vr = vd[i] + j * DH;
#pragma unroll
                        for (int k = 0; k < DS_PW; ++k) o[i][k] = fmaf(pa[i][j], to_f(vr[k]), o[i][k]);
                    }
                }
            }
            __syncthreads();  // buffer t & 1 is consumed: tile t + 2 may go there
            ds_issue(t + 2, false, ntile, c0, c1, pos, ks, vs, rowk, rowv, kh, vh);
            cp_async_commit();
        }
        cp_async_wait<0>();  // nothing outstanding when the buffers are reused below (empty groups at most)
        if (used == 1) {  // one slice holds every key: normalise and write; no merge, the counter untouched
#pragma unroll
            for (int i = 0; i < DS_NU; ++i) {
                const int e = (tid + i * DS_THREADS) * DS_PW;
#pragma unroll
                for (int k = 0; k < DS_PW; ++k)
                    if (e < GROUP * DH) out[(size_t)hk * GROUP * DH + e + k] = o[i][k] / ls[e / DH];
            }
            return;
        }
        float* pr = part + ((size_t)hk * nsplit + split) * GROUP * (2 + DH);
        if (tid < GROUP) { pr[tid * (2 + DH)] = ms[tid]; pr[tid * (2 + DH) + 1] = ls[tid]; }
#pragma unroll
        for (int i = 0; i < DS_NU; ++i) {
            const int e = (tid + i * DS_THREADS) * DS_PW;
#pragma unroll
            for (int k = 0; k < DS_PW; ++k)
                if (e < GROUP * DH) pr[(e / DH) * (2 + DH) + 2 + e % DH + k] = o[i][k];
        }
    }
    // The last block of this kv head to get here merges every slice (the pattern of cooperative groups' grid
    // barrier: the block's writes, a barrier, one thread's fence and count).
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        is_last = atomicAdd(counter + hk, 1) == used - 1;
        if (is_last) {
            counter[hk] = 0;  // ready for the next launch (graph replays reuse the counter)
            __threadfence();
        }
    }
    __syncthreads();
    if (!is_last) return;
    // Each thread merges its outputs over the slices on its own, online (max of the round, rescale, add), with
    // the (max, sum, value) loads of DS_MS slices in flight at once: one round trip for up to DS_MS slices
    // (it was a round trip for the maxima and sums, a barrier, then one per 8 slices and output).
    const float* ph = part + (size_t)hk * nsplit * GROUP * (2 + DH);
    float M[DS_NOUT], L[DS_NOUT], O[DS_NOUT];
#pragma unroll
    for (int i = 0; i < DS_NOUT; ++i) M[i] = -INFINITY, L[i] = 0.f, O[i] = 0.f;
    for (int s0 = 0; s0 < used; s0 += DS_MS) {
        float pm[DS_NOUT][DS_MS], pl[DS_NOUT][DS_MS], po[DS_NOUT][DS_MS];
#pragma unroll
        for (int i = 0; i < DS_NOUT; ++i) {
            const int idx = tid + i * DS_THREADS, a = idx / DH, d = idx % DH;
#pragma unroll
            for (int u = 0; u < DS_MS; ++u) {
                const bool ok = idx < GROUP * DH && s0 + u < used;
                const float* p = ph + ((size_t)(s0 + u) * GROUP + a) * (2 + DH);
                pm[i][u] = ok ? __ldcg(p) : -INFINITY;
                pl[i][u] = ok ? __ldcg(p + 1) : 0.f;
                po[i][u] = ok ? __ldcg(p + 2 + d) : 0.f;
            }
        }
#pragma unroll
        for (int i = 0; i < DS_NOUT; ++i) {
            float mr = M[i];
#pragma unroll
            for (int u = 0; u < DS_MS; ++u) mr = fmaxf(mr, pm[i][u]);  // finite: slice s0 holds keys
            const float f = expf(M[i] - mr);  // 0 on the first round (M = -inf)
            L[i] *= f, O[i] *= f;
#pragma unroll
            for (int u = 0; u < DS_MS; ++u) {
                const float e = expf(pm[i][u] - mr);  // 0 for slices past `used`
                L[i] = fmaf(e, pl[i][u], L[i]);
                O[i] = fmaf(e, po[i][u], O[i]);
            }
            M[i] = mr;
        }
    }
#pragma unroll
    for (int i = 0; i < DS_NOUT; ++i) {
        const int idx = tid + i * DS_THREADS;
        if (idx < GROUP * DH) out[(size_t)hk * GROUP * DH + idx] = O[i] / L[i];
    }
}
