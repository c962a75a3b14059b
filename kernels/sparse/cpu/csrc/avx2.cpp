// AVX2 + FMA kernel. Compiled with -mavx2 -mfma and called only on CPUs that have both.
//
// Per 8 inputs of a row (one code byte, 4 kept values): one byte shuffle from a 256-entry table places the 4 values
// at their positions and zeros elsewhere, giving 8 dense fp32 weights in a register (bf16 values land in the high
// half of each 32-bit lane, which is their fp32 value: widening is free). The weights are expanded once per row and
// used by every token of the tile; each token then costs 2 FMAs per 16 inputs, like a dense product, while only
// the packed bytes are read from memory. (Permuting x by the codes instead costs 2 permutes on the one shuffle port
// per 16 inputs and token: twice the dense cost as soon as the product is compute-bound.)
#include <immintrin.h>

#include "common.h"
#include "tokens.h"

namespace {

constexpr int64_t kBlock = 256;  // inputs per cascade block

// For a code byte (8 inputs, 4 kept values): byte-shuffle controls that place the 4 values at their positions and
// zeros elsewhere. f32: fp32 values -> 8 fp32 (both 128-bit lanes hold the same 4 values); b16f32: bf16 values ->
// 8 fp32 (the bf16 bits in the upper half of each lane); b16: bf16 values -> 8 bf16.
struct ShuffleTables {
    alignas(32) uint8_t f32[256][32];
    alignas(32) uint8_t b16f32[256][32];
    alignas(16) uint8_t b16[256][16];
    constexpr ShuffleTables() : f32(), b16f32(), b16() {
        for (int b = 0; b < 256; ++b) {
            for (int i = 0; i < 8; ++i) {
                const int g = i / 4, p = i % 4;
                const int c0 = (b >> (4 * g)) & 3, c1 = (b >> (4 * g + 2)) & 3;
                const int s = p == c0 ? 2 * g : p == c1 ? 2 * g + 1 : -1;
                for (int q = 0; q < 4; ++q) {
                    f32[b][4 * i + q] = (uint8_t)(s < 0 ? 0x80 : 4 * s + q);
                    b16f32[b][4 * i + q] = (uint8_t)(s < 0 || q < 2 ? 0x80 : 2 * s + q - 2);
                }
                for (int q = 0; q < 2; ++q) b16[b][2 * i + q] = (uint8_t)(s < 0 ? 0x80 : 2 * s + q);
            }
        }
    }
};
constexpr ShuffleTables kShuffles;

// 8 dense fp32 weights for inputs 8·byte .. 8·byte + 7 of a row: `v` points at the byte's 4 kept values.
template <bool BF16>
inline __m256 expand8(const void* v, uint8_t code) {
    if (BF16) {
        long long four;
        memcpy(&four, v, 8);
        const __m256i w = _mm256_set1_epi64x(four);  // 4 bf16, in both lanes
        return _mm256_castsi256_ps(_mm256_shuffle_epi8(w, _mm256_load_si256((const __m256i*)kShuffles.b16f32[code])));
    }
    const __m256i w = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)v));  // 4 fp32, in both lanes
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(w, _mm256_load_si256((const __m256i*)kShuffles.f32[code])));
}

// One row's product for one token: the 8 lanes of its running sums, plus the last 4 inputs (one group: 2 kept values)
// when `in` leaves them after input k. v and c point at the row's values and codes, x at the token's inputs.
template <bool BF16>
inline float row_sum(__m256 sum8, const char* v, const uint8_t* c, const float* x, int64_t k, int64_t in) {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    float sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    if (k < in) {
        const uint32_t b = c[k / 8] & 15u;
        const float* xt = x + k;
        if (BF16) {
            const uint16_t* vh = (const uint16_t*)v + k / 2;
            sum += sec24_bf16_to_f32(vh[0]) * xt[b & 3] + sec24_bf16_to_f32(vh[1]) * xt[b >> 2];
        } else {
            const float* vf = (const float*)v + k / 2;
            sum += vf[0] * xt[b & 3] + vf[1] * xt[b >> 2];
        }
    }
    return sum;
}

