// Shared helpers for archkit's kernels: the storage type of weights / KV cache, conversions to and from
// float (all arithmetic is fp32), 128-bit vector loads, and warp / block reductions.
//
// WDTYPE picks the storage type `wt`; activations are always float32.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#ifndef WDTYPE
#define WDTYPE 1  // 0 float32, 1 float16, 2 bfloat16
#endif
static_assert(WDTYPE >= 0 && WDTYPE <= 2, "WDTYPE must be 0 (float32), 1 (float16) or 2 (bfloat16)");

#if WDTYPE == 0
typedef float wt;
#elif WDTYPE == 1
typedef __half wt;
#else
typedef __nv_bfloat16 wt;
#endif

constexpr int VEC = 16 / sizeof(wt);  // wt elements in one 128-bit load

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// VEC wt values at p (16-byte aligned) as floats; through the read-only path, since weights never change.
__device__ __forceinline__ void load_vec(const wt* p, float* f) {
    uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const wt* e = reinterpret_cast<const wt*>(&u);
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = to_f(e[i]);
}

// A start position that a captured CUDA graph reads from device memory (start_dev) or, uncaptured, the
// value passed by argument: graphs bake their arguments in, so per-step values must come from memory.
__device__ __forceinline__ int start_pos(int start, const int* start_dev) {
    return start_dev ? *start_dev : start;
}

// Programmatic dependent launch (sm_90; no-ops elsewhere and when a kernel was launched without the
// attribute). Inside a decode graph the backend launches the kernels named in backend.PDL_KERNELS with
// programmatic stream serialization, so a kernel's blocks may start while the previous kernel still runs:
// each such kernel calls pdl_wait() before it reads or writes anything another kernel touches (it returns
// once the previous grid has completed and its writes are visible; as every kernel waits, completion is
// transitive), and pdl_launch() to let the next kernel start early. Work that needs no earlier result
// (issuing weight loads) goes before the wait.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Activation codes, shared with core/cuda/elementwise.py (ACT_CODES); used by elementwise.cu and gemv.cu.
#define ACT_GELU_TANH 0   // gelu_new / gelu_pytorch_tanh / gelu_fast
#define ACT_GELU_ERF 1    // exact gelu
#define ACT_SILU 2        // silu / swish
#define ACT_RELU 3
#define ACT_QUICK_GELU 4  // x sigmoid(1.702 x) (quick_gelu)
#define ACT_RELU2 5       // max(x, 0)^2 (relu2)
// The GEMV epilogues (gemv.cu) call activate(), which knows codes 0..ACT_GEMV_MAX only (anything above is
// ReLU there): the backend runs a product with a higher code unfused (core/cuda/linear.py), so the decode GEMVs
// keep the code they had. Every other kernel calls activate_any().
#define ACT_GEMV_MAX 3

// The gelus are written without 1 + tanh / 1 + erf, which cancel for negative x (x = -4: 1 + erf(x/sqrt2)
// = 4e-5, so one ulp of erf is 1e-3 of the result): 0.5 (1 + tanh u) = sigmoid(2u), 1 + erf z = erfc(-z).
__device__ __forceinline__ float activate(float x, int kind) {
    switch (kind) {
        case ACT_GELU_TANH: return x / (1.f + expf(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
        case ACT_GELU_ERF: return 0.5f * x * erfcf(-x * 0.7071067811865476f);
        case ACT_SILU: return x / (1.f + expf(-x));
        default: return fmaxf(x, 0.f);
    }
}

// Every ACT_* code (activate() for codes 0..ACT_GEMV_MAX).
__device__ __forceinline__ float activate_any(float x, int kind) {
    switch (kind) {
        case ACT_QUICK_GELU: return x / (1.f + expf(-1.702f * x));
        case ACT_RELU2: {
            const float r = fmaxf(x, 0.f);
            return r * r;
        }
        default: return activate(x, kind);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` is 32 floats of shared memory; the trailing barrier lets the caller reuse it at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

// Sums over the block of acc[r] (each thread's partial dot of row r) into tot[r] (shared, NR values): NT threads a
// block, part is [NT / 32][NR] shared floats. Used by moe.cu's and moe_q.cu's grouped GEMVs.
template <int NR, int NT>
__device__ __forceinline__ void block_rows_sum(float (&acc)[NR], float (*part)[NR], float* tot) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < NR; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0) part[warp][r] = v;
    }
    __syncthreads();
    if (threadIdx.x < NR) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < NT / 32; ++w) v += part[w][threadIdx.x];
        tot[threadIdx.x] = v;
    }
    __syncthreads();
}

// One row of h in the grouped up-GEMVs' epilogue (moe.cu, moe_q.cu): the routing weight w times act(gate + bg) *
// (up + bu) when GATED, else act(up + bu); bu / bg wt [E, I] or NULL, b the row's index in them.
template <bool GATED>
__device__ __forceinline__ float moe_up_value(float up, float gate, const wt* __restrict__ bu, const wt* __restrict__ bg,
                                              size_t b, int act, float w) {
    const float u = up + (bu ? to_f(bu[b]) : 0.f);
    if (!GATED) return activate_any(u, act) * w;
    return activate_any(gate + (bg ? to_f(bg[b]) : 0.f), act) * u * w;
}

// The paged KV pools of batched steps (core/cuda/paged.py): per layer wt [num_blocks, Hkv, block_size, Dh], so
// that one kv head's block_size keys are one contiguous run. Offset (in elements) of the row of cache slot
// `slot` (= block * bs + position % bs) and kv head hk; used by paged.cu and paged_attn.cu.
__device__ __forceinline__ size_t paged_row(int slot, int hk, int Hkv, int bs, int Dh) {
    const int block = slot / bs;
    return (((size_t)block * Hkv + hk) * bs + (slot - block * bs)) * (size_t)Dh;
}
