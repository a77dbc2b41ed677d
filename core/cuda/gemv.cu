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

// ---------------------------------------------------------------------------------------------------------
// gemv_rows / gemv_gated: the decode GEMV at bandwidth (issue 4). A block of GEMV_THREADS threads owns
// GEMV_ROWS output rows and splits K across all its threads, so each thread keeps GEMV_ROWS x GEMV_UNROLL
// independent 128-bit weight loads in flight and reuses each x chunk for every row (x is re-read once per
// GEMV_ROWS rows instead of once per row). Partial sums meet in shared memory; the epilogue adds the bias and
// applies the activation (gemv_rows: act >= 0) or act(gate) * up (gemv_gated), so those never round-trip
// through memory.
//   gemv_rows: up to 3 independent products of the same x in one launch (q, k, v): segment s has weight
//     w_s [n_s, K], bias b_s [n_s] or NULL, output y_s [T, n_s]; blocks 0.. cover segment 0, then 1, then 2.
//   gemv_gated: y [T, n] = act(x wg^T + bg) * (x wu^T + bu), each block reading GEMV_ROWS rows of both.
#ifndef GEMV_ROWS
#define GEMV_ROWS 4
#endif
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 2  // K chunks per thread whose loads are issued before any is used
#endif
#define GEMV_THREADS 128
#ifndef GEMV_EARLY_LAUNCH
#define GEMV_EARLY_LAUNCH 1  // where the block triggers programmatic dependent launch: at its start (1) or after its loads
#endif
static_assert(GEMV_ROWS >= 1 && GEMV_ROWS <= 8, "GEMV_ROWS must be in [1, 8]");
static_assert(GEMV_UNROLL >= 1 && GEMV_UNROLL <= 4, "GEMV_UNROLL must be in [1, 4]");

// Norm folded into the GEMV that reads it (issue 4), so no norm kernel runs and the normed row never goes
// through memory: the block covers all of K, so it can sum what the norm needs in the same pass.
#define FOLD_NONE 0
#define FOLD_RMS 1  // x[t, k] enters as x[t, k] * (off + g[k]); the block also sums x^2: result * rsqrt(mean + eps)
#define FOLD_LN 2   // LayerNorm with gain g, bias lb: sums A = w.(g x), B = w.g, C = w.lb, S1 = sum x, S2 = sum x^2;
                    // result rstd (A - mean B) + C with mean = S1 / K, rstd = rsqrt(S2 / K - mean^2 + eps)
// Values each warp reduces: NR*T dots, then per MODE: T (RMS) or NR (B) + NR (C) + T (S1) + T (S2) (LN).
#define RED_N(NR, MODE) ((NR) * GEMV_MAX_T + ((MODE) == FOLD_RMS ? GEMV_MAX_T : (MODE) == FOLD_LN ? 2 * (NR) + 2 * GEMV_MAX_T : 0))
#define TOT_SIZE(NR, MODE) (GEMV_THREADS / 32 * RED_N(NR, MODE))

// Sums over the block of x[t] . rows[r] for r < NR, t < T, into tot (shared, RED_N(NR, MODE) values in warp
// 0's slots): tot[r * GEMV_MAX_T + t], then the MODE's sums. fold_result gives the finished value.
template <int NR, int MODE>
__device__ __forceinline__ void dot_rows(const wt* const (&rows)[NR], const float* __restrict__ x, int T, int K,
                                         bool vec, float* tot, const wt* __restrict__ g, const wt* __restrict__ lb,
                                         float off, const float* pf = nullptr, float* pfv = nullptr) {
    // pf: a value the caller's epilogue needs from an earlier kernel (the residual), loaded as soon as the
    // wait returns so that its round trip overlaps the dot products instead of following the reduction
#define DOT_WAIT() do { pdl_wait(); if (pf) *pfv = *pf; } while (0)
    // Let the next kernel start its blocks as soon as every block of this one is running (the trigger takes
    // effect once all have issued it): its weight loads then overlap this kernel's last wave; it still waits
    // for this grid to complete before reading what it writes.
    if (GEMV_EARLY_LAUNCH) pdl_launch();
    constexpr int NS = RED_N(NR, MODE);
    constexpr bool FOLD = MODE != FOLD_NONE, LN = MODE == FOLD_LN;
    float acc[NR][GEMV_MAX_T], ss[GEMV_MAX_T], s1[GEMV_MAX_T], wg[NR], wb[NR];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_T; ++t) ss[t] = s1[t] = 0.f;
