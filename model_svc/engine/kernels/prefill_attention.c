/* Attention for the chunks of long prompts, with AVX-512 BF16 dot products (VDPBF16PS).
 *
 * A chunk's query rows see their sequence's keys up to their own positions (causal, after the
 * chunks before). The query vectors of one key/value head (its group of query heads, row by row)
 * are taken 16 at a time, one per float32 lane, and the keys 16 positions at a time in blocks
 * aligned on position 0: each lane keeps its own running maximum, sum and output (online softmax,
 * the keys' blocks in order), so no lane ever reads another. Scores are bfloat16 pair products
 * summed in float32 (VDPBF16PS), scaled after the sum; probabilities exp(score - max) are summed in
 * float32 and rounded to bfloat16 (nearest even) for the product with the values, summed in float32;
 * one division at the end, bfloat16 output rounded to nearest even.
 *
 * A query's numbers thus depend only on its own query, its keys and values, and the position
 * blocks, never on the other rows of its tile, how its prompt was chunked, what else is in the step
 * or which thread took it: blocks a lane does not see add exactly nothing (its probabilities there
 * are 0 and its maximum stays, so the rescale is by exp(0) = 1). They round differently from the
 * one-row kernel (decode_attention.c) that decoded tokens and short prompts take, so a long prompt's
 * cache blocks are not shared across requests (the runner's NATIVE_MAX_PROMPT).
 *
 * Built by model_svc/engine/kernels/__init__.py; `prefill_supported()` says whether it was built
 * with the instructions (the runner uses SDPA where not).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define KEYS 16 /* key positions per block */
#define MAX_HEAD_DIM 256

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "simd512.h"

int prefill_supported(void) { return 1; }


static inline __m512i bf16_bits_high(__m512 x) { /* x rounded to bfloat16 (nearest even), in the high half */
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)),
                            _mm512_set1_epi32((int)0xffff0000u));
}

/* Per-thread scratch: the tile's queries as pairs (lane = query vector), its outputs, a block's keys
 * (when the arena's are not 16 contiguous rows) and values as pairs of positions. */
typedef struct {
    uint32_t *q2;   /* [head_dim / 2][LANES] */
    float *acc;     /* [head_dim][LANES] */
    uint16_t *keys; /* [KEYS][head_dim] */
    uint32_t *v2;   /* [KEYS / 2][head_dim] */
} Scratch;

/* One tile: query vectors first .. first + count - 1 of key/value head h of one chunk (vector v is
 * row v / group, query head h * group + v % group). `past`: the sequence's tokens before the chunk. */
static void tile(const uint16_t *query, const uint16_t *k_head, const uint16_t *v_head, uint16_t *out,
                 int64_t row0, int64_t past, int64_t first, int64_t count, int64_t group, int64_t h,
                 int64_t num_heads, int64_t head_dim, const int64_t *table, int64_t block_size,
                 int64_t slot_stride, float scale, const Scratch *s) {
    const int64_t pairs = head_dim / 2;
    int32_t qpos[LANES];
    for (int r = 0; r < LANES; r++) { /* lanes past the tile's end repeat its last vector */
        const int64_t v = first + (r < count ? r : count - 1), row = v / group;
        const uint32_t *src = (const uint32_t *)(query + ((row0 + row) * num_heads + h * group + v % group) * head_dim);
        for (int64_t j = 0; j < pairs; j++) s->q2[j * LANES + r] = src[j];
        qpos[r] = (int32_t)(past + row);
    }
    const __m512i qp = _mm512_loadu_si512(qpos);
    const int64_t last = qpos[LANES - 1]; /* the furthest key any lane sees */
    __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
    memset(s->acc, 0, sizeof(float) * head_dim * LANES);
    const int contiguous = block_size % KEYS == 0 && slot_stride == head_dim;
    for (int64_t t0 = 0; t0 <= last; t0 += KEYS) {
        const int64_t n = last + 1 - t0 < KEYS ? last + 1 - t0 : KEYS; /* keys that exist */
        const uint16_t *kb;
        if (contiguous) {
            kb = k_head + (table[t0 / block_size] * block_size + t0 % block_size) * slot_stride;
        } else {
            for (int64_t t = 0; t < KEYS; t++) {
                const int64_t pos = t0 + (t < n ? t : 0);
                memcpy(s->keys + t * head_dim,
                       k_head + (table[pos / block_size] * block_size + pos % block_size) * slot_stride,
                       sizeof(uint16_t) * head_dim);
            }
            kb = s->keys;
        }
        /* Scores: lane r of sc[t] is query r's score for key t0 + t. Slots past the sequence's end
         * may hold anything; their scores are masked below. */
        __m512 sc[KEYS];
#pragma GCC unroll 16
        for (int t = 0; t < KEYS; t++) sc[t] = _mm512_setzero_ps();
        const uint32_t *k32 = (const uint32_t *)kb;
        const int64_t kstride = head_dim / 2;
        for (int64_t j = 0; j < pairs; j++) {
            const __m512bh q = (__m512bh)_mm512_load_si512(s->q2 + j * LANES);
#pragma GCC unroll 16
            for (int t = 0; t < KEYS; t++)
                sc[t] = _mm512_dpbf16_ps(sc[t], q, (__m512bh)_mm512_set1_epi32((int)k32[t * kstride + j]));
        }
        __mmask16 seen[KEYS];
        __m512 block_max = _mm512_set1_ps(-INFINITY);
#pragma GCC unroll 16
        for (int t = 0; t < KEYS; t++) {
            seen[t] = _mm512_cmple_epi32_mask(_mm512_set1_epi32((int)(t0 + t)), qp);
            sc[t] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), seen[t], sc[t], _mm512_set1_ps(scale));
            block_max = _mm512_max_ps(block_max, sc[t]);
        }
        const __m512 m_new = _mm512_max_ps(m, block_max);
        const __m512 alpha = exp_ps(_mm512_sub_ps(m, m_new)); /* first block: exp(-inf) = 0, on zeros */
        m = m_new;
        l = _mm512_mul_ps(l, alpha);
        __m512i p2[KEYS / 2];
