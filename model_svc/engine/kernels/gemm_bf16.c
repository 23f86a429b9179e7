/* Matrix products for a step's rows: bfloat16 activations times nf4 (bitsandbytes' CPU packing) or
 * bfloat16 weights, with AVX-512 BF16 dot-product instructions, batch-invariant by construction.
 *
 * nf4 weights stay as bitsandbytes packs them for the CPU: blocks of 32 output columns; within a
 * block, for each pair of input positions (k, k + 1), the 32 columns' two 4-bit codes. A code becomes
 * its code value in bfloat16 (a table lookup, VPERMW); per quantization block (64 inputs) and
 * column, one float32 lane sums x[k] * v[k] + x[k + 1] * v[k + 1] pair after pair (VDPBF16PS), and
 * the column's sum gains that partial sum times the block's absmax (one FMA). That is the arithmetic
 * of bitsandbytes' own CPU kernel, in the same order: the same bits (tests/unit/test_linear.py). It
 * is faster at many rows because the codes are decoded in registers once per tile of up to twelve
 * rows (up to FEW_ROWS rows: tiles of up to four rows and four column blocks).
 *
 * Dense bfloat16 weights (the output embedding) are packed once into the panel layout
 * ([n / 32][k / 2][32][2]) and summed the same way, without blocks: PyTorch's matmul sums in another
 * order, so these bits are our own. int8 weights (the output embedding with --output-layer int8: a
 * float32 scale per column and 64 inputs) run through the nf4 tiles, each code decoded to its exact
 * bfloat16 value (tests/unit/test_gemm_bits.py writes the sums out in torch).
 *
 * Every output element is summed in an order fixed by k alone: a row's result is the same whatever
 * rows are beside it, however many there are, and whichever thread computes it. Column blocks are
 * shared out between OpenMP threads (PyTorch's pool: one OpenMP runtime per process). Built by
 * model_svc/engine/kernels/__init__.py with the machine's C compiler; `gemm_supported()` says whether
 * it was built with the instructions (the Python side uses the libraries' kernels where not). Without
 * AVX-512 BF16, an AVX2 version (after the AVX-512 one) computes the same sums with float32 FMAs.
 */
#define _DEFAULT_SOURCE /* syscall() */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nf4_call.h"

#define COLS 32 /* output columns per block (bitsandbytes' CPU packing) */
#define MAX_ROWS 8 /* rows per register tile (dense) */
#define NF4_ROWS 6 /* rows per nf4 tile: two sums per column vector (the block's, the row's) */
#define NF4_COLS 4 /* column blocks per nf4 tile of at most FEW_ROWS rows */
#define FEW_ROWS 8 /* nf4 products of more rows: tiles of one half-block (16 columns) and HALF_ROWS rows */
#define HALF_ROWS 12 /* rows per half-block tile: a running and a block sum each, in registers */
#define AHEAD 64 /* nf4 pairs prefetched ahead (2 KiB): the step's weights come from memory, not cache */
#define INT8_FEW_ROWS 4 /* int8 products of more rows: half-block tiles, each half decoded once for all rows (an
                         * int8 decode costs several nf4 ones: 8 rows 0.8x the time of two tiles a block) */

/* A buffer of at least `bytes`, grown as needed (a step's calls reuse it); NULL when out of memory. */
static inline void *grown(void **buffer, size_t *size, size_t bytes) {
    if (*size < bytes) {
        free(*buffer);
        *buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
        *size = *buffer ? bytes : 0;
    }
    return *buffer;
}

/* Each thread's scratch buffer. */
static __thread void *thread_buffer;
static __thread size_t thread_buffer_size;

static inline void *scratch(size_t bytes) { return grown(&thread_buffer, &thread_buffer_size, bytes); }

/* The output of column block `block`: column block after column block, the parts' columns side by
 * side (part p: part_cols[p] columns, a multiple of 32, rows part_cols[p] apart at part_c[p]). */
static inline void block_output(int64_t block, int64_t parts, const int64_t *part_cols, uint16_t *const *part_c,
                                uint16_t **c, int64_t *ldc) {
    int64_t col = block * COLS;
    for (int64_t p = 0; p < parts; col -= part_cols[p], p++)
        if (col < part_cols[p]) {
            *c = part_c[p] + col;
            *ldc = part_cols[p];
            return;
        }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#include "silu.h"

int gemm_supported(void) { return 1; }

/* nf4 pair p's 32 bytes to its two bfloat16 vectors of code values (columns 0-15, then 16-31; each
 * column's (k, k + 1) side by side): byte j holds column j / 2's code in its low half and column
 * 16 + j / 2's in its high half. `table`: the 16 code values as bfloat16, twice (32 entries): VPERMW
 * reads an index's low 5 bits, so a byte's high half beyond bit 4 is ignored and its bit 4 lands in
 * the second copy; the low half needs no mask. */
static inline __attribute__((always_inline)) void decode_pair(const uint8_t *bytes, __m512i table, __m512bh *b0,
                                                              __m512bh *b1) {
    const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)bytes));
    *b0 = (__m512bh)_mm512_permutexvar_epi16(words, table);
    *b1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);
}

/* int8 codes of 16 columns for an input pair (the even input's at `even`, the odd input's COLS bytes on)
 * as one bfloat16 pair vector: an int8 value is exact in float32 with its low 16 bits zero, so its
 * bfloat16 is its float32's high half, and a lane (even, odd) is odd's float32 with even's high half in
 * its low half. */
static inline __attribute__((always_inline)) __m512bh int8_half_pair(const uint8_t *even) {
    const __m512i e = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)even))));
    const __m512i o = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(even + COLS)))));
    return (__m512bh)_mm512_or_si512(o, _mm512_srli_epi32(e, 16));
}

/* Bytes of codes per input pair of a 32-column block: nf4 32 (two 4-bit codes a byte), int8 64 (the
 * even input's 32 columns, then the odd input's). `wide` (a constant after inlining): int8 codes. */
#define PAIR_BYTES(wide) ((wide) ? 2 * COLS : COLS)

/* A pair's 32 columns decoded to two bfloat16 pair vectors (columns 0-15, 16-31), nf4 or int8. */
static inline __attribute__((always_inline)) void decode_codes(const uint8_t *pair, __m512i table, __m512bh *b0,
                                                               __m512bh *b1, const int wide) {
    if (wide) {
        *b0 = int8_half_pair(pair);
        *b1 = int8_half_pair(pair + 16);
    } else {
        decode_pair(pair, table, b0, b1);
    }
}

/* One tile: `rows` rows of A times `cols` blocks of 32 columns (both constants after inlining),
 * decoding each pair of the codes (nf4, or int8 where `wide`) as it goes. Per k-block of the
 * quantization: a float32 partial sum of x[k] * code_value[k] in pair order (VDPBF16PS), then
 * sum += partial * scale (one FMA), block after block: for nf4 the arithmetic of bitsandbytes' own CPU
 * kernel. Several column blocks give a few rows enough independent sums to hide the instruction's
 * latency. codes, scales: of the first block; the next block's are `pairs` pairs of codes and
 * `scale_stride` floats on; block j's output row r is at c[j] + r * ldc[j]. */
static inline __attribute__((always_inline)) void quant_tile(const uint16_t *a, int64_t lda, const uint8_t *codes,
                                                             const float *scales,
                                                             int64_t scale_stride, int64_t pairs, int64_t block_pairs,
                                                             __m512i table, uint16_t *const *c, const int64_t *ldc,
                                                             const int rows, const int cols, const int wide) {
    __m512 acc[2 * NF4_ROWS], part[2 * NF4_ROWS]; /* [row][block][half] */
    for (int i = 0; i < 2 * rows * cols; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t p0 = 0; p0 < pairs; p0 += block_pairs) {
        for (int i = 0; i < 2 * rows * cols; i++) part[i] = _mm512_setzero_ps();
        for (int64_t p = p0; p < p0 + block_pairs; p++) {
            __m512bh b[2 * NF4_COLS];
            for (int j = 0; j < cols; j++) {
                _mm_prefetch((const char *)(codes + (j * pairs + p + AHEAD) * PAIR_BYTES(wide)), _MM_HINT_T0);
                decode_codes(codes + (j * pairs + p) * PAIR_BYTES(wide), table, &b[2 * j], &b[2 * j + 1], wide);
            }
            for (int r = 0; r < rows; r++) {
                int32_t pair;
                memcpy(&pair, a + r * lda + 2 * p, sizeof pair);
                const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
                for (int h = 0; h < 2 * cols; h++)
                    part[2 * r * cols + h] = _mm512_dpbf16_ps(part[2 * r * cols + h], x, b[h]);
            }
        }
        for (int j = 0; j < cols; j++) {
            const float *s = scales + j * scale_stride + (p0 / block_pairs) * COLS;
            const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
            for (int r = 0; r < rows; r++) {
                const int i = 2 * (r * cols + j);
                acc[i] = _mm512_fmadd_ps(part[i], s0, acc[i]);
                acc[i + 1] = _mm512_fmadd_ps(part[i + 1], s1, acc[i + 1]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < cols; j++)
            for (int h = 0; h < 2; h++)
                _mm256_storeu_si256((__m256i *)(c[j] + r * ldc[j] + 16 * h),
                                    (__m256i)_mm512_cvtneps_pbh(acc[2 * (r * cols + j) + h]));
}

/* Rows in tiles of at most NF4_ROWS, as even as they go, times one block (up to FEW_ROWS rows, where
 * the column blocks do not fill NF4_COLS). */
static inline __attribute__((always_inline)) void quant_rows(const uint16_t *a, int64_t m, int64_t lda,
                                                             const uint8_t *codes, const float *scales, int64_t pairs,
                                                             int64_t block_pairs, __m512i table, uint16_t *c,
                                                             int64_t ldc, const int wide) {
    const int64_t tiles = (m + NF4_ROWS - 1) / NF4_ROWS;
    for (int64_t t = 0, r = 0; t < tiles; t++) {
        const int64_t rows = m / tiles + (t < m % tiles);
        uint16_t *const rows_c = c + r * ldc;
        switch (rows) {
#define TILE(n) \
    case n: quant_tile(a + r * lda, lda, codes, scales, 0, pairs, block_pairs, table, &rows_c, &ldc, n, 1, wide); break;
            TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
#undef TILE
        default: break;
        }
        r += rows;
    }
}

/* `rows` rows of A times half a block (16 columns: h = 0 the first, 1 the second), decoding each pair's
 * half as it goes: the same sums as quant_tile, in registers, for twice its rows. One decode serves
 * up to twelve rows; decoding an nf4 block once into a bfloat16 panel for all rows to read back cost
 * more (a step's products at 16 and 32 rows: 0.89-0.90x the panel's time, both prefetching). */
static inline __attribute__((always_inline)) void quant_half_tile(const uint16_t *a, int64_t lda,
                                                                  const uint8_t *codes, const float *scales,
                                                                  int64_t pairs, int64_t block_pairs, __m512i table,
                                                                  uint16_t *c, int64_t ldc, const int h,
                                                                  const int rows, const int wide) {
    __m512 acc[HALF_ROWS], part[HALF_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t p0 = 0; p0 < pairs; p0 += block_pairs) {
        for (int r = 0; r < rows; r++) part[r] = _mm512_setzero_ps();
        for (int64_t p = p0; p < p0 + block_pairs; p++) {
            _mm_prefetch((const char *)(codes + (p + AHEAD) * PAIR_BYTES(wide)), _MM_HINT_T0);
            __m512bh b;
            if (wide) {
                b = int8_half_pair(codes + p * PAIR_BYTES(wide) + 16 * h);
            } else {
                __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(codes + p * COLS)));
                if (h) words = _mm512_srli_epi16(words, 4); /* see decode_pair */
                b = (__m512bh)_mm512_permutexvar_epi16(words, table);
            }
            for (int r = 0; r < rows; r++) {
                int32_t pair;
                memcpy(&pair, a + r * lda + 2 * p, sizeof pair);
                part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)_mm512_set1_epi32(pair), b);
            }
        }
        const __m512 s = _mm512_loadu_ps(scales + (p0 / block_pairs) * COLS + 16 * h);
        for (int r = 0; r < rows; r++) acc[r] = _mm512_fmadd_ps(part[r], s, acc[r]);
    }
    for (int r = 0; r < rows; r++)
        _mm256_storeu_si256((__m256i *)(c + r * ldc + 16 * h), (__m256i)_mm512_cvtneps_pbh(acc[r]));
}

