/* A layer's small elementwise steps in one call each, for bfloat16 rows.
 *
 * Eagerly, PyTorch runs a residual add and an RMSNorm as about ten operator calls and rotary
 * positions as about twelve (each dispatched, each allocating its result); on a step of a few
 * dozen rows, that dispatch costs more than the arithmetic. These functions do the same steps
 * with the same roundings to bfloat16 between them as the eager code (a bfloat16 product or sum
 * of two bfloat16 values, computed in float32, rounded to nearest even), row by row: a row's
 * result never depends on the other rows. The one difference: the RMSNorm's mean of squares is
 * summed in a different order, which moves its float32 value in the last bits.
 *
 * Built by model_svc/engine/kernels/__init__.py with the machine's C compiler (with OpenMP), as the
 * attention kernel is.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* Rows are shared out between OpenMP threads (PyTorch's pool) from this many on; fewer are not worth
 * waking a thread for. A row's arithmetic is the same whichever thread does it. */
#define PARALLEL_ROWS 8

#include "silu.h"

/* One row of add_rmsnorm_bf16: the scalar loops, or the same arithmetic 16 values at a time (the
 * scalar loops' sums of squares are lane i % 16's, contracted to FMA; the remainder's lanes take
 * zeros, which add exactly nothing to a sum of squares), the same bits (tests/unit/test_fused.py
 * compares the scalar build). */
static inline void norm_row(uint16_t *hr, const uint16_t *dr, const uint16_t *weight, uint16_t *orow, int64_t n,
                            float eps) {
    float acc[16] = {0};
    int64_t i = 0;
#if GENRPC_VECTOR512 == 16
    if (dr != NULL)
        for (; i + 16 <= n; i += 16) store_bf16(hr + i, _mm512_add_ps(load_bf16(hr + i), load_bf16(dr + i)));
    for (; dr != NULL && i < n; i++) hr[i] = float_to_bf16(bf16_to_float(hr[i]) + bf16_to_float(dr[i]));
    __m512 sum = _mm512_setzero_ps();
    for (i = 0; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_maskz_cvtepu16_epi32(live, _mm256_maskz_loadu_epi16(live, hr + i)), 16));
        sum = _mm512_fmadd_ps(v, v, sum);
    }
    _mm512_storeu_ps(acc, sum);
#else
    if (dr != NULL)
        for (i = 0; i < n; i++) hr[i] = float_to_bf16(bf16_to_float(hr[i]) + bf16_to_float(dr[i]));
    for (i = 0; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) {
            float v = bf16_to_float(hr[i + l]);
            acc[l] += v * v;
        }
    for (; i < n; i++) {
        float v = bf16_to_float(hr[i]);
        acc[i % 16] += v * v;
    }
#endif
    for (int width = 8; width > 0; width /= 2)
        for (int l = 0; l < width; l++) acc[l] += acc[l + width];
    const float inv = 1.0f / sqrtf(acc[0] / (float)n + eps);
    i = 0;
#if GENRPC_VECTOR512 == 16
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; i + 16 <= n; i += 16)
        store_bf16(orow + i, _mm512_mul_ps(load_bf16(weight + i), round_bf16_nan_ps(_mm512_mul_ps(load_bf16(hr + i), vinv))));
#endif
    for (; i < n; i++) orow[i] = float_to_bf16(bf16_to_float(weight[i]) * round_bf16(bf16_to_float(hr[i]) * inv));
}

/* For each of `rows` rows of n values: h += delta (when delta is not NULL; h is updated in place),
 * then out = weight * bfloat16(h * 1 / sqrt(mean(h^2) + eps)), as LlamaRMSNorm computes it. */
void add_rmsnorm_bf16(uint16_t *h, const uint16_t *delta, const uint16_t *weight, uint16_t *out,
                      int64_t rows, int64_t n, float eps, int64_t h_stride, int64_t delta_stride,
                      int64_t out_stride) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++)
        norm_row(h + r * h_stride, delta != NULL ? delta + r * delta_stride : NULL, weight, out + r * out_stride, n, eps);
}

/* x * cos + rotate_half(x) * sin for one head of d values, in place (rounded after each step as the
 * eager code rounds: the two products, then their sum); 16 values of each half at a time where the
 * half is whole vectors (the same arithmetic: rotate_half's negation flips the sign bit). */
