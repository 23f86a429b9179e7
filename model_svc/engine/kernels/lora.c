/* LoRA updates for the rows of a step that have an adapter, one row at a time (lora.py).
 *
 * For row i (x and out rows row[i]) with an adapter whose columns of the stacked matrices are
 * col[i] .. col[i] + rank[i]: u = A x (float32, each of the rank sums over k in index order), then
 * y = B u (each of the n sums over the rank in index order), and out = bf16(out + bf16(scale * y)).
 * Every sum is a chain of fused multiply-adds in a fixed order, vectorized across independent sums
 * only, so a row's update depends on that row alone: the same alone, batched, or chunked.
 * at: A transposed, [k][total]; bt: B transposed, [total][n]; both bfloat16 (a step reads every
 * adapter's pairs: in float32 they were more bytes than the 4-bit model itself at 8 adapters). */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#define MAX_RANK 256

static void lora_row(const uint16_t *x, uint16_t *out, const uint16_t *at, const uint16_t *bt, int64_t total, int64_t k,
                     int64_t n, int64_t col, int64_t rank, float scale) {
    float u[MAX_RANK];
    for (int64_t j = 0; j < rank; j++) u[j] = 0.0f;
    for (int64_t p = 0; p < k; p++) {
        const float xv = bf16_to_float(x[p]);
        const uint16_t *a = at + p * total + col;
        for (int64_t j = 0; j < rank; j++) u[j] = fmaf(xv, bf16_to_float(a[j]), u[j]);
    }
    float y[8192];
    for (int64_t start = 0; start < n; start += 8192) {
        const int64_t width = n - start < 8192 ? n - start : 8192;
        for (int64_t q = 0; q < width; q++) y[q] = 0.0f;
        for (int64_t j = 0; j < rank; j++) {
            const float uj = u[j];
            const uint16_t *b = bt + (col + j) * n + start;
            for (int64_t q = 0; q < width; q++) y[q] = fmaf(uj, bf16_to_float(b[q]), y[q]);
        }
        for (int64_t q = 0; q < width; q++) {
            const float update = round_bf16(scale * y[q]);
            out[start + q] = float_to_bf16(bf16_to_float(out[start + q]) + update);
        }
    }
}

/* Returns 0, or 1 when a rank is over MAX_RANK (nothing done). */
int lora_rows_bf16(const uint16_t *x, int64_t x_stride, uint16_t *out, int64_t out_stride, int64_t rows,
                   const int64_t *row, const int64_t *col, const int64_t *rank, const float *scale,
                   const uint16_t *at, const uint16_t *bt, int64_t total, int64_t k, int64_t n) {
    for (int64_t i = 0; i < rows; i++)
        if (rank[i] > MAX_RANK || rank[i] < 0) return 1;
#pragma omp parallel for schedule(static) if (rows * (k + n) >= 4096)
    for (int64_t i = 0; i < rows; i++)
        lora_row(x + row[i] * x_stride, out + row[i] * out_stride, at, bt, total, k, n, col[i], rank[i], scale[i]);
    return 0;
}
