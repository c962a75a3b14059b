// Output helpers for the AVX-512 units that produce [rows][tokens] blocks (amx.cpp's C tiles, the token-vector
// kernel of avx512.cpp): a 16 x 16 transpose in registers and the store of one token's 16 rows into y. Include it
// only from units built with -mavx512f -mavx512bw -mavx512vl; everything is static inline (each unit its own copy).
#pragma once

#include <immintrin.h>
#include <stdint.h>

#include "packed24.h"

// The 16 x 16 fp32 matrix in r[0..15] (one row each) transposed in place: 32-bit and 64-bit interleaves within
// 128-bit lanes, then a 4 x 4 transpose of the lanes (64 shuffles).
static inline void sec24_transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int k = 0; k < 8; ++k) {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    __m512 u[16];  // u[4k + c], lane L: rows 4k..4k+3 of column 4L + c
    for (int k = 0; k < 4; ++k) {
        const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * k + 2]), d = _mm512_castps_pd(t[4 * k + 3]);
        u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; ++c) {
        const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
        const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
        const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
        r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        r[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        r[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
}

// y[token][row + i] = v[i] + bias[row + i] for the rows in `rows` (bit i: row + i), in y's dtype: bf16 rounded to
// nearest even with a NaN kept quiet, as sec24_f32_to_bf16 does.
static inline void sec24_store16(const sec24_args* a, int64_t token, int64_t row, __mmask16 rows, __m512 v) {
    if (a->bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(rows, a->bias + row));
    if (a->y_bf16) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i half = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
        const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, half), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                      _mm512_set1_epi32(0x7f800000));
        const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
        const __m256i h = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
        _mm256_mask_storeu_epi16((uint16_t*)a->y + token * a->y_stride + row, rows, h);
    } else {
        _mm512_mask_storeu_ps((float*)a->y + token * a->y_stride + row, rows, v);
    }
}
