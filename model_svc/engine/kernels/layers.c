/* A step's decoder layers in one call, for steps whose every token attends through a native
 * kernel (layers.py says when).
 *
 * The runner's Python loop makes about a dozen calls a layer (norms, products, rotary positions and
 * cache writes, attention, the gated MLP), each checking its arguments and allocating its result;
 * at a few rows that costs as much as the arithmetic. This loop makes the very same kernel calls,
 * in the same order, with the same arguments, through the function pointers it is given (the
 * kernels' own libraries: gemm_bf16.c, fused.c, decode_attention.c, prefill_attention.c, lora.c), into
 * buffers allocated once a step: the same bits as the Python loop, whichever of the two a step takes.
 * One call differs: without adapter updates on it, the gate/up product and silu * up are one call
 * (gemm_nf4_silu_bf16, silu over each group of column blocks while in cache; the two calls' bits).
 * And the last layer's attention, o and MLP may run on the rows the caller reads alone (last_layer):
 * those rows' bits are the same; the others' outputs are left undefined.
 *
 * Built by model_svc/engine/kernels/__init__.py like the other kernels; it has no arithmetic of its own.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nf4_call.h"

typedef int (*nf4_fn)(const uint16_t *a, const uint8_t *codes, const uint16_t *absmax, const uint16_t *code_values,
                      int64_t m, int64_t n, int64_t k, int64_t blocksize, int64_t lda, int64_t parts,
                      const int64_t *part_cols, uint16_t *const *part_c, int64_t long_rows);
typedef int64_t (*nf4_groups_fn)(const Nf4 *p);
typedef int (*nf4_group_fn)(const Nf4 *p, int64_t g);
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
typedef void (*silu_mul_fn)(uint16_t *gate, const uint16_t *up, int64_t count, int64_t long_count);
typedef int (*lora_fn)(const uint16_t *x, int64_t x_stride, int64_t k, int64_t rows, const int64_t *row,
                       const int64_t *slot, const float *scale, int64_t modules,
                       const void *pairs0, uint16_t *out0, int64_t out_stride0, int64_t n0,
                       const void *pairs1, uint16_t *out1, int64_t out_stride1, int64_t n1,
                       const void *pairs2, uint16_t *out2, int64_t out_stride2, int64_t n2);
/* lora.c's call in parts: plan, items (their sums), items (their updates), release. */
typedef void *(*lora_prepare_fn)(const uint16_t *x, int64_t x_stride, int64_t k, int64_t rows, const int64_t *row,
                                 const int64_t *slot, const float *scale, int64_t modules,
                                 const void *pairs0, uint16_t *out0, int64_t out_stride0, int64_t n0,
                                 const void *pairs1, uint16_t *out1, int64_t out_stride1, int64_t n1,
                                 const void *pairs2, uint16_t *out2, int64_t out_stride2, int64_t n2,
                                 int direct, int64_t *items, int *status);
typedef int (*lora_item_fn)(const void *plan, int64_t i);
typedef void (*lora_finish_fn)(const void *plan, int64_t i);
typedef void (*lora_release_fn)(void *plan);

/* The kernels (their addresses, from their libraries). */
typedef struct {
    nf4_fn nf4;
    norm_fn norm;
    rope_fn rope;
    attend_fn attend;
    attend_long_fn attend_long; /* NULL: no long-prompt kernel */
    silu_mul_fn silu_mul;
    lora_fn lora; /* NULL: no adapters */
    /* A product and its LoRA updates in one parallel loop (NULL, or nf4_groups < 0: one call each). */
    nf4_groups_fn nf4_groups;
    nf4_group_fn nf4_group;
    lora_prepare_fn lora_prepare;
    lora_item_fn lora_item;
    lora_finish_fn lora_finish_item;
    lora_release_fn lora_release;
    /* The gate/up product with silu * up after each group of its column blocks (gemm_nf4_silu_bf16:
     * the same bits as nf4 then silu_mul; NULL: those two calls). */
    nf4_fn nf4_silu;
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
    int64_t long_rows; /* rows 0 .. long_rows - 1: the long prompts' (their products' own sums on tiles) */
    /* The rows whose outputs the caller reads (ascending; none: 0): the last layer's attention, o and
     * MLP run on those rows alone where they are at most half the step (last_layer). */
    const int64_t *out_rows;
    int64_t num_out_rows;
    /* Buffers: the residual stream [tokens, hidden] (updated in place), the last sublayer's output
     * [tokens, hidden], then the rest, each [tokens, its width]. */
    uint16_t *hidden_state, *delta, *normed, *q, *k, *v, *attended, *gate, *up;
    const volatile int32_t *stop; /* checked before each layer */
    /* Rows with an adapter (none: 0): their rows, adapter slots and scalings (lora.py's StepRows). */
    int64_t lora_rows;
    const int64_t *lora_row, *lora_slot;
    const float *lora_scale;
} Step;

