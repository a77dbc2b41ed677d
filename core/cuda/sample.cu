// Greedy sampling on the GPU, so that a decode step's graph hands only the token id to the host:
//   argmax_key: *key = max over i of (orderable(x[i]) << 32 | (0xffffffff - i)), i.e. the index of the largest
//   value, the lowest such index on ties (numpy's argmax), as key; the host reads i = 0xffffffff - low word.
//   *key must be 0 before the launch (a memset node in the graph). Every NaN, whatever its sign and payload,
//   maps to the top key 0xffffffff, above +inf: the key is the lowest-index NaN's, as numpy's argmax returns, and
//   its high word still decodes to a NaN, so the host (decode.py key_to_id) and step_advance flag the step.
#include "common.cuh"

__device__ __forceinline__ unsigned long long argmax_pack(float v, int i) {
    unsigned int u = __float_as_uint(v + 0.f);           // -0 -> +0: equal values compare equal
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);      // monotone map of floats onto unsigned ints
    if (v != v) u = 0xffffffffu;                         // a negative NaN would otherwise order below -inf
    return ((unsigned long long)u << 32) | (0xffffffffu - (unsigned int)i);
}

// The largest of the warp's 32 values, in every lane (a butterfly of shuffles). Every lane must call it.
__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long best) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
    }
    return best;
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
    best = warp_max_u64(best);
    if ((threadIdx.x & 31) == 0 && best) atomicMax(key, best);
}

