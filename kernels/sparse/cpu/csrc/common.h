// Helpers every translation unit compiles for itself: all `static inline`, so each instruction set keeps its own
// copy (internal linkage; nothing here is shared between translation units compiled with different flags).
#pragma once

#include <stdint.h>
#include <string.h>

#include "packed24.h"

// Fully unroll the small loops over a tile's rows and tokens, so that its accumulator arrays live in registers.
#define SEC24_UNROLL _Pragma("GCC unroll 16")

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

// Inputs [k, in) of row r of the dense weight (k a multiple of 4) into dense_row, one kept value at a time: the
// scalar decompression, and the last inputs the SIMD decompressions leave (fewer than a vector's worth).
static inline void sec24_decompress_from(const void* values, const uint8_t* codes, int32_t values_bf16, int64_t in,
                                         int64_t code_bytes, int64_t r, int64_t k, void* dense_row) {
    const int64_t size = values_bf16 ? 2 : 4, kept = in / 2;
    const char* v = (const char*)values + r * kept * size;
    const uint8_t* c = codes + r * code_bytes;
    char* d = (char*)dense_row;
    memset(d + k * size, 0, (size_t)((in - k) * size));
    for (int64_t j = k / 2; j < kept; ++j) {
        const int64_t input = 4 * (j / 2) + ((c[j >> 2] >> (2 * (j & 3))) & 3);
        memcpy(d + input * size, v + j * size, (size_t)size);
    }
}

// For a code byte (two groups of 4 inputs): the 8-bit mask of the kept positions (bit p = input p kept).
static inline constexpr uint32_t sec24_byte_mask(uint32_t b) {
    return (1u << (b & 3u)) | (1u << ((b >> 2) & 3u)) | (16u << ((b >> 4) & 3u)) | (16u << ((b >> 6) & 3u));
}

// The same for every byte, as a table: the expanding kernels build a lane mask from 2-4 code bytes per step.
struct sec24_mask_table {
    uint8_t mask[256];
    constexpr sec24_mask_table() : mask() {
        for (uint32_t b = 0; b < 256; ++b) mask[b] = (uint8_t)sec24_byte_mask(b);
    }
};
static constexpr sec24_mask_table sec24_masks;

// Pulls the next tile's packed bytes into the cache while this tile computes. A tile reads R rows side by side, and
// for small layers each row is short (576 inputs: 1.2 KB of fp32 values, 18 cache lines): too short for the
// hardware prefetcher to ramp up on every stream, while the R rows of the next tile are one contiguous range it
// can be told about. Prefetches never fault, so running past the end of the tensor is harmless.
typedef struct {
    const char* next;
    const char* end;
    int64_t per_step;  // cache lines per step of the main loop
} sec24_prefetch;

static inline sec24_prefetch sec24_prefetch_range(const void* begin, int64_t bytes, int64_t steps) {
    sec24_prefetch p;
    p.next = (const char*)begin;
    p.end = p.next + bytes;
    p.per_step = steps > 0 ? (bytes / 64 + steps - 1) / steps : 0;
    return p;
}

static inline void sec24_prefetch_step(sec24_prefetch* p) {
    for (int64_t i = 0; i < p->per_step && p->next < p->end; ++i, p->next += 64) __builtin_prefetch(p->next, 0, 2);
}