#pragma unroll
    for (int r = 0; r < NR; ++r) {
        wg[r] = wb[r] = 0.f;
#pragma unroll
        for (int t = 0; t < GEMV_MAX_T; ++t) acc[r][t] = 0.f;
    }
    if (vec) {
        const int nvec = K / VEC;
        bool waited = false;
        for (int c0 = threadIdx.x; c0 < nvec; c0 += GEMV_THREADS * GEMV_UNROLL) {
            uint4 wv[GEMV_UNROLL][NR];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) {
                int c = c0 + u * GEMV_THREADS;
#pragma unroll
                for (int r = 0; r < NR; ++r)
                    if (c < nvec) wv[u][r] = __ldg(reinterpret_cast<const uint4*>(rows[r] + (size_t)c * VEC));
            }
            // The first weight loads (no earlier kernel writes weights) are in flight before waiting for x.
            if (!waited) { DOT_WAIT(); waited = true; }
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) {
                int c = c0 + u * GEMV_THREADS;
                if (c >= nvec) break;
                float gf[FOLD ? VEC : 1], bf[LN ? VEC : 1];
                if (FOLD) {
                    load_vec(g + (size_t)c * VEC, gf);
#pragma unroll
                    for (int e = 0; e < (FOLD ? VEC : 1); ++e) gf[e] += off;
                }
                if (LN) load_vec(lb + (size_t)c * VEC, bf);
                if (LN) {  // w.g and w.lb per row, once per chunk whatever T
#pragma unroll
                    for (int r = 0; r < NR; ++r) {
                        const wt* we = reinterpret_cast<const wt*>(&wv[u][r]);
#pragma unroll
                        for (int e = 0; e < VEC; ++e) {
                            wg[r] = fmaf(to_f(we[e]), gf[FOLD ? e : 0], wg[r]);
                            wb[r] = fmaf(to_f(we[e]), bf[LN ? e : 0], wb[r]);
                        }
                    }
                }
#pragma unroll
                for (int t = 0; t < GEMV_MAX_T; ++t) {
                    if (t >= T) break;
                    float xf[VEC];
                    const float4* xp = reinterpret_cast<const float4*>(x + (size_t)t * K + (size_t)c * VEC);
#pragma unroll
                    for (int e = 0; e < VEC / 4; ++e) {
                        float4 xv = xp[e];
                        xf[4 * e] = xv.x, xf[4 * e + 1] = xv.y, xf[4 * e + 2] = xv.z, xf[4 * e + 3] = xv.w;
                    }
                    if (FOLD) {
#pragma unroll
                        for (int e = 0; e < VEC; ++e) {
                            ss[t] = fmaf(xf[e], xf[e], ss[t]);
                            if (LN) s1[t] += xf[e];
                            xf[e] *= gf[FOLD ? e : 0];
                        }
                    }
#pragma unroll
                    for (int r = 0; r < NR; ++r) {
                        const wt* we = reinterpret_cast<const wt*>(&wv[u][r]);
                        float s = acc[r][t];
#pragma unroll
                        for (int e = 0; e < VEC; ++e) s += to_f(we[e]) * xf[e];
                        acc[r][t] = s;
                    }
                }
            }
        }
        if (!waited) DOT_WAIT();  // threads with no chunk
    } else {
        DOT_WAIT();
        for (int k = threadIdx.x; k < K; k += GEMV_THREADS) {
            float wf[NR];
#pragma unroll
            for (int r = 0; r < NR; ++r) wf[r] = to_f(rows[r][k]);
            const float gk = FOLD ? off + to_f(g[k]) : 1.f;
            if (LN) {
                const float bk = to_f(lb[k]);
#pragma unroll
                for (int r = 0; r < NR; ++r) { wg[r] = fmaf(wf[r], gk, wg[r]); wb[r] = fmaf(wf[r], bk, wb[r]); }
            }
#pragma unroll
            for (int t = 0; t < GEMV_MAX_T; ++t) {
                if (t >= T) break;
                float xv = x[(size_t)t * K + k];
                if (FOLD) {
                    ss[t] = fmaf(xv, xv, ss[t]);
                    if (LN) s1[t] += xv;
                    xv *= gk;
                }
#pragma unroll
                for (int r = 0; r < NR; ++r) acc[r][t] += wf[r] * xv;
            }
        }
    }
    if (!GEMV_EARLY_LAUNCH) pdl_launch();  // this block's loads are done: the next kernel may start its blocks
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* mine = tot + warp * NS;
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
        for (int t = 0; t < GEMV_MAX_T; ++t) {
            float v = warp_sum(acc[r][t]);
            if (lane == 0) mine[r * GEMV_MAX_T + t] = v;
        }
    if (MODE == FOLD_RMS) {
#pragma unroll
        for (int t = 0; t < GEMV_MAX_T; ++t) {
            float v = warp_sum(ss[t]);
            if (lane == 0) mine[NR * GEMV_MAX_T + t] = v;
        }
    }
    if (LN) {
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            float a = warp_sum(wg[r]), b = warp_sum(wb[r]);
            if (lane == 0) { mine[NR * GEMV_MAX_T + r] = a; mine[NR * GEMV_MAX_T + NR + r] = b; }
        }
