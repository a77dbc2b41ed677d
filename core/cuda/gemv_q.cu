// Quantized weights (issue 16): the decode GEMV that dequantizes in registers, and the dequantization the prefill
// GEMM reads. Weights are in the device layout of core/cuda/qlayout.py: per output row, 32-bit words of codes along
// K (int4: 8 a word, int8 and fp8: 4), padded to whole 16-byte chunks; scales [R, G] in the scales' own type `st`
// (SDTYPE), row n using scale row n / srow and element k column min(k >> lg, G - 1); uint8 zero points [N, G] or
// none (2^(bits-1), symmetric); x staged by the backend when it must be permuted (act-order) or padded to Kp.
//
// fp8's GEMVs and qdequant dequantize as quant.cuh does (the weight exactly core/quant/dequant.py's, rounded once to
// the scale type) and accumulate w * x in fp32 (x stays fp32), as gemv.cu does. The integer kinds' GEMVs (QFOLD,
// qacc_fold) take the scale out of the inner loop, so they multiply by (u - z) s unrounded instead; either way the
// result is the dense product over that weight up to fp32 summation order (tests/test_cuda_quant.py holds it to
// that, with geometry.qgemv_rounds saying which weight).
//
// qgemv_<kind>: up to 3 products of the same x (q, k, v) in one launch, with an activation in the epilogue, the
//   geometry of gemv.cu's gemv_rows: a block of QTHREADS threads owns QROWS output rows of one segment and splits K
//   across its threads in pieces (16 bytes; QWORDS_<kind> words for the folded integer kinds), QROWS x QUNROLL
//   weight loads in flight a thread, each piece's x read once for all QROWS rows, partial sums meeting in shared
//   memory.
// qgemv_gated_<kind>: act(x wg^T + bg) * (x wu^T + bu), a block reading QROWS rows of both.
// qdequant_<kind>: the dense weight wt [N, K] (act-order columns put back in place) for the GEMM of many tokens.
// qstage: x [T, K] permuted and zero-padded into [T, Kp].
#include "quant.cuh"

#ifndef GEMV_MAX_T
#define GEMV_MAX_T 4  // tokens per weight read; the backend routes more to the dequantized GEMM
#endif
#ifndef QROWS
#define QROWS 4  // output rows per block
#endif
#ifndef QUNROLL
#define QUNROLL 2  // chunks per thread whose loads are issued before any is used
#endif
#ifndef QPRESCALE
#define QPRESCALE 0  // load a chunk's scales with its words (1) or when it is used (0)
#endif
#ifndef QFOLD
#define QFOLD 1  // integer kinds: the scale folded out of the inner loop (qacc_fold, 1) or each word dequantized (0)
#endif
#ifndef QWORDS_INT4
#define QWORDS_INT4 2  // QFOLD: 32-bit words a lane loads at once (1, 2 or 4; see qacc_fold), int4
#endif
#ifndef QWORDS_INT8
#define QWORDS_INT8 4  // the same, int8 (one build holds every kind's kernels)
#endif
#ifndef QDIAG
#define QDIAG 0  // diagnostics of qacc_fold's limits for tools/qgemv_probe.py (wrong results): 0 in every real build
#endif
#ifndef QTHREADS
#define QTHREADS 128  // threads per block, splitting K
#endif
#ifndef GEMV_EARLY_LAUNCH
#define GEMV_EARLY_LAUNCH 1  // where a block triggers programmatic dependent launch: at its start (1) or after loads
#endif
static_assert(GEMV_MAX_T >= 1 && GEMV_MAX_T <= 16, "GEMV_MAX_T must be in [1, 16]");
static_assert(QROWS >= 1 && QROWS <= 16 && QUNROLL >= 1 && QUNROLL <= 8, "QROWS in [1, 16], QUNROLL in [1, 8]");
static_assert((QWORDS_INT4 == 1 || QWORDS_INT4 == 2 || QWORDS_INT4 == 4) &&
              (QWORDS_INT8 == 1 || QWORDS_INT8 == 2 || QWORDS_INT8 == 4), "QWORDS_* must be 1, 2 or 4");
