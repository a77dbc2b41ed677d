// Embedding gather, and the learned-position add that follows it in models with absolute positions.
#include "common.cuh"

// One block per token; threads stride over the hidden size.
//   ids != NULL: out[t] = table[ids[t]] * scale                 (token embeddings)
//   ids == NULL: out[t] = x[t] + table[start + t] * scale       (learned positions; x must be given)
extern "C" __global__ void embed(float* __restrict__ out,           // float32 [T, D]
                                 const wt* __restrict__ table,      // wt [V, D]
                                 const int* __restrict__ ids,       // int32 [T], each in [0, V); or NULL
                                 const float* __restrict__ x,       // float32 [T, D] or NULL
                                 float scale,                       // 1 when the model does not scale
                                 int start,                         // position of token 0 (if start_dev is NULL)
                                 const int* __restrict__ start_dev, // int32 [1] or NULL (graph capture)
                                 int T, int D) {
    pdl_wait();
    pdl_launch();
    int t = blockIdx.x;
    if (t >= T) return;
    size_t row = ids ? (size_t)ids[t] : (size_t)(start_pos(start, start_dev) + t);
    const wt* tr = table + row * D;
    const float* xr = x ? x + (size_t)t * D : nullptr;
    float* o = out + (size_t)t * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = to_f(tr[d]) * scale;
        o[d] = xr ? xr[d] + v : v;
    }
}
