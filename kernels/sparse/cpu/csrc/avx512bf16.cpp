// AVX-512 BF16 kernel for bf16 weights × bf16 activations, and the decompression of bf16 weights. Compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mavx512vbmi -mavx512vbmi2 and called only on CPUs that have all six
// (other dtypes go to avx512.cpp).
//
// Per 64 inputs of a row: 32 kept bf16 values (one register, as they are stored) and their 64 bits of codes. One
// byte multishift (VBMI) pulls each value's 2-bit code into the low byte of its own 16-bit lane, one ternary-logic
// op masks it and adds the group's offset 4·(j/2), and one two-source 16-bit permute gathers the matching 32 of the
// token's 64 bf16 inputs. VDPBF16PS then multiplies the pairs (the two kept values of each group) and adds both
// products into one fp32 lane: 32 weights per instruction, twice an fp32 FMA's 16, with nothing widened.
#include <immintrin.h>

#include "common.h"
#include "masks512.h"

namespace {

constexpr int64_t kBlock = 1024;  // inputs per cascade block

struct Constants {
    alignas(64) uint8_t control[64];  // byte 2j: bit offset 2j of value j's code; byte 2j+1: anything (masked)
    alignas(64) uint16_t base[32];    // lane j: 4·(j/2), the first input of value j's group
    constexpr Constants() : control(), base() {
        for (int j = 0; j < 32; ++j) {
            control[2 * j] = (uint8_t)(2 * j);
            control[2 * j + 1] = 0;
            base[j] = (uint16_t)(4 * (j / 2));
        }
    }
};
constexpr Constants kConstants;

inline __m512i gather_index(uint64_t codes) {
    const __m512i control = _mm512_load_si512((const void*)kConstants.control);
    const __m512i base = _mm512_load_si512((const void*)kConstants.base);
    const __m512i picked = _mm512_multishift_epi64_epi8(control, _mm512_set1_epi64((long long)codes));
    return _mm512_ternarylogic_epi32(picked, _mm512_set1_epi16(3), base, 0xEA);  // (picked & 3) | base
}

inline __m512 dot_pairs(__m512 acc, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}

// Rows [r0, r0 + R) × tokens [t0, t0 + TT).
template <int R, int TT>
void tile(const sec24_args* a, int64_t r0, int64_t t0) {
    const int64_t in = a->in, kept = in / 2;
    __m512 acc[R][TT];
    alignas(64) float total[R][TT][16] = {};  // in memory: touched once per block
    const uint16_t* x[TT];
    const uint16_t* v[R];
    const uint8_t* c[R];
    SEC24_UNROLL
    for (int t = 0; t < TT; ++t) x[t] = a->x_bf16 + (t0 + t) * a->x_bf16_stride;
    SEC24_UNROLL
    for (int r = 0; r < R; ++r) {
        v[r] = (const uint16_t*)a->values + (r0 + r) * kept;
        c[r] = a->codes + (r0 + r) * a->code_bytes;
        SEC24_UNROLL
        for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
    }
    // Cascade summation: each block of kBlock inputs sums into fresh accumulators that are then added to the totals.
    // The next R rows follow these in memory: stream them in while these compute.
    sec24_prefetch next_values = sec24_prefetch_range(v[0] + R * kept, R * kept * 2, in / 64);
    sec24_prefetch next_codes = sec24_prefetch_range(c[0] + R * a->code_bytes, R * a->code_bytes, in / 64);
    int64_t k = 0;
    while (k + 64 <= in) {
        const int64_t end = sec24_min(in & ~(int64_t)63, k + kBlock);
        for (; k < end; k += 64) {
            sec24_prefetch_step(&next_values);
            sec24_prefetch_step(&next_codes);
            __m512i xa[TT], xb[TT];
            SEC24_UNROLL
            for (int t = 0; t < TT; ++t) {
                xa[t] = _mm512_loadu_si512((const void*)(x[t] + k));
                xb[t] = _mm512_loadu_si512((const void*)(x[t] + k + 32));
            }
            SEC24_UNROLL
            for (int r = 0; r < R; ++r) {
                uint64_t codes;
                memcpy(&codes, c[r] + k / 8, 8);
                const __m512i index = gather_index(codes);
                const __m512i w = _mm512_loadu_si512((const void*)(v[r] + k / 2));
                SEC24_UNROLL
                for (int t = 0; t < TT; ++t)
                    acc[r][t] = dot_pairs(acc[r][t], w, _mm512_permutex2var_epi16(xa[t], index, xb[t]));
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
    if (k < in) {  // the last 4..60 inputs: masked loads; lanes past the end hold zero weights and zero inputs
        const int64_t rest = in - k;
        const __mmask32 mask_a = (__mmask32)(rest >= 32 ? 0xFFFFFFFFu : (1u << rest) - 1);
        const __mmask32 mask_b = (__mmask32)(rest > 32 ? (1u << (rest - 32)) - 1 : 0);
        const __mmask32 mask_v = (__mmask32)((1u << (rest / 2)) - 1);
        __m512i xa[TT], xb[TT];
        SEC24_UNROLL
        for (int t = 0; t < TT; ++t) {
            xa[t] = _mm512_maskz_loadu_epi16(mask_a, x[t] + k);
            xb[t] = _mm512_maskz_loadu_epi16(mask_b, x[t] + k + 32);
        }
        SEC24_UNROLL
        for (int r = 0; r < R; ++r) {
            uint64_t codes = 0;
            memcpy(&codes, c[r] + k / 8, (size_t)((rest + 7) / 8));
            const __m512i index = gather_index(codes);
            const __m512i w = _mm512_maskz_loadu_epi16(mask_v, v[r] + k / 2);
            SEC24_UNROLL
            for (int t = 0; t < TT; ++t)
                acc[r][t] = dot_pairs(acc[r][t], w, _mm512_permutex2var_epi16(xa[t], index, xb[t]));
        }
    }
    SEC24_UNROLL
    for (int r = 0; r < R; ++r)
        SEC24_UNROLL
        for (int t = 0; t < TT; ++t)
            sec24_store(a, t0 + t, r0 + r, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_load_ps(total[r][t]), acc[r][t])));
}

template <int TT>
void rows_tokens(const sec24_args* a, int64_t r0, int64_t r1, int64_t t0) {
    constexpr int R = TT == 1 ? 8 : 4;
    int64_t r = r0;
    for (; r + R <= r1; r += R) tile<R, TT>(a, r, t0);
    for (; r < r1; ++r) tile<1, TT>(a, r, t0);
}

}  // namespace

extern "C" void sec24_rows_avx512bf16(const sec24_args* a, int64_t row_begin, int64_t row_end) {
    // Above 4 tokens, blocks of one tile's rows (4), whose packed bytes stay in L1 while every token tile reads them.
    // Measured (AMD Zen 5, 1 thread, all 7 benchmark shapes, 8 and 16 tokens, fp32 and bf16; blocks of 8 until
    // 2026-11-29, chosen on the Xeon): 8 tokens 10-15 % faster on the LLaMA-7B shapes (4096x4096 fp32 2.63 -> 2.32 ms,
    // bf16 1.39 -> 1.24), 16 tokens 0-20 % on SmolLM2's (1536x576 fp32 0.205 -> 0.170 ms), LLaMA-7B's within this VM's
    // noise (±10 %); blocks of 16 measured like 8. Not re-measured on the Xeon, where bf16 from 5 tokens runs on AMX.
    const int64_t block = a->tokens <= 4 ? row_end - row_begin : 4;
    for (int64_t b = row_begin; b < row_end; b += block) {
        const int64_t e = sec24_min(b + block, row_end);
        int64_t t = 0;
        for (; t + 4 <= a->tokens; t += 4) rows_tokens<4>(a, b, e, t);
        switch (a->tokens - t) {
            case 3: rows_tokens<3>(a, b, e, t); break;
            case 2: rows_tokens<2>(a, b, e, t); break;
            case 1: rows_tokens<1>(a, b, e, t); break;
            default: break;
        }
    }
}

// Rows of a bf16 weight, dense. Per 32 inputs: one 32-bit mask of kept positions (made 64 code bytes at a time,
// masks512.h), the 16 kept values as stored, one VPEXPANDW (VBMI2) under the mask, one 64-byte store: half the
// instructions of the AVX-512 kernel's way (16 inputs at a time, widened to 32 bits to expand and narrowed back).
extern "C" void sec24_decompress_avx512bf16(const void* values, const uint8_t* codes, int32_t values_bf16,
                                            int64_t in, int64_t code_bytes, int64_t row_begin, int64_t row_end,
                                            void* dense) {
    (void)values_bf16;  // bf16 only (the dispatcher sends fp32 weights to sec24_decompress_avx512)
    const int64_t kept = in / 2, groups = in / 32;  // groups of 32 inputs: 4 code bytes, 16 kept values each
    alignas(64) uint32_t masks[16];                // the masks of 16 groups: 64 code bytes
    for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t* c = codes + r * code_bytes;
        const uint16_t* v = (const uint16_t*)values + r * kept;
        uint16_t* d = (uint16_t*)dense + (r - row_begin) * in;
        for (int64_t g = 0; g < groups; g += 16) {
            const int64_t n = sec24_min(16, groups - g);
            sec24_code_masks(c + 4 * g, 4 * n, (uint8_t*)masks);
            for (int64_t i = 0; i < n; ++i) {
                const __m512i w = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(v + 16 * (g + i))));
                _mm512_storeu_si512((void*)(d + 32 * (g + i)), _mm512_maskz_expand_epi16((__mmask32)masks[i], w));
            }
        }
        if (32 * groups < in)  // the last 4..28 inputs
            sec24_decompress_from(values, codes, values_bf16, in, code_bytes, r, 32 * groups, d);
    }
}
