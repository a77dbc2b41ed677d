// Causal GQA attention of a batched step over the paged KV pools (core/paged.py; pool layout: paged_row in
// common.cuh). The step's rows come in segments: segment s = seg[s] = (first row, rows n, start, table offset) is
// n rows of one sequence at positions start..start+n-1, whose keys and values for positions 0..start+n-1 (this
// step's already stored by paged_rope_kv) live in the blocks tables[offset + p / bs], slot p % bs.
// The query at position p sees keys 0..p, with a sliding window W > 0 only p-W+1..p; scores are q.k * scale,
// then softcap * tanh(s / softcap) when softcap > 0; fp32 online softmax and accumulation, as attention.cu.
//
// paged_attn_decode (+ paged_attn_combine): the one-row segments (decode tokens). A block owns one such row, one
//   kv head and GROUP of its query heads (the whole group when it has at most 16), so a key tile staged once
//   serves every head of the group, and one slice of the row's keys (split-K, "flash-decoding": the backend
//   picks the slices so that the grid fills the card; slices store (max, sum, unnormalised output) and
//   paged_attn_combine merges them; with one slice the block writes the output itself).
// paged_attn_prefill: the segments of several rows (prompt chunks). A block owns 16 queries of one segment and
//   one query head and walks 32-key tiles, as attention.cu's attn_prefill (lane j scores key j).
#include "common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GROUP
#define GROUP 1  // query heads per decode block (geometry.paged_decode_geometry)
#endif
static_assert(HEAD_DIM >= 1 && HEAD_DIM <= 256, "paged_attn: HEAD_DIM must be in [1, 256] (capabilities refuses)");
static_assert(GROUP >= 1 && GROUP <= 16, "paged_attn: GROUP must be in [1, 16]");

#define DH HEAD_DIM
#define KST (DH % 2 ? DH + 2 : DH + 1)  // odd fp32 row stride of staged keys: lanes reading rows j hit distinct banks
#define SEG 4                           // int32 per segment in seg[]
// The decode kernel reads keys as float4 when Dh is a multiple of 4 (a quarter of the shared-memory instructions
// of scalar reads, which bounded it): a row stride of 4 (mod 8) float4s keeps the 8 lanes of each quarter-warp
// on distinct 16-byte bank groups. Otherwise the odd stride and scalar reads, as the prefill kernel.
#define PD_VEC (DH % 4 == 0)
#define PD_KST (PD_VEC ? (DH % 8 == 0 ? DH + 4 : DH + 8) : KST)

// decode: threads, keys per tile, (head, dim) outputs per thread, heads whose softmax one warp keeps
#define PD_THREADS (GROUP * DH >= 1024 ? 256 : 128)
#define PD_NW (PD_THREADS / 32)
#define PD_TK (DH <= 128 ? 32 : 16)  // a tile is PD_TK rows of K and of V in fp32: <= 32 KB
#define PD_OPT ((GROUP * DH + PD_THREADS - 1) / PD_THREADS)
#define PD_HPW ((GROUP + PD_NW - 1) / PD_NW)
#define PD_OPV ((GROUP * DH / 4 + PD_THREADS - 1) / PD_THREADS)  // (head, 4 dims) outputs per thread (PD_VEC)
// dynamic shared memory (floats): q [GROUP][DH], K [TK][PD_KST], V [TK][DH], p [GROUP][TK], rescale, max, sum [GROUP]
#define PD_SMEM_FLOATS (GROUP * DH + PD_TK * PD_KST + PD_TK * DH + GROUP * PD_TK + 3 * GROUP)

// prefill: 4 warps x 4 queries, 32-key tiles, output dims per lane
#define PP_NW 4
#define PP_QPW 4
#define PP_NQ (PP_NW * PP_QPW)
#define PP_BK 32
#define PP_DPL ((DH + 31) / 32)
// dynamic shared memory (floats): q (scaled) [NQ][DH], K [BK][KST], V [BK][DH]
#define PP_SMEM_FLOATS (PP_NQ * DH + PP_BK * KST + PP_BK * DH)

// The backend sizes the dynamic shared memory from geometry.py's copy of the formulas above (a CPU test builds
// this file with its numbers as EXPECT_*, which must match); a block given less stops the kernel (an error at the
// next synchronisation) instead of overrunning it.
#ifdef EXPECT_DECODE_SMEM
static_assert(PD_SMEM_FLOATS * 4 == EXPECT_DECODE_SMEM && PD_THREADS == EXPECT_DECODE_THREADS
              && PP_SMEM_FLOATS * 4 == EXPECT_PREFILL_SMEM && PP_NQ == EXPECT_PREFILL_NQ,
              "geometry.paged_decode_geometry / paged_prefill_smem / PAGED_NQ differ from paged_attn.cu");