/* More than FEW_ROWS rows times one block: tiles of at most HALF_ROWS rows, as even as they go (32 rows:
 * 11, 11, 10), each half of the block in turn. */
static inline __attribute__((always_inline)) void quant_many_rows(const uint16_t *a, int64_t m, int64_t lda,
                                                                  const uint8_t *codes, const float *scales,
                                                                  int64_t pairs, int64_t block_pairs, __m512i table,
                                                                  uint16_t *c, int64_t ldc, const int wide) {
    const int64_t tiles = (m + HALF_ROWS - 1) / HALF_ROWS;
    for (int64_t t = 0, r = 0; t < tiles; t++) {
        const int64_t rows = m / tiles + (t < m % tiles);
        for (int h = 0; h < 2; h++) {
            switch (rows) {
#define TILE(n) \
    case n: quant_half_tile(a + r * lda, lda, codes, scales, pairs, block_pairs, table, c + r * ldc, ldc, h, n, wide); \
        break;
                TILE(5) TILE(6) TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)
#undef TILE
            default: break;
            }
        }
        r += rows;
    }
}

/* Up to FEW_ROWS rows times NF4_COLS blocks, decoding as it goes: tiles shaped so that each has at
 * least eight independent sums (or six). Five to eight rows take two tiles a block, the second
 * decoding the same codes again from L1: cheaper than writing them out as a panel of bfloat16 (four
 * times their nf4 bytes) and reading it back (8 rows: 10.0-11.3 against 13.2-16.3 ms a step's
 * products, alternating runs). */
static inline __attribute__((always_inline)) void quant_few_rows(const uint16_t *a, int64_t m, int64_t lda,
                                                                 const uint8_t *codes, const float *scales,
                                                                 int64_t scale_stride, int64_t pairs,
                                                                 int64_t block_pairs, __m512i table,
                                                                 uint16_t *const *c, const int64_t *ldc,
                                                                 const int wide) {
/* Rows first .. first + rows - 1 of column blocks j .. j + cols - 1, written through out[0 .. cols - 1]. */
#define TILE(first, rows, cols, j, out) quant_tile(a + (first) * lda, lda, codes + (j) * pairs * PAIR_BYTES(wide), \
                                                   scales + (j) * scale_stride, scale_stride, pairs, block_pairs, \
                                                   table, out, ldc + (j), rows, cols, wide)
#define FEW(rows, cols, j) TILE(0, rows, cols, j, c + (j))
#define HALVES(r1, r2) for (int j = 0; j < NF4_COLS; j++) {           \
        uint16_t *const second = c[j] + (r1) * ldc[j];                 \
        FEW(r1, 1, j);                                                  \
        TILE(r1, r2, 1, j, &second);                                    \
    }
    switch (m) {
    case 1: FEW(1, 4, 0); break;
    case 2: FEW(2, 2, 0); FEW(2, 2, 2); break;
    case 3: FEW(3, 2, 0); FEW(3, 2, 2); break;
    case 4: FEW(4, 1, 0); FEW(4, 1, 1); FEW(4, 1, 2); FEW(4, 1, 3); break;
    case 5: HALVES(3, 2); break;
    case 6: HALVES(3, 3); break;
    case 7: HALVES(4, 3); break;
    case 8: HALVES(4, 4); break;
    default: break;
    }
#undef HALVES
#undef FEW
#undef TILE
}

/* One group of column blocks (`cols` of them from `first`; NF4_COLS, or fewer at the end) of a
 * quantized product: the tiles for m rows. scales [cols][k / blocksize][32]; c[j], ldc[j]: block j's
 * output. */
static inline __attribute__((always_inline)) void quant_group(const uint16_t *a, int64_t m, int64_t lda,
                                                              const uint8_t *codes, const float *scales,
                                                              int64_t cols, int64_t blocks, int64_t pairs,
                                                              int64_t block_pairs, __m512i table, uint16_t *const *c,
                                                              const int64_t *ldc, const int wide) {
    if (m > FEW_ROWS || (wide && m > INT8_FEW_ROWS))
        for (int64_t j = 0; j < cols; j++)
            quant_many_rows(a, m, lda, codes + j * pairs * PAIR_BYTES(wide), scales + j * blocks * COLS, pairs,
                            block_pairs, table, c[j], ldc[j], wide);
    else if (cols == NF4_COLS)
        quant_few_rows(a, m, lda, codes, scales, blocks * COLS, pairs, block_pairs, table, c, ldc, wide);
    else
        for (int64_t j = 0; j < cols; j++)
            quant_rows(a, m, lda, codes + j * pairs * PAIR_BYTES(wide), scales + j * blocks * COLS, pairs,
                       block_pairs, table, c[j], ldc[j], wide);
}

/* A block's absmax [k-block][its 32 columns] as float32. */
static void block_scales(const uint16_t *absmax, int64_t n, int64_t col0, int64_t blocks, float *scales) {
    for (int64_t kb = 0; kb < blocks; kb++) {
        const __m256i *s = (const __m256i *)(absmax + kb * n + col0);
        _mm512_storeu_ps(scales + kb * COLS, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(s)), 16)));
        _mm512_storeu_ps(scales + kb * COLS + 16, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(s + 1)), 16)));
    }
}

/* A dense tile: `rows` rows of A times a packed bfloat16 block of 32 columns. */
static inline __attribute__((always_inline)) void dense_tile(const uint16_t *a, int64_t lda, const uint16_t *panel,
                                                             int64_t pairs, uint16_t *c, int64_t ldc, const int rows) {
    __m512 acc[2 * MAX_ROWS];
    for (int r = 0; r < 2 * rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * COLS);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * COLS + COLS);
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, a + r * lda + 2 * p, sizeof pair);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
            acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], x, b0);
            acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], x, b1);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_si256((__m256i *)(c + r * ldc), (__m256i)_mm512_cvtneps_pbh(acc[2 * r]));
        _mm256_storeu_si256((__m256i *)(c + r * ldc + 16), (__m256i)_mm512_cvtneps_pbh(acc[2 * r + 1]));
    }
}

