// Mixture-of-experts decode with the experts kept quantized (issue 16), driven by core/cuda/moe.py: moe.cu's grouped
// GEMVs over the k selected experts, reading a stack of experts in core/cuda/qlayout.py's stacked layout and
// dequantizing in registers as gemv_q.cu does (quant.cuh: the weight exactly core/quant/dequant.py's, rounded once to
// the scale type `st`; products accumulated in fp32).
//
// Stacked layout: expert e's words start at e * N * Kp / PER (N its output rows, Kp its padded input width), its
// scales at e * sstride (sstride = R * G: R scale rows of G columns), its zero points at e * N * G; within an expert
// everything is gemv_q.cu's (row n uses scale row n / srow, element kk column min(kk >> lg, G - 1)). Gate and up share
// one geometry (the backend launches the gated kernel only then).
//
//   moe_q_up_<kind> /       block (row chunk, slot) with slot = t * k + j reads MOE_ROWS rows of up[e] (and
//   moe_q_gate_up_<kind>    gate[e]) for e = ids[slot], read from device memory (a captured graph replays it for any
//                           routing); epilogue as moe.cu's: h[t, j, row] = w[t, j] * act(gate + bg) * (up + bu) (or
//                           act(up + bu)). h's rows are H >= I floats long, H the down projection's Kp: rows in
//                           [I, H) are written 0, so moe_q_down reads h as its padded x.
//   moe_q_down_<kind>       y [T, D] = sum_j down[e_j] h[t, j] (+ w[t, j] bd[e_j]): one virtual row of k * Kp codes
//                           per output row, chunk v belonging to expert j = v / (Kp / CH), summed in registers.
//
// Geometry as moe.cu (MOE_ROWS rows, MOE_THREADS threads a block, MOE_UNROLL_* 16-byte chunks a thread in flight per
// row), with gemv_q.cu's chunking: a chunk is 32 int4 or 16 int8 / fp8 codes, one scale for the chunk when a group
// spans it, else one a word. x and h are float32, 16-byte aligned, zero past the real width (the backend stages x).
// None of these kernels is launched with programmatic dependent launch.
#include "quant.cuh"

#ifndef MOE_ROWS
#define MOE_ROWS 4  // output rows per block (moe_q_up / moe_q_gate_up: of each of gate and up; moe_q_down)
#endif
#define MOE_THREADS 128
#ifndef MOE_UNROLL_UP
#define MOE_UNROLL_UP 2  // chunks per thread in flight per row, moe_q_up / moe_q_gate_up (8 rows: 16 loads)
#endif
#ifndef MOE_UNROLL_DOWN
#define MOE_UNROLL_DOWN 4  // moe_q_down (4 rows: 16 loads)
#endif
static_assert(MOE_ROWS >= 1 && MOE_ROWS <= 8, "MOE_ROWS must be in [1, 8]");
static_assert(MOE_UNROLL_UP >= 1 && MOE_UNROLL_UP <= 4 && MOE_UNROLL_DOWN >= 1 && MOE_UNROLL_DOWN <= 4,
              "MOE_UNROLL_* must be in [1, 4]");

// An expert id as read from device memory, kept inside [0, E) (as moe.cu's): a corrupt id cannot read out of bounds.
__device__ __forceinline__ int clamp_expert(int e, int E) { return min(max(e, 0), E - 1); }

