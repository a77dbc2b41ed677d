// Rotary position embedding, rotate-half form (GPT-NeoX / HF Llama): for i < Dh/2 at position p,
//   a = p * inv_freq[i] (fp32 product, as transformers), y[i] = x[i] cos a - x[i+h] sin a,
//   y[i+h] = x[i+h] cos a + x[i] sin a. inv_freq carries any scaling (linear, llama3) already.
#include "common.cuh"

// One block per (token, head); threads stride over Dh/2 pairs. Accurate sincosf: angles reach 1e5 rad.
extern "C" __global__ void rope(float* __restrict__ y,               // float32 [T, H, Dh]
                                const float* __restrict__ x,         // float32 [T, H, Dh]
                                const float* __restrict__ inv_freq,  // float32 [Dh / 2]
                                int start,                           // position of token 0 (if start_dev is NULL)
                                const int* __restrict__ start_dev,   // int32 [1] or NULL (graph capture)
                                int T, int H, int Dh) {
    int t = blockIdx.x / H;
    if (t >= T) return;
    int h = Dh / 2;
    float p = (float)(start_pos(start, start_dev) + t);
    const float* xr = x + (size_t)blockIdx.x * Dh;
    float* yr = y + (size_t)blockIdx.x * Dh;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        float x1 = xr[i], x2 = xr[i + h];
        yr[i] = x1 * c - x2 * s;
        yr[i + h] = x2 * c + x1 * s;
    }
}