static void dense_rows(const uint16_t *a, int64_t m, int64_t lda, const uint16_t *panel, int64_t pairs, uint16_t *c,
                       int64_t ldc) {
    const int64_t tiles = (m + MAX_ROWS - 1) / MAX_ROWS;
    for (int64_t t = 0, r = 0; t < tiles; t++) {
        const int64_t rows = m / tiles + (t < m % tiles);
        switch (rows) {
#define TILE(n) \
    case n: dense_tile(a + r * lda, lda, panel, pairs, c + r * ldc, ldc, n); break;
            TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
#undef TILE
        default: break;
        }
        r += rows;
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define GEMM_AMX 1 /* the tile path is built: its dispatch below is compiled only then */

/* Each thread's column block scales on the AMX path (the scratch holds the tiles' data). */
static __thread void *scale_buffer;
static __thread size_t scale_buffer_size;

/* AMX: the same sums on tiles. Per quantization block and row, TDPBF16PS sums x[k] * value[k] over
 * the block's pairs into a zeroed float32 tile (two instructions of 16 pairs each for blocks of 64),
 * and the row's sum gains that partial times the block's scale (one FMA), as in quant_tile. The
 * instruction sums in its own order: per instruction, the even inputs' products and the odd inputs'
 * each in order from zero, then their sum added to the tile (measured bit for bit; VDPBF16PS adds odd
 * then even, term by term): ~1 output in 27,000 differs after the scale and the rounding to
 * bfloat16 (tests/unit/test_amx.py writes the int8 product's tile arithmetic out in torch), so where
 * the product runs on tiles it runs on tiles at every row count: a row's result then depends on its own
 * values alone (tested: each row alone against batches of every size). Codes are decoded to
 * bfloat16 pairs in memory (the B tile's layout: a pair's 16 columns, the pair's two inputs side by
 * side, is what decode_pair gives) and loaded as tiles. Which path runs is chosen at start by timing
 * both on the model's shapes (kernel_choice.py); gemm_set_amx switches. Long prompts' rows (Nf4.long_rows,
 * the first rows of a call) take sums of their own on tiles: amx_long_rows. */
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_FEW 16 /* up to this many rows: one A tile, blocks decoded as they go */
#define AMX_STREAMED 64 /* up to this many rows: blocks decoded as they go, for every group of 32 rows */
#define AMX_SLOTS 3 /* decoded quantization blocks in flight (few rows) */
#define AMX_GROUP 4 /* most column blocks a call takes on tiles (few rows) */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int use_amx; /* set by gemm_set_amx */

/* Tiles 0-3: float32 sums (16 columns each), 4-5: rows of A, 6-7: decoded codes (16 pairs x 16
 * columns). Few rows: C 0-1 and 2-3 take alternate quantization blocks, A 4-5 alternate k tiles.
 * More rows: C 2i + half for A tile 4 + i (rows 0-15, 16-31). */
static inline void amx_config(int rows0, int rows1) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64;
    cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = (uint8_t)rows0;
    cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = (uint8_t)rows1;
    cfg.rows[6] = cfg.rows[7] = 16;
    _tile_loadconfig(&cfg);
}

/* Pairs q0 .. q0 + count - 1 of a column block decoded to B tiles: [q / 16][half][q % 16][32]. */
static inline __attribute__((always_inline)) void amx_decode(const uint8_t *codes, int64_t q0, int64_t count,
                                                             __m512i table, uint16_t *dst, const int wide) {
    const uint8_t *src = codes + q0 * PAIR_BYTES(wide);
    for (int64_t t = 0; t < count / 16; t++, dst += 1024) /* count and q0: whole k tiles (16 pairs) */
        for (int r = 0; r < 16; r++, src += PAIR_BYTES(wide)) {
            __m512bh b0, b1;
            if (wide || !(r & 1)) _mm_prefetch((const char *)(src + AHEAD * PAIR_BYTES(wide)), _MM_HINT_T0);
            decode_codes(src, table, &b0, &b1, wide);
            _mm512_store_si512(dst + r * 32, (__m512i)b0);
            _mm512_store_si512(dst + 512 + r * 32, (__m512i)b1);
        }
}

/* Quantization block kb's decoded codes in the ring of AMX_SLOTS blocks at b, after decoding block
 * kb + 1 into its slot (one block ahead of the tile work; block 0 is decoded before the loop). */
static inline __attribute__((always_inline)) const uint16_t *amx_slot(const uint8_t *codes, int64_t kb,
                                                                      int64_t blocks, int64_t block_pairs,
                                                                      __m512i table, uint16_t *b, const int wide) {
    if (kb + 1 < blocks)
        amx_decode(codes, (kb + 1) * block_pairs, block_pairs, table,
                   b + ((kb + 1) % AMX_SLOTS) * block_pairs * 2 * COLS, wide);
    return b + (kb % AMX_SLOTS) * block_pairs * 2 * COLS;
}

/* acc[r] += part[r] * scale for `rows` rows of 32 columns (float32, 32 apart); `first`: acc is taken
 * as zeros, not read (the sums start from +0, as a zeroed acc would: the same bits). */
static inline void amx_scale(float *acc, const float *part, const float *scale, int rows, int first) {
    const __m512 s0 = _mm512_loadu_ps(scale), s1 = _mm512_loadu_ps(scale + 16), zero = _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        float *x = acc + r * COLS;
        const float *y = part + r * COLS;
        _mm512_store_ps(x, _mm512_fmadd_ps(_mm512_load_ps(y), s0, first ? zero : _mm512_load_ps(x)));
        _mm512_store_ps(x + 16, _mm512_fmadd_ps(_mm512_load_ps(y + 16), s1, first ? zero : _mm512_load_ps(x + 16)));
    }
}

static inline void amx_store(const float *acc, int rows, uint16_t *c, int64_t ldc) {
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_si256((__m256i *)(c + r * ldc + 16 * h),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(acc + r * COLS + 16 * h)));
}

/* One quantization block's partial sums for up to 16 rows into C tiles C0, C1 (columns 0-15, 16-31)
 * and out to `part`; k tiles alternate between A tiles 4 and 5. */
#define AMX_FEW_BLOCK(C0, C1)                                                                             \
    do {                                                                                                  \
        _tile_zero(C0);                                                                                   \
        _tile_zero(C1);                                                                                   \
        for (int64_t t = 0; t < tiles_per_block; t++) {                                                   \
            const uint16_t *at = a + (kb * tiles_per_block + t) * 32;                                     \
            _tile_loadd(6, slot + t * 1024, 64);                                                          \
            _tile_loadd(7, slot + t * 1024 + 512, 64);                                                    \
            if (t & 1) {                                                                                  \
                _tile_loadd(5, at, stride);                                                               \
                _tile_dpbf16ps(C0, 5, 6);                                                                 \
                _tile_dpbf16ps(C1, 5, 7);                                                                 \
            } else {                                                                                      \
                _tile_loadd(4, at, stride);                                                               \
                _tile_dpbf16ps(C0, 4, 6);                                                                 \
                _tile_dpbf16ps(C1, 4, 7);                                                                 \
            }                                                                                             \
        }                                                                                                 \
        _tile_stored(C0, part, 128);                                                                      \
        _tile_stored(C1, part + 16, 128);                                                                 \
    } while (0)

/* One quantization block's partial sums for up to 32 rows into zeroed C tiles 0-3 (rows 0-15 through A
 * tile 4 from a0, rows 16-31 through A tile 5 from a1 where rows1) and out to `part` (32 rows of 32
 * float32): `tiles` k tiles of decoded codes from `bt` (1,024 values each) against the rows' inputs
 * from a0 / a1 (32 inputs a k tile, rows `stride` bytes apart). */
static inline __attribute__((always_inline)) void amx_rows_block(const uint16_t *bt, const uint16_t *a0,
                                                                 const uint16_t *a1, int64_t tiles,
                                                                 int64_t stride, int rows1, float *part) {
    _tile_zero(0);
    _tile_zero(1);
    if (rows1) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t t = 0; t < tiles; t++) {
        _tile_loadd(6, bt + t * 1024, 64);
        _tile_loadd(7, bt + t * 1024 + 512, 64);
        _tile_loadd(4, a0 + t * 32, stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (rows1) {
            _tile_loadd(5, a1 + t * 32, stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, part, 128);
    _tile_stored(1, part + 16, 128);
    if (rows1) {
        _tile_stored(2, part + AMX_FEW * COLS, 128);
        _tile_stored(3, part + AMX_FEW * COLS + 16, 128);
    }
}

/* One column block of 32 for m rows, AMX_FEW < m <= AMX_STREAMED, m at most 32 or a multiple of 32:
 * each quantization block is decoded one block ahead (as for few rows) and goes through every 32-row
 * group before the next, so the tiles read the decoded codes from L1; decoding the whole column block
 * first (more rows, below) sends every tile load to L2 (32 rows: 0.70-0.74x the products' time, here
 * and on the 1B-class model's shapes). The same sums in the same order. A group's partials are scaled
 * into its sums after the next group's tile work is issued. One tile configuration a call: the caller
 * runs a last group of fewer rows as a call of its own (reloading the configuration between groups
 * cost more than that group's second decoding). */
static inline __attribute__((always_inline)) int amx_streamed(const uint16_t *a, int64_t m, int64_t lda,
                                                              const uint8_t *codes, const float *scales,
                                                              int64_t pairs, int64_t block_pairs, __m512i table,
                                                              uint16_t *c, int64_t ldc, const int wide) {
    const int64_t blocks = pairs / block_pairs, tiles_per_block = block_pairs / 16, stride = lda * 2;
    const int64_t groups = (m + 2 * AMX_FEW - 1) / (2 * AMX_FEW), steps = blocks * groups;
    const int rows = m < 2 * AMX_FEW ? (int)m : 2 * AMX_FEW, rows0 = rows < AMX_FEW ? rows : AMX_FEW,
              rows1 = rows - rows0;
    const size_t decoded = (size_t)AMX_SLOTS * block_pairs * 2 * COLS * sizeof(uint16_t);
    const size_t group_floats = 2 * AMX_FEW * COLS;
    uint8_t *buffer = scratch(decoded + (size_t)(groups + 2) * group_floats * sizeof(float));
    if (!buffer) return 1;
    uint16_t *b = (uint16_t *)buffer;
    float *acc = (float *)(buffer + decoded), *parts = acc + groups * group_floats;
#define PART(i) (parts + ((i) & 1) * group_floats)
    amx_config(rows0, rows1 ? rows1 : 1);
    amx_decode(codes, 0, block_pairs, table, b, wide);
    for (int64_t kb = 0; kb < blocks; kb++) {
        const uint16_t *slot = amx_slot(codes, kb, blocks, block_pairs, table, b, wide);
        for (int64_t g = 0; g < groups; g++) {
            const int64_t i = kb * groups + g;
            const uint16_t *a0 = a + g * 2 * AMX_FEW * lda + kb * tiles_per_block * 32;
            amx_rows_block(slot, a0, a0 + AMX_FEW * lda, tiles_per_block, stride, rows1, PART(i));
            if (i > 0)
                amx_scale(acc + ((i - 1) % groups) * group_floats, PART(i - 1), scales + ((i - 1) / groups) * COLS, rows,
                          i - 1 < groups);
        }
    }
    amx_scale(acc + ((steps - 1) % groups) * group_floats, PART(steps - 1), scales + (blocks - 1) * COLS, rows,
              steps - 1 < groups);
    for (int64_t g = 0; g < groups; g++) amx_store(acc + g * group_floats, rows, c + g * 2 * AMX_FEW * ldc, ldc);
#undef PART
    return 0;
}

/* One column block of 32 for m rows (codes: the block's; scales [blocks][32] float32). Up to AMX_FEW
 * rows, each quantization block is decoded one block ahead of its tile work; up to AMX_STREAMED
 * rows, the same for every 32-row group (amx_streamed); more rows decode the whole column block once
 * and go through it 32 rows at a time. A block's partials are scaled into the
 * sums after the next block's tile work is issued (two partial buffers), so that the tile store has
 * finished when they are read: the same sums in the same order. `configure`: load the tile
 * configuration (the first block of a call; later blocks of the same rows keep it). Returns nonzero
 * when out of memory. */
static inline __attribute__((always_inline)) int amx_block(const uint16_t *a, int64_t m, int64_t lda,
                                                           const uint8_t *codes, const float *scales, int64_t pairs,
                                                           int64_t block_pairs, __m512i table, uint16_t *c,
                                                           int64_t ldc, const int wide, int configure) {
    if (m <= 0) return 0;
    if (m > AMX_FEW && m <= AMX_STREAMED) {
        const int64_t full = m / (2 * AMX_FEW) * (2 * AMX_FEW);
        int failed = 0;
        if (full)
            failed |= amx_streamed(a, full, lda, codes, scales, pairs, block_pairs, table, c, ldc, wide);
        if (m > full)
            failed |= amx_streamed(a + full * lda, m - full, lda, codes, scales, pairs, block_pairs, table,
                                   c + full * ldc, ldc, wide);
        return failed;
    }
    const int64_t blocks = pairs / block_pairs, tiles_per_block = block_pairs / 16, stride = lda * 2;
    const int few = m <= AMX_FEW;
    const size_t decoded = (size_t)(few ? AMX_SLOTS * block_pairs : pairs) * 2 * COLS * sizeof(uint16_t);
    const size_t rows_bytes = 2 * AMX_FEW * COLS * sizeof(float); /* one buffer of up to 32 rows */
    uint8_t *buffer = scratch(decoded + 3 * rows_bytes);
    if (!buffer) return 1;
    uint16_t *b = (uint16_t *)buffer;
    float *acc = (float *)(buffer + decoded), *parts = (float *)(buffer + decoded + rows_bytes);
#define PART(kb) (parts + ((kb) & 1) * 2 * AMX_FEW * COLS)
    if (few) {
        const int rows = (int)m;
        if (configure) amx_config(rows, rows);
        amx_decode(codes, 0, block_pairs, table, b, wide);
        for (int64_t kb = 0; kb < blocks; kb++) {
            const uint16_t *slot = amx_slot(codes, kb, blocks, block_pairs, table, b, wide);
            float *part = PART(kb);
            if (kb & 1)
                AMX_FEW_BLOCK(2, 3);
            else
                AMX_FEW_BLOCK(0, 1);
            if (kb > 0) amx_scale(acc, PART(kb - 1), scales + (kb - 1) * COLS, rows, kb == 1);
        }
        amx_scale(acc, PART(blocks - 1), scales + (blocks - 1) * COLS, rows, blocks == 1);
        amx_store(acc, rows, c, ldc);
        return 0;
    }
    amx_decode(codes, 0, pairs, table, b, wide);
    for (int64_t r0 = 0; r0 < m; r0 += 2 * AMX_FEW) {
        const int rows = m - r0 < 2 * AMX_FEW ? (int)(m - r0) : 2 * AMX_FEW;
        const int rows0 = rows < AMX_FEW ? rows : AMX_FEW, rows1 = rows - rows0;
        /* Groups before the last are all 32 rows: one configuration for them (LDTILECFG waits for the
         * tile work before it; once a group, it took ~0.1 of a 512-row product's time). */
        if (r0 == 0 || rows < 2 * AMX_FEW) amx_config(rows0, rows1 ? rows1 : 1);
        const uint16_t *a0 = a + r0 * lda, *a1 = a0 + AMX_FEW * lda;
        for (int64_t kb = 0; kb < blocks; kb++) {
            const int64_t kt = kb * tiles_per_block;
            amx_rows_block(b + kt * 1024, a0 + kt * 32, a1 + kt * 32, tiles_per_block, stride, rows1, PART(kb));
            if (kb > 0) amx_scale(acc, PART(kb - 1), scales + (kb - 1) * COLS, rows, kb == 1);
        }
        amx_scale(acc, PART(blocks - 1), scales + (blocks - 1) * COLS, rows, blocks == 1);
        amx_store(acc, rows, c + r0 * ldc, ldc);
    }
#undef PART
    return 0;
}

/* Long prompts' rows (Nf4.long_rows): a column block's weights dequantized once, each code value times
 * its block's absmax (exact in float32) rounded to bfloat16 (nearest even, VCVTNE2PS2BF16), in the B
 * tiles' layout [k tile][half][pair][32]. */
static inline __attribute__((always_inline)) void amx_decode_dequantized(const uint8_t *codes, int64_t pairs,
                                                                         int64_t block_pairs, const float *scales,
                                                                         __m512i table, uint16_t *dst) {
    uint16_t index[32]; /* words (even[c], odd[c]) side by side from [even 0..15, odd 0..15] */
    for (int i = 0; i < 32; i++) index[i] = (uint16_t)(i / 2 + (i % 2) * 16);
    const __m512i interleave = _mm512_loadu_si512(index), high = _mm512_set1_epi32((int)0xffff0000u);
    const uint8_t *src = codes;
    for (int64_t q = 0; q < pairs; q++, src += COLS) {
        __m512bh b[2];
        if (!(q & 1)) _mm_prefetch((const char *)(src + AHEAD * COLS), _MM_HINT_T0);
        decode_pair(src, table, &b[0], &b[1]);
        const float *scale = scales + q / block_pairs * COLS;
        uint16_t *row = dst + q / 16 * 1024 + q % 16 * 32;
        for (int h = 0; h < 2; h++) {
            const __m512i u = (__m512i)b[h];
            const __m512 s = _mm512_loadu_ps(scale + 16 * h);
            const __m512 even = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), s);
            const __m512 odd = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(u, high)), s);
            _mm512_store_si512(row + 512 * h, _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even)));
        }
    }
}

