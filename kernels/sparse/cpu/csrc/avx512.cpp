// AVX-512 (F, BW, VL) kernel. Compiled with -mavx512f -mavx512bw -mavx512vl and called only on CPUs that have them.
//
// Per 32 inputs of a row: 16 kept values (one register: fp32 loaded, or bf16 widened by a 16-bit shift) and their
// 32 bits of codes. The codes become 16 lane indices 4·(j/2) + code_j (broadcast, per-lane shift, mask and add in
// one ternary-logic op), and one two-source permute gathers the matching 16 of the 32 inputs held in two registers.
// One FMA per 32 inputs and token: the product never touches a pruned weight. R rows share each token's x
// registers; TT tokens share each row's index and value registers.
#include <immintrin.h>

#include "common.h"
#include "masks512.h"
#include "store512.h"
#include "tokens.h"

namespace {

constexpr int64_t kBlock = 512;  // inputs per cascade block

inline __m512i gather_index(uint32_t codes) {
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    const __m512i shifted = _mm512_srlv_epi32(_mm512_set1_epi32((int)codes), shifts);
    return _mm512_ternarylogic_epi32(shifted, _mm512_set1_epi32(3), base, 0xEA);  // (shifted & 3) | base
}

template <bool BF16>
inline __m512 load_values(const void* v, int64_t j) {
    if (BF16) {
        const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)v + j));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float*)v + j);
}

template <bool BF16>
inline __m512 load_values_masked(const void* v, int64_t j, __mmask16 mask) {
    if (BF16) {
        const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t*)v + j);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mask, (const float*)v + j);
}

// Rows [r0, r0 + R) × tokens [t0, t0 + TT).
template <int R, int TT, bool BF16>
void tile(const sec24_args* a, int64_t r0, int64_t t0) {
    const int64_t in = a->in, kept = in / 2, vsize = BF16 ? 2 : 4;
    __m512 acc[R][TT];
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
        for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
    }
    // Cascade summation: each block of kBlock inputs sums into fresh accumulators that are then added to the
    // totals, so no lane adds more than kBlock/32 products in a row (fp32 rounding stays near the dense product's).
    // (In memory, not registers: they are touched once per block, and the accumulators need the registers.)
    alignas(64) float total[R][TT][16] = {};
    // The next R rows follow these in memory: stream them in while these compute. Always in tiles of fewer than 8
    // rows (more than one token) and on short rows; on the one-token tile's long rows where the measurement at first
    // use found it faster (a->prefetch_long_rows). Measured on the Xeon of 2026-11-30 (family 6 model 167), 1 thread,
    // weights rotated over 400 MB, alternated, without it / with it: LLaMA-7B's fp32 shapes 0.73-0.85 at one token
    // (4096 x 4096: 2.48 against 3.38 ms) but 1.00-1.19 at 4, 8 and 16 tokens; SmolLM2's short rows (576 and 1536
    // inputs) 1.25-1.35 at one token (and 15-50 % slower without it on AMD, docs/kernels.md).
    const bool prefetch = R < 8 || a->prefetch_long_rows || kept * vsize < SEC24_LONG_ROW_BYTES;
    const int64_t next_value_bytes = prefetch ? R * kept * vsize : 0, next_code_bytes = prefetch ? R * a->code_bytes : 0;
    sec24_prefetch next_values = sec24_prefetch_range(v[0] + R * kept * vsize, next_value_bytes, in / 32);
    sec24_prefetch next_codes = sec24_prefetch_range(c[0] + R * a->code_bytes, next_code_bytes, in / 32);
    int64_t k = 0;
    while (k + 32 <= in) {
        const int64_t end = sec24_min(in & ~(int64_t)31, k + kBlock);
        for (; k < end; k += 32) {
            sec24_prefetch_step(&next_values);
            sec24_prefetch_step(&next_codes);
            __m512 xa[TT], xb[TT];
            SEC24_UNROLL
            for (int t = 0; t < TT; ++t) {
                xa[t] = _mm512_loadu_ps(x[t] + k);
                xb[t] = _mm512_loadu_ps(x[t] + k + 16);
            }
            SEC24_UNROLL
            for (int r = 0; r < R; ++r) {
                uint32_t codes;
                memcpy(&codes, c[r] + k / 8, 4);
                const __m512i index = gather_index(codes);
                const __m512 w = load_values<BF16>(v[r], k / 2);
                SEC24_UNROLL
                for (int t = 0; t < TT; ++t)
                    acc[r][t] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(xa[t], index, xb[t]), acc[r][t]);
            }
        }
        SEC24_UNROLL
        for (int r = 0; r < R; ++r)
            SEC24_UNROLL
            for (int t = 0; t < TT; ++t) {
                _mm512_store_ps(total[r][t], _mm512_add_ps(_mm512_load_ps(total[r][t]), acc[r][t]));
                acc[r][t] = _mm512_setzero_ps();
            }
    }
    if (k < in) {  // the last 4..28 inputs: masked loads; lanes past the end hold zero weights and zero inputs
        const int64_t rest = in - k;
        const __mmask16 mask_a = (__mmask16)((1u << sec24_min(rest, 16)) - 1);
        const __mmask16 mask_b = (__mmask16)(rest > 16 ? (1u << (rest - 16)) - 1 : 0);
        const __mmask16 mask_v = (__mmask16)((1u << (rest / 2)) - 1);
        __m512 xa[TT], xb[TT];
        SEC24_UNROLL
        for (int t = 0; t < TT; ++t) {
            xa[t] = _mm512_maskz_loadu_ps(mask_a, x[t] + k);
            xb[t] = _mm512_maskz_loadu_ps(mask_b, x[t] + k + 16);
        }
        SEC24_UNROLL
        for (int r = 0; r < R; ++r) {
            uint32_t codes = 0;
            memcpy(&codes, c[r] + k / 8, (size_t)((rest + 7) / 8));
            const __m512i index = gather_index(codes);
            const __m512 w = load_values_masked<BF16>(v[r], k / 2, mask_v);
            SEC24_UNROLL
            for (int t = 0; t < TT; ++t)
                acc[r][t] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(xa[t], index, xb[t]), acc[r][t]);
        }
    }
    SEC24_UNROLL
    for (int r = 0; r < R; ++r)
        SEC24_UNROLL
        for (int t = 0; t < TT; ++t)
            sec24_store(a, t0 + t, r0 + r, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_load_ps(total[r][t]), acc[r][t])));
}

