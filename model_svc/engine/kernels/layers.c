/* A step's decoder layers in one call, for steps whose every token attends through a native
 * kernel (layers.py says when).
 *
 * The runner's Python loop makes about a dozen calls a layer (norms, products, rotary positions and
 * cache writes, attention, the gated MLP), each checking its arguments and allocating its result;
 * at a few rows that costs as much as the arithmetic. This loop makes the very same kernel calls,
 * in the same order, with the same arguments, through the function pointers it is given (the
 * kernels' own libraries: gemm_bf16.c, fused.c, decode_attention.c, prefill_attention.c, lora.c), into
 * buffers allocated once a step: the same bits as the Python loop, whichever of the two a step takes.
 *
 * Built by model_svc/engine/kernels/__init__.py like the other kernels; it has no arithmetic of its own.
 */
#include <stdint.h>
#include <string.h>

typedef int (*nf4_fn)(const uint16_t *a, const uint8_t *codes, const uint16_t *absmax, const uint16_t *code_values,
                      int64_t m, int64_t n, int64_t k, int64_t blocksize, int64_t lda, int64_t parts,
                      const int64_t *part_cols, uint16_t *const *part_c);
typedef void (*norm_fn)(uint16_t *h, const uint16_t *delta, const uint16_t *weight, uint16_t *out, int64_t rows,
                        int64_t n, float eps, int64_t h_stride, int64_t delta_stride, int64_t out_stride);
typedef int (*rope_fn)(uint16_t *q, uint16_t *k, const uint16_t *v, const uint16_t *cos, const uint16_t *sin,
                       int64_t tokens, int64_t hq, int64_t hkv, int64_t d, const int64_t *slots, uint16_t *keys,
                       uint16_t *values, int64_t head_stride, int64_t slot_stride);
typedef int (*attend_fn)(const uint16_t *query, const uint16_t *keys, const uint16_t *values, uint16_t *out,
                         const int64_t *rows, const int64_t *tables, const int64_t *table_offsets,
                         const int64_t *lengths, int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t head_stride, int64_t slot_stride, float scale, int64_t first,
                         int64_t last);
typedef int (*attend_long_fn)(const uint16_t *query, const uint16_t *keys, const uint16_t *values, uint16_t *out,
                              const int64_t *starts, const int64_t *lengths, const int64_t *pasts,
                              const int64_t *tables, const int64_t *table_offsets, int64_t num_chunks,
                              int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t head_stride, int64_t slot_stride, float scale);
typedef void (*silu_mul_fn)(uint16_t *gate, const uint16_t *up, int64_t count);
typedef int (*lora_fn)(const uint16_t *x, int64_t x_stride, int64_t k, int64_t rows, const int64_t *row,
                       const int64_t *slot, const float *scale, int64_t modules,
                       const void *pairs0, uint16_t *out0, int64_t out_stride0, int64_t n0,
                       const void *pairs1, uint16_t *out1, int64_t out_stride1, int64_t n1,
                       const void *pairs2, uint16_t *out2, int64_t out_stride2, int64_t n2);

/* The kernels (their addresses, from their libraries). */
typedef struct {
    nf4_fn nf4;
    norm_fn norm;
    rope_fn rope;
    attend_fn attend;
    attend_long_fn attend_long; /* NULL: no long-prompt kernel */
    silu_mul_fn silu_mul;
    lora_fn lora; /* NULL: no adapters */
} Kernels;

/* One nf4 product of k inputs: one layer's weight, or several side by side (parts). */
typedef struct {
    const uint8_t *codes;
    const uint16_t *absmax;
    const uint16_t *code_values;
    int64_t n, k, blocksize, parts;
    const int64_t *part_cols;
} Product;

/* One product's LoRA call (lora.py's Adapters.apply): the modules of it some adapter targets, in
 * order (index: which of the product's outputs; pairs: that module's packed pairs by slot). */
typedef struct {
    int64_t modules;
    int64_t index[3];
    const void *pairs[3];
} Lora;

typedef struct {
    const uint16_t *input_norm, *post_norm; /* RMSNorm weights [hidden] */
    float input_eps, post_eps, scale;       /* scale: the attention's */
    Product qkv, o, gate_up, down;          /* parts: q, k, v; -; gate, up; - */
    uint16_t *keys, *values;                /* the layer's arena [kv_heads, slots, head_dim] */
    Lora lora[4];                           /* the four products' */
} Layer;

typedef struct {
    int64_t tokens, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int64_t head_stride, slot_stride, block_size;
    int64_t dummy; /* the last row is the dummy row of a one-token step: its attention copies row 0's */
    const uint16_t *cos, *sin; /* [tokens, head_dim] */
    const int64_t *slots;      /* [tokens] */
    const int64_t *rows, *tables, *table_offsets, *lengths; /* the attention kernel's, num_rows each */
    int64_t num_rows;
    /* Long prompts' chunks, for the long-prompt kernel (none: 0): starts, lengths, pasts and table
     * offsets, num_chunks each, and their block tables. */
    const int64_t *long_starts, *long_lengths, *long_pasts, *long_tables, *long_offsets;
    int64_t num_chunks;
    /* Buffers: the residual stream [tokens, hidden] (updated in place), the last sublayer's output
     * [tokens, hidden], then the rest, each [tokens, its width]. */
    uint16_t *hidden_state, *delta, *normed, *q, *k, *v, *attended, *gate, *up;
    const volatile int32_t *stop; /* checked before each layer */
    /* Rows with an adapter (none: 0): their rows, adapter slots and scalings (lora.py's StepRows). */
    int64_t lora_rows;
    const int64_t *lora_row, *lora_slot;
    const float *lora_scale;
} Step;

