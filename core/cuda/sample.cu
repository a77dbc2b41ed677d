// Greedy sampling on the GPU, so that a decode step's graph hands only the token id to the host:
//   argmax_key: *key = max over i of (orderable(x[i]) << 32 | (0xffffffff - i)), i.e. the index of the largest
//   value, the lowest such index on ties (numpy's argmax), as key; the host reads i = 0xffffffff - low word.
//   *key must be 0 before the launch (a memset node in the graph). NaN orders above +inf (numpy also
//   returns a NaN's index; among NaNs this picks the lowest index of the largest bit pattern).
#include "common.cuh"

__device__ __forceinline__ unsigned long long argmax_pack(float v, int i) {
    unsigned int u = __float_as_uint(v + 0.f);           // -0 -> +0: equal values compare equal
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);      // monotone map of floats onto unsigned ints
    return ((unsigned long long)u << 32) | (0xffffffffu - (unsigned int)i);
}

// Grid-stride; each warp folds its candidates by shuffles and lane 0 does one atomicMax.
extern "C" __global__ void argmax_key(unsigned long long* __restrict__ key,  // uint64 [1], zeroed
                                      const float* __restrict__ x,           // float32 [n]
                                      int n) {
    unsigned long long best = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned long long k = argmax_pack(x[i], i);
        best = k > best ? k : best;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
    }
    if ((threadIdx.x & 31) == 0 && best) atomicMax(key, best);
}
