// Quantized weights (issue 16): decoding core/cuda/qlayout.py's words in registers, shared by gemv_q.cu (the products
// of linear layers) and moe_q.cu (the experts' grouped GEMVs). Scales are in their own stored type `st` (SDTYPE);
// a row's scale and zero point for one group come as a QS (scale_of), and dequant_word turns one 32-bit word into
// its PER weights as floats.
//
// dequant_word computes the weight exactly as core/quant/dequant.py does: (u - z) * s (int) or e4m3(u) * s (fp8),
// rounded once to the scale type (tests/test_quant_layout.py models it op for op in numpy). How:
//   int, st half / bf16: a code goes into the low mantissa bits of MAGIC (1024 in fp16, 128 in bf16: 10 and 7
//     mantissa bits, a code's 4 or 8 fit), so one LOP3 or PRMT makes two exact values MAGIC + u; minus MAGIC + z is
//     the exact integer u - z; one hmul2 by the scale rounds it once, as the reference does (which multiplies in
//     float32 exactly, |u - z| < 2^9 and a 16-bit scale having at most 11 significant bits, then rounds). int8 in
//     bf16 (u > 127 is not exact in 128 + u) takes u - z through the fp32 MAGIC 2^23 instead: |u - z| <= 255 has 8
//     significant bits, so its fp32 bits' top half is that bf16 exactly.
//   int, st float32: fp32 MAGIC 2^23 + u, minus 2^23 + z, times s: one fp32 rounding, as the reference.
//   fp8 (E4M3): the byte's sign and 7 magnitude bits, shifted into an fp16's (sign, exponent, mantissa) fields, are an
//     fp16 of the value times 2^-8 (5 exponent bits against 4, subnormals included: every e4m3 value is an fp16),
//     so the layout stores 256 s, and one hmul2 (st half) or an fp32 multiply (exact: 4 + 11 significant bits) then
//     one rounding gives the reference's product. The e4m3 NaN codes (0x7F, 0xFF) come out finite here: qlayout.py
//     keeps a weight holding one dense.
#pragma once
#include "common.cuh"

#ifndef SDTYPE
#define SDTYPE 1  // the scales' stored type, which the dequantized weight is rounded to: 0 float32, 1 fp16, 2 bf16
#endif
static_assert(SDTYPE >= 0 && SDTYPE <= 2, "SDTYPE must be 0 (float32), 1 (float16) or 2 (bfloat16)");

#if SDTYPE == 0
typedef float st;
typedef float2 st2;
#elif SDTYPE == 1
typedef __half st;
typedef __half2 st2;
#else
typedef __nv_bfloat16 st;
typedef __nv_bfloat162 st2;
#endif

#define KIND_INT4 0
#define KIND_INT8 1
#define KIND_FP8 2

template <int KIND> struct Codes {
    static constexpr int BITS = KIND == KIND_INT4 ? 4 : 8;
    static constexpr int PER = 32 / BITS;                     // codes in a word
    static constexpr int CH = 4 * PER;                        // codes in a 16-byte chunk
    static constexpr int LOG_CH = KIND == KIND_INT4 ? 5 : 4;
    static constexpr uint32_t ZSYM = 1u << (BITS - 1);        // the zero point when there are none (symmetric)
};

template <class T> __device__ __forceinline__ T bits_as(uint32_t u) {
    T t;
    memcpy(&t, &u, sizeof(T));
    return t;
}
template <class T> __device__ __forceinline__ uint32_t as_bits(T t) {
    uint32_t u;
    memcpy(&u, &t, sizeof(u));
    return u;
}

#if SDTYPE == 1
__device__ __forceinline__ float2 st2_float2(__half2 v) { return __half22float2(v); }
#define MAGIC2 0x64006400u  // fp16 1024 in both halves
#elif SDTYPE == 2
__device__ __forceinline__ float2 st2_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
#define MAGIC2 0x43004300u  // bf16 128 in both halves
#endif
#define MAGIC32 0x4B000000u  // fp32 2^23

// A code or zero point u < 2^8 as float, by the fp32 MAGIC (no conversion instruction; gemv_q.cu's qacc_fold and
// gemv_qtc.cu, which fold the zero point out of the inner loop).
__device__ __forceinline__ float code_f(uint32_t u) { return __uint_as_float(MAGIC32 | u) - 8388608.f; }

// A row's scale and zero point for one group, in the forms dequant_word uses.
struct QS {
    float sf;   // the scale as float (fp8: times 256, as stored)
    float zf;   // 2^23 + zero point (fp32 path)
    st2 s2;     // the scale in both halves
    st2 z2;     // MAGIC + zero point in both halves (int, st half / bf16)
};

// From a scale s and a zero point z already loaded (gemv_q.cu with QPRESCALE loads them with the weights).
__device__ __forceinline__ QS make_qs(st s, uint32_t z) {
    QS q;
    q.sf = to_f(s);
    q.zf = __uint_as_float(MAGIC32 | z);
#if SDTYPE == 0
    q.s2 = make_float2(s, s);
    q.z2 = make_float2(0.f, 0.f);
#else
    q.s2 = st2(s, s);
    q.z2 = bits_as<st2>(MAGIC2 | z | (z << 16));
#endif
    return q;
}

