/* LoRA updates for the rows of a step that have an adapter (lora.py).
 *
 * For a row with adapter pair (A [rank][k], B [n][rank]) and scale s: u = A x, each of the rank sums
 * over k as PARTS chains of fused multiply-adds (p mod PARTS) added pairwise at the end; y = B u, each
 * of the n sums one chain over the rank in index order; out = bf16(out + bf16(s * y)). The order is
 * fixed and vectorized across independent sums only, so a row's update depends on that row alone:
 * the same alone, batched or chunked, whichever rows share its block and whichever thread runs it,
 * and the same bits from the AVX-512, AVX2 and plain C builds (tests/unit/test_lora.py).
 *
 * Layout (lora.py packs it): per module, per adapter slot, a Pair: A transposed, [k][padded] with
 * padded = rank rounded up to 16 (zero columns, never read back), and B transposed in blocks of
 * WIDTH outputs, each [rank][width] and contiguous; both bfloat16. A pair is read front to back.
 *
 * Speed: a call does the 1 to 3 modules that share x (q/k/v, gate/up), x converted to float32 once;
 * rows of one adapter go in blocks of up to BLOCK rows that share each load of A and B; the blocks
 * are shared out on PyTorch's OpenMP pool when there is enough work. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_RANK 256
#define LANES 16
#define PARTS 4   /* the A sums: PARTS chains over k (p mod PARTS), added pairwise at the end */
#define WIDTH 64  /* the B sums: WIDTH outputs at a time, one chain over the rank each */
#ifndef PARALLEL_WORK
#define PARALLEL_WORK 8192 /* 16-lane multiply-adds below which one thread does a call (~2-4 us) */
#endif

/* out = bf16(out + bf16(scale * y)): every build's update of one output, v_update 16 at a time. */
static inline uint16_t updated(uint16_t out, float scale, float y) {
    return float_to_bf16(bf16_to_float(out) + round_bf16(scale * y));
}