static_assert(QTHREADS % 32 == 0 && QTHREADS >= 32 && QTHREADS <= 256, "QTHREADS: whole warps, 32 to 256");

// (a & b) | c in one LOP3 (nvcc emits an AND and an OR when b and c are both constants).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Words c * QW .. c * QW + QW - 1 of a row, in one load (the row's words are 16-byte aligned).
template <int QW>
__device__ __forceinline__ void load_words(const uint32_t* row, int c, uint32_t (&w)[QW]) {
    if constexpr (QW == 4) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + c);
        w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (QW == 2) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(row) + c);
        w[0] = v.x, w[1] = v.y;
    } else {
        w[0] = __ldg(row + c);
    }
}

// The integer kinds' partial sums acc[r][t] += x[t] . W[r] with the scale folded out of the inner loop: per scale
// span (a piece of QWORDS_<kind> words when it lies in one group, else a word) sum_k (u - z) x[k] = sum_k u x[k] -
// z sum_k x[k], times s once. A code u reaches fp32 with no conversion instruction: the word's bits masked in place
// under the fp32 MAGIC 2^23 are 2^23 + u 2^p (p: the code's bit position, below bit 20; the top codes from the word
// shifted right first), and minus 2^23 that is u 2^p exactly; x[k] was multiplied by 2^-p (exact) once for all NR
// rows. So a weight costs one LOP3, one FADD and one FFMA a token.
// The weight this multiplies x by is (u - z) s unrounded (exact in fp32), not rounded to the scale type as the
// reference's is: qlayout.dense(p, rounded=False) is its numpy reference; the two differ by at most half an ulp of
// the scale type per weight.
// A lane reads QWORDS_<kind> consecutive words of a row at once and the PER * QWORDS floats of x they meet; the lanes of a
// warp take consecutive pieces, so one x load instruction of the warp spans 32 pieces' x: with 16-byte pieces (32
// int4 codes, 128 bytes of x a lane) that is 32 cache lines a load, the L1 serving 16 useful bytes a pass, which
// capped int4 at ~7 weights per SM clock on the H100 (BENCHMARKS.md); one word a lane spans 8.
template <int KIND, int NR>
__device__ __forceinline__ void qacc_fold(const uint32_t* const (&rows)[NR], const st* const (&srows)[NR],
                                          const uint8_t* const (&zrows)[NR], const float* __restrict__ x, int T,
                                          int Kp, int lg, int G, float (&acc)[NR][GEMV_MAX_T]) {
    typedef Codes<KIND> C;
    constexpr int NLO = KIND == KIND_INT4 ? 5 : 2;   // codes read in place (bits below 20: u 2^p < 2^20)
    constexpr int SH = KIND == KIND_INT4 ? 12 : 16;  // the others, from the word shifted right by SH
    constexpr uint32_t MASK = (1u << C::BITS) - 1;
    constexpr int QW = KIND == KIND_INT4 ? QWORDS_INT4 : QWORDS_INT8, PC = C::PER * QW;  // words, codes a piece
    constexpr int LOG_PC = (KIND == KIND_INT4 ? 3 : 2) + (QW == 4 ? 2 : QW == 2 ? 1 : 0);
    const int nch = Kp / PC;
    const bool whole = lg >= LOG_PC;  // every piece lies in one group: one scale a piece, else one a word
    bool waited = false;
    for (int c0 = threadIdx.x; c0 < nch; c0 += QTHREADS * QUNROLL) {
        uint32_t wv[QUNROLL][NR][QW];
        float sv[QUNROLL][NR], zv[QUNROLL][NR];  // QPRESCALE: a whole piece's scale and zero point, with its words
#pragma unroll
        for (int u = 0; u < QUNROLL; ++u) {
            const int c = c0 + u * QTHREADS;
            const int g = min((c * PC) >> lg, G - 1);
#pragma unroll
            for (int r = 0; r < NR; ++r)
                if (c < nch) {
                    // QDIAG bit 1 (tools/qgemv_probe.py only): every block reads the first block's rows (L2 hits)
                    load_words<QW>((QDIAG & 2) ? rows[r] - (size_t)(blockIdx.x * QROWS) * (Kp / C::PER) : rows[r], c,
                                   wv[u][r]);
                    if (QPRESCALE && whole) {
                        sv[u][r] = to_f(srows[r][g]);
                        zv[u][r] = code_f(zrows[r] ? (uint32_t)zrows[r][g] : C::ZSYM);
                    }
                }
        }
        if (!waited) { pdl_wait(); waited = true; }  // the first weight loads are in flight before waiting for x
#pragma unroll
        for (int u = 0; u < QUNROLL; ++u) {
            const int c = c0 + u * QTHREADS;
            if (c >= nch) break;
            float s[NR], z[NR];
            if (whole) {  // loaded before the piece's arithmetic, used after it
                const int g = min((c * PC) >> lg, G - 1);
#pragma unroll
                for (int r = 0; r < NR; ++r) {
                    s[r] = QPRESCALE ? sv[u][r] : to_f(srows[r][g]);
                    z[r] = QPRESCALE ? zv[u][r] : code_f(zrows[r] ? (uint32_t)zrows[r][g] : C::ZSYM);
                }
            }
            float p[NR][GEMV_MAX_T], sx[GEMV_MAX_T];
#pragma unroll
            for (int t = 0; t < GEMV_MAX_T; ++t) {
                sx[t] = 0.f;
#pragma unroll
                for (int r = 0; r < NR; ++r) p[r][t] = 0.f;
            }
#pragma unroll
            for (int j = 0; j < QW; ++j) {
                const int k = c * PC + j * C::PER;
                float xs[GEMV_MAX_T][C::PER];  // x[k] 2^-p
#pragma unroll
                for (int t = 0; t < GEMV_MAX_T; ++t) {
                    if (GEMV_MAX_T > 1 && t >= T) break;  // a one-token build has T = 1
                    // QDIAG bit 0 (tools/qgemv_probe.py only): x from its first 512 bytes, which stay in L1
                    const float4* xp = reinterpret_cast<const float4*>(x + (size_t)t * Kp + ((QDIAG & 1) ? k & 127 : k));
#pragma unroll
                    for (int e4 = 0; e4 < C::PER / 4; ++e4) {
                        const float4 v = xp[e4];
                        const float vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const int e = 4 * e4 + i;
                            const int pos = e < NLO ? e * C::BITS : e * C::BITS - SH;
                            sx[t] += vv[i];
                            xs[t][e] = vv[i] * (1.0f / (float)(1u << pos));
                        }
                    }
                }
#pragma unroll
                for (int r = 0; r < NR; ++r) {
                    const uint32_t word = wv[u][r][j], hi = word >> SH;
#pragma unroll
                    for (int e = 0; e < C::PER; ++e) {
                        const int pos = e < NLO ? e * C::BITS : e * C::BITS - SH;
                        const float d = __uint_as_float(and_or(e < NLO ? word : hi, MASK << pos, MAGIC32)) - 8388608.f;
#pragma unroll
                        for (int t = 0; t < GEMV_MAX_T; ++t) {
                            if (GEMV_MAX_T > 1 && t >= T) break;
                            p[r][t] = fmaf(d, xs[t][e], p[r][t]);
                        }
                    }
                }
                if (!whole) {  // groups shorter than a piece: this word's group, its scale applied now
                    const int g = min(k >> lg, G - 1);
#pragma unroll
                    for (int r = 0; r < NR; ++r) {
                        const float sw = to_f(srows[r][g]);
                        const float zw = code_f(zrows[r] ? (uint32_t)zrows[r][g] : C::ZSYM);
#pragma unroll
                        for (int t = 0; t < GEMV_MAX_T; ++t) {
                            acc[r][t] = fmaf(fmaf(-zw, sx[t], p[r][t]), sw, acc[r][t]);
                            p[r][t] = 0.f;
                        }
                    }
#pragma unroll
                    for (int t = 0; t < GEMV_MAX_T; ++t) sx[t] = 0.f;
                }
            }
            if (whole) {
#pragma unroll
                for (int r = 0; r < NR; ++r)
#pragma unroll
                    for (int t = 0; t < GEMV_MAX_T; ++t) acc[r][t] = fmaf(fmaf(-z[r], sx[t], p[r][t]), s[r], acc[r][t]);
            }
        }
    }
    if (!waited) pdl_wait();  // threads with no piece: every thread waits (completion stays transitive)
}

