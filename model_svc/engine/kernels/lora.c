/* LoRA updates for the rows of a step that have an adapter (lora.py).
 *
 * For a row with adapter pair (A [rank][k], B [n][rank]) and scale s, all bfloat16: u = A x, each of
 * the rank sums taken over input pairs (x[2i], x[2i + 1]) as VDPBF16PS takes them (the odd term, then
 * the even one, each a fused multiply-add into a float32 sum), in PARTS chains (pair i mod PARTS)
 * added pairwise at the end; u rounded to bfloat16 (as vLLM's expand kernels round the shrink's
 * float32 result to the weights' type); y = B u, each of the n sums one chain over the rank's pairs,
 * the same way; out = bf16(out + bf16(s * y)). The order is fixed and vectorized across independent
 * sums only, so a row's update depends on that row alone: the same alone, batched or chunked,
 * whichever rows share its block and whichever thread runs it, and the same bits from the AVX-512
 * BF16 build (VDPBF16PS, VCVTNEPS2BF16), the AVX-512 and AVX2 builds and plain C (fused multiply-adds
 * in the same order; tests/unit/test_lora.py), up to denormals, which the BF16 instructions flush.
 *
 * Layout (lora.py packs it): per module, per adapter slot, a Pair: A as input pairs, [k / 2][padded][2]
 * with padded = rank rounded up to 16 (zero columns, never read back) and k rounded up to even; B in
 * blocks of WIDTH outputs, each [rank2 / 2][width][2] (rank2: the rank rounded up to even, zero past
 * it) and contiguous; both bfloat16. A pair is read front to back.
 *
 * Speed: a call does the 1 to 3 modules that share x (q/k/v, gate/up); rows of one adapter go in
 * blocks of up to BLOCK rows that share each load of A and B (and their chains overlap); the blocks
 * are shared out on PyTorch's OpenMP pool when there is enough work. One VDPBF16PS does two inputs
 * of 16 sums, so a lone row (a step whose rows each have their own adapter) costs a load, a broadcast
 * and one instruction per two inputs. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_RANK 256
#define LANES 16
#define PARTS 4   /* the A sums: PARTS chains over input pairs (i mod PARTS), added pairwise at the end */
#define WIDTH 64  /* the B sums: WIDTH outputs a block, one chain over the rank's pairs each */
#ifndef PARALLEL_WORK
#define PARALLEL_WORK 8192 /* 16-lane multiply-adds below which one thread does a call (~2-4 us) */
#endif

/* out = bf16(out + bf16(scale * y)): every build's update of one output, v_update 16 at a time. */
static inline uint16_t updated(uint16_t out, float scale, float y) {
    return float_to_bf16(bf16_to_float(out) + round_bf16(scale * y));
}

/* A row's inputs for the pair sums: in the BF16 build each pair's two bfloat16 as one 32-bit word
 * (even low, odd high: a VDPBF16PS broadcast); elsewhere their float32 values, pair i at 2i, 2i + 1. */
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAIR_WORDS 1
typedef uint32_t pairs_t;
#else
#define PAIR_WORDS 0
typedef float pairs_t;
#endif

