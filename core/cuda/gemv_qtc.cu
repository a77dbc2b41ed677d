// The one-token gated decode GEMV of integer weights (int4, int8: qlayout.py's words) on tensor cores (issue 16),
// behind the qtc switch (options.py; off by default: BENCHMARKS.md).
//
// Why: gemv_q.cu's qacc_fold spends ~3.6 instructions a weight (LOP3, FADD, FFMA, x scaling), which caps a Qwen3-8B
// layer at ~9 weights per SM clock on an H100 even with every byte in cache (tools/qgemv_probe.py QDIAG 3), a third
// of what int4 needs to keep up with the memory. Here a warp multiplies a 16-row tile of W by x with
// mma.sync.m16n8k16 (fp16 in, fp32 accumulate): a code becomes an fp16 operand with one LOP3 per two codes, and the
// multiply-adds leave the FMA pipe.
//
// The arithmetic, exact up to fp32 summation (as qacc_fold; reference: qlayout.dense(p, rounded=False)):
//   A (16 rows x 16 k): the codes u themselves. Masked in place, a code's bits are the mantissa of an fp16 subnormal,
//     u 2^-24, exactly (u < 2^10); the products are scaled back by 2^24.
//   B (16 k x 8 columns): x of the one token, split as x sigma = hi + lo (two fp16; sigma a power of two putting
//     max |x| in [2^12, 2^13), so hi cannot overflow): column 0 hi, column 4 lo, the rest zero. hi + lo carries 22
//     bits of x sigma; what fp16 cannot hold of lo (below 2^-24) is < 2^-38 max |x| sigma.
//   A step is 16 words of each row (int4: 128 codes, int8: 64), every code in one scale group (the backend takes
//     this kernel only when a group holds a whole step): per row and column sum_k (u - z) x = C 2^24 - z sum_k x
//     (the step's x sums as the MMA sees them, hi and lo apart), times the group's scale; hi + lo, over sigma.
// Fragments (PTX ISA, mma.m16n8k16 .f16): lane l = 4 g + t holds A rows g and g + 8, B column g, C rows g, g + 8 and
// columns 2t, 2t + 1. Which k each operand slot stands for is free as long as A and B agree: lane t reads words
// 4t .. 4t + 3 of the step (one 16-byte load a row), and
//   int4: product (i, m) of the step (i: the word, m = 0, 1) takes nibbles m, m + 4 into slot pair 2t, 2t + 1 and
//         nibbles m + 2, m + 6 into 2t + 8, 2t + 9: word & (0x000F000F << 4m) and (word >> 8) & (0x000F000F << 4m),
//         so m = 1's codes enter as 16 u and their x is staged over 16 (exact);
//   int8: product i takes bytes 0, 2 and 1, 3: word & 0x00FF00FF and (word >> 8) & 0x00FF00FF.
// The block stages x once: B fragments for every product in that order, and the steps' sums, in shared memory
// (the backend passes their size: geometry.qtc_smem).
//
// qgemv_gated_tc_<kind>: act(x wg^T + bg) * (x wu^T + bu), as gemv_q.cu's qgemv_gated (the same arguments; T = 1).
// A block owns 16 rows of both (a pair of tiles) and its QTC_WARPS warps split the steps. (A form for the plain
// products was measured too: over a layer's q/k/v, o and down it lost to gemv_q.cu's, by 1.2-1.9x on down:
// BENCHMARKS.md; it is gone.)
#include "quant.cuh"

#ifndef QTC_WARPS
#define QTC_WARPS 8  // warps a block, splitting the steps of K
#endif
#ifndef QTC_UNROLL
#define QTC_UNROLL 2  // steps whose loads a warp issues before using any
#endif
#ifndef GEMV_EARLY_LAUNCH
#define GEMV_EARLY_LAUNCH 1
#endif
static_assert(QTC_WARPS >= 1 && QTC_WARPS <= 8 && QTC_UNROLL >= 1 && QTC_UNROLL <= 8, "QTC_WARPS, QTC_UNROLL in [1, 8]");

template <int KIND> struct Tc {
    static constexpr int CODES = KIND == KIND_INT4 ? 128 : 64;  // codes of a step (16 words)
    static constexpr int MMAS = KIND == KIND_INT4 ? 8 : 4;      // products a step
    static constexpr uint32_t MASK = KIND == KIND_INT4 ? 0x000F000Fu : 0x00FF00FFu;
    static constexpr int PER = KIND == KIND_INT4 ? 8 : 4;       // codes a word
};

// Shared memory of a block for nsteps steps (geometry.qtc_smem mirrors it): B fragments (uint2 [nsteps][MMAS]
// [4][2]: lane t's two registers for column hi / lo), the steps' x sums (float [nsteps][2]), the cross-warp sums
// (float [QTC_WARPS][2][16]), sigma's scratch (float [QTC_WARPS + 1]).
template <int KIND> __host__ __device__ constexpr int qtc_frag_bytes(int nsteps) { return nsteps * Tc<KIND>::MMAS * 64; }

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#define QTC_UNSCALE 16777216.f  // 2^24: A holds u 2^-24 (see the file comment)