// The partial sums acc[r][t] += x[t] . W[r], each word dequantized to floats (dequant_word: the reference's weight
// exactly) before its products: fp8 always, the integer kinds when QFOLD is 0.
template <int KIND, int NR>
__device__ __forceinline__ void qacc_words(const uint32_t* const (&rows)[NR], const st* const (&srows)[NR],
                                           const uint8_t* const (&zrows)[NR], const float* __restrict__ x, int T,
                                           int Kp, int lg, int G, float (&acc)[NR][GEMV_MAX_T]) {
    typedef Codes<KIND> C;
    const int nch = Kp / C::CH;
    const bool whole = lg >= C::LOG_CH;  // every chunk lies in one group: one scale a chunk, else one a word
    bool waited = false;
    for (int c0 = threadIdx.x; c0 < nch; c0 += QTHREADS * QUNROLL) {
        uint4 wv[QUNROLL][NR];
        st sv[QUNROLL][NR];  // a chunk's scale and zero point (whole), loaded with its words: not a second latency
        uint32_t zv[QUNROLL][NR];
#pragma unroll
        for (int u = 0; u < QUNROLL; ++u) {
            const int c = c0 + u * QTHREADS;
            const int g = min((c * C::CH) >> lg, G - 1);
#pragma unroll
            for (int r = 0; r < NR; ++r)
                if (c < nch) {
                    wv[u][r] = __ldg(reinterpret_cast<const uint4*>(rows[r]) + c);
                    if (QPRESCALE && whole) {
                        sv[u][r] = srows[r][g];
                        zv[u][r] = zrows[r] ? (uint32_t)zrows[r][g] : C::ZSYM;
                    }
                }
        }
        // the first weight loads (no kernel writes weights) are in flight before waiting for x
        if (!waited) { pdl_wait(); waited = true; }
#pragma unroll
        for (int u = 0; u < QUNROLL; ++u) {
            const int c = c0 + u * QTHREADS;
            if (c >= nch) break;
            QS sc[NR];
            if (whole) {
#pragma unroll
                for (int r = 0; r < NR; ++r)
                    sc[r] = QPRESCALE ? make_qs(sv[u][r], zv[u][r])
                                      : scale_of<KIND>(srows[r], zrows[r], min((c * C::CH) >> lg, G - 1));
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int k = c * C::CH + j * C::PER;
                if (!whole) {
#pragma unroll
                    for (int r = 0; r < NR; ++r) sc[r] = scale_of<KIND>(srows[r], zrows[r], min(k >> lg, G - 1));
                }
                float xf[GEMV_MAX_T][C::PER];
#pragma unroll
                for (int t = 0; t < GEMV_MAX_T; ++t) {
                    if (t >= T) break;
                    const float4* xp = reinterpret_cast<const float4*>(x + (size_t)t * Kp + k);
#pragma unroll
                    for (int e = 0; e < C::PER / 4; ++e) {
                        const float4 v = xp[e];
                        xf[t][4 * e] = v.x, xf[t][4 * e + 1] = v.y, xf[t][4 * e + 2] = v.z, xf[t][4 * e + 3] = v.w;
                    }
                }
#pragma unroll
                for (int r = 0; r < NR; ++r) {
                    const uint32_t word = j == 0 ? wv[u][r].x : j == 1 ? wv[u][r].y : j == 2 ? wv[u][r].z : wv[u][r].w;
                    float wf[C::PER];
                    dequant_word<KIND>(word, sc[r], wf);
#pragma unroll
                    for (int t = 0; t < GEMV_MAX_T; ++t) {
                        if (t >= T) break;
                        float s = acc[r][t];
#pragma unroll
                        for (int e = 0; e < C::PER; ++e) s = fmaf(wf[e], xf[t][e], s);
                        acc[r][t] = s;
                    }
                }
            }
        }
    }
    if (!waited) pdl_wait();  // threads with no chunk: every thread waits (completion stays transitive)
}