/* 16 floats: AVX-512, two AVX2 halves, or plain C (fmaf, element by element): every lane a fused
 * multiply-add, so each build gives the same bits. */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 v16;
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_set(float f) { return _mm512_set1_ps(f); }
static inline v16 v_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline v16 v_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline void v_store(float *p, v16 a) { _mm512_storeu_ps(p, a); }
static inline __m512i v_bits(v16 f) { /* float_to_bf16 in each lane's low half */
    const __m512i u = _mm512_castps_si512(f);
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
    const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_blend_epi32(is_nan, rounded, nan);
}
static inline void v_update(uint16_t *out, float scale, v16 y) { /* out = bf16(out + bf16(scale * y)) */
    const v16 update = _mm512_castsi512_ps(_mm512_slli_epi32(v_bits(_mm512_mul_ps(_mm512_set1_ps(scale), y)), 16));
    const v16 sum = _mm512_add_ps(v_bf16(out), update);
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(v_bits(sum)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef struct { __m256 lo, hi; } v16;
static inline v16 v_zero(void) { return (v16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline v16 v_set(float f) { return (v16){_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline v16 v_bf16(const uint16_t *p) { return (v16){bf16x8(p), bf16x8(p + 8)}; }
static inline v16 v_fma(v16 a, v16 b, v16 c) {
    return (v16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline v16 v_add(v16 a, v16 b) { return (v16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline void v_store(float *p, v16 a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
}
static inline __m256i bits8(__m256 f) { /* float_to_bf16 in each lane's low half */
    const __m256i u = _mm256_castps_si256(f);
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))), 16);
    const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(rounded, nan, is_nan);
}
static inline __m256 update8(const uint16_t *out, float scale, __m256 y) {
    const __m256 update = _mm256_castsi256_ps(_mm256_slli_epi32(bits8(_mm256_mul_ps(_mm256_set1_ps(scale), y)), 16));
    return _mm256_add_ps(bf16x8(out), update);
}
static inline void v_update(uint16_t *out, float scale, v16 y) { /* out = bf16(out + bf16(scale * y)) */
    const __m256i lo = bits8(update8(out, scale, y.lo)), hi = bits8(update8(out + 8, scale, y.hi));
    _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8));
}
#else
typedef struct { float f[LANES]; } v16;
static inline v16 v_zero(void) { return (v16){{0}}; }
static inline v16 v_set(float f) {
    v16 r;
    for (int i = 0; i < LANES; i++) r.f[i] = f;
    return r;
}
static inline v16 v_bf16(const uint16_t *p) {
    v16 r;
    for (int i = 0; i < LANES; i++) r.f[i] = bf16_to_float(p[i]);
    return r;
}
static inline v16 v_fma(v16 a, v16 b, v16 c) {
    for (int i = 0; i < LANES; i++) c.f[i] = fmaf(a.f[i], b.f[i], c.f[i]);
    return c;
}
static inline v16 v_add(v16 a, v16 b) {
    for (int i = 0; i < LANES; i++) a.f[i] += b.f[i];
    return a;
}
static inline void v_store(float *p, v16 a) { memcpy(p, a.f, sizeof a.f); }
static inline void v_update(uint16_t *out, float scale, v16 y) {
    for (int i = 0; i < LANES; i++) out[i] = updated(out[i], scale, y.f[i]);
}
#endif

typedef struct {
    const uint16_t *a; /* [k][padded], NULL where the adapter does not target the module */
    const uint16_t *b; /* [rank][n] in blocks of WIDTH columns: b_pass */
    int64_t rank, padded;
} Pair;

typedef struct {
    const Pair *pairs; /* by adapter slot; NULL: no adapter targets the module */
    uint16_t *out;
    int64_t out_stride, n;
} Module;

/* A block: up to BLOCK consecutive rows of the list with the same adapter, so that they share each
 * load of A and B (and their chains overlap). A row's sums are the same whichever block it is in. */
#if defined(__AVX512F__)
#define BLOCK 4
#else
#define BLOCK 2 /* 16 registers: more rows spill the sums */
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* u[g][0 .. padded) = A x[g] (x as float32): per 16 columns, PARTS chains over p (p mod PARTS), then
 * (s0 + s1) + (s2 + s3). */
ALWAYS_INLINE void a_rows(const int count, const float *const *x, const Pair *pair, int64_t k, float u[][MAX_RANK]) {
    const int64_t stride = pair->padded;
    for (int64_t c = 0; c < pair->padded; c += LANES) {
        const uint16_t *a = pair->a + c;
        v16 s[BLOCK][PARTS];
        for (int g = 0; g < count; g++)
            for (int i = 0; i < PARTS; i++) s[g][i] = v_zero();
        int64_t p = 0;
        for (; p + PARTS <= k; p += PARTS) {
            const v16 a0 = v_bf16(a + p * stride), a1 = v_bf16(a + (p + 1) * stride);
            const v16 a2 = v_bf16(a + (p + 2) * stride), a3 = v_bf16(a + (p + 3) * stride);
            for (int g = 0; g < count; g++) {
                s[g][0] = v_fma(v_set(x[g][p]), a0, s[g][0]);
                s[g][1] = v_fma(v_set(x[g][p + 1]), a1, s[g][1]);
                s[g][2] = v_fma(v_set(x[g][p + 2]), a2, s[g][2]);
                s[g][3] = v_fma(v_set(x[g][p + 3]), a3, s[g][3]);
            }
        }
        for (int i = 0; p + i < k; i++) {
            const v16 ai = v_bf16(a + (p + i) * stride);
            for (int g = 0; g < count; g++) s[g][i] = v_fma(v_set(x[g][p + i]), ai, s[g][i]);
        }
        for (int g = 0; g < count; g++) v_store(u[g] + c, v_add(v_add(s[g][0], s[g][1]), v_add(s[g][2], s[g][3])));
    }
}

/* out[g] = bf16(out[g] + bf16(scale * B u[g])): each output one chain over the rank. B is read in
 * blocks of WIDTH outputs, each [rank][width] and contiguous (the last one narrower). */
ALWAYS_INLINE void b_rows(const int count, float u[][MAX_RANK], const Pair *pair, int64_t n, float scale,
                          uint16_t *const *out) {
    const int64_t rank = pair->rank;
    int64_t q = 0;
    for (; q + WIDTH <= n; q += WIDTH) {
        const uint16_t *b = pair->b + q * rank;
        v16 y[BLOCK][4];
        for (int g = 0; g < count; g++)
            for (int i = 0; i < 4; i++) y[g][i] = v_zero();
        for (int64_t j = 0; j < rank; j++, b += WIDTH) {
            const v16 b0 = v_bf16(b), b1 = v_bf16(b + LANES), b2 = v_bf16(b + 2 * LANES), b3 = v_bf16(b + 3 * LANES);
            for (int g = 0; g < count; g++) {
                const v16 uj = v_set(u[g][j]);
                y[g][0] = v_fma(uj, b0, y[g][0]);
                y[g][1] = v_fma(uj, b1, y[g][1]);
                y[g][2] = v_fma(uj, b2, y[g][2]);
                y[g][3] = v_fma(uj, b3, y[g][3]);
            }
        }
        for (int g = 0; g < count; g++)
            for (int i = 0; i < 4; i++) v_update(out[g] + q + i * LANES, scale, y[g][i]);
    }
    const int64_t width = n - q;
    const uint16_t *b = pair->b + q * rank;
    for (int g = 0; g < count; g++) {
        int64_t i = 0;
        for (; i + LANES <= width; i += LANES) {
            v16 y0 = v_zero();
            for (int64_t j = 0; j < rank; j++) y0 = v_fma(v_set(u[g][j]), v_bf16(b + j * width + i), y0);
            v_update(out[g] + q + i, scale, y0);
        }
        for (; i < width; i++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < rank; j++) acc = fmaf(u[g][j], bf16_to_float(b[j * width + i]), acc);
            out[g][q + i] = updated(out[g][q + i], scale, acc);
        }
    }
}

ALWAYS_INLINE void rows_of(const int count, const float *const *x, const Pair *pair, int64_t k, int64_t n,
                           float scale, uint16_t *const *out) {
    float u[BLOCK][MAX_RANK];
    a_rows(count, x, pair, k, u);
    b_rows(count, u, pair, n, scale, out);
}

/* A block of `count` rows (list entries first ..) for one module; nothing where its adapter does not
 * target the module. xf: the list's rows of x as float32, [rows][k]. */
static void block(const float *xf, int64_t k, const int64_t *row, int64_t first, int count, const Pair *pair,
                  float scale, const Module *m) {
    if (pair->a == NULL) return;
    const float *x[BLOCK];
    uint16_t *out[BLOCK];
    for (int g = 0; g < count; g++) {
        x[g] = xf + (first + g) * k;
        out[g] = m->out + row[first + g] * m->out_stride;
    }
    switch (count) { /* a constant count each: the sums stay in registers */
        case 1: rows_of(1, x, pair, k, m->n, scale, out); break;
        case 2: rows_of(2, x, pair, k, m->n, scale, out); break;
#if BLOCK > 2
        case 3: rows_of(3, x, pair, k, m->n, scale, out); break;
        case 4: rows_of(4, x, pair, k, m->n, scale, out); break;
#endif
        default: break;
    }
}

/* The updates of `rows` rows (row: their rows of x and of each out; slot: their adapter's slot in each
 * module's pairs; scale: its scaling) for the `modules` modules (1 to 3) that share x [., k].
 * Returns 0; 1 when a rank is over MAX_RANK or a module count out of range, 2 out of memory (nothing
 * done either way). */
int lora_apply_bf16(const uint16_t *x, int64_t x_stride, int64_t k, int64_t rows, const int64_t *row,
                    const int64_t *slot, const float *scale, int64_t modules,
                    const Pair *pairs0, uint16_t *out0, int64_t out_stride0, int64_t n0,
                    const Pair *pairs1, uint16_t *out1, int64_t out_stride1, int64_t n1,
                    const Pair *pairs2, uint16_t *out2, int64_t out_stride2, int64_t n2) {
    if (modules < 1 || modules > 3) return 1;
    if (rows <= 0 || k <= 0) return 0;
    const Module all[3] = {{pairs0, out0, out_stride0, n0}, {pairs1, out1, out_stride1, n1},
                           {pairs2, out2, out_stride2, n2}};
    int64_t work = 0; /* multiply-adds of 16 lanes */
    for (int64_t m = 0; m < modules; m++) {
        if (all[m].pairs == NULL) continue;
        for (int64_t i = 0; i < rows; i++) {
            const Pair *pair = &all[m].pairs[slot[i]];
            if (pair->a == NULL) continue;
            if (pair->rank > MAX_RANK || pair->rank < 1 || pair->padded % LANES || pair->padded < pair->rank ||
                pair->padded > MAX_RANK)
                return 1;
            work += (k * pair->padded + pair->rank * all[m].n) / LANES;
        }
    }
    /* blocks: runs of one slot (with one scale), BLOCK rows at most */
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(rows + 1));
    float *xf = malloc(sizeof(float) * (size_t)(rows * k));
    if (starts == NULL || xf == NULL) {
        free(starts);
        free(xf);
        return 2;
    }
    int64_t blocks = 0;
    for (int64_t i = 0; i < rows; i++)
        if (i == 0 || slot[i] != slot[i - 1] || scale[i] != scale[i - 1] || i - starts[blocks - 1] == BLOCK)
            starts[blocks++] = i;
    starts[blocks] = rows;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t p = 0; p < k; p++) xf[i * k + p] = bf16_to_float(x[row[i] * x_stride + p]);
    const int64_t items = blocks * modules;
#pragma omp parallel for schedule(dynamic) if (work >= PARALLEL_WORK)
    for (int64_t item = 0; item < items; item++) {
        const Module *m = &all[item % modules];
        const int64_t first = starts[item / modules];
        if (m->pairs != NULL)
            block(xf, k, row, first, (int)(starts[item / modules + 1] - first), &m->pairs[slot[first]], scale[first], m);
    }
    free(starts);
    free(xf);
    return 0;
}