static inline void rope_head(uint16_t *x, const uint16_t *c, const uint16_t *s, int64_t d, uint16_t *tmp) {
    const int64_t half = d / 2;
#if GENRPC_VECTOR512 == 16
    if (half % 16 == 0) {
        const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
        for (int64_t i = 0; i < half; i += 16) {
            const __m512 lo = load_bf16(x + i), hi = load_bf16(x + i + half);
            const __m512 a0 = round_bf16_nan_ps(_mm512_mul_ps(lo, load_bf16(c + i)));
            const __m512 b0 = round_bf16_nan_ps(_mm512_mul_ps(_mm512_xor_ps(hi, sign), load_bf16(s + i)));
            const __m512 a1 = round_bf16_nan_ps(_mm512_mul_ps(hi, load_bf16(c + i + half)));
            const __m512 b1 = round_bf16_nan_ps(_mm512_mul_ps(lo, load_bf16(s + i + half)));
            store_bf16(x + i, _mm512_add_ps(a0, b0));
            store_bf16(x + i + half, _mm512_add_ps(a1, b1));
        }
        return;
    }
#endif
    for (int64_t i = 0; i < d; i++) {
        const float rot = i < half ? -bf16_to_float(x[i + half]) : bf16_to_float(x[i - half]);
        const float a = round_bf16(bf16_to_float(x[i]) * bf16_to_float(c[i]));
        const float b = round_bf16(rot * bf16_to_float(s[i]));
        tmp[i] = float_to_bf16(a + b);
    }
    memcpy(x, tmp, (size_t)d * sizeof *x);
}

/* Rotary positions for a step's T tokens, and the keys and values stored in the cache arena:
 * q [T, hq, d] rotated in place; k [T, hkv, d] rotated in place and, with v [T, hkv, d], copied to
 * keys/values[head * head_stride + slots[t] * slot_stride]; cos, sin [T, d]. d at most 512. */
int rope_store_bf16(uint16_t *q, uint16_t *k, const uint16_t *v, const uint16_t *cos, const uint16_t *sin,
                    int64_t tokens, int64_t hq, int64_t hkv, int64_t d, const int64_t *slots, uint16_t *keys,
                    uint16_t *values, int64_t head_stride, int64_t slot_stride) {
    if (d > 512 || d % 2) return 1;
#pragma omp parallel for schedule(static) if (tokens >= PARALLEL_ROWS)
    for (int64_t t = 0; t < tokens; t++) {
        uint16_t tmp[512];
        const uint16_t *c = cos + t * d, *s = sin + t * d;
        for (int64_t h = 0; h < hq; h++) rope_head(q + (t * hq + h) * d, c, s, d, tmp);
        for (int64_t h = 0; h < hkv; h++) {
            uint16_t *kh = k + (t * hkv + h) * d;
            rope_head(kh, c, s, d, tmp);
            memcpy(keys + h * head_stride + slots[t] * slot_stride, kh, (size_t)d * sizeof *kh);
            memcpy(values + h * head_stride + slots[t] * slot_stride, v + (t * hkv + h) * d, (size_t)d * sizeof *kh);
        }
    }
    return 0;
}

/* 16 where built with AVX-512 (long prompts' rows then take silu_mul_run_long's own arithmetic), else 1. */
int fused_vector_width(void) { return GENRPC_VECTOR512; }

/* gate = bfloat16(bfloat16(silu(gate)) * up) for `count` values (the gated MLP's act_fn(gate) * up,
 * rounded as the eager code rounds: silu(x) = x / (1 + e^-x) in float32, then the product); the first
 * `long_count` (long prompts' rows) with silu.h's silu_mul_run_long. An element's result depends on its
 * two inputs and side alone; big calls are shared out on the OpenMP pool. */
void silu_mul_bf16(uint16_t *gate, const uint16_t *up, int64_t count, int64_t long_count) {
    const int64_t chunk = 4096, chunks = (count + chunk - 1) / chunk; /* whole vectors but the last */
    long_count = long_count < 0 ? 0 : long_count > count ? count : long_count;
#pragma omp parallel for schedule(static) if (count >= 16384)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i = c * chunk, end = count - i < chunk ? count : i + chunk;
        const int64_t split = long_count < i ? i : long_count > end ? end : long_count;
        silu_mul_run_long(gate + i, gate + i, up + i, split - i);
        silu_mul_run(gate + split, gate + split, up + split, end - split);
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* The index of a row's first NaN if it has one, else of its first largest value: torch.argmax's
 * answer for a float32 row. */
static int64_t argmax_row(const float *x, int64_t n) {
    float best = -INFINITY;
    int nan = 0;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 m = _mm512_set1_ps(-INFINITY);
    __mmask16 unordered = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, v);
    }
    best = _mm512_reduce_max_ps(m);
    nan = unordered != 0;
#endif
    for (; i < n; i++) {
        if (x[i] != x[i]) nan = 1;
        else if (x[i] > best) best = x[i];
    }
    if (nan) {
        for (i = 0; i < n; i++)
            if (x[i] != x[i]) return i;
    }
    i = 0;
#if defined(__AVX512F__)
    const __m512 target = _mm512_set1_ps(best);
    for (; i + 16 <= n; i += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), target, _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz(hit);
    }
#endif
    for (; i < n; i++)
        if (x[i] == best) return i;
    return 0; /* an empty row */
}

/* out[r] = argmax of row r (n float32 values, rows `stride` apart), as torch.argmax(dim=-1) gives it. */
void argmax_f32(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out) {
#pragma omp parallel for schedule(static) if (rows >= 4)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * stride, n);
}