#pragma GCC unroll 8
        for (int i = 0; i < KEYS / 2; i++) {
            const __m512 e0 = _mm512_maskz_mov_ps(seen[2 * i], exp_ps(_mm512_sub_ps(sc[2 * i], m)));
            const __m512 e1 = _mm512_maskz_mov_ps(seen[2 * i + 1], exp_ps(_mm512_sub_ps(sc[2 * i + 1], m)));
            l = _mm512_add_ps(_mm512_add_ps(l, e0), e1);
            p2[i] = _mm512_or_si512(_mm512_srli_epi32(bf16_bits_high(e0), 16), bf16_bits_high(e1));
        }
        /* The block's values as pairs of positions (t, t + 1) per dimension; none past the end. */
        for (int64_t i = 0; i < KEYS / 2; i++) {
            const int64_t pa = t0 + 2 * i, pb = pa + 1;
            const uint16_t *va = 2 * i < n ? v_head + (table[pa / block_size] * block_size + pa % block_size) * slot_stride : NULL;
            const uint16_t *vb = 2 * i + 1 < n ? v_head + (table[pb / block_size] * block_size + pb % block_size) * slot_stride : NULL;
            for (int64_t d = 0; d < head_dim; d += 16) {
                const __m512i a = va ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(va + d))) : _mm512_setzero_si512();
                const __m512i b = vb ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vb + d))) : _mm512_setzero_si512();
                _mm512_storeu_si512(s->v2 + i * head_dim + d, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
            }
        }
        for (int64_t c = 0; c < head_dim; c += 16) {
            __m512 a[16];
#pragma GCC unroll 16
            for (int d = 0; d < 16; d++) a[d] = _mm512_mul_ps(_mm512_load_ps(s->acc + (c + d) * LANES), alpha);
            for (int i = 0; i < KEYS / 2; i++) {
                const __m512bh p = (__m512bh)p2[i];
                const uint32_t *v = s->v2 + i * head_dim + c;
#pragma GCC unroll 16
                for (int d = 0; d < 16; d++) a[d] = _mm512_dpbf16_ps(a[d], p, (__m512bh)_mm512_set1_epi32((int)v[d]));
            }
#pragma GCC unroll 16
            for (int d = 0; d < 16; d++) _mm512_store_ps(s->acc + (c + d) * LANES, a[d]);
        }
    }
    float sums[LANES];
    _mm512_storeu_ps(sums, l);
    for (int64_t r = 0; r < count; r++) {
        const int64_t v = first + r;
        uint16_t *dst = out + ((row0 + v / group) * num_heads + h * group + v % group) * head_dim;
        for (int64_t d = 0; d < head_dim; d++) {
            const float x = s->acc[d * LANES + r] / sums[r];
            uint32_t u;
            memcpy(&u, &x, sizeof u);
            dst[d] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
}

/* A call's tasks: a tile of 16 query vectors of one chunk and one key/value head each. */
static inline int64_t chunk_tiles(const int64_t *lengths, int64_t c, int64_t group) {
    return (lengths[c] * group + LANES - 1) / LANES;
}

static int64_t count_tasks(const int64_t *lengths, int64_t num_chunks, int64_t group, int64_t num_kv_heads) {
    int64_t num_tasks = 0;
    for (int64_t c = 0; c < num_chunks; c++) num_tasks += num_kv_heads * chunk_tiles(lengths, c, group);
    return num_tasks;
}

/* Task `task`'s chunk (returned), key/value head and first query vector (chunks are few). */
static inline int64_t locate_task(int64_t task, const int64_t *lengths, int64_t group, int64_t num_kv_heads,
                                  int64_t *h, int64_t *first) {
    int64_t c = 0, rest = task, tiles;
    for (;; c++) {
        tiles = chunk_tiles(lengths, c, group);
        if (rest < num_kv_heads * tiles) break;
        rest -= num_kv_heads * tiles;
    }
    *h = rest / tiles;
    *first = rest % tiles * LANES;
    return c;
}

/* query/out: [tokens, num_heads, head_dim] contiguous bfloat16; keys/values: element (kv_head, slot,
 * i) at kv_head * head_stride + slot * slot_stride + i. Chunk c is query rows starts[c] ..
 * starts[c] + lengths[c] - 1, after pasts[c] tokens of its sequence, whose blocks are tables +
 * table_offsets[c]. Returns -1 when buffers cannot be allocated, -2 for a head_dim it does not take. */
int prefill_attention_bf16(const uint16_t *query, const uint16_t *keys, const uint16_t *values, uint16_t *out,
                           const int64_t *starts, const int64_t *lengths, const int64_t *pasts,
                           const int64_t *tables, const int64_t *table_offsets, int64_t num_chunks,
                           int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           int64_t head_stride, int64_t slot_stride, float scale) {
    if (head_dim % 32 != 0 || head_dim > MAX_HEAD_DIM || num_heads % num_kv_heads != 0) return -2;
    const int64_t group = num_heads / num_kv_heads, num_tasks = count_tasks(lengths, num_chunks, group, num_kv_heads);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        Scratch s = {aligned_alloc(64, sizeof(uint32_t) * head_dim / 2 * LANES),
                     aligned_alloc(64, sizeof(float) * head_dim * LANES),
                     aligned_alloc(64, sizeof(uint16_t) * KEYS * head_dim),
                     aligned_alloc(64, sizeof(uint32_t) * KEYS / 2 * head_dim)};
        const int ready = s.q2 && s.acc && s.keys && s.v2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; task++) {
            if (!ready) {
                failed = 1;
                continue;
            }
            int64_t h, first;
            const int64_t c = locate_task(task, lengths, group, num_kv_heads, &h, &first), vectors = lengths[c] * group;
            tile(query, keys + h * head_stride, values + h * head_stride, out, starts[c], pasts[c], first,
                 vectors - first < LANES ? vectors - first : LANES, group, h, num_heads, head_dim,
                 tables + table_offsets[c], block_size, slot_stride, scale, &s);
        }
        free(s.q2), free(s.acc), free(s.keys), free(s.v2);
    }
    return failed ? -1 : 0;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* AMX: the same attention with its two products on tiles (TDPBF16PS), for 16 query vectors against
 * phases of PHASE_KEYS key positions (aligned on position 0). Scores come out transposed, a key per
 * tile row and a query per column: the lane-per-query layout of the AVX-512 tile above. Scores^T =
 * K Q^T (A: 16 key rows read in place from the cache, B: the queries as pairs, the q2 layout); one
 * online-softmax step a phase, with exponentials in base 2; out^T += V^T P^T (A: the values transposed
 * once per call into blocks of AMX_KEYS positions, [kv head][block][dimension][position], B: the
 * probabilities as pairs of positions, the p2 layout), the running sums rescaled in float32 before a
 * phase's products are added. The tile unit rounds its pair sums its own way, and the phases and the
 * exponentials are not the AVX-512 tile's, so these bits differ from it; like them they depend on
 * nothing but the query, its keys and values and the phase positions: the same however the prompt is
 * chunked, whatever else the call holds. The runner takes this kernel where the matrix products run on
 * tiles (kernel_choice.py). Measured on a 2-core AMX Xeon: phases of 64 and 256 keys were slower than
 * 128; scoring the next phase and multiplying the last one's values around a softmax (the tile and
 * vector units side by side) gained nothing. */