/* One column block of 32 for m long-prompt rows: the weights dequantized once (amx_decode_dequantized),
 * then, 32 rows at a time, each row's sum taken over all of k on tiles, one TDPBF16PS sum after another
 * in k order from zero, rounded to bfloat16 (nearest even). No per-block partial is stored and scaled:
 * 0.72-0.74x the time of amx_block's sums at 512 rows of the bundled model's four shapes (2-core AMX
 * Xeon). Other bits than amx_block's, the same at every row count. Returns nonzero when out of memory. */
static int amx_long_rows(const uint16_t *a, int64_t m, int64_t lda, const uint8_t *codes, const float *scales,
                         int64_t pairs, int64_t block_pairs, __m512i table, uint16_t *c, int64_t ldc) {
    if (m <= 0) return 0;
    const size_t decoded = (size_t)pairs * 2 * COLS * sizeof(uint16_t);
    uint8_t *buffer = scratch(decoded + 2 * AMX_FEW * COLS * sizeof(float));
    if (!buffer) return 1;
    uint16_t *b = (uint16_t *)buffer;
    float *acc = (float *)(buffer + decoded);
    amx_decode_dequantized(codes, pairs, block_pairs, scales, table, b);
    for (int64_t r0 = 0; r0 < m; r0 += 2 * AMX_FEW) {
        const int rows = m - r0 < 2 * AMX_FEW ? (int)(m - r0) : 2 * AMX_FEW;
        const int rows0 = rows < AMX_FEW ? rows : AMX_FEW, rows1 = rows - rows0;
        if (r0 == 0 || rows < 2 * AMX_FEW) amx_config(rows0, rows1 ? rows1 : 1);
        const uint16_t *a0 = a + r0 * lda;
        amx_rows_block(b, a0, a0 + AMX_FEW * lda, pairs / 16, lda * 2, rows1, acc);
        amx_store(acc, rows, c + r0 * ldc, ldc);
    }
    return 0;
}

/* Column blocks per call on tiles: up to AMX_GROUP where m is few (one configuration and a decode
 * pipeline for several blocks: measured 1.64x -> 1.31x AVX-512's time at one row on two threads),
 * but at least four calls per thread to share out (16 threads: one block a call). */
static inline int64_t amx_group(int64_t m, int64_t num_blocks) {
    if (m > AMX_FEW) return 1;
    const int64_t group = num_blocks / (4 * (int64_t)omp_get_max_threads());
    return group < 1 ? 1 : group > AMX_GROUP ? AMX_GROUP : group;
}

/* Whether a product of this quantization block size can run on tiles (whole k tiles per block). */
static inline int amx_fits(int64_t blocksize) { return use_amx && blocksize % 32 == 0; }

/* 1: products run on AMX tiles from now on, 0: with AVX-512; returns the state, 0 where Linux refuses
 * this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once). */
int64_t gemm_set_amx(int64_t on) {
    static int permitted = -1;
    if (on && permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    use_amx = on && permitted > 0;
    return use_amx;
}
#else
/* -1: built without AMX (this CPU has none, or the compiler does not know it). */
int64_t gemm_set_amx(int64_t on) { (void)on; return -1; }
#endif

/* Column blocks per group: up to FEW_ROWS rows NF4_COLS at a time, more rows one; on AMX tiles,
 * amx_group's (num_blocks: how many the product shares out). */
static int64_t nf4_group_size(const Nf4 *p, int64_t num_blocks) {
#ifdef GEMM_AMX
    if (amx_fits(p->blocksize)) return amx_group(p->m, num_blocks);
#else
    (void)num_blocks;
#endif
    return p->m > FEW_ROWS ? 1 : NF4_COLS;
}

/* Column blocks first .. first + count - 1 of the product, count at most the group size: more rows
 * in half-block tiles, on AMX tiles one block at a time. Returns nonzero when out of memory. */
static int nf4_blocks(const Nf4 *p, int64_t first, int64_t count) {
    __m512i table = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p->code_values));
    table = _mm512_inserti64x4(table, _mm256_loadu_si256((const __m256i *)p->code_values), 1);
    const int64_t pairs = p->k / 2, block_pairs = p->blocksize / 2, blocks = p->k / p->blocksize;
#ifdef GEMM_AMX
    if (amx_fits(p->blocksize)) {
        float *scales = grown(&scale_buffer, &scale_buffer_size, (size_t)blocks * COLS * sizeof(float));
        if (!scales) return 1;
        int failed = 0;
        for (int64_t j = first; j < first + count; j++) {
            block_scales(p->absmax, p->n, j * COLS, blocks, scales);
            uint16_t *c = NULL;
            int64_t ldc = 0;
            block_output(j, p->parts, p->part_cols, p->part_c, &c, &ldc);
            const uint8_t *codes = p->codes + j * pairs * COLS;
            const int64_t long_rows = p->long_rows < 0 ? 0 : p->long_rows > p->m ? p->m : p->long_rows;
            failed |= amx_long_rows(p->a, long_rows, p->lda, codes, scales, pairs, block_pairs, table, c, ldc);
            failed |= amx_block(p->a + long_rows * p->lda, p->m - long_rows, p->lda, codes, scales, pairs, block_pairs,
                                table, c + long_rows * ldc, ldc, 0, j == first || long_rows > 0);
        }
        return failed;
    }
#endif
    float *scales = scratch((size_t)count * blocks * COLS * sizeof(float));
    if (!scales) return 1;
    uint16_t *c[NF4_COLS];
    int64_t ldc[NF4_COLS];
    for (int64_t j = 0; j < count; j++) {
        block_scales(p->absmax, p->n, (first + j) * COLS, blocks, scales + j * blocks * COLS);
        block_output(first + j, p->parts, p->part_cols, p->part_c, &c[j], &ldc[j]);
    }
    quant_group(p->a, p->m, p->lda, p->codes + first * pairs * COLS, scales, count, blocks, pairs, block_pairs, table,
                c, ldc, 0);
    return 0;
}

/* How many groups of column blocks gemm_nf4_group shares a product out in. */
int64_t gemm_nf4_groups(const Nf4 *p) {
    const int64_t num_blocks = p->n / COLS, group = nf4_group_size(p, num_blocks);
    return (num_blocks + group - 1) / group;
}

/* Group g of the product. Returns nonzero when out of memory. */
int gemm_nf4_group(const Nf4 *p, int64_t g) {
    const int64_t num_blocks = p->n / COLS, group = nf4_group_size(p, num_blocks), first = g * group;
    return nf4_blocks(p, first, num_blocks - first < group ? num_blocks - first : group);
}