#pragma unroll
        for (int t = 0; t < GEMV_MAX_T; ++t) {
            float a = warp_sum(s1[t]), b = warp_sum(ss[t]);
            if (lane == 0) { mine[NR * GEMV_MAX_T + 2 * NR + t] = a; mine[NR * GEMV_MAX_T + 2 * NR + GEMV_MAX_T + t] = b; }
        }
    }
    __syncthreads();
    if (threadIdx.x < NS) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < GEMV_THREADS / 32; ++w) s += tot[w * NS + threadIdx.x];
        tot[threadIdx.x] = s;  // only this thread touches column threadIdx.x (warp 0's slot of it)
    }
    __syncthreads();
#undef DOT_WAIT
}

// The finished product of row r and token t from dot_rows' sums (before bias and activation).
template <int NR, int MODE>
__device__ __forceinline__ float fold_result(const float* tot, int r, int t, int K, float eps) {
    const float a = tot[r * GEMV_MAX_T + t];
    if (MODE == FOLD_RMS) return a * rsqrtf(tot[NR * GEMV_MAX_T + t] / K + eps);
    if (MODE == FOLD_LN) {
        const float* e = tot + NR * GEMV_MAX_T;
        const float mean = e[2 * NR + t] / K;
        const float var = fmaxf(e[2 * NR + GEMV_MAX_T + t] / K - mean * mean, 0.f);
        return rsqrtf(var + eps) * (a - mean * e[r]) + e[NR + r];
    }
    return a;
}

template <int MODE>
__device__ __forceinline__ void gemv_rows_body(const float* __restrict__ x,  // float32 [T, K]
          int T, int K,                 // T <= GEMV_MAX_T
          int act,                      // ACT_* code applied after the bias, or -1 for none
          const wt* __restrict__ g,     // wt [K]: the folded norm's gain (MODE != FOLD_NONE)
          const wt* __restrict__ lb,    // wt [K]: the folded LayerNorm's bias (MODE == FOLD_LN)
          float eps, float off,         // the folded norm's epsilon; its gain applied as (off + g)
          const float* __restrict__ resid,  // float32 [T, n0] added to segment 0's result (residual), or NULL
          float* y0, const wt* __restrict__ w0, const wt* __restrict__ b0, int n0,  // segment 0
          float* y1, const wt* __restrict__ w1, const wt* __restrict__ b1, int n1,  // segment 1 (n1 = 0: none)
          float* y2, const wt* __restrict__ w2, const wt* __restrict__ b2, int n2)  // segment 2 (n2 = 0: none)
{
    __shared__ float tot[TOT_SIZE(GEMV_ROWS, MODE)];
    int blk = blockIdx.x;
    int nb0 = (n0 + GEMV_ROWS - 1) / GEMV_ROWS, nb1 = (n1 + GEMV_ROWS - 1) / GEMV_ROWS;
    float* y = y0; const wt* w = w0; const wt* b = b0; int n = n0;
    if (blk >= nb0 + nb1) { blk -= nb0 + nb1; y = y2; w = w2; b = b2; n = n2; }
    else if (blk >= nb0) { blk -= nb0; y = y1; w = w1; b = b1; n = n1; }
    int r0 = blk * GEMV_ROWS;
    if (r0 >= n) { pdl_wait(); return; }  // whole block: no barrier is skipped by part of it
    const wt* rows[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) rows[r] = w + (size_t)min(r0 + r, n - 1) * K;  // clamped rows are not written
    bool vec = (K % VEC == 0) && aligned16(w) && aligned16(x) && (MODE == FOLD_NONE || aligned16(g))
               && (MODE != FOLD_LN || aligned16(lb));
    // the epilogue's thread (row r, token t): its bias now (weights), its residual right after the wait
    const int er = threadIdx.x / GEMV_MAX_T, et = threadIdx.x % GEMV_MAX_T, erow = r0 + er;
    const bool epi = threadIdx.x < GEMV_ROWS * GEMV_MAX_T && et < T && erow < n;
    const float bv = epi && b ? to_f(b[erow]) : 0.f;
    float rv = 0.f;
    dot_rows<GEMV_ROWS, MODE>(rows, x, T, K, vec, tot, g, lb, off,
                              epi && resid && y == y0 ? resid + (size_t)et * n + erow : nullptr, &rv);
    if (epi) {
        float v = fold_result<GEMV_ROWS, MODE>(tot, er, et, K, eps) + bv;
        v = act >= 0 ? activate(v, act) : v;
        y[(size_t)et * n + erow] = rv + v;
    }
}

