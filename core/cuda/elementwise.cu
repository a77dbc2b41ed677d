// Elementwise kernels on float32 activations: residual add, activation, gated activation (act(gate) * up),
// soft-capping (cap * tanh(x / cap)), clamping to [lo, hi], a scalar multiple, a per-token sigmoid gate; for the
// cuBLAS path, x rounded to the weight type and a bias add.
// Grid-stride loops, so any grid size is correct; n may be any length.
#include "common.cuh"

extern "C" __global__ void add(float* __restrict__ y,        // float32 [n]
                               const float* __restrict__ a,  // float32 [n]
                               const float* __restrict__ b,  // float32 [n]
                               long long n) {
    pdl_wait();
    pdl_launch();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}

extern "C" __global__ void act(float* __restrict__ y,        // float32 [n]
                               const float* __restrict__ x,  // float32 [n]
                               long long n, int kind) {      // kind: ACT_* code
    pdl_wait();
    pdl_launch();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = activate_any(x[i], kind);
}

extern "C" __global__ void gated_act(float* __restrict__ y,           // float32 [n]
                                     const float* __restrict__ gate,  // float32 [n]
                                     const float* __restrict__ up,    // float32 [n]
                                     long long n, int kind) {         // kind: ACT_* code
    pdl_wait();
    pdl_launch();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = activate_any(gate[i], kind) * up[i];
}

extern "C" __global__ void soft_cap(float* __restrict__ y,        // float32 [n]
                                    const float* __restrict__ x,  // float32 [n]
                                    long long n, float cap) {
    pdl_wait();
    pdl_launch();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = cap * tanhf(x[i] / cap);
}

// x clamped to [lo, hi] (q, k and v under clip_qkv). Written with comparisons, not fminf/fmaxf, so that a NaN
// stays NaN as in np.clip and torch.clamp (fminf would return the bound).
extern "C" __global__ void clamp(float* __restrict__ y,        // float32 [n]
                                 const float* __restrict__ x,  // float32 [n]
                                 long long n, float lo, float hi) {
    pdl_wait();
    pdl_launch();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        y[i] = v < lo ? lo : (v > hi ? hi : v);
    }
}

// x * s (embedding, residual-branch and logit multipliers; s is the float32 the reference rounds to).
extern "C" __global__ void scale(float* __restrict__ y,        // float32 [n]
                                 const float* __restrict__ x,  // float32 [n]
                                 long long n, float s) {
    pdl_wait();
    pdl_launch();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = x[i] * s;
}

// y [T, N] * sigmoid(g [T, 1]): one gate value per token (row of N), 1 / (1 + exp(-g)) as the reference.
extern "C" __global__ void sigmoid_gate(float* __restrict__ out,      // float32 [n] = [T, N]
                                        const float* __restrict__ y,  // float32 [T, N]
                                        const float* __restrict__ g,  // float32 [T]
                                        long long n, int N) {
    pdl_wait();
    pdl_launch();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = y[i] * (1.f / (1.f + expf(-g[i / N])));
}

// x rounded to the storage type (the operand a vendor GEMM reads; core/cuda/cublas.py).
extern "C" __global__ void to_wt(wt* __restrict__ y,           // wt [n]
                                 const float* __restrict__ x,  // float32 [n]
                                 long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = from_f<wt>(x[i]);
}

// y[r, j] += b[j] for a row-major y of n elements and rows of N (bias after a vendor GEMM).
extern "C" __global__ void add_bias(float* __restrict__ y,     // float32 [n / N, N]
                                    const wt* __restrict__ b,  // wt [N]
                                    long long n, int N) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] += to_f(b[i % N]);
}