/* Each thread's gate and up values of a group's column blocks (the silu product's). */
static __thread void *silu_buffer;
static __thread size_t silu_buffer_size;

/* The gated MLP's product and silu: parts gate and up of equal widths, then gate = silu(gate) * up
 * (silu.h's: fused.c's silu_mul_bf16 arithmetic). A group's column blocks of gate and the same of up
 * go to a compact buffer of the thread's, then silu * up from there into gate: the bits of
 * gemm_nf4_bf16 followed by silu_mul_bf16, with neither a pass over the step's gate and up values
 * from memory nor up written at all (its part is left as it was). Silu over the blocks in place
 * instead read rows 3 KB apart, which L1 maps to a few sets: slower than the two calls from 128 rows.
 * Returns -2 for other parts, else gemm_nf4_bf16's status. */
int gemm_nf4_silu_bf16(const uint16_t *a, const uint8_t *codes, const uint16_t *absmax, const uint16_t *code_values,
                       int64_t m, int64_t n, int64_t k, int64_t blocksize, int64_t lda, int64_t parts,
                       const int64_t *part_cols, uint16_t *const *part_c, int64_t long_rows) {
    if (parts != 2 || part_cols[0] != part_cols[1] || part_cols[0] % COLS != 0 || n != 2 * part_cols[0]) return -2;
    const int64_t width = part_cols[0], half = width / COLS;
    const Nf4 whole = {a, codes, absmax, code_values, m, n, k, blocksize, lda, parts, part_cols, part_c, long_rows};
    const int64_t group = nf4_group_size(&whole, half), groups = (half + group - 1) / group;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : failed)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t first = g * group, count = half - first < group ? half - first : group, wide = count * COLS;
        uint16_t *values = grown(&silu_buffer, &silu_buffer_size, (size_t)2 * m * wide * sizeof(uint16_t));
        if (!values) {
            failed = 1;
            continue;
        }
        /* the product's columns as three parts: before the group's, the group's (to the buffer), after */
        int status = 0;
        for (int h = 0; h < 2; h++) {
            const int64_t before = h * width + first * COLS;
            const int64_t cols[3] = {before, wide, n - before - wide};
            uint16_t *outs[3] = {NULL, values + h * m * wide, NULL};
            const Nf4 p = {a, codes, absmax, code_values, m, n, k, blocksize, lda, 3, cols, outs, long_rows};
            status |= nf4_blocks(&p, h * half + first, count);
        }
        if (status == 0)
            for (int64_t r = 0; r < m; r++)
                (r < long_rows ? silu_mul_run_long : silu_mul_run)(part_c[0] + r * width + first * COLS, values + r * wide,
                                                                   values + (m + r) * wide, wide);
        failed |= status;
    }
    return failed;
}
int gemm_nf4_silu_supported(void) { return GENRPC_VECTOR512 == 16; }
#define GEMM_SILU 1

/* [parts of c][m, n] = a[m, k] @ W.T for nf4 W [n, k] in bitsandbytes' CPU packing (codes: [n / 32][k / 2][32]
 * bytes), absmax [k / blocksize][n] bfloat16, code_values: the 16 code values as bfloat16. a's rows
 * are lda apart. The n output columns go to `parts` tensors, part p taking the next part_cols[p]
 * (several layers' weights side by side, one product for all: q, k and v; gate and up). n and each
 * part % 32 == 0, k % blocksize == 0, blocksize even. Returns nonzero when out of memory. */
int gemm_nf4_bf16(const uint16_t *a, const uint8_t *codes, const uint16_t *absmax, const uint16_t *code_values,
                  int64_t m, int64_t n, int64_t k, int64_t blocksize, int64_t lda, int64_t parts,
                  const int64_t *part_cols, uint16_t *const *part_c, int64_t long_rows) {
    const Nf4 p = {a, codes, absmax, code_values, m, n, k, blocksize, lda, parts, part_cols, part_c, long_rows};
    const int64_t groups = gemm_nf4_groups(&p);
    int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : failed)
    for (int64_t g = 0; g < groups; g++) failed |= gemm_nf4_group(&p, g);
    return failed;
}

/* Its tiles are chosen by row count alone (FEW_ROWS): no direct path to set. */
int64_t gemm_set_direct_rows(int64_t kind, int64_t rows) { return -1; }
const char *gemm_isa(void) { return "avx512-bf16"; }
int gemm_int8_supported(void) { return 1; }

/* c[m, n] = a[m, k] @ W.T for int8 W (codes [n / 32][k][32], column block after column block, each
 * input's 32 columns side by side; float32 scales [n / 32][k / blocksize][32]; n % 32 == 0, k % blocksize
 * == 0, blocksize even): the nf4 product's tiles, each pair's codes decoded in registers by
 * int8_half_pair; the AVX2 build's sums, term for term. (Decoding a column block once into a bfloat16
 * panel for all rows, as the AVX2 build does in float32, measured slower at every row count: 1.3-1.5x
 * the bfloat16 product's time at 4-64 rows against 1.1-1.2x in registers; the panel is twice the
 * bfloat16 weight's traffic through L2.) */
int gemm_int8_bf16(const uint16_t *a, const int8_t *codes, const float *scales, int64_t m, int64_t n, int64_t k,
                   int64_t blocksize, int64_t lda, uint16_t *c, int64_t ldc) {
    const int64_t pairs = k / 2, block_pairs = blocksize / 2, blocks = k / blocksize, num_blocks = n / COLS;
#ifdef GEMM_AMX
    if (amx_fits(blocksize)) {
        const int64_t group = amx_group(m, num_blocks), groups = (num_blocks + group - 1) / group;
        int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : failed)
        for (int64_t g = 0; g < groups; g++)
            for (int64_t j = g * group; j < (g + 1) * group && j < num_blocks; j++)
                failed |= amx_block(a, m, lda, (const uint8_t *)codes + j * k * COLS, scales + j * blocks * COLS, pairs,
                                    block_pairs, _mm512_setzero_si512(), c + j * COLS, ldc, 1, j == g * group);
        return failed;
    }
#endif
    const int64_t group = m > FEW_ROWS ? 1 : NF4_COLS, groups = (num_blocks + group - 1) / group;
#pragma omp parallel for schedule(dynamic)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t first = g * group, cols = num_blocks - first < group ? num_blocks - first : group;
        uint16_t *out[NF4_COLS];
        int64_t ldcs[NF4_COLS];
        for (int64_t j = 0; j < cols; j++) {
            out[j] = c + (first + j) * COLS;
            ldcs[j] = ldc;
        }
        quant_group(a, m, lda, (const uint8_t *)codes + first * k * COLS, scales + first * blocks * COLS, cols,
                    blocks, pairs, block_pairs, _mm512_setzero_si512(), out, ldcs, 1);
    }
    return 0;
}

/* c[m, n] = a[m, k] @ W.T for a bfloat16 W packed by pack_bf16 ([n / 32][k / 2][32][2]). */
int gemm_packed_bf16(const uint16_t *a, const uint16_t *packed, uint16_t *c, int64_t m, int64_t n, int64_t k,
                     int64_t lda, int64_t ldc) {
#pragma omp parallel for schedule(dynamic, 8)
    for (int64_t block = 0; block < n / COLS; block++)
        dense_rows(a, m, lda, packed + block * k * COLS, k / 2, c + block * COLS, ldc);
    return 0;
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* Without AVX-512 BF16: the same sums in float32 with FMA, emulating VDPBF16PS as Intel documents it
 * (each lane: acc += x[k + 1] * w[k + 1], rounded, then acc += x[k] * w[k], rounded; a product of two
 * bfloat16 values is exact in float32, so one FMA is each step) and VCVTNEPS2BF16's rounding (to
 * nearest even). Denormals are kept (the instruction flushes them), so the bits are the AVX-512
 * kernel's except where a sum passes through a denormal. A column block takes one of two ways, by row
 * count (the threshold measured per CPU, below): straight from the codes (nf4: a byte shuffle per
 * half-byte), one or two rows two blocks or two rows a pass, more rows in tiles of up to five over
 * half a block, each pair's codes decoded in registers once per tile (half_tile); or through a
 * float32 panel ([pair][4 column vectors][odd, even][8]) decoded once per call and read by every row
 * tile, which many rows amortize. The sums, and so the bits, are the same either way. */
#define LANES 8 /* float32 lanes of a vector */
#define VECS (COLS / LANES) /* column vectors per block */
#define TILE_ROWS 5 /* rows per tile of two column vectors: 10 sums, 2 weights, 1 input in 16 registers */

int gemm_supported(void) { return 1; }

/* The bfloat16 values of 32 nf4 codes (code indices in the low half of each byte of q, a pair's low or
 * high nibbles) by two byte shuffles of the code values' low and high bytes: each 32-bit lane of w[0]
 * holds a column's (even input, odd input) pair for columns {0-3, 8-11} of the 16, w[1] for {4-7, 12-15}. */
static inline __attribute__((always_inline)) void nf4_words(__m256i q, __m256i table_lo, __m256i table_hi,
                                                            __m256i *w) {
    const __m256i lo = _mm256_shuffle_epi8(table_lo, q), hi = _mm256_shuffle_epi8(table_hi, q);
    w[0] = _mm256_unpacklo_epi8(lo, hi);
    w[1] = _mm256_unpackhi_epi8(lo, hi);
}

/* One nf4 column block (`pairs` pairs of 32 bytes) to its float32 panel, decoded by nf4_words, whose
 * vectors hold columns {0-3, 8-11}, {4-7, 12-15}, {16-19, 24-27}, {20-23, 28-31}, so each
 * 128-bit half goes to its column vector's place (the stores are 128 bits wide on some CPUs anyway;
 * a lane-crossing permute is slow on others). */
static void nf4_panel(const uint8_t *codes, int64_t pairs, __m256i table_lo, __m256i table_hi, float *panel) {
    const __m256i nibble = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t p = 0; p < pairs; p++) {
        float *out = panel + p * VECS * 2 * LANES;
        const __m256i y = _mm256_loadu_si256((const __m256i *)(codes + p * COLS));
        const __m256i q[2] = {_mm256_and_si256(y, nibble), _mm256_and_si256(_mm256_srli_epi16(y, 4), nibble)};
        for (int half = 0; half < 2; half++) {
            __m256i w[2];
            nf4_words(q[half], table_lo, table_hi, w);
            float *v0 = out + 2 * (2 * half) * LANES, *v1 = out + 2 * (2 * half + 1) * LANES; /* columns 16h.., 16h + 8.. */
            for (int j = 0; j < 2; j++) { /* w[j]: columns 16h + 4j.. (low half), 16h + 8 + 4j.. (high half) */
                const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(w[j], high));
                const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(w[j], 16));
                _mm_storeu_ps(v0 + 4 * j, _mm256_castps256_ps128(odd));
                _mm_storeu_ps(v0 + LANES + 4 * j, _mm256_castps256_ps128(even));
                _mm_storeu_ps(v1 + 4 * j, _mm256_extractf128_ps(odd, 1));
                _mm_storeu_ps(v1 + LANES + 4 * j, _mm256_extractf128_ps(even, 1));
            }
        }
    }
}