#define AMX_KEYS 32
#define PHASE_KEYS 128 /* keys scored, softmaxed and multiplied with their values together */

int prefill_amx_supported(void) { return 1; }

/* Chunk c's sequence positions, padded to whole blocks of AMX_KEYS. */
static inline int64_t padded_positions(const int64_t *pasts, const int64_t *lengths, int64_t c) {
    return (pasts[c] + lengths[c] + AMX_KEYS - 1) / AMX_KEYS * AMX_KEYS;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Every tile 16 rows of 64 bytes: 0-3 the output's partials (16 dimensions x 16 queries), 4-5 the
 * scores of keys 0-15 and 16-31 (x 16 queries), 6 an A operand, 7 a B operand. */
static void amx_configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

typedef struct {
    uint32_t *q2;   /* [head_dim / 2][LANES] */
    float *acc;     /* [head_dim][LANES] */
    float *scores;  /* [PHASE_KEYS][LANES] */
    uint32_t *p2;   /* [PHASE_KEYS / 2][LANES] */
    uint16_t *keys; /* [PHASE_KEYS][head_dim], when the arena's 16-key runs are not in place */
} AmxScratch;

/* 16 x 16 32-bit elements: r[i] row i in, r[c] column c out. */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* u[i + k], 128-bit lane L: column 4L + k of rows i .. i + 3 */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        const __m512i x = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44), y = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xee);
        const __m512i x2 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44);
        const __m512i y2 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xee);
        t[k] = _mm512_shuffle_i32x4(x, x2, 0x88);
        t[4 + k] = _mm512_shuffle_i32x4(x, x2, 0xdd);
        t[8 + k] = _mm512_shuffle_i32x4(y, y2, 0x88);
        t[12 + k] = _mm512_shuffle_i32x4(y, y2, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* 2^x within ~3 ulp for x <= 0 (a little above 0 too): x - floor(x) in [0, 1) exactly (VREDUCEPS), a
 * degree-5 polynomial there with p(0) = 1 exactly, times 2^floor(x) (VSCALEFPS); x clamped at -126 so
 * results stay normal: the running sums' rescale factor (the probabilities take simd512.h's exp2_poly4_ps). */