// Sums over the block of x[t] . W[r] for r < NR, t < T into tot[r * GEMV_MAX_T + t] (shared; QTHREADS / 32 * NR *
// GEMV_MAX_T floats). rows: the NR rows' words; srows / zrows: their scale rows and zero-point rows (or NULL).
template <int KIND, int NR>
__device__ __forceinline__ void qdot(const uint32_t* const (&rows)[NR], const st* const (&srows)[NR],
                                     const uint8_t* const (&zrows)[NR], const float* __restrict__ x, int T, int Kp,
                                     int lg, int G, float* tot) {
    // Let the next kernel start its blocks as soon as every block of this one runs (gemv.cu's early launch; not
    // before the decode attention, whose K/V prefetch it slows: geometry.gemv_geometry).
    if (GEMV_EARLY_LAUNCH) pdl_launch();
    float acc[NR][GEMV_MAX_T];
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
        for (int t = 0; t < GEMV_MAX_T; ++t) acc[r][t] = 0.f;
    if constexpr (KIND != KIND_FP8 && QFOLD) qacc_fold<KIND, NR>(rows, srows, zrows, x, T, Kp, lg, G, acc);
    else qacc_words<KIND, NR>(rows, srows, zrows, x, T, Kp, lg, G, acc);
    if (!GEMV_EARLY_LAUNCH) pdl_launch();
    constexpr int NS = NR * GEMV_MAX_T;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
        for (int t = 0; t < GEMV_MAX_T; ++t) {
            const float v = warp_sum(acc[r][t]);
            if (lane == 0) tot[warp * NS + r * GEMV_MAX_T + t] = v;
        }
    __syncthreads();
    if (QTHREADS > 32) {  // one warp: its lane 0 wrote the sums already
        for (int i = threadIdx.x; i < NS; i += QTHREADS) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < QTHREADS / 32; ++w) s += tot[w * NS + i];
            tot[i] = s;  // only this thread touches column i (warp 0's slot of it)
        }
        __syncthreads();
    }
    // one warp: its lane 0's sums, written before the barrier above, are the totals
}