/* One packed bfloat16 column block ([pairs][32][2]) to its float32 panel. */
static void dense_panel(const uint16_t *block, int64_t pairs, float *panel) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t p = 0; p < pairs; p++)
        for (int v = 0; v < VECS; v++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(block + (p * COLS + v * LANES) * 2));
            float *out = panel + (p * VECS + v) * 2 * LANES;
            _mm256_storeu_ps(out, _mm256_castsi256_ps(_mm256_and_si256(w, high)));
            _mm256_storeu_ps(out + LANES, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        }
}

/* float32 to bfloat16, to nearest even (VCVTNEPS2BF16 on numbers), 8 lanes. */
static inline void store_bf16(uint16_t *c, __m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
    _mm_storeu_si128((__m128i *)c, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

/* `rows` rows (float32, lda apart) times `vecs` column vectors from v0 of a block's panel: per
 * quantization block, a partial sum in pair order, then sum += partial * scale (scales: NULL for a
 * dense weight, whose one partial is the sum). */
static inline __attribute__((always_inline)) void tile(const float *a, int64_t lda, const float *panel, int64_t pairs,
                                                       int64_t block_pairs, const float *scales, int v0,
                                                       uint16_t *c, int64_t ldc, const int rows, const int vecs) {
    __m256 acc[TILE_ROWS * VECS], part[TILE_ROWS * VECS];
    for (int i = 0; i < rows * vecs; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t p0 = 0; p0 < pairs; p0 += block_pairs) {
        for (int i = 0; i < rows * vecs; i++) part[i] = _mm256_setzero_ps();
        for (int64_t p = p0; p < p0 + block_pairs; p++) {
            const float *w = panel + (p * VECS + v0) * 2 * LANES;
            for (int r = 0; r < rows; r++) {
                const __m256 odd = _mm256_broadcast_ss(a + r * lda + 2 * p + 1);
                for (int v = 0; v < vecs; v++)
                    part[r * vecs + v] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(w + 2 * v * LANES), part[r * vecs + v]);
                const __m256 even = _mm256_broadcast_ss(a + r * lda + 2 * p);
                for (int v = 0; v < vecs; v++)
                    part[r * vecs + v] = _mm256_fmadd_ps(even, _mm256_loadu_ps(w + (2 * v + 1) * LANES), part[r * vecs + v]);
            }
        }
        if (!scales) {
            for (int i = 0; i < rows * vecs; i++) acc[i] = part[i];
            continue;
        }
        for (int v = 0; v < vecs; v++) {
            const __m256 s = _mm256_loadu_ps(scales + (p0 / block_pairs) * COLS + (v0 + v) * LANES);
            for (int r = 0; r < rows; r++) acc[r * vecs + v] = _mm256_fmadd_ps(part[r * vecs + v], s, acc[r * vecs + v]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < vecs; v++) store_bf16(c + r * ldc + (v0 + v) * LANES, acc[r * vecs + v]);
}

/* All m rows times one block from its panel: one or two rows take the four column vectors at once
 * (independent sums for the FMA latency), more rows tiles of up to TILE_ROWS rows, two vectors each. */
static void panel_rows(const float *a, int64_t m, int64_t lda, const float *panel, int64_t pairs, int64_t block_pairs,
                       const float *scales, uint16_t *c, int64_t ldc) {
    if (m <= 2) {
        if (m == 1) tile(a, lda, panel, pairs, block_pairs, scales, 0, c, ldc, 1, VECS);
        else tile(a, lda, panel, pairs, block_pairs, scales, 0, c, ldc, 2, VECS);
        return;
    }
    const int64_t tiles = (m + TILE_ROWS - 1) / TILE_ROWS;
    for (int64_t t = 0, r = 0; t < tiles; t++) {
        const int64_t rows = m / tiles + (t < m % tiles);
        for (int v0 = 0; v0 < VECS; v0 += 2) {
            switch (rows) {
#define TILE(n) \
    case n: tile(a + r * lda, lda, panel, pairs, block_pairs, scales, v0, c + r * ldc, ldc, n, 2); break;
                TILE(1) TILE(2) TILE(3) TILE(4) TILE(5)
#undef TILE
            default: break;
            }
        }
        r += rows;
    }
}

#define DIRECT_ROWS 2 /* the direct way's row threshold until the runner sets a measured one */

/* Products of at most this many rows read the weights directly instead of through a panel: where the
 * crossover lies differs between CPUs, so the runner measures it (kernel_choice.py) and sets it; until
 * then, two. Per weight kind: [0] nf4, [1] dense, [2] int8. */
static int64_t direct_rows[3] = {DIRECT_ROWS, DIRECT_ROWS, DIRECT_ROWS};

int64_t gemm_set_amx(int64_t on) { (void)on; return -1; }
int64_t gemm_set_direct_rows(int64_t kind, int64_t rows) {
    if (kind < 0 || kind > 2 || rows < 0) return -1;
    direct_rows[kind] = rows;
    return rows;
}

const char *gemm_isa(void) { return "avx2"; }

/* Natural column order (0-7, 8-15, 16-23, 24-31) from the direct nf4 path's vectors, which hold
 * columns {0-3, 8-11}, {4-7, 12-15}, {16-19, 24-27}, {20-23, 28-31}; and back, for the scales. */
static inline void to_natural(const __m256 *v, __m256 *out) {
    out[0] = _mm256_permute2f128_ps(v[0], v[1], 0x20);
    out[1] = _mm256_permute2f128_ps(v[0], v[1], 0x31);
    out[2] = _mm256_permute2f128_ps(v[2], v[3], 0x20);
    out[3] = _mm256_permute2f128_ps(v[2], v[3], 0x31);
}

/* One input pair's terms of four column vectors' sums, `tile`'s arithmetic: x points at the row's
 * (even, odd) inputs; each 32-bit lane of w holds a column's (even input, odd input) bfloat16 pair.
 * The odd term first, then the even one, as VDPBF16PS. */
static inline __attribute__((always_inline)) void pair_sums(const float *x, const __m256i *w, __m256 *sums) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256 odd = _mm256_broadcast_ss(x + 1);
    for (int v = 0; v < VECS; v++)
        sums[v] = _mm256_fmadd_ps(odd, _mm256_castsi256_ps(_mm256_and_si256(w[v], high)), sums[v]);
    const __m256 even = _mm256_broadcast_ss(x);
    for (int v = 0; v < VECS; v++)
        sums[v] = _mm256_fmadd_ps(even, _mm256_castsi256_ps(_mm256_slli_epi32(w[v], 16)), sums[v]);
}

/* One row times one or two nf4 column blocks, or two rows times one, straight from the codes. Byte j
 * of a pair holds column j / 2's code (low half) and column 16 + j / 2's (high half) for input
 * k + j % 2. Two byte shuffles give each code's bfloat16 value as a low and a high byte; interleaved,
 * each 32-bit lane holds one column's (even input, odd input) pair, whose float32 values are a shift
 * and a mask away. The columns come out in the order to_natural undoes; the sums are `tile`'s, term
 * for term. Each column's sum is a chain of dependent FMAs, so one row of one block (four chains)
 * waits on their latency: two blocks or two rows give eight chains to interleave. */
static inline __attribute__((always_inline)) void nf4_direct(const float *a, int64_t lda, const uint8_t *const *codes,
                                                             int64_t pairs, int64_t block_pairs,
                                                             const float *const *scales, __m256i table_lo,
                                                             __m256i table_hi, uint16_t *const *c, int64_t ldc,
                                                             const int rows, const int nblocks) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const int groups = rows * nblocks; /* (row, block) pairs: at most two */
    __m256 acc[2 * VECS], part[2 * VECS];
    for (int i = 0; i < groups * VECS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t p0 = 0; p0 < pairs; p0 += block_pairs) {
        for (int i = 0; i < groups * VECS; i++) part[i] = _mm256_setzero_ps();
        for (int64_t p = p0; p < p0 + block_pairs; p++) {
            for (int blk = 0; blk < nblocks; blk++) {
                const __m256i y = _mm256_loadu_si256((const __m256i *)(codes[blk] + p * COLS));
                __m256i w[VECS];
                nf4_words(_mm256_and_si256(y, nibble), table_lo, table_hi, w);
                nf4_words(_mm256_and_si256(_mm256_srli_epi16(y, 4), nibble), table_lo, table_hi, w + 2);
                for (int r = 0; r < rows; r++) /* group blk + r: one of the two is 0 */
                    pair_sums(a + r * lda + 2 * p, w, part + (blk + r) * VECS);
            }
        }
        for (int g = 0; g < groups; g++) {
            const float *block = scales[nblocks == 1 ? 0 : g] + (p0 / block_pairs) * COLS;
            const __m256 natural[VECS] = {_mm256_loadu_ps(block), _mm256_loadu_ps(block + 8),
                                          _mm256_loadu_ps(block + 16), _mm256_loadu_ps(block + 24)};
            __m256 s[VECS];
            to_natural(natural, s); /* the same pairing of halves maps natural order to the vectors' */
            for (int v = 0; v < VECS; v++) acc[g * VECS + v] = _mm256_fmadd_ps(part[g * VECS + v], s[v], acc[g * VECS + v]);
        }
    }
    for (int g = 0; g < groups; g++) {
        __m256 out[VECS];
        to_natural(acc + g * VECS, out);
        uint16_t *dst = nblocks == 1 ? c[0] + g * ldc : c[g];
        for (int v = 0; v < VECS; v++) store_bf16(dst + v * LANES, out[v]);
    }
}

/* One row times one or two packed bfloat16 column blocks, or two rows times one, straight from the
 * weights: each 32-bit lane holds a column's (even input, odd input) pair. The sums are `tile`'s for a
 * dense weight; two blocks or rows interleave eight FMA chains, as nf4_direct. */
static inline __attribute__((always_inline)) void dense_direct(const float *a, int64_t lda,
                                                               const uint16_t *const *blocks, int64_t pairs,
                                                               uint16_t *const *c, int64_t ldc, const int rows,
                                                               const int nblocks) {
    const int groups = rows * nblocks;
    __m256 part[2 * VECS];
    for (int i = 0; i < groups * VECS; i++) part[i] = _mm256_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        for (int blk = 0; blk < nblocks; blk++) {
            __m256i w[VECS];
            for (int v = 0; v < VECS; v++)
                w[v] = _mm256_loadu_si256((const __m256i *)(blocks[blk] + (p * COLS + v * LANES) * 2));
            for (int r = 0; r < rows; r++) pair_sums(a + r * lda + 2 * p, w, part + (blk + r) * VECS);
        }
    }
    for (int g = 0; g < groups; g++) {
        uint16_t *dst = nblocks == 1 ? c[0] + g * ldc : c[g];
        for (int v = 0; v < VECS; v++) store_bf16(dst + v * LANES, part[g * VECS + v]);
    }
}