static inline __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(0x1.e97110p-10f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.27795ep-7f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.c91cb8p-5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.ebdb5ap-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.62e4bap-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, x);
}

/* Scores^T (raw) of each run of 16 keys of the phase from t0 that holds any key up to `last` into
 * sc ([PHASE_KEYS][LANES]; the other runs are left as they were, for the caller to mask): four runs in
 * flight (tiles 0-3), their operands in tiles 4-5 (keys) and 6-7 (queries: loaded once for the phase
 * where head_dim <= 64, 0.93x the kernel's time at 64, else with each run's keys). Returns the runs. */
static inline int64_t amx_scores(const uint16_t *k_head, const uint32_t *q2, float *sc, uint16_t *keys, int64_t t0,
                                 int64_t last, int64_t head_dim, const int64_t *table, int64_t block_size,
                                 int64_t slot_stride) {
    const int64_t runs16 = (last - t0) / 16 + 1 < PHASE_KEYS / 16 ? (last - t0) / 16 + 1 : PHASE_KEYS / 16;
    const int held = head_dim <= 64;
    if (held) {
        _tile_loadd(6, q2, 64);
        if (head_dim > 32) _tile_loadd(7, q2 + 16 * LANES, 64);
    }
    for (int64_t g = 0; g < runs16; g++) {
        const int64_t base = t0 + 16 * g;
        const uint16_t *kb;
        int64_t stride;
        if (block_size % 16 == 0) { /* the run lies in one cache block, in place */
            kb = k_head + (table[base / block_size] * block_size + base % block_size) * slot_stride;
            stride = slot_stride * 2;
        } else {
            uint16_t *dst = keys + 16 * g * head_dim;
            for (int64_t t = 0; t < 16; t++) {
                const int64_t pos = base + t <= last ? base + t : base;
                memcpy(dst + t * head_dim, k_head + (table[pos / block_size] * block_size + pos % block_size) * slot_stride,
                       sizeof(uint16_t) * head_dim);
            }
            kb = dst;
            stride = head_dim * 2;
        }
#define SCORE_TILE(S)                                                                                  \
        _tile_zero(S);                                                                                 \
        for (int64_t d = 0; d < head_dim; d += 64) {                                                   \
            _tile_loadd(4, kb + d, stride);                                                            \
            if (!held) _tile_loadd(6, q2 + d / 2 * LANES, 64);                                         \
            _tile_dpbf16ps(S, 4, 6);                                                                   \
            if (d + 32 < head_dim) {                                                                   \
                _tile_loadd(5, kb + d + 32, stride);                                                   \
                if (!held) _tile_loadd(7, q2 + (d + 32) / 2 * LANES, 64);                              \
                _tile_dpbf16ps(S, 5, 7);                                                               \
            }                                                                                          \
        }                                                                                              \
        _tile_stored(S, sc + 16 * g * LANES, 64);
        switch (g & 3) {
        case 0: SCORE_TILE(0) break;
        case 1: SCORE_TILE(1) break;
        case 2: SCORE_TILE(2) break;
        default: SCORE_TILE(3) break;
        }
#undef SCORE_TILE
    }
    return runs16;
}