// Rows [r0, r0 + R) × tokens [t0, t0 + TT).
template <int R, int TT, bool BF16>
void tile(const sec24_args* a, int64_t r0, int64_t t0) {
    const int64_t in = a->in, kept = in / 2, vsize = BF16 ? 2 : 4;
    __m256 acc[R][TT];
    alignas(32) float total[R][TT][8] = {};  // in memory: touched once per block
    const float* x[TT];
    const char* v[R];
    const uint8_t* c[R];
    SEC24_UNROLL
    for (int t = 0; t < TT; ++t) x[t] = a->x + (t0 + t) * a->x_stride;
    SEC24_UNROLL
    for (int r = 0; r < R; ++r) {
        v[r] = (const char*)a->values + (r0 + r) * kept * vsize;
        c[r] = a->codes + (r0 + r) * a->code_bytes;
        SEC24_UNROLL
        for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps();
    }
    // Cascade summation: each block of kBlock inputs sums into fresh accumulators that are then added to the
    // totals, so no lane adds more than kBlock/8 products in a row (fp32 rounding stays near the dense product's).
    // The next R rows follow these in memory: stream them in while these compute.
    sec24_prefetch next_values = sec24_prefetch_range(v[0] + R * kept * vsize, R * kept * vsize, in / 16);
    sec24_prefetch next_codes = sec24_prefetch_range(c[0] + R * a->code_bytes, R * a->code_bytes, in / 16);
    int64_t k = 0;
    while (k + 8 <= in) {
        const int64_t end = sec24_min(in & ~(int64_t)7, k + kBlock);
        for (; k + 16 <= end; k += 16) {
            sec24_prefetch_step(&next_values);
            sec24_prefetch_step(&next_codes);
            SEC24_UNROLL
            for (int r = 0; r < R; ++r) {
                const __m256 w0 = expand8<BF16>(v[r] + k / 2 * vsize, c[r][k / 8]);
                const __m256 w1 = expand8<BF16>(v[r] + (k / 2 + 4) * vsize, c[r][k / 8 + 1]);
                SEC24_UNROLL
                for (int t = 0; t < TT; ++t) {
                    acc[r][t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + k), acc[r][t]);
                    acc[r][t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t] + k + 8), acc[r][t]);
                }
            }
        }
        if (k < end) {  // 8 inputs left in the block
            SEC24_UNROLL
            for (int r = 0; r < R; ++r) {
                const __m256 w0 = expand8<BF16>(v[r] + k / 2 * vsize, c[r][k / 8]);
                SEC24_UNROLL
                for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + k), acc[r][t]);
            }
            k += 8;
        }
        SEC24_UNROLL
        for (int r = 0; r < R; ++r)
            SEC24_UNROLL
            for (int t = 0; t < TT; ++t) {
                _mm256_store_ps(total[r][t], _mm256_add_ps(_mm256_load_ps(total[r][t]), acc[r][t]));
                acc[r][t] = _mm256_setzero_ps();
            }
    }
    SEC24_UNROLL
    for (int r = 0; r < R; ++r)
        SEC24_UNROLL
        for (int t = 0; t < TT; ++t)
            sec24_store(a, t0 + t, r0 + r, row_sum<BF16>(_mm256_load_ps(total[r][t]), v[r], c[r], x[t], k, in));
}

// One token, rows [r0, r0 + R), for long rows: the tile above with two accumulators per row (the two halves of
// each 16 inputs), so each row's FMAs form two dependency chains instead of one, and the codes of 32 inputs read as one
// 32-bit word. Measured (AMD EPYC Zen 3, 1 thread, standalone, medians of 5 interleaved rounds, weights rotated past
// the 32 MiB L3): bf16 4096x4096 1.6-2.6 ms against the general tile's 1.9-3.0, bf16 4096x11008 4.2-4.3 ms (best
// three) against 5.2-7.3, fp32 576x1536 0.135-0.146 against 0.12-0.17, fp32 4096x4096 2.5-3.0 against 2.3-3.4 (no
// clear difference); in L2 (64 x 2048 fp32, the loop without the prefetch) 0.008 ms against 0.014 at best; but
// 576-input rows (SmolLM2's 576x576, 1536x576) 10-15 % slower (18 steps per row: the per-row set-up and the sums
// weigh more), so rows_tokens takes it from kOneTokenLongRow inputs.
constexpr int64_t kOneTokenLongRow = 1024;

