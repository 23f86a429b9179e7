/* bfloat16 <-> float32 for the kernels in this folder: a bfloat16 is the top half of a float32;
 * rounding is to nearest even, and a NaN stays a (quiet) NaN. Written as a select rather than a
 * branch so that loops over it vectorize. */
#ifndef GENRPC_BF16_H
#define GENRPC_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

#endif
