// Elementwise kernels on float32 activations: residual add, activation, gated activation (act(gate) * up),
// soft-capping (cap * tanh(x / cap)).
// Grid-stride loops, so any grid size is correct; n may be any length.
#include "common.cuh"

// Activation codes, shared with core/cuda/backend.py (ACT_CODES).
#define ACT_GELU_TANH 0  // gelu_new / gelu_pytorch_tanh
#define ACT_GELU_ERF 1   // exact gelu
#define ACT_SILU 2
#define ACT_RELU 3

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

extern "C" __global__ void add(float* __restrict__ y,        // float32 [n]
                               const float* __restrict__ a,  // float32 [n]
                               const float* __restrict__ b,  // float32 [n]
                               long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}

extern "C" __global__ void act(float* __restrict__ y,        // float32 [n]
                               const float* __restrict__ x,  // float32 [n]
                               long long n, int kind) {      // kind: ACT_* code
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = activate(x[i], kind);
}

extern "C" __global__ void gated_act(float* __restrict__ y,           // float32 [n]
                                     const float* __restrict__ gate,  // float32 [n]
                                     const float* __restrict__ up,    // float32 [n]
                                     long long n, int kind) {         // kind: ACT_* code
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = activate(gate[i], kind) * up[i];
}

extern "C" __global__ void soft_cap(float* __restrict__ y,        // float32 [n]
                                    const float* __restrict__ x,  // float32 [n]
                                    long long n, float cap) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = cap * tanhf(x[i] / cap);
}