template <int TT, bool BF16>
void rows_tokens(const sec24_args* a, int64_t r0, int64_t r1, int64_t t0) {
    constexpr int R = TT == 1 ? 8 : 4;
    int64_t r = r0;
    for (; r + R <= r1; r += R) tile<R, TT, BF16>(a, r, t0);
    for (; r < r1; ++r) tile<1, TT, BF16>(a, r, t0);
}

template <bool BF16>
void rows(const sec24_args* a, int64_t r0, int64_t r1) {
    // Above 4 tokens, blocks of one tile's rows (4), whose packed bytes stay in L1 while every token tile reads them.
    // Measured (AMD Zen 5, 1 thread, all 7 benchmark shapes, 8 and 16 tokens, fp32 and bf16; blocks of 8 until
    // 2026-11-29, chosen on the Xeon): 8 tokens 10-15 % faster on the LLaMA-7B shapes (4096x4096 fp32 2.63 -> 2.32 ms,
    // bf16 1.39 -> 1.24), 16 tokens 0-20 % on SmolLM2's (1536x576 fp32 0.205 -> 0.170 ms), LLaMA-7B's within this VM's
    // noise (±10 %); blocks of 16 measured like 8. Not re-measured on the Xeon, where bf16 from 5 tokens runs on AMX.
    const int64_t block = a->tokens <= 4 ? r1 - r0 : 4;
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

// tokens.h's vector type: 16 fp32 lanes; up to 24 accumulators of the 32 registers.
struct Vec512 {
    using reg = __m512;
    static constexpr int kLanes = 16, kMaxVectors = 8, kAccumulators = 24;
    static reg zero() { return _mm512_setzero_ps(); }
    static reg set1(float f) { return _mm512_set1_ps(f); }
    // tokens.h's weights four at a time, as avx2.cpp's Vec256 takes them: weights j..j + 3 of a row
    // (tokens_weights4) in all four 128-bit lanes, then weight q of them in every lane by one in-lane shuffle, instead
    // of a broadcast load per weight (the kernel is bound by its loads: every FMA loads its own vector of x). Measured
    // (AMD EPYC Zen 4, family 25 model 17, 1 thread, 16-row blocks, four weight copies alternated, the two forms
    // compiled side by side and called in turn, medians of the paired ratios of 8 rounds; fp32 weights / bf16
    // weights): 32 tokens 6-16 % / 3-8 % faster on the seven benchmark shapes, 128 and 512 tokens 0.5-6.5 % / 1-4 %;
    // the same sums to the bit. The 64-row blocks, on that CPU: 0-1 % on 4096x4096, 20-36 % on 1536x576. Not yet
    // measured on an Intel CPU.
    static reg broadcast4(__m128 f) { return _mm512_broadcast_f32x4(f); }
    static reg spread(reg v, int q) {
        switch (q) {
            case 0: return _mm512_permute_ps(v, 0x00);
            case 1: return _mm512_permute_ps(v, 0x55);
            case 2: return _mm512_permute_ps(v, 0xAA);
            default: return _mm512_permute_ps(v, 0xFF);
        }
    }
    static reg load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
    static reg add(reg x, reg y) { return _mm512_add_ps(x, y); }
    static reg fmadd(reg x, reg y, reg z) { return _mm512_fmadd_ps(x, y, z); }
    static void transpose(reg r[16]) { sec24_transpose16(r); }
    static void store_y(const sec24_args* a, int64_t token, int64_t row, reg v) {
        sec24_store16(a, token, row, 0xffff, v);
    }
};

}  // namespace

