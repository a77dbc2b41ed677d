// Mixture of experts (core.ops.moe) on the GPU, driven by core/cuda/moe.py.
//
//   moe_route      one warp per token: softmax or sigmoid scores of the router logits in fp32, the top k
//                  (ties to the lower expert id, as the reference's stable argsort) chosen by score + selection
//                  bias, within the best groups if group-limited; their scores renormalised if asked, times
//                  routed_scale → int32 ids [T, k] and float32 weights [T, k], in device memory.
//   moe_up /       decode (a few tokens): a grouped GEMV over the k selected experts only. Block (row chunk,
//   moe_gate_up    slot) with slot = t * k + j reads MOE_ROWS rows of up[e] (and gate[e]) for e = ids[slot],
//                  e read from device memory inside the kernel (a captured graph replays it for any routing);
//                  the epilogue adds the biases, applies act(gate) * up (or act(up)) and the routing weight:
//                  h [T, k, I] = w[t, j] * act(...).
//   moe_down       y [T, D] = sum_j down[e_j] h[t, j] (+ w[t, j] bd[e_j]): one GEMV per token over the k
//                  experts' rows laid end to end (K = k * I), so each block loops over all k experts for its
//                  MOE_ROWS output rows and sums them in registers: no atomics, no second pass.
//   moe_gather /   prefill: rows of x gathered per expert, and an expert's weighted output added back to its
//   moe_scatter_add tokens' rows (one expert per launch: a token picks an expert at most once, so no two threads
//                  of a launch write one element).
//
// The GEMVs follow gemv.cu: MOE_THREADS threads split the reduction, 128-bit __ldg weight loads (MOE_UNROLL_*
// chunks per thread issued before any is used, for every row of the block), fp32 accumulation, warp sums,
// then the warps' partial sums meet in shared memory. A scalar path covers widths that are not multiples of
// the vector (or unaligned activations).
//
// Inside a decode graph moe_route, moe_up / moe_gate_up and moe_down are launched with programmatic dependent launch
// (launch.PDL_KERNELS; common.cuh): each lets the next kernel launch once its own wait is over, so the launches of
// a MoE layer overlap the kernels before them. moe_route and moe_up wait first thing (they read the previous
// kernel's output, and the up product's weights depend on the ids). moe_down reads the ids and issues its first
// weight loads before waiting for h: the ids were written by moe_route, two kernels back, and moe_down cannot start
// before every block of the up product has passed its own wait, i.e. before moe_route has completed.
#include "common.cuh"

#ifndef MOE_ROWS
#define MOE_ROWS 4  // output rows per block (moe_up / moe_gate_up: of each of gate and up; moe_down)
#endif
#define MOE_THREADS 128
#ifndef MOE_UNROLL_UP
#define MOE_UNROLL_UP 2  // chunks per thread in flight per row, moe_up / moe_gate_up (8 rows: 16 loads)
#endif
#ifndef MOE_UNROLL_DOWN
#define MOE_UNROLL_DOWN 4  // moe_down (4 rows: 16 loads)
#endif
#define ROUTE_WARPS 4  // tokens per moe_route block
static_assert(MOE_ROWS >= 1 && MOE_ROWS <= 8, "MOE_ROWS must be in [1, 8]");
static_assert(MOE_UNROLL_UP >= 1 && MOE_UNROLL_UP <= 4 && MOE_UNROLL_DOWN >= 1 && MOE_UNROLL_DOWN <= 4,
              "MOE_UNROLL_* must be in [1, 4]");


// An expert id as read from device memory, kept inside [0, E) so that a corrupt id cannot read out of bounds.
__device__ __forceinline__ int clamp_expert(int e, int E) { return min(max(e, 0), E - 1); }

// moe_route keeps a token's scores in registers when E <= 32 ROUTE_REG (every expert count of the in-tree
// families) and the picks in the registers of lane j (j < 32), written out once at the end. The first version
// re-read the logits from memory for each of the k picks and wrote each pick, then read all k back from global
// memory one after another to renormalise them; it took ~8 us of a ~73 us qwen3-30b-a3b layer on the decode
// step's critical path (H100 trace, BENCHMARKS.md), we expect mostly in those dependent round trips (this version
// is not yet timed). More experts or more than 32 picks take the memory path for what does not fit. The
// arithmetic is the same expressions in the same order either way.
//
// Every comparison reads an expert's choice value, its score plus the selection bias when there is one
// (DeepSeek-V3 / GLM-4.5 e_score_correction_bias), while a pick's weight is its score alone. Group-limited routing
// (topk_groups < groups, at most ROUTE_MAX_GROUPS; the experts are `groups` contiguous groups of E / groups): lane g
// scores group g by the sum of its two largest choice values, a group is kept when fewer than topk_groups groups
// beat it (score descending, id ascending), and the experts of the other groups get the choice -inf, which the
// picks never reach (top_k is at most the kept groups' experts: moe.py checks).
#define ROUTE_REG 8
#define ROUTE_MAX_GROUPS 32  // one group per lane