/* acc^T += V^T P^T for `runs` 32-key runs of the phase from t0 (vt: the head's transposed values;
 * p2: the runs' probabilities as pairs of keys), 64 dimensions at a time in tiles 0-3 (loaded from
 * and stored to acc), a run's probabilities in tile 6 or 7, the values in 4 or 5. */
static inline void amx_values(const uint16_t *vt, const uint32_t *p2, float *acc, int64_t t0, int64_t runs,
                              int64_t head_dim) {
    for (int64_t c0 = 0; c0 < head_dim; c0 += 64) {
        const int64_t tiles = head_dim - c0 < 64 ? (head_dim - c0) / 16 : 4;
#define LOAD_OUT(j) if (j < tiles) _tile_loadd(j, acc + (c0 + 16 * (j)) * LANES, 64);
        LOAD_OUT(0) LOAD_OUT(1) LOAD_OUT(2) LOAD_OUT(3)
#undef LOAD_OUT
        for (int64_t r = 0; r < runs; r++) {
            const uint16_t *v = vt + (t0 + 32 * r) * head_dim + c0 * AMX_KEYS;
#define ADD_OUT(j, A, B)                                                                               \
            if (j < tiles) {                                                                           \
                _tile_loadd(A, v + 16 * (j) * AMX_KEYS, AMX_KEYS * 2);                                 \
                _tile_dpbf16ps(j, A, B);                                                               \
            }
            if (r & 1) {
                _tile_loadd(7, p2 + 16 * r * LANES, 64);
                ADD_OUT(0, 4, 7) ADD_OUT(1, 5, 7) ADD_OUT(2, 4, 7) ADD_OUT(3, 5, 7)
            } else {
                _tile_loadd(6, p2 + 16 * r * LANES, 64);
                ADD_OUT(0, 4, 6) ADD_OUT(1, 5, 6) ADD_OUT(2, 4, 6) ADD_OUT(3, 5, 6)
            }
#undef ADD_OUT
        }
#define STORE_OUT(j) if (j < tiles) _tile_stored(j, acc + (c0 + 16 * (j)) * LANES, 64);
        STORE_OUT(0) STORE_OUT(1) STORE_OUT(2) STORE_OUT(3)
#undef STORE_OUT
    }
}