#endif
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// Keys k0..k0+n-1 of kv head hk, read through the block table `tab`, into shared memory as fp32 (K rows with
// stride KST, V rows with stride DH). Within a block of the pool a kv head's rows are contiguous, so a tile is
// one or two runs of bs * DH values per tensor.
template <int KS>
__device__ __forceinline__ void stage_paged(float* ks, float* vs, const wt* kp, const wt* vp, const int* tab,
                                            int hk, int Hkv, int bs, int k0, int n) {
    if (DH % VEC == 0 && KS % 4 == 0) {  // (decode: float4 stores; VEC is 4 or 8, so d is a multiple of 4)
        constexpr int CPR = DH / VEC;
        for (int c = threadIdx.x; c < n * CPR; c += blockDim.x) {
            const int j = c / CPR, d = (c % CPR) * VEC, p = k0 + j, b = p / bs;
            const size_t r = paged_row(tab[b] * bs + (p - b * bs), hk, Hkv, bs, DH) + d;
            float f[VEC];
            load_vec(kp + r, f);
#pragma unroll
            for (int e = 0; e < VEC; e += 4) *(float4*)(ks + j * KS + d + e) = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
            load_vec(vp + r, f);
#pragma unroll
            for (int e = 0; e < VEC; e += 4) *(float4*)(vs + j * DH + d + e) = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
        }
    } else if (DH % VEC == 0) {
        constexpr int CPR = DH / VEC;  // 16-byte chunks per row
        for (int c = threadIdx.x; c < n * CPR; c += blockDim.x) {
            const int j = c / CPR, d = (c % CPR) * VEC, p = k0 + j, b = p / bs;
            const size_t r = paged_row(tab[b] * bs + (p - b * bs), hk, Hkv, bs, DH) + d;
            float f[VEC];
            load_vec(kp + r, f);
#pragma unroll
            for (int e = 0; e < VEC; ++e) ks[j * KS + d + e] = f[e];
            load_vec(vp + r, f);
#pragma unroll
            for (int e = 0; e < VEC; ++e) vs[j * DH + d + e] = f[e];
        }
    } else {
        for (int c = threadIdx.x; c < n * DH; c += blockDim.x) {
            const int j = c / DH, d = c % DH, p = k0 + j, b = p / bs;
            const size_t r = paged_row(tab[b] * bs + (p - b * bs), hk, Hkv, bs, DH) + d;
            ks[j * KS + d] = to_f(kp[r]);
            vs[j * DH + d] = to_f(vp[r]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(PD_THREADS)
paged_attn_decode(float* __restrict__ out,         // float32 [T, H, Dh]: written when nsplit == 1
                  float* __restrict__ part,        // float32 [nd, H, nsplit, 2 + Dh] when nsplit > 1, else NULL
                  const float* __restrict__ q,     // float32 [T, H, Dh], RoPE applied
                  const wt* __restrict__ kp,       // wt [num_blocks, Hkv, bs, Dh]
                  const wt* __restrict__ vp,       // wt [num_blocks, Hkv, bs, Dh]
                  const int* __restrict__ seg,     // int32 [segments, 4]
                  const int* __restrict__ tables,  // int32 [sum of the segments' table lengths]
                  const int* __restrict__ dec,     // int32 [nd]: the segments of one row (grid.x = nd)
                  int H, int Hkv, int bs, float scale,
                  int window, float softcap) {     // 0: no sliding window / no soft-capping
    extern __shared__ float sm[];
    if (dynamic_smem_bytes() < PD_SMEM_FLOATS * sizeof(float)) __trap();
    float* qs = sm;                    // [GROUP][DH], times scale
    float* ks = qs + GROUP * DH;       // [PD_TK][PD_KST]
    float* vs = ks + PD_TK * PD_KST;   // [PD_TK][DH]
    float* ps = vs + PD_TK * DH;       // [GROUP][PD_TK]: probabilities
    float* al = ps + GROUP * PD_TK;    // [GROUP]: this tile's rescale of the running output
    float* ms = al + GROUP;            // [GROUP]: final running max
    float* ls = ms + GROUP;            // [GROUP]: final running sum
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = H / Hkv, chunks = (g + GROUP - 1) / GROUP;
    const int hk = blockIdx.y / chunks, h0 = hk * g + (blockIdx.y % chunks) * GROUP;
    const int nh = min(GROUP, hk * g + g - h0);  // heads of this block (the last chunk of a group may have fewer)
    const int di = blockIdx.x, split = blockIdx.z, nsplit = gridDim.z;
    const int* sg = seg + SEG * dec[di];
    const int row = sg[0], P = sg[2];
    const int* tab = tables + sg[3];
    const int lo = window > 0 ? max(0, P + 1 - window) : 0;  // first key in the window
    const int chunk = ((P + 1 - lo + nsplit - 1) / nsplit + PD_TK - 1) / PD_TK * PD_TK;
    const int c0 = lo + split * chunk, c1 = min(P + 1, c0 + chunk);  // this slice's keys (maybe none)

    for (int i = tid; i < GROUP * DH; i += PD_THREADS) {
        const int h = i / DH;
        qs[i] = h < nh ? q[((size_t)row * H + h0 + h) * DH + i % DH] * scale : 0.f;
    }
    // Warp w keeps the softmax of heads w, w + PD_NW, ...; lane j scores key j of the tile for each of them.
    // The output (head, dims) is spread over the threads: 4 consecutive dims each (PD_VEC), else one.
    constexpr int NOUT = PD_VEC ? PD_OPV : PD_OPT;
    constexpr int W = PD_VEC ? 4 : 1;
    float m[PD_HPW], l[PD_HPW], acc[NOUT][W];
#pragma unroll
    for (int a = 0; a < PD_HPW; ++a) {
        m[a] = -INFINITY;
        l[a] = 0.f;
    }
#pragma unroll
    for (int o = 0; o < NOUT; ++o)
#pragma unroll
        for (int e = 0; e < W; ++e) acc[o][e] = 0.f;

    for (int k0 = c0; k0 < c1; k0 += PD_TK) {
        const int nk = min(PD_TK, c1 - k0);  // every key of [c0, c1) is causal and in the window
        __syncthreads();  // the previous tile is consumed (and q staged, the first time)
        stage_paged<PD_KST>(ks, vs, kp, vp, tab, hk, Hkv, bs, k0, nk);
        __syncthreads();
        float s[PD_HPW];
#pragma unroll
        for (int a = 0; a < PD_HPW; ++a) s[a] = 0.f;
        if (lane < nk) {
            const float* kr = ks + lane * PD_KST;
#if PD_VEC
#pragma unroll 4
            for (int d = 0; d < DH; d += 4) {
                const float4 k4 = *(const float4*)(kr + d);
#pragma unroll
                for (int a = 0; a < PD_HPW; ++a) {
                    const int h = warp + a * PD_NW;
                    if (h < GROUP) {  // warp-uniform
                        const float4 q4 = *(const float4*)(qs + h * DH + d);  // one address: a broadcast
                        s[a] = fmaf(q4.x, k4.x, fmaf(q4.y, k4.y, fmaf(q4.z, k4.z, fmaf(q4.w, k4.w, s[a]))));
                    }
                }
            }
#else
#pragma unroll 8
            for (int d = 0; d < DH; ++d) {
                const float kv = kr[d];
#pragma unroll
                for (int a = 0; a < PD_HPW; ++a) {
                    const int h = warp + a * PD_NW;
                    if (h < GROUP) s[a] = fmaf(qs[h * DH + d], kv, s[a]);
                }
            }
#endif
        }
#pragma unroll
        for (int a = 0; a < PD_HPW; ++a) {
            const int h = warp + a * PD_NW;
            if (h < GROUP) {  // warp-uniform
                const float sc = lane < nk ? (softcap > 0.f ? softcap * tanhf(s[a] / softcap) : s[a]) : -INFINITY;
                const float mn = fmaxf(m[a], warp_max(sc));  // finite: key k0 is valid
                const float alpha = expf(m[a] - mn);          // 0 on the first tile (m = -inf)
                const float pj = lane < nk ? expf(sc - mn) : 0.f;
                l[a] = l[a] * alpha + warp_sum(pj);
                m[a] = mn;
                if (lane < PD_TK) ps[h * PD_TK + lane] = pj;
                if (lane == 0) al[h] = alpha;
            }
        }
        __syncthreads();
#pragma unroll
        for (int o = 0; o < NOUT; ++o) {
            const int i = tid + o * PD_THREADS;
            if (i < GROUP * DH / W) {
                const int h = i / (DH / W), d = (i % (DH / W)) * W;
                const float* pr = ps + h * PD_TK;
                const float r = al[h];
#pragma unroll
                for (int e = 0; e < W; ++e) acc[o][e] *= r;
#if PD_VEC
                for (int j = 0; j < nk; ++j) {
                    const float pj = pr[j];
                    const float4 v4 = *(const float4*)(vs + j * DH + d);
                    acc[o][0] = fmaf(pj, v4.x, acc[o][0]);
                    acc[o][1] = fmaf(pj, v4.y, acc[o][1]);
                    acc[o][2] = fmaf(pj, v4.z, acc[o][2]);
                    acc[o][3] = fmaf(pj, v4.w, acc[o][3]);
                }
#else
                for (int j = 0; j < nk; ++j) acc[o][0] = fmaf(pr[j], vs[j * DH + d], acc[o][0]);
#endif
            }
        }
    }
#pragma unroll
    for (int a = 0; a < PD_HPW; ++a) {
        const int h = warp + a * PD_NW;
        if (h < GROUP && lane == 0) {
            ms[h] = m[a];
            ls[h] = l[a];
        }
    }
    __syncthreads();
#pragma unroll
    for (int o = 0; o < NOUT; ++o) {
        const int i = tid + o * PD_THREADS;
        const int h = i / (DH / W), d = (i % (DH / W)) * W;
        if (i >= GROUP * DH / W || h >= nh) continue;
        if (nsplit == 1) {
#pragma unroll
            for (int e = 0; e < W; ++e) out[((size_t)row * H + h0 + h) * DH + d + e] = acc[o][e] / ls[h];
        } else {  // an empty slice stores (-inf, 0, 0), which the merge skips
            float* pr = part + (((size_t)di * H + h0 + h) * nsplit + split) * (2 + DH);
            if (d == 0) {
                pr[0] = ms[h];
                pr[1] = ls[h];
            }
#pragma unroll
            for (int e = 0; e < W; ++e) pr[2 + d + e] = acc[o][e];
        }
    }
}

// Merge the slices of paged_attn_decode: one block per (one-row segment, query head); threads over Dh.
extern "C" __global__ void paged_attn_combine(float* __restrict__ out,         // float32 [T, H, Dh]
                                              const float* __restrict__ part,  // float32 [nd, H, nsplit, 2 + Dh]
                                              const int* __restrict__ seg,     // int32 [segments, 4]
                                              const int* __restrict__ dec,     // int32 [nd]
                                              int H, int nsplit) {
    const int di = blockIdx.x, h = blockIdx.y;
    const int row = seg[SEG * dec[di]];
    const float* ph = part + ((size_t)di * H + h) * nsplit * (2 + DH);
    float M = -INFINITY;
    for (int s = 0; s < nsplit; ++s) M = fmaxf(M, ph[s * (2 + DH)]);  // finite: slice 0 holds key lo
    float L = 0.f;
    for (int s = 0; s < nsplit; ++s) {
        const float m = ph[s * (2 + DH)];
        if (m != -INFINITY) L += ph[s * (2 + DH) + 1] * expf(m - M);
    }
    for (int d = threadIdx.x; d < DH; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < nsplit; ++s) {
            const float m = ph[s * (2 + DH)];
            if (m != -INFINITY) acc += ph[s * (2 + DH) + 2 + d] * expf(m - M);
        }
        out[((size_t)row * H + h) * DH + d] = acc / L;
    }
}

// Prompt chunks: attention.cu's attn_prefill with its keys read through the segment's block table. A block takes
// 16 queries (tiles[b] = (segment, first query)) of one query head; in each 32-key tile lane j scores key j for
// the warp's 4 queries, then every lane accumulates its Dh/32 output dims over the tile's keys.
extern "C" __global__ void __launch_bounds__(PP_NW * 32)
paged_attn_prefill(float* __restrict__ out,         // float32 [T, H, Dh]
                   const float* __restrict__ q,     // float32 [T, H, Dh], RoPE applied
                   const wt* __restrict__ kp,       // wt [num_blocks, Hkv, bs, Dh]
                   const wt* __restrict__ vp,       // wt [num_blocks, Hkv, bs, Dh]
                   const int* __restrict__ seg,     // int32 [segments, 4]
                   const int* __restrict__ tables,  // int32 [sum of the segments' table lengths]
                   const int* __restrict__ tiles,   // int32 [ntiles, 2]: (segment of > 1 row, first query); grid.x
                   int H, int Hkv, int bs, float scale,
                   int window, float softcap) {     // 0: no sliding window / no soft-capping
    extern __shared__ float sm[];
    if (dynamic_smem_bytes() < PP_SMEM_FLOATS * sizeof(float)) __trap();
    float* qs = sm;
    float* ks = qs + PP_NQ * DH;
    float* vs = ks + PP_BK * KST;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int* sg = seg + SEG * tiles[2 * blockIdx.x];
    const int t0 = tiles[2 * blockIdx.x + 1];
    const int row0 = sg[0], T = sg[1], st = sg[2];
    const int* tab = tables + sg[3];
    const int h = blockIdx.y, hk = h / (H / Hkv);

    for (int c = threadIdx.x; c < PP_NQ * DH; c += blockDim.x) {
        const int t = t0 + c / DH;
        qs[c] = t < T ? q[((size_t)(row0 + t) * H + h) * DH + c % DH] * scale : 0.f;
    }
    const int tw = t0 + warp * PP_QPW;                     // this warp's first query
    const int wlast = min(tw + PP_QPW, T) - 1;             // its last valid query (< tw if none)
    const int nkeys = st + min(t0 + PP_NQ, T);             // keys this block needs (end)
    const int kfirst = window > 0 ? max(0, st + t0 - window + 1) / PP_BK * PP_BK : 0;  // (start, tile-aligned)
    float m[PP_QPW], l[PP_QPW], o[PP_QPW][PP_DPL];
#pragma unroll
    for (int a = 0; a < PP_QPW; ++a) {
        m[a] = -INFINITY;
        l[a] = 0.f;
#pragma unroll
        for (int i = 0; i < PP_DPL; ++i) o[a][i] = 0.f;
    }

    for (int k0 = kfirst; k0 < nkeys; k0 += PP_BK) {
        const int n = min(PP_BK, nkeys - k0);
        __syncthreads();  // previous tile fully consumed (and q staged, first time)
        stage_paged<KST>(ks, vs, kp, vp, tab, hk, Hkv, bs, k0, n);
        __syncthreads();
        if (wlast < tw || k0 > st + wlast) continue;  // no query of this warp sees this tile
        if (window > 0 && k0 + n - 1 <= st + tw - window) continue;

        float s[PP_QPW];
#pragma unroll
        for (int a = 0; a < PP_QPW; ++a) s[a] = 0.f;
        if (lane < n) {
            const float* kr = ks + lane * KST;
            const float* qw = qs + warp * PP_QPW * DH;
#pragma unroll 8
            for (int d = 0; d < DH; ++d) {
                const float kv = kr[d];
#pragma unroll
                for (int a = 0; a < PP_QPW; ++a) s[a] = fmaf(qw[a * DH + d], kv, s[a]);
            }
        }
        float p[PP_QPW];
#pragma unroll
        for (int a = 0; a < PP_QPW; ++a) {
            const int t = tw + a, key = k0 + lane;
            const bool ok = t < T && lane < n && key <= st + t && (window <= 0 || key > st + t - window);
            const float sc = ok ? (softcap > 0.f ? softcap * tanhf(s[a] / softcap) : s[a]) : -INFINITY;
            const float mn = fmaxf(m[a], warp_max(sc));
            if (mn == -INFINITY) { p[a] = 0.f; continue; }  // nothing seen yet (warp-uniform)
            const float alpha = expf(m[a] - mn);            // 0 while m is still -inf
            p[a] = ok ? expf(sc - mn) : 0.f;
            l[a] = l[a] * alpha + warp_sum(p[a]);
            m[a] = mn;
#pragma unroll
            for (int i = 0; i < PP_DPL; ++i) o[a][i] *= alpha;
        }
        for (int j = 0; j < n; ++j) {
            float v[PP_DPL];
#pragma unroll
            for (int i = 0; i < PP_DPL; ++i) {
                const int d = lane + 32 * i;
                v[i] = d < DH ? vs[j * DH + d] : 0.f;
            }
#pragma unroll
            for (int a = 0; a < PP_QPW; ++a) {
                const float pj = __shfl_sync(0xffffffffu, p[a], j);
#pragma unroll
                for (int i = 0; i < PP_DPL; ++i) o[a][i] = fmaf(pj, v[i], o[a][i]);
            }
        }
    }
#pragma unroll
    for (int a = 0; a < PP_QPW; ++a) {
        const int t = tw + a;
        if (t >= T) break;
        const float inv = 1.f / l[a];
#pragma unroll
        for (int i = 0; i < PP_DPL; ++i) {
            const int d = lane + 32 * i;
            if (d < DH) out[((size_t)(row0 + t) * H + h) * DH + d] = o[a][i] * inv;
        }
    }
}