/* Adds the adapters' updates to the rows of a product's outputs (outs[i]: n[i] wide) of x [rows, k],
 * the call lora.py's Adapters.apply makes. Returns nonzero on failure. */
static int lora_update(const Kernels *kern, const Step *s, const Lora *lora, const uint16_t *x, int64_t k,
                       uint16_t *const *outs, const int64_t *n) {
    if (s->lora_rows == 0 || lora->modules == 0) return 0;
    const void *pairs[3] = {NULL, NULL, NULL};
    uint16_t *out[3] = {NULL, NULL, NULL};
    int64_t width[3] = {0, 0, 0};
    for (int64_t m = 0; m < lora->modules; m++) {
        pairs[m] = lora->pairs[m];
        out[m] = outs[lora->index[m]];
        width[m] = n[lora->index[m]];
    }
    return kern->lora(x, k, k, s->lora_rows, s->lora_row, s->lora_slot, s->lora_scale, lora->modules,
                      pairs[0], out[0], width[0], width[0], pairs[1], out[1], width[1], width[1],
                      pairs[2], out[2], width[2], width[2]);
}

/* Runs layers[0 .. num_layers) on the step: each as the runner's Python loop runs it (add + norm,
 * q/k/v, rotary positions and cache writes, attention, o, add + norm, gate/up, silu * up, down).
 * Attention: the decode kernel's rows, then the long-prompt kernel's chunks, as the runner calls them.
 * The first layer's norm adds no delta; the last layer's output is left in delta, not added.
 * Rows with an adapter get its updates after each product, as the Python loop adds them.
 * Returns 0, 1 when stopped (*stop set before a layer), -1 when a kernel failed (out of memory, or
 * an adapter's rank over the LoRA kernel's), -2 for adapter rows without the LoRA kernel. */
int decode_layers(const Kernels *kern, const Layer *layers, int64_t num_layers, const Step *s) {
    const int64_t t = s->tokens, h = s->hidden, inter = s->intermediate;
    const int64_t q_width = s->num_heads * s->head_dim, kv_width = s->num_kv_heads * s->head_dim;
    const int64_t qkv_n[3] = {q_width, kv_width, kv_width}, h_n[1] = {h}, inter_n[2] = {inter, inter};
    uint16_t *qkv[3] = {s->q, s->k, s->v}, *gate_up[2] = {s->gate, s->up}, *delta[1] = {s->delta};
    if ((s->lora_rows && kern->lora == NULL) || (s->num_chunks && kern->attend_long == NULL)) return -2;
    for (int64_t l = 0; l < num_layers; l++) {
        if (s->stop != NULL && *s->stop) return 1;
        const Layer *layer = layers + l;
        kern->norm(s->hidden_state, l ? s->delta : NULL, layer->input_norm, s->normed, t, h, layer->input_eps, h, h, h);
        const Product *p = &layer->qkv;
        if (kern->nf4(s->normed, p->codes, p->absmax, p->code_values, t, p->n, p->k, p->blocksize, p->k, p->parts,
                      p->part_cols, qkv) ||
            lora_update(kern, s, &layer->lora[0], s->normed, h, qkv, qkv_n))
            return -1;
        kern->rope(s->q, s->k, s->v, s->cos, s->sin, t, s->num_heads, s->num_kv_heads, s->head_dim, s->slots,
                   layer->keys, layer->values, s->head_stride, s->slot_stride);
        if (s->num_rows &&
            kern->attend(s->q, layer->keys, layer->values, s->attended, s->rows, s->tables, s->table_offsets,
                         s->lengths, s->block_size, s->num_heads, s->num_kv_heads, s->head_dim, s->head_stride,
                         s->slot_stride, layer->scale, 0, s->num_rows * s->num_kv_heads))
            return -1;
        if (s->num_chunks &&
            kern->attend_long(s->q, layer->keys, layer->values, s->attended, s->long_starts, s->long_lengths,
                              s->long_pasts, s->long_tables, s->long_offsets, s->num_chunks, s->block_size,
                              s->num_heads, s->num_kv_heads, s->head_dim, s->head_stride, s->slot_stride,
                              layer->scale))
            return -1;
        if (s->dummy) memcpy(s->attended + (t - 1) * q_width, s->attended, (size_t)q_width * sizeof *s->attended);
        p = &layer->o;
        if (kern->nf4(s->attended, p->codes, p->absmax, p->code_values, t, p->n, p->k, p->blocksize, p->k, 1,
                      p->part_cols, delta) ||
            lora_update(kern, s, &layer->lora[1], s->attended, q_width, delta, h_n))
            return -1;
        kern->norm(s->hidden_state, s->delta, layer->post_norm, s->normed, t, h, layer->post_eps, h, h, h);
        p = &layer->gate_up;
        if (kern->nf4(s->normed, p->codes, p->absmax, p->code_values, t, p->n, p->k, p->blocksize, p->k, p->parts,
                      p->part_cols, gate_up) ||
            lora_update(kern, s, &layer->lora[2], s->normed, h, gate_up, inter_n))
            return -1;
        kern->silu_mul(s->gate, s->up, t * inter);
        p = &layer->down;
        if (kern->nf4(s->gate, p->codes, p->absmax, p->code_values, t, p->n, p->k, p->blocksize, p->k, 1,
                      p->part_cols, delta) ||
            lora_update(kern, s, &layer->lora[3], s->gate, inter, delta, h_n))
            return -1;
    }
    return 0;
}