template <int KIND>
__device__ __forceinline__ void qgemv_body(
    const float* __restrict__ x,  // float32 [T, Kp], 16-byte aligned (staged when it is not, or K < Kp)
    int T, int Kp,                // T <= GEMV_MAX_T; Kp: K padded to whole chunks (the words' row length in codes)
    int lg, int G, int srow,      // the shared scale geometry of the segments (see the file comment)
    int act,                      // ACT_* code applied after the bias, or -1 for none
    // segment s: y_s float32 [T, n_s]; q_s uint32 [n_s, Kp / PER]; s_s st [ceil(n_s / srow), G]; z_s uint8 [n_s, G]
    // or NULL; b_s wt [n_s] or NULL. n1 = 0 / n2 = 0: no such segment
    float* y0, const uint32_t* q0, const st* s0, const uint8_t* z0, const wt* b0, int n0,
    float* y1, const uint32_t* q1, const st* s1, const uint8_t* z1, const wt* b1, int n1,
    float* y2, const uint32_t* q2, const st* s2, const uint8_t* z2, const wt* b2, int n2) {
    __shared__ float tot[QTHREADS / 32 * QROWS * GEMV_MAX_T];
    int blk = blockIdx.x;
    const int nb0 = (n0 + QROWS - 1) / QROWS, nb1 = (n1 + QROWS - 1) / QROWS;
    float* y = y0; const uint32_t* q = q0; const st* s = s0; const uint8_t* z = z0; const wt* b = b0; int n = n0;
    if (blk >= nb0 + nb1) { blk -= nb0 + nb1; y = y2; q = q2; s = s2; z = z2; b = b2; n = n2; }
    else if (blk >= nb0) { blk -= nb0; y = y1; q = q1; s = s1; z = z1; b = b1; n = n1; }
    const int r0 = blk * QROWS;
    if (r0 >= n) { pdl_wait(); return; }  // whole block: no barrier is skipped by part of it
    const uint32_t* rows[QROWS];
    const st* srows[QROWS];
    const uint8_t* zrows[QROWS];
#pragma unroll
    for (int r = 0; r < QROWS; ++r)  // clamped rows are read, never written
        row_ptrs<KIND>(q, s, z, min(r0 + r, n - 1), Kp, G, srow, rows[r], srows[r], zrows[r]);
    if (QROWS * GEMV_MAX_T <= QTHREADS) {  // one output a thread: its bias loaded before the dot product
        const int er = threadIdx.x / GEMV_MAX_T, et = threadIdx.x % GEMV_MAX_T, erow = r0 + er;
        const bool epi = threadIdx.x < QROWS * GEMV_MAX_T && et < T && erow < n;
        const float bv = epi && b ? to_f(b[erow]) : 0.f;
        qdot<KIND, QROWS>(rows, srows, zrows, x, T, Kp, lg, G, tot);
        if (epi) {
            const float v = tot[er * GEMV_MAX_T + et] + bv;
            y[(size_t)et * n + erow] = act >= 0 ? activate(v, act) : v;
        }
        return;
    }
    qdot<KIND, QROWS>(rows, srows, zrows, x, T, Kp, lg, G, tot);
    for (int i = threadIdx.x; i < QROWS * GEMV_MAX_T; i += QTHREADS) {  // more outputs than threads
        const int et = i % GEMV_MAX_T, erow = r0 + i / GEMV_MAX_T;
        if (et < T && erow < n) {
            const float v = tot[i] + (b ? to_f(b[erow]) : 0.f);
            y[(size_t)et * n + erow] = act >= 0 ? activate(v, act) : v;
        }
    }
}

