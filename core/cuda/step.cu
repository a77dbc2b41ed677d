// The last node of a decode step's CUDA graph when the token is picked on the GPU (issue 4): it turns the
// step's pick into the next step's input on the device, so the host can launch step i+1 before it has read
// token i (the graph runs ahead of the host; the host only reads the ids, to stream them).
//   inputs: int32 [2] = (token id, position) that the step's kernels read; advanced to (picked id, position+1).
//   key:    uint64 [1] from argmax_key (id = 0xffffffff - low word), or NULL when pick32 is given.
//   pick32: int32 [2] = (picked id, non-finite flag) from GPU sampling (sample.cu), or NULL.
//   ring:   int32 [ring_size], host-mapped or device memory: ring[position % ring_size] = picked id, or -1 - id
//           when the step's logits were not finite (issue 17: the flag rides with the token, no extra copy or
//           sync; graph.py raises NonFiniteLogitsError). The next input stays the valid id, so steps already
//           launched ahead read a sane token while the host stops.
#include "common.cuh"

extern "C" __global__ void step_advance(int* __restrict__ inputs, const unsigned long long* __restrict__ key,
                                        const int* __restrict__ pick32, int* __restrict__ ring, int ring_size) {
    pdl_wait();
    pdl_launch();
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int id;
    bool bad;
    if (key) {
        const unsigned long long k = key[0];
        const unsigned hi = (unsigned)(k >> 32);  // the largest logit, mapped (sample.cu argmax_pack); undo the map
        const unsigned bits = (hi & 0x80000000u) ? (hi & 0x7fffffffu) : ~hi;
        id = (int)(0xffffffffu - (unsigned)(k & 0xffffffffull));
        bad = (bits & 0x7f800000u) == 0x7f800000u;  // exponent all ones: NaN, +inf, or -inf as the largest
    } else {
        id = pick32[0];
        bad = pick32[1] != 0;
    }
    const int pos = inputs[1];
    ring[pos % ring_size] = bad ? -1 - id : id;
    inputs[0] = id;
    inputs[1] = pos + 1;
    __threadfence_system();  // the host reads ring once the step's event has completed
}
