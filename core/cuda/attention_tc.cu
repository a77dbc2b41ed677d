// Causal prefill attention on tensor cores (flash-attention style), for half-precision caches and head sizes
// that are multiples of 16. Same contract as attn_prefill in attention.cu (GQA, start offset, sliding window,
// soft-capping; keys 0..start+t for query t), and the same fp32 softmax statistics; what differs is that q
// and the probabilities are rounded to the cache type to enter the WMMA products (fp32 accumulation), as a
// half-precision flash attention does.
//
// A block takes FQ = 64 queries of one head (4 warps x 16 rows) and walks 64-key tiles staged in shared memory
// as wt. Per tile each warp computes S = Q K^T (16 x 64, fp32) into its shared scratch, then two lanes per row
// do the online softmax (mask, scale, cap, running max and sum in fp32; the output row rescaled in shared
// memory), write P as wt, and the warp adds P V into its fp32 output rows [16, Dh] kept in shared memory
// (WMMA accumulators are loaded from and stored back to it, since their element layout is opaque).
#include <mma.h>
#include "common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
static_assert(WDTYPE != 0, "attention_tc.cu needs a half-precision cache (float32 uses attention.cu)");
static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM >= 16 && HEAD_DIM <= 256, "HEAD_DIM must be a multiple of 16, <= 256");

#define DH HEAD_DIM
#define FQ 64             // queries per block
#define FK 64             // keys per tile
#define NW 4              // warps per block: 16 query rows each
#define LDK (DH + 8)      // wt row stride of Q / K / V tiles (16-byte pad)
#define LDS (FK + 4)      // float row stride of the score scratch
#define LDP (FK + 8)      // wt row stride of the probabilities
#define LDO (DH + 4)      // float row stride of the output rows

using namespace nvcuda;

// Shared memory (bytes): K and V tiles (Q is staged in K's place first), then per warp S, P, O.
#define TC_KV_BYTES (FK * LDK * 2)
#define TC_WARP_BYTES (16 * LDS * 4 + 16 * LDP * 2 + 16 * LDO * 4)
#define TC_SMEM_BYTES (2 * TC_KV_BYTES + NW * TC_WARP_BYTES)
static_assert(TC_KV_BYTES % 128 == 0 && (16 * LDS * 4) % 128 == 0 && (16 * LDP * 2) % 32 == 0 &&
              (16 * LDO * 4) % 32 == 0, "WMMA pointers must stay 32-byte aligned");

// Rows [r0, r0 + n) of a [rows, DH] wt matrix (row stride `stride` elements) into a tile; rows >= n are zeros.
__device__ __forceinline__ void stage_rows(wt* dst, const wt* src, size_t stride, int n, int rows) {
    constexpr int CPR = DH / 8;  // 16-byte chunks per row (DH % 16 == 0)
    for (int c = threadIdx.x; c < rows * CPR; c += blockDim.x) {
        int j = c / CPR, d = (c % CPR) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (j < n) v = __ldg(reinterpret_cast<const uint4*>(src + (size_t)j * stride + d));
        *reinterpret_cast<uint4*>(dst + j * LDK + d) = v;
    }
}