// Stages x [Kp] (float32, one token) into the B fragments and step sums; returns 1 / sigma. Every thread calls it.
template <int KIND>
__device__ __forceinline__ float qtc_stage_x(const float* __restrict__ x, int Kp, int nsteps, unsigned char* smem) {
    typedef Tc<KIND> C;
    __half* frag = reinterpret_cast<__half*>(smem);
    float* sx = reinterpret_cast<float*>(smem + qtc_frag_bytes<KIND>(nsteps));
    float* scratch = sx + 2 * nsteps + QTC_WARPS * 2 * 16;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float m = 0.f;
    for (int k = threadIdx.x; k < Kp; k += 32 * QTC_WARPS) m = fmaxf(m, fabsf(x[k]));
#pragma unroll
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) scratch[warp] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float mm = 0.f;
        for (int w = 0; w < QTC_WARPS; ++w) mm = fmaxf(mm, scratch[w]);
        int e = 0;
        frexpf(mm, &e);  // mm < 2^e
        scratch[QTC_WARPS] = mm > 0.f ? ldexpf(1.f, 13 - e) : 1.f;
    }
    __syncthreads();
    const float sigma = scratch[QTC_WARPS];
    // a warp a step: lane l takes codes l, l + 32, ... of it, so its sums come from one warp reduction
    for (int s = warp; s < nsteps; s += QTC_WARPS) {
        float shi = 0.f, slo = 0.f;
#pragma unroll
        for (int j = 0; j < C::CODES / 32; ++j) {
            const int kin = lane + 32 * j, k = s * C::CODES + kin;
            const int w = kin / C::PER, c = kin % C::PER, t = w >> 2, i = w & 3;
            const float f = KIND == KIND_INT4 && (c & 1) ? 0.0625f : 1.f;  // its code enters as 16 u (see qtc_dot)
            const float v = k < Kp ? x[k] * sigma * f : 0.f;
            const __half hi = __float2half_rn(v);
            const __half lo = __float2half_rn(v - __half2float(hi));
            shi += __half2float(hi) / f;  // exact: f a power of two
            slo += __half2float(lo) / f;
            int mi, reg, half;
            if (KIND == KIND_INT4) {
                mi = 2 * i + (c & 1), reg = (c >> 1) & 1, half = c >> 2;
            } else {
                mi = i, reg = c & 1, half = c >> 1;
            }
            const int at = (((s * C::MMAS + mi) * 4 + t) * 2) * 4 + reg * 2 + half;  // column hi; lo 4 halves on
            frag[at] = hi;
            frag[at + 4] = lo;
        }
#pragma unroll
        for (int o = 16; o; o >>= 1) {
            shi += __shfl_xor_sync(0xffffffffu, shi, o);
            slo += __shfl_xor_sync(0xffffffffu, slo, o);
        }
        if (lane == 0) sx[2 * s] = shi, sx[2 * s + 1] = slo;
    }
    __syncthreads();
    return 1.f / sigma;
}