template <int KIND>
__device__ __forceinline__ QS scale_of(const st* __restrict__ srow, const uint8_t* __restrict__ zrow, int g) {
    return make_qs(srow[g], zrow ? (uint32_t)zrow[g] : Codes<KIND>::ZSYM);
}

// The PER weights of word w (code i at bits i * BITS), dequantized as the reference does (see the file comment).
template <int KIND> __device__ __forceinline__ void dequant_word(uint32_t w, const QS& q, float* f);

template <> __device__ __forceinline__ void dequant_word<KIND_INT4>(uint32_t w, const QS& q, float* f) {
#if SDTYPE == 0
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = (__uint_as_float(((w >> (4 * i)) & 0xFu) | MAGIC32) - q.zf) * q.sf;
#else
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // codes i and i + 4 in the low and high halves
        const st2 d = __hsub2(bits_as<st2>(((w >> (4 * i)) & 0x000F000Fu) | MAGIC2), q.z2);
        const float2 v = st2_float2(__hmul2(d, q.s2));
        f[i] = v.x;
        f[i + 4] = v.y;
    }
#endif
}

template <> __device__ __forceinline__ void dequant_word<KIND_INT8>(uint32_t w, const QS& q, float* f) {
#if SDTYPE == 1
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // bytes i and i + 2 under the fp16 MAGIC's high byte 0x64
        const st2 d = __hsub2(bits_as<st2>(__byte_perm(w, 0x64646464u, 0x4240u + 0x0101u * i)), q.z2);
        const float2 v = st2_float2(__hmul2(d, q.s2));
        f[i] = v.x;
        f[i + 2] = v.y;
    }
#else
    float d[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = __uint_as_float(__byte_perm(w, MAGIC32, 0x7440u + i)) - q.zf;  // exact u - z
#if SDTYPE == 0
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = d[i] * q.sf;
#else
#pragma unroll
    for (int i = 0; i < 4; i += 2) {  // the fp32 bits' top halves are the bf16 of u - z, exactly
        const st2 e = bits_as<st2>(__byte_perm(__float_as_uint(d[i]), __float_as_uint(d[i + 1]), 0x7632u));
        const float2 v = st2_float2(__hmul2(e, q.s2));
        f[i] = v.x;
        f[i + 1] = v.y;
    }
#endif
#endif
}

template <> __device__ __forceinline__ void dequant_word<KIND_FP8>(uint32_t w, const QS& q, float* f) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        // bytes 2i and 2i + 1 at bits 8-15 and 24-31: each half's sign in place, its 7 magnitude bits one lower
        const uint32_t t = __byte_perm(w, 0u, i ? 0x3424u : 0x1404u);
        const __half2 h = bits_as<__half2>((t & 0x80008000u) | ((t >> 1) & 0x3F803F80u));  // value * 2^-8, exact
#if SDTYPE == 1
        const float2 v = __half22float2(__hmul2(h, q.s2));
#else
        const float2 e = __half22float2(h);
        float2 v = make_float2(e.x * q.sf, e.y * q.sf);  // sf = 256 s: the exact product for a bf16 scale
#if SDTYPE == 2
        v = __bfloat1622float2(__floats2bfloat162_rn(v.x, v.y));
#endif
#endif
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

// Pointers of output row `row` of a weight: its words, scale row and zero-point row.
template <int KIND>
__device__ __forceinline__ void row_ptrs(const uint32_t* q, const st* s, const uint8_t* z, int row, int Kp, int G,
                                         int srow, const uint32_t*& qr, const st*& sr, const uint8_t*& zr) {
    qr = q + (size_t)row * (Kp / Codes<KIND>::PER);
    sr = s + (size_t)(row / srow) * G;
    zr = z ? z + (size_t)row * G : nullptr;
}

// The arguments of the one-to-three-product GEMV and of the gated GEMV, shared by gemv_q.cu and gemv_qtc.cu (the
// backend launches either with the same values).
#define QGEMV_ARGS const float* __restrict__ x, int T, int Kp, int lg, int G, int srow, int act, \
    float* y0, const uint32_t* q0, const st* s0, const uint8_t* z0, const wt* b0, int n0, \
    float* y1, const uint32_t* q1, const st* s1, const uint8_t* z1, const wt* b1, int n1, \
    float* y2, const uint32_t* q2, const st* s2, const uint8_t* z2, const wt* b2, int n2
#define QGEMV_PASS x, T, Kp, lg, G, srow, act, y0, q0, s0, z0, b0, n0, y1, q1, s1, z1, b1, n1, y2, q2, s2, z2, b2, n2
#define QGATED_ARGS float* __restrict__ y, const float* __restrict__ x, int T, int Kp, int lg, int G, int srow, \
    int act, int n, const uint32_t* qg, const st* sg, const uint8_t* zg, const wt* bg, const uint32_t* qu, \
    const st* su, const uint8_t* zu, const wt* bu
#define QGATED_PASS y, x, T, Kp, lg, G, srow, act, n, qg, sg, zg, bg, qu, su, zu, bu