/* 16 float32 sums: AVX-512, two AVX2 halves, or plain C (fmaf, element by element). v_pair adds one
 * input pair's terms to 16 sums: w holds 16 (even, odd) bfloat16 pairs, x the row's pairs (pair i). */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 v16;
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline void v_store(float *p, v16 a) { _mm512_storeu_ps(p, a); }
static inline v16 v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline v16 v_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#if PAIR_WORDS
static inline v16 v_pair(v16 sum, const pairs_t *x, int64_t i, const uint16_t *w) {
    uint32_t pair; /* (x may be a bfloat16 row read as words: memcpy, not a cast) */
    memcpy(&pair, x + i, sizeof pair);
    return _mm512_dpbf16_ps(sum, (__m512bh)_mm512_set1_epi32((int)pair), (__m512bh)_mm512_loadu_si512(w));
}
static inline v16 v_round(v16 f) { /* to bfloat16 and back */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(f)), 16));
}
static inline void v_update(uint16_t *out, float scale, v16 y) { /* out = bf16(out + bf16(scale * y)) */
    const v16 sum = _mm512_add_ps(v_bf16(out), v_round(_mm512_mul_ps(_mm512_set1_ps(scale), y)));
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(sum));
}
#else
static inline v16 v_pair(v16 sum, const pairs_t *x, int64_t i, const uint16_t *w) {
    const __m512i words = _mm512_loadu_si512(w);
    sum = _mm512_fmadd_ps(_mm512_set1_ps(x[2 * i + 1]),
                          _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32((int)0xFFFF0000u))), sum);
    return _mm512_fmadd_ps(_mm512_set1_ps(x[2 * i]), _mm512_castsi512_ps(_mm512_slli_epi32(words, 16)), sum);
}
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
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef struct { __m256 lo, hi; } v16;
static inline v16 v_zero(void) { return (v16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline v16 v_add(v16 a, v16 b) { return (v16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline void v_store(float *p, v16 a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
}
static inline v16 v_load(const float *p) { return (v16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline __m256 pair8(__m256 sum, __m256 odd, __m256 even, const uint16_t *w) {
    const __m256i words = _mm256_loadu_si256((const __m256i *)w);
    sum = _mm256_fmadd_ps(odd, _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32((int)0xFFFF0000u))), sum);
    return _mm256_fmadd_ps(even, _mm256_castsi256_ps(_mm256_slli_epi32(words, 16)), sum);
}
static inline v16 v_pair(v16 sum, const pairs_t *x, int64_t i, const uint16_t *w) {
    const __m256 odd = _mm256_set1_ps(x[2 * i + 1]), even = _mm256_set1_ps(x[2 * i]);
    return (v16){pair8(sum.lo, odd, even, w), pair8(sum.hi, odd, even, w + 16)};
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
static inline v16 v_add(v16 a, v16 b) {
    for (int i = 0; i < LANES; i++) a.f[i] += b.f[i];
    return a;
}
static inline void v_store(float *p, v16 a) { memcpy(p, a.f, sizeof a.f); }
static inline v16 v_load(const float *p) {
    v16 r;
    memcpy(r.f, p, sizeof r.f);
    return r;
}
static inline v16 v_pair(v16 sum, const pairs_t *x, int64_t i, const uint16_t *w) {
    for (int l = 0; l < LANES; l++) {
        sum.f[l] = fmaf(x[2 * i + 1], bf16_to_float(w[2 * l + 1]), sum.f[l]);
        sum.f[l] = fmaf(x[2 * i], bf16_to_float(w[2 * l]), sum.f[l]);
    }
    return sum;
}
static inline void v_update(uint16_t *out, float scale, v16 y) {
    for (int i = 0; i < LANES; i++) out[i] = updated(out[i], scale, y.f[i]);
}
#endif

/* A row's float32 sums [0 .. count), rounded to bfloat16, as pairs_t pairs (count even). */
static inline void to_pairs(const float *u, int64_t count, pairs_t *pairs) {
    for (int64_t i = 0; i < count; i += 2) {
        const uint16_t even = float_to_bf16(u[i]), odd = float_to_bf16(u[i + 1]);
#if PAIR_WORDS
        pairs[i / 2] = (uint32_t)even | (uint32_t)odd << 16;
#else
        pairs[i] = bf16_to_float(even);
        pairs[i + 1] = bf16_to_float(odd);
#endif
    }
}

typedef struct {
    const uint16_t *a; /* [k / 2][padded][2], NULL where the adapter does not target the module */
    const uint16_t *b; /* blocks of WIDTH outputs, each [rank2 / 2][width][2] */
    int64_t rank, padded;
} Pair;

typedef struct {
    const Pair *pairs; /* by adapter slot; NULL: no adapter targets the module */
    uint16_t *out;
    int64_t out_stride, n;
} Module;

/* A block: up to BLOCK consecutive rows of the list whose pairs have the same rank (AVX-512) or are
 * the same (AVX2, plain C), so that their chains overlap and their loads are in flight together (rows
 * of one adapter share each load; rows of several read as many streams at once). A row's sums are the
 * same whichever block it is in. */
#if defined(__AVX512F__)
#define BLOCK 4
#define MIXED_BLOCKS 1
#else
#define BLOCK 2 /* 16 registers: more rows spill the sums */
#define MIXED_BLOCKS 0 /* rows of two adapters would need both pairs converted: spills */
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The rank rounded up to even: B's pairs. */
static inline int64_t rank_pairs(int64_t rank) { return (rank + 1) / 2; }

/* u[g][0 .. padded) = A[g] x[g] (x as the row's input pairs, kp of them), rounded to bfloat16 pairs:
 * per 16 columns, PARTS chains over the pairs (i mod PARTS), then (s0 + s1) + (s2 + s3). */
ALWAYS_INLINE void a_rows(const int count, const pairs_t *const *x, const Pair *const *pair, int64_t kp,
                          pairs_t u[][MAX_RANK]) {
    const int64_t padded = pair[0]->padded, stride = 2 * padded; /* bfloat16 per input pair */
    float sums[MAX_RANK];
    for (int64_t c = 0; c < padded; c += LANES) {
        const uint16_t *a[BLOCK];
        v16 s[BLOCK][PARTS];
        for (int g = 0; g < count; g++) {
            a[g] = pair[g]->a + 2 * c;
            for (int i = 0; i < PARTS; i++) s[g][i] = v_zero();
        }
        int64_t i = 0;
        for (; i + PARTS <= kp; i += PARTS)
            for (int g = 0; g < count; g++) {
                const uint16_t *w = a[MIXED_BLOCKS ? g : 0] + i * stride; /* one pair a block: loads shared */
                s[g][0] = v_pair(s[g][0], x[g], i, w);
                s[g][1] = v_pair(s[g][1], x[g], i + 1, w + stride);
                s[g][2] = v_pair(s[g][2], x[g], i + 2, w + 2 * stride);
                s[g][3] = v_pair(s[g][3], x[g], i + 3, w + 3 * stride);
            }
        for (int j = 0; i + j < kp; j++)
            for (int g = 0; g < count; g++)
                s[g][j] = v_pair(s[g][j], x[g], i + j, a[MIXED_BLOCKS ? g : 0] + (i + j) * stride);
        for (int g = 0; g < count; g++) {
            v_store(sums, v_add(v_add(s[g][0], s[g][1]), v_add(s[g][2], s[g][3])));
            to_pairs(sums, LANES, u[g] + c / (PAIR_WORDS ? 2 : 1));
        }
    }
}

/* y[g][0 .. n) = B[g] u[g] in float32: each output one chain over the rank's pairs. B is read in
 * blocks of WIDTH outputs, each [rank2 / 2][width][2] and contiguous (the last one narrower); with
 * AVX-512, a block of one or two rows takes two WIDTH blocks at a time (more independent sums; the
 * same ones). */
ALWAYS_INLINE void b_rows(const int count, pairs_t u[][MAX_RANK], const Pair *const *pair, int64_t n,
                          float *const *y) {
    const int64_t rp = rank_pairs(pair[0]->rank), step = 2 * WIDTH; /* bfloat16 per pair of the rank */
    const int wide = count <= 2 && BLOCK > 2 ? 2 : 1; /* AVX2's 16 registers hold the sums of one */
    int64_t q = 0;
    for (; q + wide * WIDTH <= n; q += wide * WIDTH) {
        const uint16_t *b[BLOCK];
        v16 sum[BLOCK][8];
        for (int g = 0; g < count; g++) {
            b[g] = pair[g]->b + 2 * q * rp;
            for (int v = 0; v < 4 * wide; v++) sum[g][v] = v_zero();
        }
        for (int64_t j = 0; j < rp; j++)
            for (int g = 0; g < count; g++)
                for (int v = 0; v < 4 * wide; v++) /* vector v: WIDTH block v / 4, its lanes 16 (v % 4) on */
                    sum[g][v] = v_pair(sum[g][v], u[g], j,
                                       b[MIXED_BLOCKS ? g : 0] + j * step + (v / 4) * WIDTH * 2 * rp + (v % 4) * 2 * LANES);
        for (int g = 0; g < count; g++)
            for (int v = 0; v < 4 * wide; v++) v_store(y[g] + q + v * LANES, sum[g][v]);
    }
    for (; q < n; q += WIDTH) {
        const int64_t width = n - q < WIDTH ? n - q : WIDTH;
        for (int g = 0; g < count; g++) {
            const uint16_t *b = pair[g]->b + 2 * q * rp;
            int64_t i = 0;
            for (; i + LANES <= width; i += LANES) {
                v16 y0 = v_zero();
                for (int64_t j = 0; j < rp; j++) y0 = v_pair(y0, u[g], j, b + j * 2 * width + 2 * i);
                v_store(y[g] + q + i, y0);
            }
            for (; i < width; i++) {
                float acc = 0.0f;
                for (int64_t j = 0; j < rp; j++) {
                    const uint16_t *w = b + j * 2 * width + 2 * i;
#if PAIR_WORDS
                    acc = fmaf(bf16_to_float((uint16_t)(u[g][j] >> 16)), bf16_to_float(w[1]), acc);
                    acc = fmaf(bf16_to_float((uint16_t)u[g][j]), bf16_to_float(w[0]), acc);
#else
                    acc = fmaf(u[g][2 * j + 1], bf16_to_float(w[1]), acc);
                    acc = fmaf(u[g][2 * j], bf16_to_float(w[0]), acc);
#endif
                }
                y[g][q + i] = acc;
            }
        }
    }
}

ALWAYS_INLINE void rows_of(const int count, const pairs_t *const *x, const Pair *const *pair, int64_t kp, int64_t n,
                           float *const *y) {
    pairs_t u[BLOCK][MAX_RANK];
    a_rows(count, x, pair, kp, u);
    b_rows(count, u, pair, n, y);
}

/* Values of pairs_t per input pair. */
#define PAIR_VALUES (PAIR_WORDS ? 1 : 2)

/* One item of a call: rows first .. first + count - 1 of the module's list (the call's rows whose
 * adapter targets the module, in order). */
typedef struct {
    int64_t module, first, count;
} Item;

/* A call planned (lora_prepare): its modules and rows, their items, each row's inputs as pairs (in
 * the BF16 build with an even k, x's own row: a bfloat16 pair is a 32-bit word) and each row's float32
 * sums y per module ([rows][y_stride], module m's from offset[m]). In the calling thread's buffer, kept
 * for its next plan (one plan at a time per thread). */
typedef struct {
    Module all[3];
    int64_t kp, count, y_stride, offset[3];
    const int64_t *row, *slot;
    const float *scale;
    int64_t *which; /* the modules' lists of rows, one after the other */
    Item *items;
    const pairs_t **xr; /* each row's input pairs */
    float *y;
    int64_t work; /* multiply-adds of 16 lanes (two a pair) */
    int direct;   /* lora_item adds its updates (nothing else writes the outputs meanwhile) */
} Plan;

/* out = bf16(out + bf16(scale * y)) for the item's rows of its module. */
static void update_item(const Plan *plan, const Item *item) {
    const Module *m = &plan->all[item->module];
    for (int64_t g = 0; g < item->count; g++) {
        const int64_t r = plan->which[item->first + g];
        const float *y = plan->y + r * plan->y_stride + plan->offset[item->module], scale = plan->scale[r];
        uint16_t *out = m->out + plan->row[r] * m->out_stride;
        int64_t q = 0;
        for (; q + LANES <= m->n; q += LANES) v_update(out + q, scale, v_load(y + q));
        for (; q < m->n; q++) out[q] = updated(out[q], scale, y[q]);
    }
}

/* Item i's sums, B A x of each of its rows, into y; and their updates where the plan is direct. */
int lora_item(const Plan *plan, int64_t i) {
    const Item *item = &plan->items[i];
    const Module *m = &plan->all[item->module];
    const pairs_t *x[BLOCK];
    const Pair *pair[BLOCK];
    float *y[BLOCK];
    for (int g = 0; g < item->count; g++) {
        const int64_t r = plan->which[item->first + g];
        x[g] = plan->xr[r];
        pair[g] = &m->pairs[plan->slot[r]];
        y[g] = plan->y + r * plan->y_stride + plan->offset[item->module];
    }
    switch (item->count) { /* a constant count each: the sums stay in registers */
        case 1: rows_of(1, x, pair, plan->kp, m->n, y); break;
        case 2: rows_of(2, x, pair, plan->kp, m->n, y); break;
#if BLOCK > 2
        case 3: rows_of(3, x, pair, plan->kp, m->n, y); break;
        case 4: rows_of(4, x, pair, plan->kp, m->n, y); break;
#endif
        default: break;
    }
    if (plan->direct) update_item(plan, item);
    return 0;
}

/* Item i's updates, once the outputs are the base product's (a plan that is not direct). */
void lora_finish_item(const Plan *plan, int64_t i) { update_item(plan, &plan->items[i]); }

/* The thread's plan buffer: grown to its largest call's and reused (a fresh allocation a call faulted
 * its pages in every time); 512 rows of gate/up (the default --max-batch-tokens) take ~6.5 MB. */
static __thread char *plan_buffer;
static __thread size_t plan_buffer_size;

void lora_release(Plan *plan) { (void)plan; /* its memory is the thread's buffer, reused */ }

/* Plans the updates of `rows` rows (row: their rows of x and of each out; slot: their adapter's slot in
 * each module's pairs; scale: its scaling) for the `modules` modules (1 to 3) that share x [., k]:
 * then lora_item for each of its *items, lora_finish_item for each unless `direct`, lora_release.
 * NULL with *status 1 when a rank is over MAX_RANK or a module count out of range, 2 out of memory. */
Plan *lora_prepare(const uint16_t *x, int64_t x_stride, int64_t k, int64_t rows, const int64_t *row,
                   const int64_t *slot, const float *scale, int64_t modules,
                   const Pair *pairs0, uint16_t *out0, int64_t out_stride0, int64_t n0,
                   const Pair *pairs1, uint16_t *out1, int64_t out_stride1, int64_t n1,
                   const Pair *pairs2, uint16_t *out2, int64_t out_stride2, int64_t n2, int direct,
                   int64_t *items, int *status) {
    *status = 1;
    *items = 0;
    if (modules < 1 || modules > 3 || rows < 0 || k <= 0) return NULL;
    Plan p = {.all = {{pairs0, out0, out_stride0, n0}, {pairs1, out1, out_stride1, n1},
                      {pairs2, out2, out_stride2, n2}},
              .kp = (k + 1) / 2, .row = row, .slot = slot, .scale = scale,
              .direct = direct};
    for (int64_t m = 0; m < modules; m++) {
        p.offset[m] = p.y_stride;
        p.y_stride += p.all[m].n;
        if (p.all[m].pairs == NULL) continue;
        for (int64_t i = 0; i < rows; i++) {
            const Pair *pair = &p.all[m].pairs[slot[i]];
            if (pair->a == NULL) continue;
            if (pair->rank > MAX_RANK || pair->rank < 1 || pair->padded % LANES || pair->padded < pair->rank ||
                pair->padded > MAX_RANK)
                return NULL;
            p.work += 2 * (p.kp * pair->padded + rank_pairs(pair->rank) * p.all[m].n) / LANES;
        }
    }
    /* the plan, y, the rows' input pairs (where converted), their pointers, the lists and the items */
    const int copy = !PAIR_WORDS || k % 2;
    const size_t parts[6] = {sizeof(Plan), sizeof(float) * (size_t)(rows * p.y_stride),
                             copy ? sizeof(pairs_t) * (size_t)(rows * p.kp * PAIR_VALUES) : 0,
                             sizeof(pairs_t *) * (size_t)rows, sizeof(int64_t) * (size_t)(modules * rows),
                             sizeof(Item) * (size_t)(modules * rows)};
    size_t at[6], total = 0;
    for (int i = 0; i < 6; i++) {
        at[i] = total;
        total += (parts[i] + 63) / 64 * 64;
    }
    if (plan_buffer_size < total) {
        free(plan_buffer);
        plan_buffer = aligned_alloc(64, total);
        plan_buffer_size = plan_buffer ? total : 0;
    }
    char *memory = plan_buffer;
    if (memory == NULL) {
        *status = 2;
        return NULL;
    }
    Plan *plan = (Plan *)memory;
    *plan = p;
    plan->y = (float *)(memory + at[1]);
    pairs_t *converted = (pairs_t *)(memory + at[2]);
    plan->xr = (const pairs_t **)(memory + at[3]);
    plan->which = (int64_t *)(memory + at[4]);
    plan->items = (Item *)(memory + at[5]);
    /* per module, its rows (those whose adapter targets it) in blocks of one rank, BLOCK rows at most */
    int64_t listed = 0;
    for (int64_t m = 0; m < modules; m++) {
        if (plan->all[m].pairs == NULL) continue;
        for (int64_t i = 0; i < rows; i++) {
            const Pair *pair = &plan->all[m].pairs[slot[i]];
            if (pair->a == NULL) continue;
            Item *last = plan->count ? &plan->items[plan->count - 1] : NULL;
            const int64_t first_slot = last ? slot[plan->which[last->first]] : -1;
            if (last && last->module == m && last->count < BLOCK &&
                (MIXED_BLOCKS ? plan->all[m].pairs[first_slot].rank == pair->rank : first_slot == slot[i]))
                last->count++;
            else
                plan->items[plan->count++] = (Item){m, listed, 1};
            plan->which[listed++] = i;
        }
    }
    for (int64_t i = 0; i < rows; i++) { /* each row's inputs as pairs, a zero after an odd k's last */
        const uint16_t *in = x + row[i] * x_stride;
        if (!copy) {
            plan->xr[i] = (const pairs_t *)in; /* (even, odd) bfloat16 side by side: the pair's word */
            continue;
        }
        pairs_t *to = converted + i * plan->kp * PAIR_VALUES;
        plan->xr[i] = to;
        for (int64_t q = 0; q < plan->kp; q++) {
            const uint16_t even = in[2 * q], odd = 2 * q + 1 < k ? in[2 * q + 1] : 0;
#if PAIR_WORDS
            to[q] = (uint32_t)even | (uint32_t)odd << 16;
#else
            to[2 * q] = bf16_to_float(even);
            to[2 * q + 1] = bf16_to_float(odd);
#endif
        }
    }
    *items = plan->count;
    *status = 0;
    return plan;
}

/* The whole call: lora_prepare's arguments, its items shared out on PyTorch's OpenMP pool when there
 * is enough work, each adding its updates. Returns 0, or lora_prepare's status (nothing done). */
int lora_apply_bf16(const uint16_t *x, int64_t x_stride, int64_t k, int64_t rows, const int64_t *row,
                    const int64_t *slot, const float *scale, int64_t modules,
                    const Pair *pairs0, uint16_t *out0, int64_t out_stride0, int64_t n0,
                    const Pair *pairs1, uint16_t *out1, int64_t out_stride1, int64_t n1,
                    const Pair *pairs2, uint16_t *out2, int64_t out_stride2, int64_t n2) {
    int64_t items;
    int status;
    Plan *plan = lora_prepare(x, x_stride, k, rows, row, slot, scale, modules, pairs0, out0, out_stride0, n0,
                              pairs1, out1, out_stride1, n1, pairs2, out2, out_stride2, n2, 1, &items, &status);
    if (plan == NULL) return status;
#pragma omp parallel for schedule(dynamic) if (plan->work >= PARALLEL_WORK)
    for (int64_t i = 0; i < items; i++) lora_item(plan, i);
    lora_release(plan);
    return 0;
}