#define GEMV_ROWS_ARGS const float* __restrict__ x, int T, int K, int act, const wt* __restrict__ g, \
    const wt* __restrict__ lb, float eps, float off, const float* __restrict__ resid, float* y0, \
    const wt* __restrict__ w0, const wt* __restrict__ b0, int n0, float* y1, const wt* __restrict__ w1, \
    const wt* __restrict__ b1, int n1, float* y2, const wt* __restrict__ w2, const wt* __restrict__ b2, int n2
#define GEMV_ROWS_PASS x, T, K, act, g, lb, eps, off, resid, y0, w0, b0, n0, y1, w1, b1, n1, y2, w2, b2, n2
// One kernel per mode, so the plain one keeps its registers (g, lb, eps, off unused there).
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_rows(GEMV_ROWS_ARGS) {
    gemv_rows_body<FOLD_NONE>(GEMV_ROWS_PASS);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_rows_norm(GEMV_ROWS_ARGS) {
    gemv_rows_body<FOLD_RMS>(GEMV_ROWS_PASS);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_rows_ln(GEMV_ROWS_ARGS) {
    gemv_rows_body<FOLD_LN>(GEMV_ROWS_PASS);
}

template <int MODE>
__device__ __forceinline__ void gemv_gated_body(float* __restrict__ y,         // float32 [T, n]
           const float* __restrict__ x,   // float32 [T, K]
           const wt* __restrict__ wg,     // wt [n, K] (gate)
           const wt* __restrict__ bg,     // wt [n] or NULL
           const wt* __restrict__ wu,     // wt [n, K] (up)
           const wt* __restrict__ bu,     // wt [n] or NULL
           int T, int n, int K, int act,  // T <= GEMV_MAX_T; act: ACT_* code
           const wt* __restrict__ g, const wt* __restrict__ lb, float eps, float off)  // folded norm (gemv_rows)
{
    __shared__ float tot[TOT_SIZE(2 * GEMV_ROWS, MODE)];
    int r0 = blockIdx.x * GEMV_ROWS;
    if (r0 >= n) { pdl_wait(); return; }
    const wt* rows[2 * GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        size_t o = (size_t)min(r0 + r, n - 1) * K;
        rows[r] = wg + o;
        rows[GEMV_ROWS + r] = wu + o;
    }
    bool vec = (K % VEC == 0) && aligned16(wg) && aligned16(wu) && aligned16(x)
               && (MODE == FOLD_NONE || aligned16(g)) && (MODE != FOLD_LN || aligned16(lb));
    dot_rows<2 * GEMV_ROWS, MODE>(rows, x, T, K, vec, tot, g, lb, off);
    if (threadIdx.x < GEMV_ROWS * GEMV_MAX_T) {
        int r = threadIdx.x / GEMV_MAX_T, t = threadIdx.x % GEMV_MAX_T, row = r0 + r;
        if (t < T && row < n) {
            float gv = fold_result<2 * GEMV_ROWS, MODE>(tot, r, t, K, eps) + (bg ? to_f(bg[row]) : 0.f);
            float u = fold_result<2 * GEMV_ROWS, MODE>(tot, GEMV_ROWS + r, t, K, eps) + (bu ? to_f(bu[row]) : 0.f);
            y[(size_t)t * n + row] = activate(gv, act) * u;
        }
    }
}

#define GEMV_GATED_ARGS float* __restrict__ y, const float* __restrict__ x, const wt* __restrict__ wg, \
    const wt* __restrict__ bg, const wt* __restrict__ wu, const wt* __restrict__ bu, int T, int n, int K, int act, \
    const wt* __restrict__ g, const wt* __restrict__ lb, float eps, float off
#define GEMV_GATED_PASS y, x, wg, bg, wu, bu, T, n, K, act, g, lb, eps, off
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_gated(GEMV_GATED_ARGS) {
    gemv_gated_body<FOLD_NONE>(GEMV_GATED_PASS);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_gated_norm(GEMV_GATED_ARGS) {
    gemv_gated_body<FOLD_RMS>(GEMV_GATED_PASS);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_gated_ln(GEMV_GATED_ARGS) {
    gemv_gated_body<FOLD_LN>(GEMV_GATED_PASS);
}
