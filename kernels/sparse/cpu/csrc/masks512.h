// The kept-position masks of a run of code bytes, 64 at a time, for the AVX-512 units (avx512.cpp, avx512bf16.cpp:
// include it only from units built with -mavx512bw).
#pragma once

#include <immintrin.h>
#include <stdint.h>

// A code byte holds two groups of 4 inputs, one per nibble (two 2-bit codes each); a 16-entry byte shuffle maps a
// nibble to its group's 4-bit mask of kept positions, in the low (first group) or high (second) half of the byte.
typedef struct {
    alignas(64) uint8_t low[64];  // the same 16 entries in each 128-bit lane
    alignas(64) uint8_t high[64];
} sec24_nibble_masks;

static inline constexpr sec24_nibble_masks sec24_make_nibble_masks() {
    sec24_nibble_masks t = {};
    for (int i = 0; i < 64; ++i) {
        const int n = i % 16;
        t.low[i] = (uint8_t)((1u << (n & 3)) | (1u << (n >> 2)));
        t.high[i] = (uint8_t)(t.low[i] << 4);
    }
    return t;
}
static constexpr sec24_nibble_masks sec24_nibbles = sec24_make_nibble_masks();

// out[i] = the 8-bit mask of kept positions of code byte c[i] (bit p: input p of the byte's 8 inputs kept), for
// i < n ≤ 64; out is 64 bytes and bytes n..63 are zero. Two shuffles for 64 code bytes, where a table lookup per
// byte would take 64 loads.
static inline void sec24_code_masks(const uint8_t* c, int64_t n, uint8_t* out) {
    const __mmask64 valid = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
    const __m512i codes = _mm512_maskz_loadu_epi8(valid, c);
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i low = _mm512_shuffle_epi8(_mm512_load_si512((const void*)sec24_nibbles.low),
                                            _mm512_and_si512(codes, nibble));
    const __m512i high = _mm512_shuffle_epi8(_mm512_load_si512((const void*)sec24_nibbles.high),
                                             _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble));
    _mm512_storeu_si512((void*)out, _mm512_maskz_mov_epi8(valid, _mm512_or_si512(low, high)));
}