// Sums x . W[r] over the block for the rows of NT tiles (tile j: rows r0 + g, r0 + g + 8 of weight j), into
// out[j][16] (shared; valid after the barrier this ends with). q/s/z: the tiles' words, scales, zero points (or NULL).
template <int KIND, int NT>
__device__ __forceinline__ void qtc_dot(const uint32_t* const (&q)[NT], const st* const (&s)[NT],
                                        const uint8_t* const (&z)[NT], int r0, int n, const float* __restrict__ x,
                                        int Kp, int lg, int G, int srow, unsigned char* smem, float* out) {
    typedef Tc<KIND> C;
    if (GEMV_EARLY_LAUNCH) pdl_launch();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int kw = Kp / C::PER, nsteps = (Kp + C::CODES - 1) / C::CODES;
    const uint2* frag = reinterpret_cast<const uint2*>(smem);
    const float* sx = reinterpret_cast<const float*>(smem + qtc_frag_bytes<KIND>(nsteps));
    float* red = const_cast<float*>(sx) + 2 * nsteps;  // [QTC_WARPS][NT][16]
    const uint32_t* rw[NT][2];
    const st* rs[NT][2];
    const uint8_t* rz[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // clamped rows are read, never written
            const int row = min(r0 + g + 8 * h, n - 1);
            rw[j][h] = q[j] + (size_t)row * kw;
            rs[j][h] = s[j] + (size_t)(row / srow) * G;
            rz[j][h] = z[j] ? z[j] + (size_t)row * G : nullptr;
        }
    float acc[NT][2];  // rows g, g + 8 of each tile; column hi (t = 0) or lo (t = 2); other lanes' are unused
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = 0.f;
    uint4 wv[QTC_UNROLL][NT][2];
    st sv[QTC_UNROLL][NT][2];  // raw: converted when used, so no load waits before the next is issued
    uint32_t zv[QTC_UNROLL][NT][2];
    auto load = [&](int s0) {
#pragma unroll
        for (int u = 0; u < QTC_UNROLL; ++u) {
            const int st_ = s0 + u * QTC_WARPS, word = st_ * 16 + 4 * t;
            const int grp = min((st_ * C::CODES) >> lg, G - 1);
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    wv[u][j][h] = st_ < nsteps && word < kw ? __ldg(reinterpret_cast<const uint4*>(rw[j][h] + word))
                                                             : make_uint4(0, 0, 0, 0);
                    if (st_ < nsteps) {
                        sv[u][j][h] = rs[j][h][grp];
                        zv[u][j][h] = rz[j][h] ? (uint32_t)rz[j][h][grp] : Codes<KIND>::ZSYM;
                    }
                }
        }
    };
    load(warp);  // the first weights are in flight while x is staged
    pdl_wait();
    const float inv_sigma = qtc_stage_x<KIND>(x, Kp, nsteps, smem);
    const int col = t >> 1;  // the x sum this lane's column 2t takes: hi (t = 0), lo (t = 2)
    for (int s0 = warp; s0 < nsteps; s0 += QTC_WARPS * QTC_UNROLL) {
        if (s0 != warp) load(s0);
#pragma unroll
        for (int u = 0; u < QTC_UNROLL; ++u) {
            const int st_ = s0 + u * QTC_WARPS;
            if (st_ >= nsteps) break;
            float d[NT][4];
#pragma unroll
            for (int j = 0; j < NT; ++j) d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.f;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int m = 0; m < C::MMAS / 4; ++m) {
                    const uint2 b = (g == 0 || g == 4) ? frag[((st_ * C::MMAS + (C::MMAS / 4) * i + m) * 4 + t) * 2 +
                                                              (g >> 2)]
                                                       : make_uint2(0, 0);
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        const uint32_t wg = i == 0 ? wv[u][j][0].x : i == 1 ? wv[u][j][0].y : i == 2 ? wv[u][j][0].z
                                                                                                     : wv[u][j][0].w;
                        const uint32_t wh = i == 0 ? wv[u][j][1].x : i == 1 ? wv[u][j][1].y : i == 2 ? wv[u][j][1].z
                                                                                                     : wv[u][j][1].w;
                        // int4: nibbles m, m + 4 in place (m = 1: 16 u, its x staged over 16) and m + 2, m + 6 from
                        // the word shifted by 8; int8: bytes 0, 2 in place and 1, 3 shifted by 8
                        const uint32_t mask = KIND == KIND_INT4 && m ? C::MASK << 4 : C::MASK;
                        const uint32_t a[4] = {wg & mask, wh & mask, (wg >> 8) & mask, (wh >> 8) & mask};
                        mma16816(d[j], a, b.x, b.y);
                    }
                }
            }
            const float sxc = sx[2 * st_ + col];
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h)  // d[j][2h]: row g + 8h, column 2t
                    acc[j][h] = fmaf(fmaf(d[j][2 * h], QTC_UNSCALE, -code_f(zv[u][j][h]) * sxc), to_f(sv[u][j][h]),
                                     acc[j][h]);
        }
    }
    if (!GEMV_EARLY_LAUNCH) pdl_launch();
    // hi (lane 4g) + lo (lane 4g + 2), then over the warps
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float v = acc[j][h] + __shfl_down_sync(0xffffffffu, acc[j][h], 2);
            if (t == 0) red[(warp * NT + j) * 16 + g + 8 * h] = v * inv_sigma;
        }
    __syncthreads();
    for (int i = threadIdx.x; i < NT * 16; i += 32 * QTC_WARPS) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < QTC_WARPS; ++w) v += red[w * NT * 16 + i];
        out[i] = v;
    }
    __syncthreads();
}

template <int KIND>
__device__ __forceinline__ void qgemv_gated_tc_body(
    float* __restrict__ y, const float* __restrict__ x, int T, int Kp, int lg, int G, int srow, int act, int n,
    const uint32_t* qg, const st* sg, const uint8_t* zg, const wt* bg,
    const uint32_t* qu, const st* su, const uint8_t* zu, const wt* bu) {
    extern __shared__ __align__(16) unsigned char qtc_smem[];
    __shared__ float tot[32];
    const int r0 = blockIdx.x * 16;
    if (r0 >= n) { pdl_wait(); return; }
    const uint32_t* qs[2] = {qg, qu};
    const st* ss[2] = {sg, su};
    const uint8_t* zs[2] = {zg, zu};
    qtc_dot<KIND, 2>(qs, ss, zs, r0, n, x, Kp, lg, G, srow, qtc_smem, tot);
    if (threadIdx.x < 16 && r0 + threadIdx.x < n) {
        const int row = r0 + threadIdx.x;
        const float gv = tot[threadIdx.x] + (bg ? to_f(bg[row]) : 0.f);
        const float u = tot[16 + threadIdx.x] + (bu ? to_f(bu[row]) : 0.f);
        y[row] = activate(gv, act) * u;
    }
}

#define QTC_KERNELS(NAME, KIND) \
    extern "C" __global__ void __launch_bounds__(32 * QTC_WARPS) qgemv_gated_tc_##NAME(QGATED_ARGS) { \
        qgemv_gated_tc_body<KIND>(QGATED_PASS); }
QTC_KERNELS(int4, KIND_INT4)
QTC_KERNELS(int8, KIND_INT8)