template <int KIND>
__device__ __forceinline__ void qgemv_gated_body(
    float* __restrict__ y,        // float32 [T, n]
    const float* __restrict__ x,  // float32 [T, Kp] (as qgemv)
    int T, int Kp, int lg, int G, int srow, int act, int n,  // act: ACT_* code of the gate
    const uint32_t* qg, const st* sg, const uint8_t* zg, const wt* bg,  // gate [n, K] (as a qgemv segment)
    const uint32_t* qu, const st* su, const uint8_t* zu, const wt* bu)  // up [n, K]
{
    __shared__ float tot[QTHREADS / 32 * 2 * QROWS * GEMV_MAX_T];
    const int r0 = blockIdx.x * QROWS;
    if (r0 >= n) { pdl_wait(); return; }
    const uint32_t* rows[2 * QROWS];
    const st* srows[2 * QROWS];
    const uint8_t* zrows[2 * QROWS];
#pragma unroll
    for (int r = 0; r < QROWS; ++r) {
        const int row = min(r0 + r, n - 1);
        row_ptrs<KIND>(qg, sg, zg, row, Kp, G, srow, rows[r], srows[r], zrows[r]);
        row_ptrs<KIND>(qu, su, zu, row, Kp, G, srow, rows[QROWS + r], srows[QROWS + r], zrows[QROWS + r]);
    }
    qdot<KIND, 2 * QROWS>(rows, srows, zrows, x, T, Kp, lg, G, tot);
    for (int i = threadIdx.x; i < QROWS * GEMV_MAX_T; i += QTHREADS) {
        const int r = i / GEMV_MAX_T, t = i % GEMV_MAX_T, row = r0 + r;
        if (t < T && row < n) {
            const float gv = tot[r * GEMV_MAX_T + t] + (bg ? to_f(bg[row]) : 0.f);
            const float u = tot[(QROWS + r) * GEMV_MAX_T + t] + (bu ? to_f(bu[row]) : 0.f);
            y[(size_t)t * n + row] = activate(gv, act) * u;
        }
    }
}

