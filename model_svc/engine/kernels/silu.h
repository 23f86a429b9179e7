/* silu(gate) * up for bfloat16 values, shared by fused.c (its own pass over a step's values) and
 * gemm_bf16.c (the gate/up product's column blocks while they are in cache): one arithmetic, so
 * the same bits from either. Also the AVX-512 rounding helpers fused.c's other kernels use.
 *
 * GENRPC_VECTOR512: built with AVX-512 (F, BW, VL, DQ) and without -DGENRPC_SCALAR (the tests build the
 * plain loops that way and compare). */
#ifndef GENRPC_SILU_H
#define GENRPC_SILU_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    !defined(GENRPC_SCALAR)
#include <immintrin.h>

#include "simd512.h"
#define GENRPC_VECTOR512 16

/* bfloat16 bits of 16 floats in the low halves of the lanes, as float_to_bf16 rounds them (nearest
 * even; a NaN quieted; subnormals kept, which VCVTNEPS2BF16 would flush). */
static inline __m512i bf16_round_bits(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(_mm512_srli_epi32(round_to_bf16_bits(x), 16), nan, _mm512_srli_epi32(u, 16),
                                _mm512_set1_epi32(0x40));
}

/* round_bf16 for 16 floats, and float_to_bf16's 16 values stored. */
static inline __m512 round_bf16_nan_ps(__m512 x) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_round_bits(x), 16)); }
static inline void store_bf16(uint16_t *p, __m512 x) { _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(bf16_round_bits(x))); }
#else
#define GENRPC_VECTOR512 1
#endif

/* e^x for float32 within ~2 ulp (Cephes' range reduction and polynomial), in plain arithmetic: the
 * compiler vectorizes a loop over it (libm's expf it would not; GCC only with -fno-trapping-math,
 * which fused.py builds fused.c with, else its clamps stay branches), and with FMA contraction on
 * in every loop the vector lanes and the scalar remainder give the same bits. */
static inline float exp_f32(float x) {
    const float c = x < -86.0f ? -86.0f : x > 88.72283f ? 88.72283f : x; /* e^c: a normal float */
    const float n = rintf(c * 1.44269504088896341f);
    const float r = c - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const uint32_t bits = (uint32_t)((int32_t)n + 126) << 23; /* 2^(n - 1): n may be 128 */
    float half;
    memcpy(&half, &bits, sizeof half);
    const float e = (p * (r * r) + r + 1.0f) * half * 2.0f;
    return x > 88.72283f ? INFINITY : x < -86.0f ? 0.0f : e; /* (below -86: 1 + e^x is 1 anyway) */
}

/* silu(gate) * up for one value, in plain arithmetic (GCC vectorizes a loop over it where there is no
 * AVX-512). */
static inline uint16_t silu_mul1(uint16_t gate, uint16_t up) {
    const float x = bf16_to_float(gate);
    const float s = round_bf16(x / (1.0f + exp_f32(-x)));
    return float_to_bf16(s * bf16_to_float(up));
}

#if GENRPC_VECTOR512 == 16
/* silu_mul's arithmetic for the 16 values at gate and up, instruction for instruction exp_f32's and
 * the scalar loop's (FMA where GCC contracts the scalar code; the clamps' operand order passes a NaN
 * through as the scalar comparisons do): the same bits, checked against the scalar build for every
 * bfloat16 gate. */
static inline __m256i silu_mul16(const uint16_t *gate, const uint16_t *up_bits) {
    const __m512 x = load_bf16(gate), up = load_bf16(up_bits);
    const __m512 y = _mm512_sub_ps(_mm512_setzero_ps(), x); /* -x: sign flipped, NaN kept */
    const __m512 c = _mm512_min_ps(_mm512_set1_ps(88.72283f), _mm512_max_ps(_mm512_set1_ps(-86.0f), y));
    __m512 n, r;
    const __m512 p = exp_reduced_ps(c, &n, &r);
    const __m512 half = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(126)), 23));
    __m512 e = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    e = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(e, _mm512_set1_ps(1.0f)), half), _mm512_set1_ps(2.0f));
    e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(y, _mm512_set1_ps(-86.0f), _CMP_LT_OQ), _mm512_setzero_ps());
    e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(y, _mm512_set1_ps(88.72283f), _CMP_GT_OQ), _mm512_set1_ps(INFINITY));
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(
        bf16_round_bits(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e))), 16));
    return _mm512_cvtepi32_epi16(bf16_round_bits(_mm512_mul_ps(s, up)));
}

/* Long prompts' rows (silu_mul_run_long): silu(x) = x / (1 + 2^t), t = x * -log2 e (one rounding)
 * clamped at -126 (2^t then stays normal; below, 1 + 2^t is 1 anyway), 2^t by simd512.h's
 * exp2_poly4_ps (infinity past float32's range, as e^-x overflows), rounded to bfloat16, times up,
 * rounded: 0.63x silu_mul16's time (its Cephes e^x and clamps), within a bfloat16 step of it
 * (tests/unit/test_fused.py writes it out in torch). */
static inline __m256i silu_mul_long16(__m512 x, __m512 up) {
    const __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(-1.44269504088896341f)), _mm512_set1_ps(-126.0f));
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp2_poly4_ps(t));
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(bf16_round_bits(_mm512_div_ps(x, d)), 16));
    return _mm512_cvtepi32_epi16(bf16_round_bits(_mm512_mul_ps(s, up)));
}
#endif

/* out[i] = silu(gate[i]) * up[i] for i < count (out may be gate), 16 at a time where built so, the
 * rest one by one (an element's bits depend on its two values alone). */
static inline void silu_mul_run(uint16_t *out, const uint16_t *gate, const uint16_t *up, int64_t count) {
    int64_t i = 0;
#if GENRPC_VECTOR512 == 16
    for (; i + 16 <= count; i += 16) _mm256_storeu_si256((__m256i *)(out + i), silu_mul16(gate + i, up + i));
#endif
    for (; i < count; i++) out[i] = silu_mul1(gate[i], up[i]);
}

/* silu_mul_run for long prompts' rows: silu_mul_long16's arithmetic for every value (the last few
 * through masked loads) where built with AVX-512, else silu_mul_run's. */
static inline void silu_mul_run_long(uint16_t *out, const uint16_t *gate, const uint16_t *up, int64_t count) {
#if GENRPC_VECTOR512 == 16
    for (int64_t i = 0; i < count; i += 16) {
        const __mmask16 mask = count - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (count - i)) - 1);
        const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, gate + i)), 16));
        const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, up + i)), 16));
        _mm256_mask_storeu_epi16(out + i, mask, silu_mul_long16(x, y));
    }
#else
    silu_mul_run(out, gate, up, count);
#endif
}

#endif