static void tile_amx(const uint16_t *query, const uint16_t *k_head, const uint16_t *vt,
                     uint16_t *out, int64_t row0, int64_t past, int64_t first, int64_t count, int64_t group,
                     int64_t h, int64_t num_heads, int64_t head_dim, const int64_t *table, int64_t block_size,
                     int64_t slot_stride, float scale, const AmxScratch *s) {
    const int64_t pairs = head_dim / 2;
    int32_t qpos[LANES];
    const uint32_t *src[LANES];
    for (int r = 0; r < LANES; r++) {
        const int64_t v = first + (r < count ? r : count - 1), row = v / group;
        src[r] = (const uint32_t *)(query + ((row0 + row) * num_heads + h * group + v % group) * head_dim);
        qpos[r] = (int32_t)(past + row);
    }
    for (int64_t j0 = 0; j0 < pairs; j0 += 16) { /* 16 pairs of each query vector, transposed */
        __m512i r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src[i] + j0);
        transpose16(r);
        for (int i = 0; i < 16; i++) _mm512_store_si512(s->q2 + (j0 + i) * LANES, r[i]);
    }
    const __m512i qp = _mm512_loadu_si512(qpos);
    const int64_t last = qpos[LANES - 1];
    __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
    const __m512 scale2 = _mm512_set1_ps(scale * 1.44269504088896341f); /* e^(x scale) = 2^(x scale2) */
    memset(s->acc, 0, sizeof(float) * head_dim * LANES);
    uint16_t interleave_index[32]; /* words (e0[q], e1[q]) side by side from [e0 0..15, e1 0..15] */
    for (int i = 0; i < 32; i++) interleave_index[i] = (uint16_t)(i / 2 + (i % 2) * 16);
    const __m512i interleave = _mm512_loadu_si512(interleave_index);
    for (int64_t t0 = 0; t0 <= last; t0 += PHASE_KEYS) {
        const float *sc = s->scores;
        const int64_t runs32 = (amx_scores(k_head, s->q2, s->scores, s->keys, t0, last, head_dim, table, block_size,
                                           slot_stride) + 1) / 2;
        /* The phase's maximum in base-2 units (score * scale * log2 e; scale > 0, so the largest scaled
         * score is the largest raw one scaled), over the keys each lane sees: 32-key runs up to `last`. */
        const int full = t0 + PHASE_KEYS - 1 <= qpos[0]; /* every lane sees every key of the phase */
        __m512 mx[8];
        for (int i = 0; i < 8; i++) mx[i] = _mm512_set1_ps(-INFINITY);
        if (full) {
            for (int64_t t = 0; t < PHASE_KEYS; t += 8)
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) mx[i] = _mm512_max_ps(mx[i], _mm512_load_ps(sc + (t + i) * LANES));
        } else {
            for (int64_t t = 0; t < 32 * runs32; t += 8)
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) {
                    const __mmask16 seen = _mm512_cmple_epi32_mask(_mm512_set1_epi32((int)(t0 + t + i)), qp);
                    mx[i] = _mm512_mask_max_ps(mx[i], seen, mx[i], _mm512_load_ps(sc + (t + i) * LANES));
                }
        }
        const __m512 block_max = _mm512_max_ps(_mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3])),
                                               _mm512_max_ps(_mm512_max_ps(mx[4], mx[5]), _mm512_max_ps(mx[6], mx[7])));
        const __m512 m_new = _mm512_max_ps(m, _mm512_mul_ps(block_max, scale2));
        const __mmask16 moved = _mm512_cmp_ps_mask(m_new, m, _CMP_GT_OQ);
        const __m512 alpha = exp2_ps(_mm512_sub_ps(m, m_new)); /* exactly 1 where the maximum stayed */
        m = m_new;
        /* p = 2^(score * scale2 - m) (one rounding: FMA), zero where the lane does not see the key; pairs
         * of keys rounded to bfloat16 side by side per query (the value product's B tile). Four partial
         * sums, added in a fixed order: the phase's keys are the same whatever the call. Every step an
         * explicit instruction, so the compiler contracts nothing differently in either branch. */
        __m512 ps[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t i = 0; i < 16 * runs32; i += 4) {
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const int64_t t = 2 * (i + k);
                __m512 e0 = exp2_poly4_ps(_mm512_fmsub_ps(_mm512_load_ps(sc + t * LANES), scale2, m));
                __m512 e1 = exp2_poly4_ps(_mm512_fmsub_ps(_mm512_load_ps(sc + (t + 1) * LANES), scale2, m));
                if (!full) {
                    e0 = _mm512_maskz_mov_ps(_mm512_cmple_epi32_mask(_mm512_set1_epi32((int)(t0 + t)), qp), e0);
                    e1 = _mm512_maskz_mov_ps(_mm512_cmple_epi32_mask(_mm512_set1_epi32((int)(t0 + t + 1)), qp), e1);
                }
                ps[k] = _mm512_add_ps(_mm512_add_ps(ps[k], e0), e1);
                _mm512_store_si512(s->p2 + (i + k) * LANES,
                                   _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(e1, e0)));
            }
        }
        l = _mm512_fmadd_ps(l, alpha, _mm512_add_ps(_mm512_add_ps(ps[0], ps[1]), _mm512_add_ps(ps[2], ps[3])));
        if (moved && t0 > 0) /* the other lanes are multiplied by exactly 1 */
            for (int64_t d = 0; d < head_dim; d++)
                _mm512_store_ps(s->acc + d * LANES, _mm512_mul_ps(_mm512_load_ps(s->acc + d * LANES), alpha));
        amx_values(vt, s->p2, s->acc, t0, runs32, head_dim);
    }
    /* out = acc / l rounded to nearest even, 32 dimensions at a time: pairs of dimensions side by side
     * per query, transposed to a row per query. */
    for (int64_t d0 = 0; d0 < head_dim; d0 += 32) {
        __m512i rows[16];
        for (int j = 0; j < 16; j++) {
            const __m512 x0 = _mm512_div_ps(_mm512_load_ps(s->acc + (d0 + 2 * j) * LANES), l);
            const __m512 x1 = _mm512_div_ps(_mm512_load_ps(s->acc + (d0 + 2 * j + 1) * LANES), l);
            rows[j] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
        }
        transpose16(rows);
        for (int64_t r = 0; r < count; r++) {
            const int64_t v = first + r;
            _mm512_storeu_si512(out + ((row0 + v / group) * num_heads + h * group + v % group) * head_dim + d0, rows[r]);
        }
    }
}

