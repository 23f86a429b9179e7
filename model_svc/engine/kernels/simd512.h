/* 16 floats at a time (AVX-512), shared by the kernels in this folder so that each rounds the same
 * way: bfloat16 loads and rounding (nearest even), and exp. */
#ifndef GENRPC_SIMD512_H
#define GENRPC_SIMD512_H

#include <immintrin.h>

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512i round_to_bf16_bits(__m512 x) { /* round to nearest even; inputs are finite here */
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
}

static inline __m512 round_bf16_ps(__m512 x) {
    return _mm512_castsi512_ps(_mm512_and_si512(round_to_bf16_bits(x), _mm512_set1_epi32((int)0xffff0000u)));
}

/* Cephes' e^x range reduction and polynomial: *n = round(x log2 e), *r = x - n ln 2 (ln 2 in two
 * parts), returns p with e^r = 1 + r + r^2 p. Callers finish e^x each its own way (exp_ps here,
 * fused.c's silu as its scalar loop rounds). */
static inline __m512 exp_reduced_ps(__m512 x, __m512 *n, __m512 *r) {
    *n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    *r = _mm512_fnmadd_ps(*n, _mm512_set1_ps(0.693359375f), x);
    *r = _mm512_fnmadd_ps(*n, _mm512_set1_ps(-2.12194440e-4f), *r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, *r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, *r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, *r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, *r, _mm512_set1_ps(1.6666665459e-1f));
    return _mm512_fmadd_ps(p, *r, _mm512_set1_ps(5.0000001201e-1f));
}

/* exp(x) for x <= 0: Cephes' polynomial on the reduced argument, scaling by 2^n; 0 below -87.3, and
 * exp(0) is exactly 1. */
static inline __m512 exp_ps(__m512 x) {
    __m512 n, r;
    const __m512 p = exp_reduced_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3365447505f)), &n, &r);
    return _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f))), n);
}

/* 2^x as p(x - floor(x)) * 2^floor(x): x - floor(x) in [0, 1) exactly (VREDUCEPS), a degree-4 polynomial
 * there (relative error 3e-6, p(0) = 1 exactly), VSCALEFPS (infinity past float32's range; below
 * -126, subnormal or 0: callers clamp or flush). The tile attention's probabilities and long prompts'
 * silu take it. */
#ifdef __AVX512DQ__
static inline __m512 exp2_poly4_ps(__m512 x) {
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(0x1.b7f214p-7f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.abfa76p-5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.ee2414p-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.62d6c8p-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, x);
}
#endif

#endif