// acc[r] += the CH codes of chunk wv[r] (row r's words k0 .. k0 + CH) dequantized, times x[k0 .. k0 + CH) at xc
// (16-byte aligned); srows / zrows: each row's scale row and zero-point row (or NULL).
template <int KIND, int NR>
__device__ __forceinline__ void chunk_dot(const uint4 (&wv)[NR], const st* const (&srows)[NR],
                                          const uint8_t* const (&zrows)[NR], const float* __restrict__ xc, int k0,
                                          int lg, int G, float (&acc)[NR]) {
    typedef Codes<KIND> C;
    const bool whole = lg >= C::LOG_CH;  // the chunk lies in one group: one scale for it
    QS sc[NR];
    if (whole) {
#pragma unroll
        for (int r = 0; r < NR; ++r) sc[r] = scale_of<KIND>(srows[r], zrows[r], min(k0 >> lg, G - 1));
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int kk = k0 + j * C::PER;
        if (!whole) {
#pragma unroll
            for (int r = 0; r < NR; ++r) sc[r] = scale_of<KIND>(srows[r], zrows[r], min(kk >> lg, G - 1));
        }
        float xf[C::PER];
        const float4* xp = reinterpret_cast<const float4*>(xc + j * C::PER);
#pragma unroll
        for (int e = 0; e < C::PER / 4; ++e) {
            const float4 v = xp[e];
            xf[4 * e] = v.x, xf[4 * e + 1] = v.y, xf[4 * e + 2] = v.z, xf[4 * e + 3] = v.w;
        }
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            const uint32_t word = j == 0 ? wv[r].x : j == 1 ? wv[r].y : j == 2 ? wv[r].z : wv[r].w;
            float wf[C::PER];
            dequant_word<KIND>(word, sc[r], wf);
            float s = acc[r];
#pragma unroll
            for (int e = 0; e < C::PER; ++e) s = fmaf(wf[e], xf[e], s);
            acc[r] = s;
        }
    }
}