extern "C" __global__ void __launch_bounds__(NW * 32)
attn_prefill_tc(float* __restrict__ out,      // float32 [T, H, Dh]
                const float* __restrict__ q,  // float32 [T, H, Dh]
                const wt* __restrict__ kc,    // wt [Hkv, S, Dh]
                const wt* __restrict__ vc,    // wt [Hkv, S, Dh]
                int start, const int* __restrict__ start_dev,  // position of query 0 (device value if given)
                int T, int H, int Hkv, int S, float scale,   // start + T <= S
                int window, float softcap) {                  // 0: no sliding window / no soft-capping
    extern __shared__ __align__(128) unsigned char smem_raw[];
    wt* Ks = reinterpret_cast<wt*>(smem_raw);
    wt* Vs = reinterpret_cast<wt*>(smem_raw + TC_KV_BYTES);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned char* wbase = smem_raw + 2 * TC_KV_BYTES + warp * TC_WARP_BYTES;
    float* Sw = reinterpret_cast<float*>(wbase);
    wt* Pw = reinterpret_cast<wt*>(wbase + 16 * LDS * 4);
    float* Ow = reinterpret_cast<float*>(wbase + 16 * LDS * 4 + 16 * LDP * 2);

    const int h = blockIdx.y, hk = h / (H / Hkv), t0 = blockIdx.x * FQ;
    const int st = start_pos(start, start_dev);
    const wt* kh = kc + (size_t)hk * S * DH;
    const wt* vh = vc + (size_t)hk * S * DH;

    // Q tile (rounded to wt; rows past T are zeros) staged in K's place, then held as fragments.
    for (int c = threadIdx.x; c < FQ * DH; c += blockDim.x) {
        int i = c / DH, d = c % DH, t = t0 + i;
        Ks[i * LDK + d] = from_f<wt>(t < T ? q[((size_t)t * H + h) * DH + d] : 0.f);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, wt, wmma::row_major> qf[DH / 16];
#pragma unroll
    for (int dd = 0; dd < DH / 16; ++dd) wmma::load_matrix_sync(qf[dd], Ks + warp * 16 * LDK + dd * 16, LDK);
    for (int c = lane; c < 16 * LDO; c += 32) Ow[c] = 0.f;

    const int tw = t0 + warp * 16;             // this warp's first query
    const int wlast = min(tw + 16, T) - 1;     // its last valid query (< tw if none)
    const int nkeys = st + min(t0 + FQ, T);    // keys this block needs (end)
    const int kfirst = window > 0 ? max(0, st + t0 - window + 1) / FK * FK : 0;
    const int r = lane >> 1, half = lane & 1;  // softmax: two lanes per row, 32 columns each
    const int t = tw + r, qpos = st + t;
    const bool row_ok = t < T;
    float m = -INFINITY, l = 0.f;

    for (int k0 = kfirst; k0 < nkeys; k0 += FK) {
        const int n = min(FK, nkeys - k0);
        __syncthreads();  // previous tile consumed (and the Q fragments loaded, first time)
        stage_rows(Ks, kh + (size_t)k0 * DH, DH, n, FK);
        stage_rows(Vs, vh + (size_t)k0 * DH, DH, n, FK);
        __syncthreads();
        if (wlast < tw || k0 > st + wlast) continue;                      // no query of this warp sees it
        if (window > 0 && k0 + n - 1 <= st + tw - window) continue;       // all keys too old for the warp

        // S = Q K^T: 16 x 64 in four 16 x 16 pieces.
#pragma unroll
        for (int kk = 0; kk < FK / 16; ++kk) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int dd = 0; dd < DH / 16; ++dd) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, wt, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, Ks + kk * 16 * LDK + dd * 16, LDK);
                wmma::mma_sync(acc, qf[dd], kf, acc);
            }
            wmma::store_matrix_sync(Sw + kk * 16, acc, LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax of row r over this tile's columns [32 half, 32 half + 32).
        float s[32];
        float tmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            const int c = half * 32 + j, key = k0 + c;
            bool ok = row_ok && c < n && key <= qpos && (window <= 0 || key > qpos - window);
            float v = Sw[r * LDS + c] * scale;
            if (softcap > 0.f) v = softcap * tanhf(v / softcap);
            s[j] = ok ? v : -INFINITY;
            tmax = fmaxf(tmax, s[j]);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        const float mnew = fmaxf(m, tmax);
        const float alpha = mnew == -INFINITY ? 1.f : expf(m - mnew);
        float psum = 0.f;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            float p = s[j] == -INFINITY ? 0.f : expf(s[j] - mnew);
            psum += p;
            Pw[r * LDP + half * 32 + j] = from_f<wt>(p);
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        l = l * alpha + psum;
        m = mnew;
        if (alpha != 1.f)
            for (int d = half; d < DH; d += 2) Ow[r * LDO + d] *= alpha;
        __syncwarp();

        // O += P V.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, wt, wmma::row_major> pf[FK / 16];
#pragma unroll
        for (int kk = 0; kk < FK / 16; ++kk) wmma::load_matrix_sync(pf[kk], Pw + kk * 16, LDP);
#pragma unroll
        for (int dd = 0; dd < DH / 16; ++dd) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, Ow + dd * 16, LDO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < FK / 16; ++kk) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, wt, wmma::row_major> vf;
                wmma::load_matrix_sync(vf, Vs + kk * 16 * LDK + dd * 16, LDK);
                wmma::mma_sync(acc, pf[kk], vf, acc);
            }
            wmma::store_matrix_sync(Ow + dd * 16, acc, LDO, wmma::mem_row_major);
        }
        __syncwarp();
    }

    if (row_ok) {
        const float inv = 1.f / l;
        float* o = out + ((size_t)t * H + h) * DH;
        for (int d = half; d < DH; d += 2) o[d] = Ow[r * LDO + d] * inv;
    }
}