template <int R, bool BF16>
void tile_one(const sec24_args* a, int64_t r0) {
    const int64_t in = a->in, kept = in / 2, vsize = BF16 ? 2 : 4;
    const float* x = a->x;  // [in]: the one token
    __m256 acc0[R], acc1[R], total[R];
    const char* v[R];
    const uint8_t* c[R];
    SEC24_UNROLL
    for (int r = 0; r < R; ++r) {
        v[r] = (const char*)a->values + (r0 + r) * kept * vsize;
        c[r] = a->codes + (r0 + r) * a->code_bytes;
        acc0[r] = acc1[r] = total[r] = _mm256_setzero_ps();
    }
    // The cascade and the prefetch of the next R rows as in the general tile.
    sec24_prefetch next_values = sec24_prefetch_range(v[0] + R * kept * vsize, R * kept * vsize, in / 32);
    sec24_prefetch next_codes = sec24_prefetch_range(c[0] + R * a->code_bytes, R * a->code_bytes, in / 32);
    int64_t k = 0;
    while (k + 8 <= in) {
        const int64_t end = sec24_min(in & ~(int64_t)7, k + kBlock);
        for (; k + 32 <= end; k += 32) {
            sec24_prefetch_step(&next_values);
            sec24_prefetch_step(&next_codes);
            SEC24_UNROLL
            for (int r = 0; r < R; ++r) {
                uint32_t four;  // 4 code bytes: 32 inputs
                memcpy(&four, c[r] + k / 8, 4);
                const char* vr = v[r] + k / 2 * vsize;
                acc0[r] = _mm256_fmadd_ps(expand8<BF16>(vr, four & 255), _mm256_loadu_ps(x + k), acc0[r]);
                acc1[r] = _mm256_fmadd_ps(expand8<BF16>(vr + 4 * vsize, (four >> 8) & 255),
                                          _mm256_loadu_ps(x + k + 8), acc1[r]);
                acc0[r] = _mm256_fmadd_ps(expand8<BF16>(vr + 8 * vsize, (four >> 16) & 255),
                                          _mm256_loadu_ps(x + k + 16), acc0[r]);
                acc1[r] = _mm256_fmadd_ps(expand8<BF16>(vr + 12 * vsize, four >> 24), _mm256_loadu_ps(x + k + 24),
                                          acc1[r]);
            }
        }
        for (; k + 8 <= end; k += 8) {  // fewer than 32 inputs left in the block
            SEC24_UNROLL
            for (int r = 0; r < R; ++r)
                acc0[r] = _mm256_fmadd_ps(expand8<BF16>(v[r] + k / 2 * vsize, c[r][k / 8]), _mm256_loadu_ps(x + k),
                                          acc0[r]);
        }
        SEC24_UNROLL
        for (int r = 0; r < R; ++r) {
            total[r] = _mm256_add_ps(total[r], _mm256_add_ps(acc0[r], acc1[r]));
            acc0[r] = acc1[r] = _mm256_setzero_ps();
        }
    }
    SEC24_UNROLL
    for (int r = 0; r < R; ++r) sec24_store(a, 0, r0 + r, row_sum<BF16>(total[r], v[r], c[r], x, k, in));
}

template <int TT, bool BF16>
void rows_tokens(const sec24_args* a, int64_t r0, int64_t r1, int64_t t0) {
    int64_t r = r0;
    if (TT == 1 && a->tokens == 1 && a->in >= kOneTokenLongRow) {  // t0 == 0
        for (; r + 4 <= r1; r += 4) tile_one<4, BF16>(a, r);
        for (; r < r1; ++r) tile_one<1, BF16>(a, r);
        return;
    }
    constexpr int R = TT == 1 ? 4 : 2;
    for (; r + R <= r1; r += R) tile<R, TT, BF16>(a, r, t0);
    for (; r < r1; ++r) tile<1, TT, BF16>(a, r, t0);
}

template <bool BF16>
void rows(const sec24_args* a, int64_t r0, int64_t r1) {
    // Blocks of rows small enough that their packed weights stay in L1/L2 while every token tile reads them.
    const int64_t block = a->tokens <= 4 ? r1 - r0 : 8;
    for (int64_t b = r0; b < r1; b += block) {
        const int64_t e = sec24_min(b + block, r1);
        int64_t t = 0;
        for (; t + 4 <= a->tokens; t += 4) rows_tokens<4, BF16>(a, b, e, t);
        switch (a->tokens - t) {
            case 3: rows_tokens<3, BF16>(a, b, e, t); break;
            case 2: rows_tokens<2, BF16>(a, b, e, t); break;
            case 1: rows_tokens<1, BF16>(a, b, e, t); break;
            default: break;
        }
    }
}