/* a [m, k] bfloat16 (rows lda apart) as float32 [m, k], in the calling thread's second buffer. */
static __thread void *rows_buffer;
static __thread size_t rows_buffer_size;

static float *float_rows(const uint16_t *a, int64_t m, int64_t k, int64_t lda) {
    float *rows = grown(&rows_buffer, &rows_buffer_size, (size_t)m * k * sizeof(float));
    if (!rows) return NULL;
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < k; i++) {
            const uint32_t bits = (uint32_t)a[r * lda + i] << 16;
            memcpy(rows + r * k + i, &bits, sizeof bits);
        }
    return rows;
}

/* An int8 column block's codes ([k][32], see gemm_int8_bf16 below): 8 of them as float32. */
static inline __attribute__((always_inline)) __m256 int8_vector(const int8_t *codes) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)codes)));
}

/* `rows` rows times one half (16 columns) of a column block, straight from its codes: each input pair's
 * 32 weights of the half decoded in registers once, then multiplied into every row of the tile (the
 * sums of `tile`, term for term: the same bits at any row count). nf4 (int8 == 0): codes as
 * gemm_nf4_bf16's, the half's columns their low (half 0) or high (half 1) nibbles, decoded by nf4_words
 * into its column order, which to_natural's pairing of halves maps to and from natural order
 * (the scales on the way in, the sums on the way out). int8: codes [k][32], natural order. Decoding
 * once per tile of rows rather than once per pair of rows (nf4_direct), and in registers rather than
 * through a block's panel in memory, measured faster from 3 rows to ~16 (docs/measurements.md). */
static inline __attribute__((always_inline)) void half_tile(const float *a, int64_t lda, const uint8_t *codes,
                                                            int64_t pairs, int64_t block_pairs, const float *scales,
                                                            __m256i table_lo, __m256i table_hi, const int int8,
                                                            const int half, uint16_t *c, int64_t ldc, const int rows) {
    const __m256i nibble = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[TILE_ROWS * 2], part[TILE_ROWS * 2];
    for (int i = 0; i < rows * 2; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t p0 = 0; p0 < pairs; p0 += block_pairs) {
        for (int i = 0; i < rows * 2; i++) part[i] = _mm256_setzero_ps();
        for (int64_t p = p0; p < p0 + block_pairs; p++) {
            __m256 odd[2], even[2];
            if (int8) {
                const int8_t *pair = (const int8_t *)codes + 2 * p * COLS + 16 * half;
                for (int v = 0; v < 2; v++) {
                    odd[v] = int8_vector(pair + COLS + v * LANES);
                    even[v] = int8_vector(pair + v * LANES);
                }
            } else {
                const __m256i y = _mm256_loadu_si256((const __m256i *)(codes + p * COLS));
                const __m256i q = _mm256_and_si256(half ? _mm256_srli_epi16(y, 4) : y, nibble);
                __m256i w[2];
                nf4_words(q, table_lo, table_hi, w);
                for (int v = 0; v < 2; v++) {
                    odd[v] = _mm256_castsi256_ps(_mm256_and_si256(w[v], high));
                    even[v] = _mm256_castsi256_ps(_mm256_slli_epi32(w[v], 16));
                }
            }
            for (int r = 0; r < rows; r++) { /* each input broadcast once for both vectors */
                const __m256 xo = _mm256_broadcast_ss(a + r * lda + 2 * p + 1);
                part[r * 2] = _mm256_fmadd_ps(xo, odd[0], part[r * 2]);
                part[r * 2 + 1] = _mm256_fmadd_ps(xo, odd[1], part[r * 2 + 1]);
                const __m256 xe = _mm256_broadcast_ss(a + r * lda + 2 * p);
                part[r * 2] = _mm256_fmadd_ps(xe, even[0], part[r * 2]);
                part[r * 2 + 1] = _mm256_fmadd_ps(xe, even[1], part[r * 2 + 1]);
            }
        }
        const float *block = scales + (p0 / block_pairs) * COLS + 16 * half;
        const __m256 n0 = _mm256_loadu_ps(block), n1 = _mm256_loadu_ps(block + LANES);
        const __m256 s[2] = {int8 ? n0 : _mm256_permute2f128_ps(n0, n1, 0x20),
                             int8 ? n1 : _mm256_permute2f128_ps(n0, n1, 0x31)};
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < 2; v++) acc[r * 2 + v] = _mm256_fmadd_ps(part[r * 2 + v], s[v], acc[r * 2 + v]);
    }
    for (int r = 0; r < rows; r++) {
        const __m256 a0 = acc[r * 2], a1 = acc[r * 2 + 1];
        store_bf16(c + r * ldc + 16 * half, int8 ? a0 : _mm256_permute2f128_ps(a0, a1, 0x20));
        store_bf16(c + r * ldc + 16 * half + LANES, int8 ? a1 : _mm256_permute2f128_ps(a0, a1, 0x31));
    }
}

/* All m rows times one column block by half_tile: tiles of up to TILE_ROWS rows, as even as they go. */
static void half_tiles(const float *a, int64_t m, int64_t lda, const uint8_t *codes, int64_t pairs,
                       int64_t block_pairs, const float *scales, __m256i table_lo, __m256i table_hi, const int int8,
                       uint16_t *c, int64_t ldc) {
    const int64_t tiles = (m + TILE_ROWS - 1) / TILE_ROWS;
    for (int64_t t = 0, r = 0; t < tiles; t++) {
        const int64_t rows = m / tiles + (t < m % tiles);
        for (int half = 0; half < 2; half++) {
            switch (rows) {
#define HALF(n) \
    case n: half_tile(a + r * lda, lda, codes, pairs, block_pairs, scales, table_lo, table_hi, int8, half, c + r * ldc, ldc, n); break;
                HALF(1) HALF(2) HALF(3) HALF(4) HALF(5)
#undef HALF
            default: break;
            }
        }
        r += rows;
    }
}

/* No groups to share out: this build's product converts its rows once a call (gemm_nf4_bf16), and
 * run a group at a time it measured slower. */
int64_t gemm_nf4_groups(const Nf4 *p) { (void)p; return -1; }
int gemm_nf4_group(const Nf4 *p, int64_t g) { (void)p; (void)g; return 1; }

/* As the AVX-512 BF16 version (above): the same arguments and layout, the same bits up to denormals. */
int gemm_nf4_bf16(const uint16_t *a, const uint8_t *codes, const uint16_t *absmax, const uint16_t *code_values,
                  int64_t m, int64_t n, int64_t k, int64_t blocksize, int64_t lda, int64_t parts,
                  const int64_t *part_cols, uint16_t *const *part_c, int64_t long_rows) {
    (void)long_rows; /* no tiles: long prompts' rows are summed as the others */
    uint8_t bytes_lo[16], bytes_hi[16]; /* the code values' low and high bytes, for the byte shuffles */
    for (int i = 0; i < 16; i++) {
        bytes_lo[i] = (uint8_t)(code_values[i] & 0xFF);
        bytes_hi[i] = (uint8_t)(code_values[i] >> 8);
    }
    const __m256i table_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bytes_lo));
    const __m256i table_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bytes_hi));
    const int64_t pairs = k / 2, block_pairs = blocksize / 2, blocks = k / blocksize, num_blocks = n / COLS;
    const int direct = m <= direct_rows[0];
    const float *x = float_rows(a, m, k, lda);
    if (!x) return 1;
    int failed = 0;
    /* One row: two column blocks a pass (their FMA chains interleave); else one block a pass. */
    const int64_t step = direct && m == 1 ? 2 : 1;
#pragma omp parallel for schedule(dynamic) reduction(| : failed)
    for (int64_t b0 = 0; b0 < num_blocks; b0 += step) {
        const int nblocks = b0 + step <= num_blocks ? (int)step : 1;
        const size_t panel = direct ? 0 : (size_t)pairs * VECS * 2 * LANES;
        float *buffer = scratch((panel + (size_t)nblocks * blocks * COLS) * sizeof(float));
        if (!buffer) {
            failed = 1;
            continue;
        }
        const float *scales[2];
        const uint8_t *block[2];
        uint16_t *c[2];
        int64_t ldc = 0;
        for (int blk = 0; blk < nblocks; blk++) {
            const int64_t b = b0 + blk;
            float *own = buffer + panel + blk * blocks * COLS;
            for (int64_t kb = 0; kb < blocks; kb++)
                for (int i = 0; i < COLS; i++) {
                    const uint32_t bits = (uint32_t)absmax[kb * n + b * COLS + i] << 16;
                    memcpy(&own[kb * COLS + i], &bits, sizeof bits);
                }
            scales[blk] = own;
            block[blk] = codes + b * pairs * COLS;
            block_output(b, parts, part_cols, part_c, &c[blk], &ldc);
        }
        if (nblocks == 2) { /* one row: each block's output where its part puts it, no stride needed */
            nf4_direct(x, k, block, pairs, block_pairs, scales, table_lo, table_hi, c, 0, 1, 2);
        } else if (direct && m > 2) {
            half_tiles(x, m, k, block[0], pairs, block_pairs, scales[0], table_lo, table_hi, 0, c[0], ldc);
        } else if (direct) {
            for (int64_t r = 0; r < m; r += 2) {
                uint16_t *out[1] = {c[0] + r * ldc};
                if (m - r == 1) nf4_direct(x + r * k, k, block, pairs, block_pairs, scales, table_lo, table_hi, out, ldc, 1, 1);
                else nf4_direct(x + r * k, k, block, pairs, block_pairs, scales, table_lo, table_hi, out, ldc, 2, 1);
            }
        } else {
            nf4_panel(block[0], pairs, table_lo, table_hi, buffer);
            panel_rows(x, m, k, buffer, pairs, block_pairs, scales[0], c[0], ldc);
        }
    }
    return failed;
}