// (a, b): the two largest values seen so far, a >= b; x is one more (a NaN is passed over).
__device__ __forceinline__ void top2(float& a, float& b, float x) {
    if (x > a) {
        b = a;
        a = x;
    } else if (x > b) {
        b = x;
    }
}

// (at least 1 block an SM: without the bound ptxas held sm_90 to 56 registers and spilled 8 bytes; 66 now)
extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32, 1)
moe_route(int* __restrict__ ids,             // int32 [T, k]
          float* __restrict__ wts,           // float32 [T, k]
          const float* __restrict__ logits,  // float32 [T, E]
          const float* __restrict__ bias,    // float32 [E] or NULL: the selection bias (chooses, never weighs)
          int T, int E, int k,
          int use_sigmoid,                   // 0: softmax over the E logits; 1: an independent sigmoid each
          int renorm, float scale,           // weights / their sum when renorm; then times scale
          int groups, int topk_groups) {     // group-limited when topk_groups < groups (<= 32, dividing E)
    pdl_wait();  // every thread, before any returns (a dependent's wait on this grid stays a wait on the ones before)
    pdl_launch();
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * ROUTE_WARPS + (threadIdx.x >> 5);
    if (t >= T) return;  // a whole warp: no barrier below spans warps
    const float* l = logits + (size_t)t * E;
    const bool reg = E <= 32 * ROUTE_REG;
    float v[ROUTE_REG];  // register path: the logit of expert lane + 32 i (-inf past E)
#pragma unroll
    for (int i = 0; i < ROUTE_REG; ++i) v[i] = reg && lane + 32 * i < E ? l[lane + 32 * i] : -INFINITY;
    float m = 0.f, s = 1.f;
    if (!use_sigmoid) {
        m = -INFINITY;
        if (reg) {
#pragma unroll
            for (int i = 0; i < ROUTE_REG; ++i) m = fmaxf(m, v[i]);
        } else {
            for (int e = lane; e < E; e += 32) m = fmaxf(m, l[e]);
        }
        m = warp_max(m);
        float acc = 0.f;
        if (reg) {
#pragma unroll
            for (int i = 0; i < ROUTE_REG; ++i)
                if (lane + 32 * i < E) acc += expf(v[i] - m);
        } else {
            for (int e = lane; e < E; e += 32) acc += expf(l[e] - m);
        }
        s = warp_sum(acc);
    }
    // An expert's score and its choice value, each from this one expression, so they are the same bits in every
    // pass and on either path.
    auto score = [&](float x) { return use_sigmoid ? 1.f / (1.f + expf(-x)) : expf(x - m) / s; };
    auto choose = [&](float sx, int e) { return bias != nullptr ? sx + bias[e] : sx; };
    float sc[ROUTE_REG], ch[ROUTE_REG];  // register path: scores and choice values (unused past E)
#pragma unroll
    for (int i = 0; i < ROUTE_REG; ++i) {
        sc[i] = score(v[i]);
        ch[i] = reg && lane + 32 * i < E ? choose(sc[i], lane + 32 * i) : -INFINITY;
    }
    const bool limited = topk_groups < groups;
    const int gsize = E / groups;
    unsigned kept = 0xffffffffu;  // bit g: group g's experts may be picked
    if (limited) {
        float mine = -INFINITY;  // lane g: group g's score
        for (int g = 0; g < groups; ++g) {
            const int lo = g * gsize, hi = lo + gsize;
            float a = -INFINITY, b = -INFINITY;
            if (reg) {
#pragma unroll
                for (int i = 0; i < ROUTE_REG; ++i)
                    if (lane + 32 * i >= lo && lane + 32 * i < hi) top2(a, b, ch[i]);
            } else {
                for (int e = lo + lane; e < hi; e += 32) top2(a, b, choose(score(l[e]), e));
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {  // the two largest of both lanes' pairs
                const float oa = __shfl_xor_sync(0xffffffffu, a, o), ob = __shfl_xor_sync(0xffffffffu, b, o);
                b = fmaxf(fminf(a, oa), fmaxf(b, ob));
                a = fmaxf(a, oa);
            }
            if (lane == g) mine = a + b;
        }
        int better = 0;  // the groups that beat this lane's
        for (int g = 0; g < groups; ++g) {
            const float o = __shfl_sync(0xffffffffu, mine, g);
            better += o > mine || (o == mine && g < lane);
        }
        kept = __ballot_sync(0xffffffffu, lane < groups && better < topk_groups);
#pragma unroll
        for (int i = 0; i < ROUTE_REG; ++i)
            if (reg && lane + 32 * i < E && !((kept >> ((lane + 32 * i) / gsize)) & 1u)) ch[i] = -INFINITY;
    }
    int* out_id = ids + (size_t)t * k;
    float* out_w = wts + (size_t)t * k;
    // Pick j is the best (choice descending, id ascending) of the experts strictly after pick j - 1 in that
    // order, so no list of taken experts is kept and k has no limit.
    float prev_c = INFINITY, total = 0.f, my_w = 0.f;
    int prev_id = -1, my_id = 0;
    for (int j = 0; j < k; ++j) {
        float best_c = -INFINITY, best_w = 0.f;
        int best_id = INT_MAX;
        if (reg) {
#pragma unroll
            for (int i = 0; i < ROUTE_REG; ++i) {
                const int e = lane + 32 * i;
                const bool after = ch[i] < prev_c || (ch[i] == prev_c && e > prev_id);
                if (e < E && after && (ch[i] > best_c || (ch[i] == best_c && e < best_id))) {
                    best_c = ch[i];
                    best_w = sc[i];
                    best_id = e;
                }
            }
        } else {
            for (int e = lane; e < E; e += 32) {
                const float sx = score(l[e]);
                const float x = limited && !((kept >> (e / gsize)) & 1u) ? -INFINITY : choose(sx, e);
                const bool after = x < prev_c || (x == prev_c && e > prev_id);
                if (after && (x > best_c || (x == best_c && e < best_id))) {
                    best_c = x;
                    best_w = sx;
                    best_id = e;
                }
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float oc = __shfl_xor_sync(0xffffffffu, best_c, o);
            const float ow = __shfl_xor_sync(0xffffffffu, best_w, o);
            const int oi = __shfl_xor_sync(0xffffffffu, best_id, o);
            if (oc > best_c || (oc == best_c && oi < best_id)) {
                best_c = oc;
                best_w = ow;
                best_id = oi;
            }
        }
        if (best_id >= E) {  // nothing left to pick: only NaN choices; a NaN weight makes that visible downstream
            best_id = 0;
            best_c = best_w = NAN;  // (and no later pick comes after a NaN)
        }
        if (j < 32) {
            if (lane == j) { my_id = best_id; my_w = best_w; }
        } else if (lane == 0) {
            out_id[j] = best_id; out_w[j] = best_w;
        }
        total += best_w;
        prev_c = best_c;
        prev_id = best_id;
    }
    if (lane < k) {  // picks 0..31, from registers
        out_id[lane] = my_id;
        out_w[lane] = (renorm ? my_w / total : my_w) * scale;
    }
    if (lane == 0) {  // picks past 32 (reads back its own writes)
        for (int j = 32; j < k; ++j) {
            float w = out_w[j];
            if (renorm) w = w / total;
            out_w[j] = w * scale;
        }
    }
}

// One 128-bit chunk of weights (VEC values) times VEC floats of x at xp (16-byte aligned), added to acc.
__device__ __forceinline__ float dot_chunk(const uint4& wv, const float* xp, float acc) {
    const wt* we = reinterpret_cast<const wt*>(&wv);
    const float4* x4 = reinterpret_cast<const float4*>(xp);
#pragma unroll
    for (int e = 0; e < VEC / 4; ++e) {
        const float4 xv = x4[e];
        acc += to_f(we[4 * e]) * xv.x + to_f(we[4 * e + 1]) * xv.y + to_f(we[4 * e + 2]) * xv.z
               + to_f(we[4 * e + 3]) * xv.w;
    }
    return acc;
}

template <bool GATED>
__device__ __forceinline__ void moe_up_body(
        float* __restrict__ h,           // float32 [T, k, I]: w[t, j] * act(...)
        const float* __restrict__ x,     // float32 [T, D]
        const int* __restrict__ ids,     // int32 [T, k]
        const float* __restrict__ wts,   // float32 [T, k]
        const wt* __restrict__ wg,       // wt [E, I, D] (GATED)
        const wt* __restrict__ bg,       // wt [E, I] or NULL
        const wt* __restrict__ wu,       // wt [E, I, D]
        const wt* __restrict__ bu,       // wt [E, I] or NULL
        int k, int E, int I, int D, int act) {
    constexpr int NR = GATED ? 2 * MOE_ROWS : MOE_ROWS;  // up rows first, then gate rows
    __shared__ float part[MOE_THREADS / 32][NR];
    __shared__ float tot[NR];
    pdl_wait();  // the ids, x: the previous kernels' (and which weights to read depends on the ids)
    pdl_launch();  // moe_down may launch; it reads the ids before its own wait (file comment)
    const int slot = blockIdx.y, t = slot / k, r0 = blockIdx.x * MOE_ROWS;
    const int e = clamp_expert(ids[slot], E);
    const wt* rows[NR];
#pragma unroll
    for (int r = 0; r < MOE_ROWS; ++r) {
        const size_t o = ((size_t)e * I + min(r0 + r, I - 1)) * D;  // clamped rows are not written
        rows[r] = wu + o;
        if (GATED) rows[MOE_ROWS + r] = wg + o;
    }
    const float* xt = x + (size_t)t * D;
    float acc[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[r] = 0.f;
    const bool vec = D % VEC == 0 && aligned16(wu) && (!GATED || aligned16(wg)) && aligned16(x);
    if (vec) {
        const int nvec = D / VEC;
        for (int c0 = threadIdx.x; c0 < nvec; c0 += MOE_THREADS * MOE_UNROLL_UP) {
            uint4 wv[MOE_UNROLL_UP][NR];
#pragma unroll
            for (int u = 0; u < MOE_UNROLL_UP; ++u) {
                const int c = c0 + u * MOE_THREADS;
#pragma unroll
                for (int r = 0; r < NR; ++r)
                    if (c < nvec) wv[u][r] = __ldg(reinterpret_cast<const uint4*>(rows[r] + (size_t)c * VEC));
            }
#pragma unroll
            for (int u = 0; u < MOE_UNROLL_UP; ++u) {
                const int c = c0 + u * MOE_THREADS;
                if (c >= nvec) break;
#pragma unroll
                for (int r = 0; r < NR; ++r) acc[r] = dot_chunk(wv[u][r], xt + (size_t)c * VEC, acc[r]);
            }
        }
    } else {
        for (int i = threadIdx.x; i < D; i += MOE_THREADS) {
            const float xv = xt[i];
#pragma unroll
            for (int r = 0; r < NR; ++r) acc[r] += to_f(rows[r][i]) * xv;
        }
    }
    block_rows_sum<NR, MOE_THREADS>(acc, part, tot);
    if (threadIdx.x < MOE_ROWS) {
        const int row = r0 + threadIdx.x;
        if (row < I)
            h[(size_t)slot * I + row] = moe_up_value<GATED>(tot[threadIdx.x], GATED ? tot[MOE_ROWS + threadIdx.x] : 0.f,
                                                            bu, bg, (size_t)e * I + row, act, wts[slot]);
    }
}

#define MOE_UP_ARGS float* __restrict__ h, const float* __restrict__ x, const int* __restrict__ ids, \
    const float* __restrict__ wts, const wt* __restrict__ wg, const wt* __restrict__ bg, const wt* __restrict__ wu, \
    const wt* __restrict__ bu, int k, int E, int I, int D, int act
#define MOE_UP_PASS h, x, ids, wts, wg, bg, wu, bu, k, E, I, D, act
// grid (ceil(I / MOE_ROWS), T * k), MOE_THREADS threads
extern "C" __global__ void __launch_bounds__(MOE_THREADS) moe_gate_up(MOE_UP_ARGS) { moe_up_body<true>(MOE_UP_PASS); }
extern "C" __global__ void __launch_bounds__(MOE_THREADS) moe_up(MOE_UP_ARGS) { moe_up_body<false>(MOE_UP_PASS); }

// grid (ceil(D / MOE_ROWS), T), MOE_THREADS threads
extern "C" __global__ void __launch_bounds__(MOE_THREADS)
moe_down(float* __restrict__ y,            // float32 [T, D]
         const float* __restrict__ h,      // float32 [T, k, I] (already times the routing weights)
         const int* __restrict__ ids,      // int32 [T, k]
         const float* __restrict__ wts,    // float32 [T, k] (for the bias)
         const wt* __restrict__ wd,        // wt [E, D, I]
         const wt* __restrict__ bd,        // wt [E, D] or NULL
         int k, int E, int I, int D) {
    __shared__ float part[MOE_THREADS / 32][MOE_ROWS];
    __shared__ float tot[MOE_ROWS];
    const int t = blockIdx.y, r0 = blockIdx.x * MOE_ROWS;
    const int* it = ids + (size_t)t * k;
    const float* ht = h + (size_t)t * k * I;  // the k experts' activations of token t, end to end
    size_t roff[MOE_ROWS];
#pragma unroll
    for (int r = 0; r < MOE_ROWS; ++r) roff[r] = (size_t)min(r0 + r, D - 1) * I;  // clamped rows are not written
    float acc[MOE_ROWS];
#pragma unroll
    for (int r = 0; r < MOE_ROWS; ++r) acc[r] = 0.f;
    const bool vec = I % VEC == 0 && aligned16(wd) && aligned16(h);
    bool waited = false;
    if (vec) {
        // chunk v of the virtual row covers expert j = v / nvec, columns (v - j nvec) * VEC.., and h at v * VEC
        const int nvec = I / VEC, nv = nvec * k;
        for (int c0 = threadIdx.x; c0 < nv; c0 += MOE_THREADS * MOE_UNROLL_DOWN) {
            uint4 wv[MOE_UNROLL_DOWN][MOE_ROWS];
#pragma unroll
            for (int u = 0; u < MOE_UNROLL_DOWN; ++u) {
                const int v = c0 + u * MOE_THREADS;
                if (v < nv) {
                    const int j = v / nvec, c = v - j * nvec;
                    const wt* base = wd + (size_t)clamp_expert(it[j], E) * D * I + (size_t)c * VEC;
#pragma unroll
                    for (int r = 0; r < MOE_ROWS; ++r) wv[u][r] = __ldg(reinterpret_cast<const uint4*>(base + roff[r]));
                }
            }
            if (!waited) {  // the first weight loads are in flight before waiting for h (file comment)
                pdl_wait();
                pdl_launch();
                waited = true;
            }
#pragma unroll
            for (int u = 0; u < MOE_UNROLL_DOWN; ++u) {
                const int v = c0 + u * MOE_THREADS;
                if (v >= nv) break;
#pragma unroll
                for (int r = 0; r < MOE_ROWS; ++r) acc[r] = dot_chunk(wv[u][r], ht + (size_t)v * VEC, acc[r]);
            }
        }
    } else {
        pdl_wait();
        pdl_launch();
        waited = true;
        const int n = k * I;
        for (int q = threadIdx.x; q < n; q += MOE_THREADS) {
            const int j = q / I, i = q - j * I;
            const wt* base = wd + (size_t)clamp_expert(it[j], E) * D * I + i;
            const float xv = ht[q];
#pragma unroll
            for (int r = 0; r < MOE_ROWS; ++r) acc[r] += to_f(base[roff[r]]) * xv;
        }
    }
    if (!waited) {  // threads with no chunk: every thread waits (completion stays transitive)
        pdl_wait();
        pdl_launch();
    }
    block_rows_sum<MOE_ROWS, MOE_THREADS>(acc, part, tot);
    if (threadIdx.x < MOE_ROWS) {
        const int row = r0 + threadIdx.x;
        if (row < D) {
            float v = tot[threadIdx.x];
            if (bd)
                for (int j = 0; j < k; ++j) v += wts[(size_t)t * k + j] * to_f(bd[(size_t)clamp_expert(it[j], E) * D + row]);
            y[(size_t)t * D + row] = v;
        }
    }
}

// xs [n, D] = x rows tok[0..n) (prefill: one expert's tokens)
extern "C" __global__ void moe_gather(float* __restrict__ xs, const float* __restrict__ x, const int* __restrict__ tok,
                                      long long n, int D) {
    const long long total = n * D;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / D, d = i - r * D;
        xs[i] = x[(long long)tok[r] * D + d];
    }
}

// out[tok[i]] += wts[slot[i]] * y[i] for i < n (prefill: one expert's output, its tokens distinct)
extern "C" __global__ void moe_scatter_add(float* __restrict__ out, const float* __restrict__ y,
                                           const int* __restrict__ tok, const int* __restrict__ slot,
                                           const float* __restrict__ wts, long long n, int D) {
    const long long total = n * D;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / D, d = i - r * D;
        out[(long long)tok[r] * D + d] += wts[slot[r]] * y[i];
    }
}