// tokens.h's vector type: 8 fp32 lanes; up to 12 accumulators of the 16 registers.
struct Vec256 {
    using reg = __m256;
    static constexpr int kLanes = 8, kMaxVectors = 8, kAccumulators = 12;
    static reg zero() { return _mm256_setzero_ps(); }
    static reg set1(float f) { return _mm256_set1_ps(f); }
    // tokens.h's weights four at a time: weights j..j + 3 of a row (tokens_weights4) in both 128-bit lanes, then
    // weight q of them in every lane by one in-lane shuffle, instead of a broadcast load per weight. Measured (AMD
    // EPYC Zen 3, the kernel alone on one thread, fp32, weights in cache, best of 300, three rounds): 8 tokens
    // 1536x576 1.60 -> 1.75, 576x576 1.60 -> 1.75, 4096x4096 1.16 -> 1.27 G vector FMAs/s; 192-256 tokens 0-13 %
    // faster; 64 tokens alike. (In a loop of its own with x in L1, the broadcast loads had halved the FMA rate: 1.9
    // against 3.5 G; the kernel's other work, the positions and x from L2, bounds it more.)
    static reg broadcast4(__m128 f) { return _mm256_set_m128(f, f); }
    static reg spread(reg v, int q) {
        switch (q) {
            case 0: return _mm256_permute_ps(v, 0x00);
            case 1: return _mm256_permute_ps(v, 0x55);
            case 2: return _mm256_permute_ps(v, 0xAA);
            default: return _mm256_permute_ps(v, 0xFF);
        }
    }
    static reg load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
    static reg add(reg x, reg y) { return _mm256_add_ps(x, y); }
    static reg fmadd(reg x, reg y, reg z) { return _mm256_fmadd_ps(x, y, z); }
    // The 8 x 8 matrix in r[0..7] (one row each) transposed in place: interleaves within 128-bit lanes, then lanes.
    static void transpose(reg r[8]) {
        __m256 t[8], s[8];
        for (int k = 0; k < 4; ++k) {
            t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        for (int h = 0; h < 2; ++h) {  // s[4h + c], lane L: rows 4h..4h+3 of column 4L + c
            s[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
            s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
            s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
            s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
        }
        for (int c = 0; c < 4; ++c) {
            r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
            r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
        }
    }
    // y[token][row .. row + 7] = v + bias, in y's dtype (bf16 rounded to nearest even, NaN kept quiet).
    static void store_y(const sec24_args* a, int64_t token, int64_t row, reg v) {
        if (a->bias) v = _mm256_add_ps(v, _mm256_loadu_ps(a->bias + row));
        if (!a->y_bf16) {
            _mm256_storeu_ps((float*)a->y + token * a->y_stride + row, v);
            return;
        }
        const __m256i u = _mm256_castps_si256(v);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i rounded =
            _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                               _mm256_set1_epi32(0x7f800000));  // both sides non-negative
        const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
        const __m256i h = _mm256_blendv_epi8(rounded, quiet, nan);  // 8 values < 2^16 in 32-bit lanes
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);  // 16-bit, in order
        _mm_storeu_si128((__m128i*)((uint16_t*)a->y + token * a->y_stride + row), _mm256_castsi256_si128(packed));
    }
};

}  // namespace

extern "C" void sec24_rows_avx2_tokens(const sec24_args* a, int64_t row_begin, int64_t row_end) {
    tokens_rows<Vec256>(a, row_begin, row_end);
}

extern "C" int64_t sec24_tokens_xt_floats_avx2(int64_t tokens, int64_t in) {
    return tokens_xt_floats<Vec256>(tokens, in);
}

extern "C" void sec24_tokens_pack_xt_avx2(const sec24_args* a, float* x_t) { tokens_pack_xt<Vec256>(a, x_t); }

extern "C" void sec24_rows_avx2(const sec24_args* a, int64_t row_begin, int64_t row_end) {
    if (a->values_bf16)
        rows<true>(a, row_begin, row_end);
    else
        rows<false>(a, row_begin, row_end);
}

// 8 inputs (one code byte, 4 kept values) at a time: one byte shuffle from a table.
extern "C" void sec24_decompress_avx2(const void* values, const uint8_t* codes, int32_t values_bf16, int64_t in,
                                      int64_t code_bytes, int64_t row_begin, int64_t row_end, void* dense) {
    const int64_t kept = in / 2;
    for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t* c = codes + r * code_bytes;
        int64_t k = 0;
        if (values_bf16) {
            const uint16_t* v = (const uint16_t*)values + r * kept;
            uint16_t* d = (uint16_t*)dense + (r - row_begin) * in;
            for (; k + 8 <= in; k += 8) {
                const __m128i w = _mm_loadl_epi64((const __m128i*)(v + k / 2));
                const __m128i s = _mm_loadu_si128((const __m128i*)kShuffles.b16[c[k / 8]]);
                _mm_storeu_si128((__m128i*)(d + k), _mm_shuffle_epi8(w, s));
            }
        } else {
            const float* v = (const float*)values + r * kept;
            float* d = (float*)dense + (r - row_begin) * in;
            for (; k + 8 <= in; k += 8) {
                const __m256i w = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(v + k / 2)));
                const __m256i s = _mm256_loadu_si256((const __m256i*)kShuffles.f32[c[k / 8]]);
                _mm256_storeu_si256((__m256i*)(d + k), _mm256_shuffle_epi8(w, s));
            }
        }
        if (k < in)  // the last 4 inputs
            sec24_decompress_from(values, codes, values_bf16, in, code_bytes, r, k,
                                  (char*)dense + (r - row_begin) * in * (values_bf16 ? 2 : 4));
    }
}