template <int KIND, bool GATED>
__device__ __forceinline__ void moe_q_up_body(
        float* __restrict__ h,             // float32 [T, k, H]
        const float* __restrict__ x,       // float32 [T, Kp]
        const int* __restrict__ ids,       // int32 [T, k]
        const float* __restrict__ wts,     // float32 [T, k]
        const uint32_t* __restrict__ qg,   // gate words uint32 [E, I, Kp / PER] (GATED)
        const st* __restrict__ sg,         // st [E, R, G]
        const uint8_t* __restrict__ zg,    // uint8 [E, I, G] or NULL
        const wt* __restrict__ bg,         // wt [E, I] or NULL
        const uint32_t* __restrict__ qu,   // up, as gate
        const st* __restrict__ su,
        const uint8_t* __restrict__ zu,
        const wt* __restrict__ bu,
        int k, int E, int I, int H, int Kp, int lg, int G, int srow, int sstride, int act) {
    typedef Codes<KIND> C;
    constexpr int NR = GATED ? 2 * MOE_ROWS : MOE_ROWS;  // up rows first, then gate rows
    __shared__ float part[MOE_THREADS / 32][NR];
    __shared__ float tot[NR];
    const int slot = blockIdx.y, t = slot / k, r0 = blockIdx.x * MOE_ROWS;
    if (r0 >= I) {  // a whole block of h's padding (the grid covers H rows): no barrier is skipped by part of it
        if (threadIdx.x < MOE_ROWS && r0 + threadIdx.x < H) h[(size_t)slot * H + r0 + threadIdx.x] = 0.f;
        return;
    }
    const int e = clamp_expert(ids[slot], E);
    const int kw = Kp / C::PER;
    const uint32_t* rows[NR];
    const st* srows[NR];
    const uint8_t* zrows[NR];
#pragma unroll
    for (int r = 0; r < MOE_ROWS; ++r) {
        const size_t n = (size_t)e * I + min(r0 + r, I - 1);  // clamped rows are read, never written
        const size_t so = (size_t)e * sstride + (size_t)(min(r0 + r, I - 1) / srow) * G;
        rows[r] = qu + n * kw;
        srows[r] = su + so;
        zrows[r] = zu ? zu + n * G : nullptr;
        if (GATED) {
            rows[MOE_ROWS + r] = qg + n * kw;
            srows[MOE_ROWS + r] = sg + so;
            zrows[MOE_ROWS + r] = zg ? zg + n * G : nullptr;
        }
    }
    const float* xt = x + (size_t)t * Kp;
    float acc[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[r] = 0.f;
    const int nch = Kp / C::CH;
    for (int c0 = threadIdx.x; c0 < nch; c0 += MOE_THREADS * MOE_UNROLL_UP) {
        uint4 wv[MOE_UNROLL_UP][NR];
#pragma unroll
        for (int u = 0; u < MOE_UNROLL_UP; ++u) {
            const int c = c0 + u * MOE_THREADS;
#pragma unroll
            for (int r = 0; r < NR; ++r)
                if (c < nch) wv[u][r] = __ldg(reinterpret_cast<const uint4*>(rows[r]) + c);
        }
#pragma unroll
        for (int u = 0; u < MOE_UNROLL_UP; ++u) {
            const int c = c0 + u * MOE_THREADS;
            if (c >= nch) break;
            chunk_dot<KIND, NR>(wv[u], srows, zrows, xt + (size_t)c * C::CH, c * C::CH, lg, G, acc);
        }
    }
    block_rows_sum<NR, MOE_THREADS>(acc, part, tot);
    if (threadIdx.x < MOE_ROWS) {
        const int row = r0 + threadIdx.x;
        if (row < I) {
            h[(size_t)slot * H + row] = moe_up_value<GATED>(tot[threadIdx.x], GATED ? tot[MOE_ROWS + threadIdx.x] : 0.f,
                                                            bu, bg, (size_t)e * I + row, act, wts[slot]);
        } else if (row < H) {
            h[(size_t)slot * H + row] = 0.f;
        }
    }
}

template <int KIND>
__device__ __forceinline__ void moe_q_down_body(
        float* __restrict__ y,             // float32 [T, D]
        const float* __restrict__ h,       // float32 [T, k, Kp] (already times the routing weights; 0 past I)
        const int* __restrict__ ids,       // int32 [T, k]
        const float* __restrict__ wts,     // float32 [T, k] (for the bias)
        const uint32_t* __restrict__ qd,   // down words uint32 [E, D, Kp / PER]
        const st* __restrict__ sd,         // st [E, R, G]
        const uint8_t* __restrict__ zd,    // uint8 [E, D, G] or NULL
        const wt* __restrict__ bd,         // wt [E, D] or NULL
        int k, int E, int D, int Kp, int lg, int G, int srow, int sstride) {
    typedef Codes<KIND> C;
    __shared__ float part[MOE_THREADS / 32][MOE_ROWS];
    __shared__ float tot[MOE_ROWS];
    const int t = blockIdx.y, r0 = blockIdx.x * MOE_ROWS;
    const int* it = ids + (size_t)t * k;
    const float* ht = h + (size_t)t * k * Kp;  // the k experts' activations of token t, end to end
    const int kw = Kp / C::PER;
    int rr[MOE_ROWS];
#pragma unroll
    for (int r = 0; r < MOE_ROWS; ++r) rr[r] = min(r0 + r, D - 1);  // clamped rows are not written
    float acc[MOE_ROWS];
#pragma unroll
    for (int r = 0; r < MOE_ROWS; ++r) acc[r] = 0.f;
    const int nch = Kp / C::CH, nv = nch * k;
    for (int c0 = threadIdx.x; c0 < nv; c0 += MOE_THREADS * MOE_UNROLL_DOWN) {
        uint4 wv[MOE_UNROLL_DOWN][MOE_ROWS];
        int ev[MOE_UNROLL_DOWN];
#pragma unroll
        for (int u = 0; u < MOE_UNROLL_DOWN; ++u) {
            const int v = c0 + u * MOE_THREADS;
            if (v < nv) {
                const int j = v / nch, c = v - j * nch;
                ev[u] = clamp_expert(it[j], E);
                const uint32_t* base = qd + (size_t)ev[u] * D * kw;
#pragma unroll
                for (int r = 0; r < MOE_ROWS; ++r)
                    wv[u][r] = __ldg(reinterpret_cast<const uint4*>(base + (size_t)rr[r] * kw) + c);
            }
        }
#pragma unroll
        for (int u = 0; u < MOE_UNROLL_DOWN; ++u) {
            const int v = c0 + u * MOE_THREADS;
            if (v >= nv) break;
            const int c = v - (v / nch) * nch;
            const st* srows[MOE_ROWS];
            const uint8_t* zrows[MOE_ROWS];
#pragma unroll
            for (int r = 0; r < MOE_ROWS; ++r) {
                srows[r] = sd + (size_t)ev[u] * sstride + (size_t)(rr[r] / srow) * G;
                zrows[r] = zd ? zd + ((size_t)ev[u] * D + rr[r]) * G : nullptr;
            }
            chunk_dot<KIND, MOE_ROWS>(wv[u], srows, zrows, ht + (size_t)v * C::CH, c * C::CH, lg, G, acc);
        }
    }
    block_rows_sum<MOE_ROWS, MOE_THREADS>(acc, part, tot);
    if (threadIdx.x < MOE_ROWS) {
        const int row = r0 + threadIdx.x;
        if (row < D) {
            float v = tot[threadIdx.x];
            if (bd)
                for (int j = 0; j < k; ++j)
                    v += wts[(size_t)t * k + j] * to_f(bd[(size_t)clamp_expert(it[j], E) * D + row]);
            y[(size_t)t * D + row] = v;
        }
    }
}

#define MOE_Q_UP_ARGS float* __restrict__ h, const float* __restrict__ x, const int* __restrict__ ids, \
    const float* __restrict__ wts, const uint32_t* __restrict__ qg, const st* __restrict__ sg, \
    const uint8_t* __restrict__ zg, const wt* __restrict__ bg, const uint32_t* __restrict__ qu, \
    const st* __restrict__ su, const uint8_t* __restrict__ zu, const wt* __restrict__ bu, int k, int E, int I, int H, \
    int Kp, int lg, int G, int srow, int sstride, int act
#define MOE_Q_UP_PASS h, x, ids, wts, qg, sg, zg, bg, qu, su, zu, bu, k, E, I, H, Kp, lg, G, srow, sstride, act
#define MOE_Q_DOWN_ARGS float* __restrict__ y, const float* __restrict__ h, const int* __restrict__ ids, \
    const float* __restrict__ wts, const uint32_t* __restrict__ qd, const st* __restrict__ sd, \
    const uint8_t* __restrict__ zd, const wt* __restrict__ bd, int k, int E, int D, int Kp, int lg, int G, int srow, \
    int sstride
#define MOE_Q_DOWN_PASS y, h, ids, wts, qd, sd, zd, bd, k, E, D, Kp, lg, G, srow, sstride
// One set per kind (the backend names them by the layout's kind). moe_q_up / moe_q_gate_up: grid (ceil(H / MOE_ROWS),
// T * k); moe_q_down: grid (ceil(D / MOE_ROWS), T); MOE_THREADS threads.
#define MOE_Q_KERNELS(NAME, KIND) \
    extern "C" __global__ void __launch_bounds__(MOE_THREADS) moe_q_gate_up_##NAME(MOE_Q_UP_ARGS) { \
        moe_q_up_body<KIND, true>(MOE_Q_UP_PASS); } \
    extern "C" __global__ void __launch_bounds__(MOE_THREADS) moe_q_up_##NAME(MOE_Q_UP_ARGS) { \
        moe_q_up_body<KIND, false>(MOE_Q_UP_PASS); } \
    extern "C" __global__ void __launch_bounds__(MOE_THREADS) moe_q_down_##NAME(MOE_Q_DOWN_ARGS) { \
        moe_q_down_body<KIND>(MOE_Q_DOWN_PASS); }
MOE_Q_KERNELS(int4, KIND_INT4)
MOE_Q_KERNELS(int8, KIND_INT8)
MOE_Q_KERNELS(fp8, KIND_FP8)
