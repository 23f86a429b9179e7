/* One nf4 product's arguments (gemm_bf16.c's gemm_nf4_bf16), for running it a group of column blocks
 * at a time (gemm_nf4_groups / gemm_nf4_group) inside a caller's own parallel loop: layers.c runs a
 * product's groups beside the LoRA updates that follow it. */
#ifndef GENRPC_NF4_CALL_H
#define GENRPC_NF4_CALL_H

#include <stdint.h>

typedef struct {
    const uint16_t *a;
    const uint8_t *codes;
    const uint16_t *absmax, *code_values;
    int64_t m, n, k, blocksize, lda, parts;
    const int64_t *part_cols;
    uint16_t *const *part_c;
    int64_t long_rows; /* rows 0 .. long_rows - 1 are long prompts' (gemm_nf4_bf16) */
} Nf4;

#endif