template <int KIND>
__device__ __forceinline__ void qdequant_body(
    wt* __restrict__ out,            // wt [N, K]
    const uint32_t* __restrict__ q,  // uint32 [N, Kp / PER]
    const st* __restrict__ s,        // st [ceil(N / srow), G]
    const uint8_t* __restrict__ z,   // uint8 [N, G] or NULL
    const int* __restrict__ perm,    // int32 [K] (packed column j is column perm[j]) or NULL
    int N, int K, int Kp, int lg, int G, int srow) {
    typedef Codes<KIND> C;
    const int kw = Kp / C::PER;
    const long long total = (long long)N * kw;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += stride) {
        const int n = (int)(i / kw), k = (int)(i - (long long)n * kw) * C::PER;
        if (k >= K) continue;
        const uint8_t* zr = z ? z + (size_t)n * G : nullptr;
        float f[C::PER];
        dequant_word<KIND>(q[i], scale_of<KIND>(s + (size_t)(n / srow) * G, zr, min(k >> lg, G - 1)), f);
        wt* o = out + (size_t)n * K;
#pragma unroll
        for (int e = 0; e < C::PER; ++e)
            if (k + e < K) o[perm ? perm[k + e] : k + e] = from_f<wt>(f[e]);
    }
}

#define QDEQ_ARGS wt* __restrict__ out, const uint32_t* __restrict__ q, const st* __restrict__ s, \
    const uint8_t* __restrict__ z, const int* __restrict__ perm, int N, int K, int Kp, int lg, int G, int srow
#define QDEQ_PASS out, q, s, z, perm, N, K, Kp, lg, G, srow
// One kernel per kind (the backend names them by the layout's kind).
#define QKERNELS(NAME, KIND) \
    extern "C" __global__ void __launch_bounds__(QTHREADS) qgemv_##NAME(QGEMV_ARGS) { qgemv_body<KIND>(QGEMV_PASS); } \
    extern "C" __global__ void __launch_bounds__(QTHREADS) qgemv_gated_##NAME(QGATED_ARGS) { \
        qgemv_gated_body<KIND>(QGATED_PASS); } \
    extern "C" __global__ void qdequant_##NAME(QDEQ_ARGS) { qdequant_body<KIND>(QDEQ_PASS); }
QKERNELS(int4, KIND_INT4)
QKERNELS(int8, KIND_INT8)
QKERNELS(fp8, KIND_FP8)

extern "C" __global__ void qstage(float* __restrict__ xs,       // float32 [T, Kp]
                                  const float* __restrict__ x,  // float32 [T, K]
                                  const int* __restrict__ perm, // int32 [K] or NULL
                                  int T, int K, int Kp) {
    const long long total = (long long)T * Kp;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += stride) {
        const int t = (int)(i / Kp), j = (int)(i - (long long)t * Kp);
        xs[i] = j < K ? x[(size_t)t * K + (perm ? perm[j] : j)] : 0.f;
    }
}