extern "C" void sec24_rows_avx512_tokens(const sec24_args* a, int64_t row_begin, int64_t row_end) {
    tokens_rows<Vec512>(a, row_begin, row_end);
}

extern "C" int64_t sec24_tokens_xt_floats_avx512(int64_t tokens, int64_t in) {
    return tokens_xt_floats<Vec512>(tokens, in);
}

extern "C" void sec24_tokens_pack_xt_avx512(const sec24_args* a, float* x_t) { tokens_pack_xt<Vec512>(a, x_t); }

extern "C" void sec24_rows_avx512(const sec24_args* a, int64_t row_begin, int64_t row_end) {
    if (a->values_bf16)
        rows<true>(a, row_begin, row_end);
    else
        rows<false>(a, row_begin, row_end);
}

// Rows of the dense weight. Per 16 inputs: one 16-bit mask of kept positions (made 64 code bytes at a time,
// masks512.h), the 8 kept values, one expand under the mask, one store.
extern "C" void sec24_decompress_avx512(const void* values, const uint8_t* codes, int32_t values_bf16, int64_t in,
                                        int64_t code_bytes, int64_t row_begin, int64_t row_end, void* dense) {
    const int64_t kept = in / 2, groups = in / 16;  // groups of 16 inputs: 2 code bytes, 8 kept values each
    alignas(64) uint16_t masks[32];                // the masks of 32 groups: 64 code bytes
    for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t* c = codes + r * code_bytes;
        for (int64_t g = 0; g < groups; g += 32) {
            const int64_t n = sec24_min(32, groups - g);
            sec24_code_masks(c + 2 * g, 2 * n, (uint8_t*)masks);
            if (values_bf16) {
                const uint16_t* v = (const uint16_t*)values + r * kept + 8 * g;
                uint16_t* d = (uint16_t*)dense + (r - row_begin) * in + 16 * g;
                for (int64_t i = 0; i < n; ++i) {
                    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(v + 8 * i)));
                    const __m512i e = _mm512_maskz_expand_epi32((__mmask16)masks[i], _mm512_castsi256_si512(w));
                    _mm256_storeu_si256((__m256i*)(d + 16 * i), _mm512_cvtepi32_epi16(e));
                }
            } else {
                const float* v = (const float*)values + r * kept + 8 * g;
                float* d = (float*)dense + (r - row_begin) * in + 16 * g;
                for (int64_t i = 0; i < n; ++i)
                    _mm512_storeu_ps(d + 16 * i, _mm512_maskz_expand_ps((__mmask16)masks[i],
                                                                         _mm512_castps256_ps512(_mm256_loadu_ps(v + 8 * i))));
            }
        }
        if (16 * groups < in)  // the last 4, 8 or 12 inputs
            sec24_decompress_from(values, codes, values_bf16, in, code_bytes, r, 16 * groups,
                                  (char*)dense + (r - row_begin) * in * (values_bf16 ? 2 : 4));
    }
}
