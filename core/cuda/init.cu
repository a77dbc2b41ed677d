// Random weights made on the GPU (benchmarks of named shapes need no checkpoint): a counter-based hash
// of (seed, index) gives each element an independent uniform value in [center - a, center + a].
#include "common.cuh"

__device__ __forceinline__ uint32_t mix(uint64_t x) {  // splitmix64 finaliser
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((x ^ (x >> 31)) >> 32);
}

extern "C" __global__ void fill_uniform(wt* __restrict__ out,  // wt [n]
                                        long long n, unsigned long long seed, float center, float a) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float u = mix(seed * 0x100000001B3ull + (uint64_t)i) * (1.f / 4294967296.f);  // [0, 1)
        out[i] = from_f<wt>(center + a * (2.f * u - 1.f));
    }
}
