// Helpers every translation unit compiles for itself: all `static inline`, so each instruction set keeps its own
// copy (internal linkage; nothing here is shared between translation units compiled with different flags).
#pragma once

#include <stdint.h>
#include <string.h>

#include "packed24.h"

static inline float sec24_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, as torch rounds fp32 to bf16 (a NaN stays a quiet NaN).
static inline uint16_t sec24_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void sec24_store(const sec24_args* a, int64_t token, int64_t row, float v) {
    if (a->bias) v += a->bias[row];
    if (a->y_bf16)
        ((uint16_t*)a->y)[token * a->y_stride + row] = sec24_f32_to_bf16(v);
    else
        ((float*)a->y)[token * a->y_stride + row] = v;
}

static inline int64_t sec24_min(int64_t a, int64_t b) { return a < b ? a : b; }

// For a code byte (two groups of 4 inputs): the 8-bit mask of the kept positions (bit p = input p kept).
static inline uint32_t sec24_byte_mask(uint32_t b) {
    return (1u << (b & 3u)) | (1u << ((b >> 2) & 3u)) | (16u << ((b >> 4) & 3u)) | (16u << ((b >> 6) & 3u));
}
