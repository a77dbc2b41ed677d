// KV-cache write: k, v [T, Hkv, Dh] (float32) stored at positions start..start+T-1 of the head-major
// caches [Hkv, S, Dh] in the cache's storage type.
#include "common.cuh"

// One block per (token, kv head); threads stride over Dh.
extern "C" __global__ void kv_write(wt* __restrict__ kc,               // wt [Hkv, S, Dh]
                                    wt* __restrict__ vc,               // wt [Hkv, S, Dh]
                                    const float* __restrict__ k,       // float32 [T, Hkv, Dh]
                                    const float* __restrict__ v,       // float32 [T, Hkv, Dh]
                                    int start,                         // position of token 0 (if start_dev is NULL)
                                    const int* __restrict__ start_dev, // int32 [1] or NULL (graph capture)
                                    int T, int Hkv, int S, int Dh) {   // start + T <= S
    pdl_wait();
    pdl_launch();
    int t = blockIdx.x / Hkv, hk = blockIdx.x % Hkv;
    if (t >= T) return;
    size_t src = (size_t)blockIdx.x * Dh;
    size_t dst = ((size_t)hk * S + start_pos(start, start_dev) + t) * Dh;
    for (int d = threadIdx.x; d < Dh; d += blockDim.x) {
        kc[dst + d] = from_f<wt>(k[src + d]);
        vc[dst + d] = from_f<wt>(v[src + d]);
    }
}