/* The LoRA call's modules for a product: their pairs, outputs and widths. */
static void lora_modules(const Lora *lora, uint16_t *const *outs, const int64_t *n, const void **pairs,
                         uint16_t **out, int64_t *width) {
    for (int64_t m = 0; m < 3; m++) {
        pairs[m] = m < lora->modules ? lora->pairs[m] : NULL;
        out[m] = m < lora->modules ? outs[lora->index[m]] : NULL;
        width[m] = m < lora->modules ? n[lora->index[m]] : 0;
    }
}

/* Adds the adapters' updates to the rows of a product's outputs (outs[i]: n[i] wide) of x [rows, k],
 * the call lora.py's Adapters.apply makes. Returns nonzero on failure. */
static int lora_update(const Kernels *kern, const Step *s, const Lora *lora, const uint16_t *x, int64_t k,
                       uint16_t *const *outs, const int64_t *n) {
    if (s->lora_rows == 0 || lora->modules == 0) return 0;
    const void *pairs[3];
    uint16_t *out[3];
    int64_t width[3];
    lora_modules(lora, outs, n, pairs, out, width);
    return kern->lora(x, k, k, s->lora_rows, s->lora_row, s->lora_slot, s->lora_scale, lora->modules,
                      pairs[0], out[0], width[0], width[0], pairs[1], out[1], width[1], width[1],
                      pairs[2], out[2], width[2], width[2]);
}

/* Product p of x into outs, then the adapters' updates of its rows: the calls gemm_nf4_bf16
 * and lora_apply_bf16 make, the same bits. Where there are updates and the product runs a group at a
 * time, its groups and the updates' items share one parallel loop, interleaved, so that one thread
 * reads adapter pairs from memory while the other multiplies (a step of rows with 8 adapters reads
 * ~80 MB of them), then each item's updates are added. Returns nonzero on failure. */
static int product(const Kernels *kern, const Step *s, const Product *p, const Lora *lora, const uint16_t *x,
                   uint16_t *const *outs, const int64_t *n) {
    const int64_t k = p->k;
    const Nf4 call = {x, p->codes, p->absmax, p->code_values, s->tokens, p->n, k, p->blocksize, k, p->parts,
                      p->part_cols, outs, s->long_rows};
    const int with = s->lora_rows > 0 && lora->modules > 0;
    const int64_t groups = with && kern->nf4_groups && kern->lora_prepare ? kern->nf4_groups(&call) : -1;
    if (groups < 0)
        return kern->nf4(x, p->codes, p->absmax, p->code_values, s->tokens, p->n, k, p->blocksize, k, p->parts,
                         p->part_cols, outs, s->long_rows) ||
               (with && lora_update(kern, s, lora, x, k, outs, n));
    const void *pairs[3];
    uint16_t *out[3];
    int64_t width[3], items;
    int status;
    lora_modules(lora, outs, n, pairs, out, width);
    void *plan = kern->lora_prepare(x, k, k, s->lora_rows, s->lora_row, s->lora_slot, s->lora_scale, lora->modules,
                                    pairs[0], out[0], width[0], width[0], pairs[1], out[1], width[1], width[1],
                                    pairs[2], out[2], width[2], width[2], 0, &items, &status);
    if (plan == NULL) return 1;
    const int64_t total = groups + items;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        /* position t: an update's item where t * items / total steps up, else the product's next group */
#pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < total; t++) {
            const int64_t before = t * items / total;
            if ((t + 1) * items / total > before)
                failed |= kern->lora_item(plan, before);
            else
                failed |= kern->nf4_group(&call, t - before);
        }
#pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < items; i++) kern->lora_finish_item(plan, i);
    }
    kern->lora_release(plan);
    return failed;
}

/* A layer after its attention, for s->tokens rows of the given buffers: o into delta, hidden += delta and
 * its norm, the gate/up product and silu * up, down into delta; each product with its adapters' updates
 * where s has adapter rows. Returns nonzero on failure. */
static int o_and_mlp(const Kernels *kern, const Step *s, const Layer *layer, const uint16_t *attended,
                     uint16_t *hidden, uint16_t *delta, uint16_t *normed, uint16_t *gate, uint16_t *up) {
    const int64_t t = s->tokens, h = s->hidden, inter = s->intermediate;
    const int64_t h_n[1] = {h}, inter_n[2] = {inter, inter};
    uint16_t *delta_out[1] = {delta}, *gate_up[2] = {gate, up};
    const Product *p = &layer->o;
    if (product(kern, s, p, &layer->lora[1], attended, delta_out, h_n)) return 1;
    kern->norm(hidden, delta, layer->post_norm, normed, t, h, layer->post_eps, h, h, h);
    p = &layer->gate_up;
    if (kern->nf4_silu != NULL && !(s->lora_rows > 0 && layer->lora[2].modules > 0)) {
        /* no adapter updates between the product and silu: silu * up while the blocks are in cache */
        if (kern->nf4_silu(normed, p->codes, p->absmax, p->code_values, t, p->n, p->k, p->blocksize, p->k, p->parts,
                           p->part_cols, gate_up, s->long_rows))
            return 1;
    } else {
        if (product(kern, s, p, &layer->lora[2], normed, gate_up, inter_n)) return 1;
        kern->silu_mul(gate, up, t * inter, s->long_rows * inter);
    }
    p = &layer->down;
    return product(kern, s, p, &layer->lora[3], gate, delta_out, h_n);
}

/* The last layer's attention, o and MLP for the out rows alone (after its norm, q/k/v and cache writes
 * for every row, which the cache needs): the other rows' outputs are never read. Each out row gets
 * the very calls' bits it gets in the whole step: the attention kernels take any subset of their rows
 * (a long chunk's row as a chunk of one at its position), the products and norms are row by row, the
 * out rows keep their order (long prompts' first). hidden_state and delta of the out rows are written
 * as the whole layer writes them. Returns 0, or -1 when a kernel or an allocation failed. */