int gemm_packed_bf16(const uint16_t *a, const uint16_t *packed, uint16_t *c, int64_t m, int64_t n, int64_t k,
                     int64_t lda, int64_t ldc) {
    const int64_t pairs = k / 2;
    const float *x = float_rows(a, m, k, lda);
    if (!x) return 1;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 8) reduction(| : failed)
    for (int64_t b = 0; b < n / COLS; b++) {
        if (m <= direct_rows[1]) {
            const uint16_t *blocks[2] = {packed + b * k * COLS, packed + (b + 1) * k * COLS};
            if (m == 1 && b % 2 == 0 && b + 1 < n / COLS) { /* two blocks a pass (see nf4_direct) */
                uint16_t *out[2] = {c + b * COLS, c + (b + 1) * COLS};
                dense_direct(x, k, blocks, pairs, out, ldc, 1, 2);
            } else if (m == 1 && b % 2 == 1) {
                continue; /* done with the block before it (an even last block goes alone) */
            } else {
                for (int64_t r = 0; r < m; r += 2) {
                    uint16_t *out[1] = {c + r * ldc + b * COLS};
                    if (m - r == 1) dense_direct(x + r * k, k, blocks, pairs, out, ldc, 1, 1);
                    else dense_direct(x + r * k, k, blocks, pairs, out, ldc, 2, 1);
                }
            }
            continue;
        }
        float *panel = scratch((size_t)pairs * VECS * 2 * LANES * sizeof(float));
        if (!panel) {
            failed = 1;
            continue;
        }
        dense_panel(packed + b * k * COLS, pairs, panel);
        panel_rows(x, m, k, panel, pairs, pairs, NULL, c + b * COLS, ldc);
    }
    return failed;
}


/* int8 weights with a float32 scale per block of inputs and column (the output layer, --output-layer
 * int8): codes [n / 32][k][32], column block after column block, each input's 32 columns side by side;
 * scales [n / 32][k / blocksize][32]. A code is exact in float32, so is its product with a bfloat16
 * input: per block of inputs, a float32 partial sum pair after pair, the odd input first (as the
 * panel's `tile`), then sum += partial * scale. Half the bfloat16 weight's bytes, which one stream's
 * step reads from memory every token. */
#define INT8_AHEAD 2048 /* bytes of int8 codes prefetched ahead */

/* One int8 column block ([k][32] codes) to its float32 panel ([pair][4 column vectors][odd, even][8]). */
static void int8_panel(const int8_t *codes, int64_t pairs, float *panel) {
    for (int64_t p = 0; p < pairs; p++)
        for (int v = 0; v < VECS; v++) {
            float *out = panel + (p * VECS + v) * 2 * LANES;
            _mm256_storeu_ps(out, int8_vector(codes + (2 * p + 1) * COLS + v * LANES));
            _mm256_storeu_ps(out + LANES, int8_vector(codes + 2 * p * COLS + v * LANES));
        }
}

/* One row times one or two int8 column blocks, or two rows times one, straight from the codes: the sums
 * of `tile` on int8_panel's panel, term for term (so the same bits at any row count). */
static inline __attribute__((always_inline)) void int8_direct(const float *a, int64_t lda, const int8_t *const *codes,
                                                              int64_t pairs, int64_t block_pairs,
                                                              const float *const *scales, uint16_t *const *c,
                                                              int64_t ldc, const int rows, const int nblocks) {
    const int groups = rows * nblocks; /* (row, block) pairs: at most two */
    __m256 acc[2 * VECS], part[2 * VECS];
    for (int i = 0; i < groups * VECS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t p0 = 0; p0 < pairs; p0 += block_pairs) {
        for (int i = 0; i < groups * VECS; i++) part[i] = _mm256_setzero_ps();
        for (int64_t p = p0; p < p0 + block_pairs; p++) {
            for (int blk = 0; blk < nblocks; blk++) {
                const int8_t *pair = codes[blk] + 2 * p * COLS;
                _mm_prefetch((const char *)(pair + INT8_AHEAD), _MM_HINT_T0);
                __m256 odd_w[VECS], even_w[VECS];
                for (int v = 0; v < VECS; v++) {
                    odd_w[v] = int8_vector(pair + COLS + v * LANES);
                    even_w[v] = int8_vector(pair + v * LANES);
                }
                for (int r = 0; r < rows; r++) { /* group blk + r: one of the two is 0 */
                    __m256 *sums = part + (blk + r) * VECS;
                    const __m256 odd = _mm256_broadcast_ss(a + r * lda + 2 * p + 1);
                    for (int v = 0; v < VECS; v++) sums[v] = _mm256_fmadd_ps(odd, odd_w[v], sums[v]);
                    const __m256 even = _mm256_broadcast_ss(a + r * lda + 2 * p);
                    for (int v = 0; v < VECS; v++) sums[v] = _mm256_fmadd_ps(even, even_w[v], sums[v]);
                }
            }
        }
        for (int g = 0; g < groups; g++) {
            const float *s = scales[nblocks == 1 ? 0 : g] + (p0 / block_pairs) * COLS;
            for (int v = 0; v < VECS; v++)
                acc[g * VECS + v] = _mm256_fmadd_ps(part[g * VECS + v], _mm256_loadu_ps(s + v * LANES), acc[g * VECS + v]);
        }
    }
    for (int g = 0; g < groups; g++) {
        uint16_t *dst = nblocks == 1 ? c[0] + g * ldc : c[g];
        for (int v = 0; v < VECS; v++) store_bf16(dst + v * LANES, acc[g * VECS + v]);
    }
}

int gemm_int8_supported(void) { return 1; }

/* c[m, n] = a[m, k] @ W.T for int8 W as above (n % 32 == 0, k % blocksize == 0, blocksize even). Up to
 * direct_rows[2] rows straight from the codes (one row: two column blocks a pass), more through each
 * block's panel. Returns nonzero when out of memory. */
int gemm_int8_bf16(const uint16_t *a, const int8_t *codes, const float *scales, int64_t m, int64_t n, int64_t k,
                   int64_t blocksize, int64_t lda, uint16_t *c, int64_t ldc) {
    const int64_t pairs = k / 2, block_pairs = blocksize / 2, blocks = k / blocksize, num_blocks = n / COLS;
    const int direct = m <= direct_rows[2];
    const float *x = float_rows(a, m, k, lda);
    if (!x) return 1;
    int failed = 0;
    const int64_t step = direct && m == 1 ? 2 : 1;
#pragma omp parallel for schedule(dynamic, 4) reduction(| : failed)
    for (int64_t b0 = 0; b0 < num_blocks; b0 += step) {
        const int nblocks = b0 + step <= num_blocks ? (int)step : 1;
        const int8_t *block[2] = {codes + b0 * k * COLS, codes + (b0 + nblocks - 1) * k * COLS};
        const float *s[2] = {scales + b0 * blocks * COLS, scales + (b0 + nblocks - 1) * blocks * COLS};
        if (nblocks == 2) {
            uint16_t *out[2] = {c + b0 * COLS, c + (b0 + 1) * COLS};
            int8_direct(x, k, block, pairs, block_pairs, s, out, 0, 1, 2);
        } else if (direct && m > 2) {
            const __m256i none = _mm256_setzero_si256(); /* no nf4 tables */
            half_tiles(x, m, k, (const uint8_t *)block[0], pairs, block_pairs, s[0], none, none, 1, c + b0 * COLS, ldc);
        } else if (direct) {
            for (int64_t r = 0; r < m; r += 2) {
                uint16_t *out[1] = {c + r * ldc + b0 * COLS};
                if (m - r == 1) int8_direct(x + r * k, k, block, pairs, block_pairs, s, out, ldc, 1, 1);
                else int8_direct(x + r * k, k, block, pairs, block_pairs, s, out, ldc, 2, 1);
            }
        } else {
            float *panel = scratch((size_t)pairs * VECS * 2 * LANES * sizeof(float));
            if (!panel) {
                failed = 1;
                continue;
            }
            int8_panel(block[0], pairs, panel);
            panel_rows(x, m, k, panel, pairs, block_pairs, s[0], c + b0 * COLS, ldc);
        }
    }
    return failed;
}

#else
int gemm_supported(void) { return 0; }
int64_t gemm_set_amx(int64_t on) { (void)on; return -1; }
int64_t gemm_nf4_groups(const Nf4 *p) { (void)p; return -1; }
int gemm_nf4_group(const Nf4 *p, int64_t g) { (void)p; (void)g; return 1; }
int64_t gemm_set_direct_rows(int64_t kind, int64_t rows) { return -1; }
const char *gemm_isa(void) { return "none"; }
int gemm_nf4_bf16(const uint16_t *a, const uint8_t *codes, const uint16_t *absmax, const uint16_t *code_values,
                  int64_t m, int64_t n, int64_t k, int64_t blocksize, int64_t lda, int64_t parts,
                  const int64_t *part_cols, uint16_t *const *part_c, int64_t long_rows) {
    (void)long_rows;
    return -1;
}
int gemm_packed_bf16(const uint16_t *a, const uint16_t *packed, uint16_t *c, int64_t m, int64_t n, int64_t k,
                     int64_t lda, int64_t ldc) {
    return -1;
}
int gemm_int8_supported(void) { return 0; }
int gemm_int8_bf16(const uint16_t *a, const int8_t *codes, const float *scales, int64_t m, int64_t n, int64_t k,
                   int64_t blocksize, int64_t lda, uint16_t *c, int64_t ldc) {
    return -1;
}
#endif

/* w [n, k] bfloat16 row-major to [n / 32][k / 2][32][2] (n % 32 == 0, k even). */
void pack_bf16(const uint16_t *w, uint16_t *packed, int64_t n, int64_t k) {
    for (int64_t col = 0; col < n; col++)
        for (int64_t kk = 0; kk < k; kk++)
            packed[(col / COLS) * k * COLS + (kk / 2) * 2 * COLS + (col % COLS) * 2 + kk % 2] = w[col * k + kk];
}

#ifndef GEMM_SILU
/* Builds without AVX-512 BF16: the layer loop calls the product, then fused.c's silu_mul. */
int gemm_nf4_silu_supported(void) { return 0; }
int gemm_nf4_silu_bf16(const uint16_t *a, const uint8_t *codes, const uint16_t *absmax, const uint16_t *code_values,
                       int64_t m, int64_t n, int64_t k, int64_t blocksize, int64_t lda, int64_t parts,
                       const int64_t *part_cols, uint16_t *const *part_c, int64_t long_rows) {
    (void)a, (void)codes, (void)absmax, (void)code_values, (void)m, (void)n, (void)k, (void)blocksize, (void)lda;
    (void)parts, (void)part_cols, (void)part_c, (void)long_rows;
    return -2;
}
#endif
