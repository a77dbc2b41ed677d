// xIELU (arXiv 2411.13010), Apertus' MLP activation, as transformers' XIELUActivation computes it:
//   ap = softplus(alpha_p), an = beta + softplus(alpha_n)
//   y  = x > 0 ? ap x^2 + beta x : (expm1(min(x, eps)) - x) an + beta x
// The four parameters are one layer's weights (stored in the weight type `wt`, one element each), read from
// device memory, so a captured decode graph needs no host value. Built by archkit like its own kernels
// (core/cuda/modules.py): -DWDTYPE picks `wt`, common.cuh is on the include path. A grid-stride loop.
#include "common.cuh"

__device__ __forceinline__ float softplus(float a) { return a > 20.f ? a : log1pf(expf(a)); }  // torch's threshold

extern "C" __global__ void xielu(float* __restrict__ y,              // float32 [n]
                                 const float* __restrict__ x,        // float32 [n]
                                 const wt* __restrict__ alpha_p,     // wt [1]
                                 const wt* __restrict__ alpha_n,     // wt [1]
                                 const wt* __restrict__ beta,        // wt []
                                 const wt* __restrict__ eps,         // wt []
                                 long long n) {
    const float b = to_f(*beta), e = to_f(*eps);
    const float ap = softplus(to_f(*alpha_p)), an = b + softplus(to_f(*alpha_n));
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        y[i] = v > 0.f ? ap * v * v + b * v : (expm1f(fminf(v, e)) - v) * an + b * v;
    }
}