static int last_layer(const Kernels *kern, const Layer *layer, const Step *s) {
    const int64_t n = s->num_out_rows, h = s->hidden, inter = s->intermediate;
    const int64_t q_width = s->num_heads * s->head_dim;
    int64_t *index = malloc(sizeof(int64_t) * (size_t)(7 * n + 1));
    uint16_t *buffer = malloc(sizeof(uint16_t) * (size_t)n * (q_width + 3 * h + 2 * inter));
    int failed = index == NULL || buffer == NULL;
    if (!failed) {
        int64_t *rows = index, *row_offsets = rows + n, *lengths = row_offsets + n; /* the decode kernel's */
        int64_t *starts = lengths + n, *ones = starts + n, *pasts = ones + n, *offsets = pasts + n; /* long */
        int64_t native = 0, chunks = 0, long_out = 0;
        for (int64_t i = 0; i < n; i++) {
            const int64_t r = s->out_rows[i];
            long_out += r < s->long_rows;
            for (int64_t j = 0; j < s->num_rows; j++)
                if (s->rows[j] == r) {
                    rows[native] = r, row_offsets[native] = s->table_offsets[j], lengths[native] = s->lengths[j];
                    native++;
                }
            for (int64_t c = 0; c < s->num_chunks; c++)
                if (r >= s->long_starts[c] && r < s->long_starts[c] + s->long_lengths[c]) {
                    starts[chunks] = r, ones[chunks] = 1, offsets[chunks] = s->long_offsets[c];
                    pasts[chunks] = s->long_pasts[c] + (r - s->long_starts[c]);
                    chunks++;
                }
        }
        if (native && kern->attend(s->q, layer->keys, layer->values, s->attended, rows, s->tables, row_offsets, lengths,
                                   s->block_size, s->num_heads, s->num_kv_heads, s->head_dim, s->head_stride,
                                   s->slot_stride, layer->scale, 0, native * s->num_kv_heads))
            failed = 1;
        if (!failed && chunks &&
            kern->attend_long(s->q, layer->keys, layer->values, s->attended, starts, ones, pasts, s->long_tables,
                              offsets, chunks, s->block_size, s->num_heads, s->num_kv_heads, s->head_dim,
                              s->head_stride, s->slot_stride, layer->scale))
            failed = 1;
        if (!failed) {
            uint16_t *attended = buffer, *hidden = attended + n * q_width, *delta = hidden + n * h;
            uint16_t *normed = delta + n * h, *gate = normed + n * h, *up = gate + n * inter;
            for (int64_t i = 0; i < n; i++) {
                memcpy(attended + i * q_width, s->attended + s->out_rows[i] * q_width, sizeof(uint16_t) * q_width);
                memcpy(hidden + i * h, s->hidden_state + s->out_rows[i] * h, sizeof(uint16_t) * h);
            }
            Step sub = *s;
            sub.tokens = n, sub.long_rows = long_out, sub.lora_rows = 0;
            failed = o_and_mlp(kern, &sub, layer, attended, hidden, delta, normed, gate, up) != 0;
            if (!failed)
                for (int64_t i = 0; i < n; i++) {
                    memcpy(s->hidden_state + s->out_rows[i] * h, hidden + i * h, sizeof(uint16_t) * h);
                    memcpy(s->delta + s->out_rows[i] * h, delta + i * h, sizeof(uint16_t) * h);
                }
        }
    }
    free(index);
    free(buffer);
    return failed ? -1 : 0;
}

/* Runs layers[0 .. num_layers) on the step: each as the runner's Python loop runs it (add + norm,
 * q/k/v, rotary positions and cache writes, attention, o, add + norm, gate/up, silu * up, down).
 * Attention: the decode kernel's rows, then the long-prompt kernel's chunks, as the runner calls them.
 * The first layer's norm adds no delta; the last layer's output is left in delta, not added.
 * Rows with an adapter get its updates after each product, as the Python loop adds them.
 * Returns 0, 1 when stopped (*stop set before a layer), -1 when a kernel failed (out of memory, or
 * an adapter's rank over the LoRA kernel's), -2 for adapter rows without the LoRA kernel. */
int decode_layers(const Kernels *kern, const Layer *layers, int64_t num_layers, const Step *s) {
    const int64_t t = s->tokens, h = s->hidden;
    const int64_t q_width = s->num_heads * s->head_dim, kv_width = s->num_kv_heads * s->head_dim;
    const int64_t qkv_n[3] = {q_width, kv_width, kv_width};
    uint16_t *qkv[3] = {s->q, s->k, s->v};
    if ((s->lora_rows && kern->lora == NULL) || (s->num_chunks && kern->attend_long == NULL)) return -2;
    for (int64_t l = 0; l < num_layers; l++) {
        if (s->stop != NULL && *s->stop) return 1;
        const Layer *layer = layers + l;
        kern->norm(s->hidden_state, l ? s->delta : NULL, layer->input_norm, s->normed, t, h, layer->input_eps, h, h, h);
        const Product *p = &layer->qkv;
        if (product(kern, s, p, &layer->lora[0], s->normed, qkv, qkv_n))
            return -1;
        kern->rope(s->q, s->k, s->v, s->cos, s->sin, t, s->num_heads, s->num_kv_heads, s->head_dim, s->slots,
                   layer->keys, layer->values, s->head_stride, s->slot_stride);
        if (l == num_layers - 1 && 2 * s->num_out_rows <= t && !s->dummy && s->lora_rows == 0) {
            if (s->num_out_rows && last_layer(kern, layer, s)) return -1;
            break;
        }
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
        if (o_and_mlp(kern, s, layer, s->attended, s->hidden_state, s->delta, s->normed, s->gate, s->up)) return -1;
    }
    return 0;
}