/* Dimensions d0 .. d0 + 31 of AMX_KEYS positions' value rows (NULL: a position past the end, zeros)
 * into rows d0 .. d0 + 31 of the block dst (a row of AMX_KEYS positions per dimension): each half of
 * the positions transposed as 32-bit pairs of dimensions, then the pairs' halves split into rows. */
static void transpose_block(const uint16_t *const *src, int64_t d0, uint16_t *dst) {
    __m512i half[2][16];
    for (int g = 0; g < 2; g++) {
        for (int i = 0; i < 16; i++)
            half[g][i] = src[16 * g + i] ? _mm512_loadu_si512(src[16 * g + i] + d0) : _mm512_setzero_si512();
        transpose16(half[g]);
    }
    uint16_t even_index[32];
    for (int i = 0; i < 32; i++) even_index[i] = (uint16_t)(i < 16 ? 2 * i : 32 + 2 * (i - 16));
    const __m512i even = _mm512_loadu_si512(even_index), odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int j = 0; j < 16; j++) {
        _mm512_storeu_si512(dst + (d0 + 2 * j) * AMX_KEYS, _mm512_permutex2var_epi16(half[0][j], even, half[1][j]));
        _mm512_storeu_si512(dst + (d0 + 2 * j + 1) * AMX_KEYS, _mm512_permutex2var_epi16(half[0][j], odd, half[1][j]));
    }
}