// One argmax key per row (the engine's greedy rows, core/cuda/decode.py argmax_rows): block r reduces row r of
// x [R, V] and writes keys[r] = argmax_pack's max over the row, so no memset and no atomics. blockDim.x: a
// multiple of 32, at most 1024.
extern "C" __global__ void argmax_rows(unsigned long long* __restrict__ keys,  // uint64 [R]
                                       const float* __restrict__ x,           // float32 [R, V]
                                       int V) {
    __shared__ unsigned long long warp_best[32];
    const float* row = x + (size_t)blockIdx.x * V;
    unsigned long long best = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        unsigned long long k = argmax_pack(row[i], i);
        best = k > best ? k : best;
    }
    best = warp_max_u64(best);
    if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x < 32) {
        best = threadIdx.x < (blockDim.x >> 5) ? warp_best[threadIdx.x] : 0ull;
        best = warp_max_u64(best);
        if (threadIdx.x == 0) keys[blockIdx.x] = best;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Sampling on the GPU (core/cuda/gpu_sampling.py drives it for one row, core/cuda/row_sampler.py for the engine's
// rows; core/sampling.py is the reference): repetition penalty -> temperature -> top-k -> top-p -> one draw from the
// softmax of what is kept, seeded.
//
// Many rows in one launch: gridDim.y = R rows, and every pass below runs independently per row (blockIdx.y). A row's
// per-request state lives in its SLOT (slots[row], or slot = row when slots is null): SampleParams, SampleState
// (SAMPLE_STATE_BYTES apart), keys [V] and the seen mask [V], so a request keeps its slot (and its seen mask) from
// one step to the next while the rows of a step are just the requests that want a token. What is per ROW: the
// logits (row * V), out (2 ints), the counter (counter_dev[row]) and warped (row * V). Two rows of one launch must
// not share a slot (their done counters and histograms would mix). One row with slots null is the single-row
// sampler, unchanged.
//
// `sample_pass` is launched SAMPLE_PASSES times in a row with pass = 0 .. SAMPLE_PASSES-1, always the same
// launches whatever the parameters (a captured graph serves any of them): every parameter and every value one
// pass hands to the next lives in device memory (SampleParams, written by the host; SampleState). Each pass is
// multi-block (grid-stride over the vocabulary); the last block to finish (a done counter, the threadfence
// pattern) reduces the global histogram and writes what the next pass needs. Passes with nothing to do return
// at once.
//   0   penalised logit p_i -> orderable key_i (kept in `keys`), argmax of p (greedy, and the softmax max),
//       top-k level 0: count histogram of the key's top 11 bits.
//   1,2 top-k levels 1, 2 (next 11, last 10 bits) inside the chosen bin: Tk = key of the k-th largest p, the
//       tokens with key >= Tk survive (ties at the k-th value are kept, as transformers does).
//   3-5 top-p: histograms of mass e_i = exp(y_i - y_max), y_i = (double)p_i / temperature (float64, as the
//       reference), over the survivors, by the same 11/11/10-bit digits: finds the value v_p of the last kept
//       token in the stable descending order, and how many of the tokens tied at v_p are kept.
//   6,7 only when the top-p cut splits tokens of equal value: the kept ones are those of lowest index, so a
//       select over the (22-bit) index among the tied tokens finds the index cut.
//   8   Gumbel-max over kept tokens: argmax of (float)y_i - log(-log u_i), u_i from Philox-4x32-10 keyed by
//       the seed, counter (seed, step, i, 0); the last block writes the id and marks it seen.
// What is kept is described by Tk and one 64-bit threshold: token i is kept iff key_i >= Tk and
// (key_i << 32 | ~i) >= thr, the order of the stable descending sort (top-p's cut may be a bin's lower bound,
// which can lie below Tk). temperature == 0: pass 8 returns the argmax of pass 0 (numpy's rule).
// Non-finite logits (issue 17): pass 0 notes a NaN or +inf anywhere, pass 8 also a largest logit of -inf (all
// masked); out[1] = 1 then, the id is still a valid index (0 if the draw found none) and is not marked seen, so
// the graph's next step reads a sane token while the host raises NonFiniteLogitsError. -inf among finite values
// is a masked logit, not an error.
#define SAMPLE_THREADS 512   // blockDim.x of every launch (gpu_sampling.py, row_sampler.py)
#define SBINS 2048           // histogram bins (11-bit digits)
#define SAMPLE_PASSES 9
#define TIE_BITS 22          // index bits for the tie cut: vocabularies up to 4,194,304
static_assert(SBINS % SAMPLE_THREADS == 0, "bins per thread");

struct SampleParams {        // 32 bytes; gpu_sampling.py packs the same layout
    double temperature;      // 0: greedy
    double top_p;            // >= 1: off
    float penalty;           // repetition penalty (1: off)
    int top_k;               // <= 0 or >= V: off
    unsigned seed_lo, seed_hi;
};

struct SampleState {         // zeroed by the host once; every call leaves it ready for the next
    unsigned long long maxkey;   // pass 0: argmax_pack of the penalised logits
    unsigned long long best;     // pass 8: packed Gumbel score
    unsigned long long thr;      // the kept set (see above)
    double tp_P;                 // top_p * Z (Z: mass of the top-k survivors)
    double tp_A;                 // mass strictly above the current top-p prefix
    unsigned done;               // blocks finished in the current pass
    unsigned bad;                // pass 0: a NaN or +inf logit was seen (pass 8 reports it and clears it)
    int tk_on, tp_on, tie_on;    // selection still running
    unsigned tk_prefix, tk_rank, Tk;
    unsigned tp_prefix, tie_prefix, tie_rank, vp;
    unsigned hcnt[SBINS];
    double hmass[SBINS];
};
#define SAMPLE_STATE_BYTES 32768  // what the host allocates
static_assert(sizeof(SampleState) <= SAMPLE_STATE_BYTES, "SampleState grew: raise STATE_BYTES in gpu_sampling.py too");

__device__ __forceinline__ unsigned s_key(float v) {  // orderable key (-0 as +0), as argmax_pack's high word
    unsigned u = __float_as_uint(v + 0.f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float s_val(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Philox-4x32-10 (Salmon et al. 2011, Random123's constants); returns the first word.
__device__ __forceinline__ unsigned philox_x(unsigned c0, unsigned c1, unsigned c2, unsigned c3, unsigned k0,
                                             unsigned k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        unsigned hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        unsigned hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0; c1 = lo1; c2 = hi0 ^ c3 ^ k1; c3 = lo0;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    return c0;
}

// Gumbel noise from 23 random bits: u = (r + 1/2) / 2^23 in (0, 1), exact in float (24 bits would round the
// top value's u up to 1, g = +inf: that token would win whatever its logit), g = -log(-log u).
__device__ __forceinline__ float gumbel(unsigned bits) {
    float u = ((float)(bits >> 9) + 0.5f) * 1.1920928955078125e-7f;
    return -logf(-logf(u));
}

// The softmax weight of key k (relative to the largest value): exactly the reference's exp(x - x0) in float64.
__device__ __forceinline__ double s_mass(unsigned k, double T, double ymax) {
    double y = (double)s_val(k) / T;
    return y == ymax ? 1.0 : exp(y - ymax);
}

// Adds one element per lane (bin < 0: none) to the shared histogram, one atomic per distinct bin in the warp.
// Every lane of the warp must call it.
__device__ __forceinline__ void s_hist_add(unsigned* hc, double* hm, int bin, double mass, bool with_mass) {
    if (!__any_sync(0xffffffffu, bin >= 0)) return;  // sparse passes: most warps hold no candidate
    unsigned peers = __match_any_sync(0xffffffffu, bin);
    int lane = threadIdx.x & 31;
    bool leader = lane == __ffs(peers) - 1 && bin >= 0;
    if (with_mass) {
        double s = 0.0;
        for (int l = 0; l < 32; ++l) {
            double o = __shfl_sync(0xffffffffu, mass, l);
            if ((peers >> l) & 1u) s += o;
        }
        if (leader) atomicAdd(&hm[bin], s);
    }
    if (leader) atomicAdd(&hc[bin], (unsigned)__popc(peers));
}

template <class T> __device__ __forceinline__ T s_warp_incl(T x) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    return x;
}

// Exclusive prefix over the threads of the block (in threadIdx order); `total` gets the sum. sh: 32 T.
template <class T> __device__ T s_block_excl(T v, T* sh, T& total) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    T incl = s_warp_incl(v);
    T excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = T(0);
    if (lane == 31) sh[w] = incl;
    __syncthreads();
    if (w == 0) {
        T s = lane < nw ? sh[lane] : T(0);
        s = s_warp_incl(s);
        __syncwarp();
        sh[lane] = s;
    }
    __syncthreads();
    T base = w ? sh[w - 1] : T(0);
    total = sh[nw - 1];
    __syncthreads();
    return base + excl;
}

struct SPick {
    int bin;               // -1: no bin crosses the target
    unsigned cabove, cbin;
    double mabove, mbin, mtotal;
};

// Last block: scans the global histogram from the top bin down and finds the bin where the running count
// (by_mass false: cabove < rank <= cabove + cbin) or mass (mabove < target <= mabove + mbin) crosses; with
// frac_of_total the mass target is target * (total mass). Zeroes the global histogram. Result in *pk (shared).
__device__ void s_pick(SampleState* st, bool by_mass, unsigned rank, double target, bool frac_of_total, SPick* pk) {
    constexpr int BPT = SBINS / SAMPLE_THREADS;
    __shared__ unsigned shc[32];
    __shared__ double shm[32];
    int b0 = SBINS - 1 - threadIdx.x * BPT;  // this thread's bins: b0, b0-1, ... (descending)
    unsigned c[BPT], csum = 0;
    double m[BPT], msum = 0.0;
#pragma unroll
    for (int j = 0; j < BPT; ++j) {
        c[j] = __ldcg(&st->hcnt[b0 - j]);
        m[j] = by_mass ? __ldcg(&st->hmass[b0 - j]) : 0.0;
        csum += c[j];
        msum += m[j];
    }
    if (threadIdx.x == 0) pk->bin = -1;
    unsigned ctot;
    double mtot = 0.0, mex = 0.0;
    unsigned cex = s_block_excl(csum, shc, ctot);
    if (by_mass) mex = s_block_excl(msum, shm, mtot);
    if (frac_of_total) target *= mtot;
#pragma unroll
    for (int j = 0; j < BPT; ++j) {
        bool hit = by_mass ? (mex < target && target <= mex + m[j]) : (cex < rank && rank <= cex + c[j]);
        if (hit) {
            pk->bin = b0 - j;
            pk->cabove = cex; pk->cbin = c[j];
            pk->mabove = mex; pk->mbin = m[j];
        }
        cex += c[j];
        mex += m[j];
        st->hcnt[b0 - j] = 0;
        st->hmass[b0 - j] = 0.0;
    }
    if (threadIdx.x == 0) pk->mtotal = mtot;
    __syncthreads();
}

// The one thread that ends a call: the id from its packed key, the non-finite flag, the seen mark; then the state
// is left ready for the next call. maxkey's high word is the largest penalised logit (NaN on top, as argmax_pack).
__device__ void s_finish(SampleState* st, int* out, unsigned char* seen, unsigned long long packed, int V, int mark) {
    int id = (int)(0xffffffffu - (unsigned)packed);
    float top = s_val((unsigned)(st->maxkey >> 32));
    bool bad = st->bad || !(top > -INFINITY && top < INFINITY) || !packed || id < 0 || id >= V;
    if (id < 0 || id >= V) id = 0;  // (no token survived: only with non-finite logits) a valid next input
    out[0] = id;
    out[1] = bad ? 1 : 0;
    if (mark && !bad) seen[id] = 1;
    st->best = 0; st->maxkey = 0; st->done = 0; st->bad = 0;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_pass(const SampleParams* __restrict__ prm_all,  // [S] per slot
            unsigned char* __restrict__ st_all,        // S SampleStates, SAMPLE_STATE_BYTES apart
            unsigned* __restrict__ keys_all,           // uint32 [S, V] per slot: the penalised logits' keys
            unsigned char* __restrict__ seen_all,      // uint8 [S, V] per slot: 1 = seen (penalised); pass 8 marks picks
            const float* __restrict__ logits_all,      // float32 [R, V]
            int* __restrict__ out_all,                 // int32 [R, 2]: the chosen id, 1 if the logits were not finite
            float* __restrict__ warped_all,            // float32 [R, V] or null: the warped logits (tests)
            const int* __restrict__ counter_all,       // int32 [R] or null: the RNG counter (step), else `counter`
            const int* __restrict__ slots,             // int32 [R] or null: row r's slot (null: slot = row)
            int counter, int V, int pass, int mark) {
    const int row = blockIdx.y;
    const size_t slot = (size_t)(slots ? slots[row] : row);
    const SampleParams* __restrict__ prm = prm_all + slot;
    SampleState* __restrict__ st = (SampleState*)(st_all + slot * SAMPLE_STATE_BYTES);
    unsigned* __restrict__ keys = keys_all + slot * V;
    unsigned char* __restrict__ seen = seen_all + slot * V;
    const float* __restrict__ logits = logits_all + (size_t)row * V;
    int* __restrict__ out = out_all + 2 * row;
    float* __restrict__ warped = warped_all ? warped_all + (size_t)row * V : nullptr;
    const int* __restrict__ counter_dev = counter_all ? counter_all + row : nullptr;
    __shared__ unsigned hc[SBINS];
    __shared__ double hm[SBINS];
    __shared__ SPick pk;
    __shared__ bool last;
    const double T = prm->temperature;
    const bool greedy = !(T > 0.0);
    const int stride = gridDim.x * blockDim.x;
    const int lane = threadIdx.x & 31;

    // Which selection this pass runs: level 0..2 of the key (top-k, top-p) or 0..1 of the index (ties).
    int level = 0;
    bool by_mass = false, tie = false;
    if (pass == 0) {
        level = 0;
    } else if (pass <= 2) {
        if (greedy || st->tk_on != 1) return;
        level = pass;
    } else if (pass <= 5) {
        if (greedy || st->tp_on != 1) return;
        level = pass - 3; by_mass = true;
    } else if (pass <= 7) {
        if (greedy || st->tie_on != 1) return;
        level = pass - 6; tie = true;
    }

    if (pass == SAMPLE_PASSES - 1) {  // ---- the draw
        if (greedy) {
            if (warped)
                for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < V; i += stride) warped[i] = s_val(keys[i]);
            if (blockIdx.x == 0 && threadIdx.x == 0) s_finish(st, out, seen, st->maxkey, V, mark);
            return;
        }
        const unsigned long long thr = st->thr;  // top-p's cut, within the top-k survivors (key >= Tk)
        const unsigned Tk = st->Tk;
        const unsigned ctr = counter_dev ? (unsigned)*counter_dev : (unsigned)counter;
        const unsigned k0 = prm->seed_lo, k1 = prm->seed_hi;
        unsigned long long best = 0;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < V; i += stride) {
            unsigned key = keys[i];
            bool kept = key >= Tk && (((unsigned long long)key << 32) | (0xffffffffu - (unsigned)i)) >= thr;
            float y = (float)((double)s_val(key) / T);
            if (kept) {
                float s = y + gumbel(philox_x((unsigned)i, ctr, 0u, 0u, k0, k1));
                unsigned long long pkd = argmax_pack(s, i);
                best = pkd > best ? pkd : best;
            }
            if (warped) warped[i] = kept ? y : -INFINITY;
        }
        best = warp_max_u64(best);
        if (lane == 0 && best) atomicMax(&st->best, best);
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(&st->done, 1u) == gridDim.x - 1;
        __syncthreads();
        if (!last || threadIdx.x != 0) return;
        __threadfence();
        s_finish(st, out, seen, atomicAdd(&st->best, 0ull), V, mark);
        return;
    }

    // ---- histogram passes
    const int shift = tie ? (level == 0 ? 11 : 0) : (level == 0 ? 21 : level == 1 ? 10 : 0);
    const int width = tie ? 11 : (level == 2 ? 10 : 11);
    const unsigned mask = (1u << width) - 1u;
    const bool counting = pass != 0 || (!greedy && prm->top_k > 0 && prm->top_k < V);
    if (counting)
        for (int b = threadIdx.x; b < SBINS; b += blockDim.x) { hc[b] = 0; hm[b] = 0.0; }
    __syncthreads();

    unsigned prefix = 0, Tk = 0, vp = 0;  // prefix: the bins chosen at the levels above (none at level 0)
    double ymax = 0.0;
    if (pass > 0) {
        Tk = st->Tk;
        if (level > 0) prefix = tie ? st->tie_prefix : by_mass ? st->tp_prefix : st->tk_prefix;
        vp = st->vp;
        ymax = (double)s_val((unsigned)(st->maxkey >> 32)) / T;
    }
    const float pen = prm->penalty;
    unsigned long long best = 0;
    bool bad = false;
    for (int base = blockIdx.x * blockDim.x; base < V; base += stride) {  // uniform trip count: warp shuffles
        int i = base + threadIdx.x;
        int bin = -1;
        double e = 0.0;
        if (i < V) {
            unsigned key;
            if (pass == 0) {
                float x = logits[i];
                bad |= x != x || x == INFINITY;
                if (seen[i]) x = x > 0.f ? x / pen : x * pen;
                key = s_key(x);
                keys[i] = key;
                unsigned long long pkd = argmax_pack(x, i);
                best = pkd > best ? pkd : best;
            } else {
                key = keys[i];
            }
            if (tie) {
                unsigned sub = ((1u << TIE_BITS) - 1u) - (unsigned)i;  // larger sub = lower index = earlier
                if (key == vp && (level == 0 || (sub >> (shift + width)) == prefix)) bin = (int)((sub >> shift) & mask);
            } else if (!by_mass || key >= Tk) {
                if (level == 0 || (key >> (shift + width)) == prefix) bin = (int)((key >> shift) & mask);
                if (by_mass && bin >= 0) e = s_mass(key, T, ymax);
            }
        }
        if (counting) s_hist_add(hc, hm, bin, e, by_mass);
    }
    if (pass == 0) {
        best = warp_max_u64(best);
        if (lane == 0 && best) atomicMax(&st->maxkey, best);
        if (__any_sync(0xffffffffu, bad) && lane == 0) atomicOr(&st->bad, 1u);
    }
    __syncthreads();
    if (counting)
        for (int b = threadIdx.x; b < SBINS; b += blockDim.x)
            if (hc[b]) {
                atomicAdd(&st->hcnt[b], hc[b]);
                if (by_mass) atomicAdd(&st->hmass[b], hm[b]);
            }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&st->done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();

    // ---- the last block: pick the bin, hand the state on
    const bool t0 = threadIdx.x == 0;
    if (pass == 0) {
        if (counting) s_pick(st, false, (unsigned)prm->top_k, 0.0, false, &pk);
        if (t0) {
            st->done = 0;
            st->best = 0;
            st->tie_on = 0;
            st->tp_on = !greedy && prm->top_p < 1.0;
            st->tk_on = 0;
            unsigned Tk0 = 0;
            if (counting) {
                unsigned r = (unsigned)prm->top_k - pk.cabove;
                if (r == pk.cbin) Tk0 = (unsigned)pk.bin << shift;  // the whole bin is kept
                else { st->tk_on = 1; st->tk_prefix = (unsigned)pk.bin; st->tk_rank = r; }
            }
            st->Tk = Tk0;
            st->thr = (unsigned long long)Tk0 << 32;
        }
        return;
    }
    if (!by_mass) {  // top-k (levels 1, 2) or the tie index (levels 0, 1): count select
        unsigned rank = tie ? st->tie_rank : st->tk_rank;
        s_pick(st, false, rank, 0.0, false, &pk);
        if (!t0) return;
        st->done = 0;
        unsigned np = (prefix << width) | (unsigned)pk.bin, r = rank - pk.cabove;
        bool fin = shift == 0 || r == pk.cbin;
        if (!tie) {
            if (fin) { st->Tk = np << shift; st->thr = (unsigned long long)(np << shift) << 32; st->tk_on = 0; }
            else { st->tk_prefix = np; st->tk_rank = r; }
        } else {
            if (fin) {
                unsigned icut = ((1u << TIE_BITS) - 1u) - (np << shift);
                st->thr = ((unsigned long long)vp << 32) | (0xffffffffu - icut);
                st->tie_on = 0;
            } else { st->tie_prefix = np; st->tie_rank = r; }
        }
        return;
    }
    // top-p (levels 0..2): mass select
    double P = level == 0 ? prm->top_p : st->tp_P - st->tp_A;
    s_pick(st, true, 0, P, level == 0, &pk);
    if (!t0) return;
    st->done = 0;
    if (level == 0) st->tp_P = prm->top_p * pk.mtotal;
    if (pk.bin < 0) {  // rounding: the prefix bin's mass fell short of what the level above saw; keep all of it
        st->thr = level == 0 ? (unsigned long long)Tk << 32 : (unsigned long long)(prefix << (shift + width)) << 32;
        st->tp_on = 0;
        return;
    }
    unsigned np = (prefix << width) | (unsigned)pk.bin;
    double A = (level == 0 ? 0.0 : st->tp_A) + pk.mabove;
    st->tp_A = A;
    if (shift == 0) {  // np is v_p: keep the first r of its n tied tokens, r = #{r >= 0 : A + r e < P}
        double e = s_mass(np, T, (double)s_val((unsigned)(st->maxkey >> 32)) / T);
        double q = (st->tp_P - A) / e;
        unsigned n = pk.cbin, r = q >= (double)n ? n : (unsigned)ceil(q);
        if (r < 1) r = 1;
        if (r >= n) st->thr = (unsigned long long)np << 32;
        else { st->tie_on = 1; st->tie_rank = r; st->tie_prefix = 0; st->vp = np; }
        st->tp_on = 0;
    } else if (pk.cbin == 1) {  // the crossing bin holds one token: it is the last one kept
        st->thr = (unsigned long long)(np << shift) << 32;
        st->tp_on = 0;
    } else {
        st->tp_prefix = np;
    }
}