/* prefill_attention_bf16's contract, on tiles (the caller holds Linux's AMX permission). */
int prefill_attention_amx_bf16(const uint16_t *query, const uint16_t *keys, const uint16_t *values, uint16_t *out,
                               const int64_t *starts, const int64_t *lengths, const int64_t *pasts,
                               const int64_t *tables, const int64_t *table_offsets, int64_t num_chunks,
                               int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t head_stride, int64_t slot_stride, float scale) {
    if (head_dim % 32 != 0 || head_dim > MAX_HEAD_DIM || num_heads % num_kv_heads != 0) return -2;
    if (num_chunks <= 0) return 0;
    const int64_t group = num_heads / num_kv_heads;
    /* Each chunk's values transposed, [kv head][block of AMX_KEYS positions][dimension][position],
     * positions padded with zeros to whole blocks (a zero probability times a zero adds nothing, where a stale slot could be NaN). */
    int64_t *vt_offsets = malloc(sizeof(int64_t) * (size_t)(num_chunks + 1));
    if (!vt_offsets) return -1;
    vt_offsets[0] = 0;
    int64_t num_runs = 0;
    for (int64_t c = 0; c < num_chunks; c++) {
        const int64_t padded = padded_positions(pasts, lengths, c);
        vt_offsets[c + 1] = vt_offsets[c] + num_kv_heads * head_dim * padded;
        num_runs += num_kv_heads * padded / AMX_KEYS;
    }
    uint16_t *vt = aligned_alloc(64, sizeof(uint16_t) * (size_t)((vt_offsets[num_chunks] + 31) / 32 * 32));
    if (!vt) {
        free(vt_offsets);
        return -1;
    }
#pragma omp parallel for schedule(static)
    for (int64_t run = 0; run < num_runs; run++) {
        int64_t c = 0, rest = run, padded;
        for (;; c++) {
            padded = padded_positions(pasts, lengths, c);
            if (rest < num_kv_heads * padded / AMX_KEYS) break;
            rest -= num_kv_heads * padded / AMX_KEYS;
        }
        const int64_t h = rest / (padded / AMX_KEYS), t0 = rest % (padded / AMX_KEYS) * AMX_KEYS;
        const int64_t total = pasts[c] + lengths[c];
        const int64_t *table = tables + table_offsets[c];
        const uint16_t *src[AMX_KEYS];
        for (int64_t t = 0; t < AMX_KEYS; t++) {
            const int64_t pos = t0 + t;
            src[t] = pos < total ? values + h * head_stride + (table[pos / block_size] * block_size + pos % block_size) * slot_stride
                                 : NULL;
        }
        for (int64_t d0 = 0; d0 < head_dim; d0 += 32)
            transpose_block(src, d0, vt + vt_offsets[c] + h * head_dim * padded + t0 * head_dim);
    }
    const int64_t num_tasks = count_tasks(lengths, num_chunks, group, num_kv_heads);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        AmxScratch s = {aligned_alloc(64, sizeof(uint32_t) * head_dim / 2 * LANES),
                        aligned_alloc(64, sizeof(float) * head_dim * LANES),
                        aligned_alloc(64, sizeof(float) * PHASE_KEYS * LANES),
                        aligned_alloc(64, sizeof(uint32_t) * PHASE_KEYS / 2 * LANES),
                        aligned_alloc(64, sizeof(uint16_t) * PHASE_KEYS * head_dim)};
        const int ready = s.q2 && s.acc && s.scores && s.p2 && s.keys;
        const unsigned int csr = _mm_getcsr();
        /* Denormals flushed to zero (FTZ, DAZ): the probabilities' 2^x (exp2_poly4_ps, no clamp) gives 0
         * below -126, where a clamp would give 2^-126, which adds nothing to sums of 1 or more. Degree 4
         * and no clamp, with the queries' vectorized transpose: 0.92x the kernel's time, as accurate as
         * degree 5 against float64 on random data (2.69e-4 RMS). */
        _mm_setcsr(csr | 0x8040);
        if (ready) amx_configure();
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; task++) {
            if (!ready) {
                failed = 1;
                continue;
            }
            int64_t h, first;
            const int64_t c = locate_task(task, lengths, group, num_kv_heads, &h, &first), vectors = lengths[c] * group;
            const int64_t padded = padded_positions(pasts, lengths, c);
            tile_amx(query, keys + h * head_stride, vt + vt_offsets[c] + h * head_dim * padded, out,
                     starts[c], pasts[c], first, vectors - first < LANES ? vectors - first : LANES, group, h,
                     num_heads, head_dim, tables + table_offsets[c], block_size, slot_stride, scale, &s);
        }
        _mm_setcsr(csr);
        free(s.q2), free(s.acc), free(s.scores), free(s.p2), free(s.keys);
    }
    free(vt);
    free(vt_offsets);
    return failed ? -1 : 0;
}
#endif

#else

int prefill_supported(void) { return 0; }
int prefill_attention_bf16(const uint16_t *query, const uint16_t *keys, const uint16_t *values, uint16_t *out,
                           const int64_t *starts, const int64_t *lengths, const int64_t *pasts,
                           const int64_t *tables, const int64_t *table_offsets, int64_t num_chunks,
                           int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           int64_t head_stride, int64_t slot_stride, float scale) {
    (void)query, (void)keys, (void)values, (void)out, (void)starts, (void)lengths, (void)pasts, (void)tables;
    (void)table_offsets, (void)num_chunks, (void)block_size, (void)num_heads, (void)num_kv_heads, (void)head_dim;
    (void)head_stride, (void)slot_stride, (void)scale;
    return -2;
}

#endif

#if !(defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__))
/* Built without AMX tiles: the AVX-512 version, or its refusal (the runner asks prefill_amx_supported). */
int prefill_amx_supported(void) { return 0; }
int prefill_attention_amx_bf16(const uint16_t *query, const uint16_t *keys, const uint16_t *values, uint16_t *out,
                               const int64_t *starts, const int64_t *lengths, const int64_t *pasts,
                               const int64_t *tables, const int64_t *table_offsets, int64_t num_chunks,
                               int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t head_stride, int64_t slot_stride, float scale) {
    return prefill_attention_bf16(query, keys, values, out, starts, lengths, pasts, tables, table_offsets,
                                  num_chunks, block_size, num_heads, num_kv_heads, head_dim, head_stride,
                                  slot_stride, scale);
}
#endif
