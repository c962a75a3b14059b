// The token-vector kernel for products of many tokens (fp32 activations; fp32 or bf16 weights), written once over a
// vector type and compiled by each instruction set's translation unit for itself (avx512.cpp, avx2.cpp): everything
// here has internal linkage, so no copy compiled with one unit's flags is linked into another's.
//
// Why: the permute kernels spend a permute per token for every vector of kept weights, so from a few dozen tokens
// they are compute-bound at about the dense cost, and the hand-over (decompress, then a dense product) pays the
// dense cost plus the decompression. Here the vector runs over tokens instead of inputs: x is transposed once per
// call (tokens_pack_xt) so that one input's 16 (AVX-512) or 8 (AVX2) tokens are one vector, and each kept
// weight is one broadcast and one FMA per vector of tokens, reading x at the kept input's row: a pruned weight costs
// nothing, so the product does half the dense FMAs (the 2:4 pattern of Mishra et al. 2021, arXiv 2104.08378, §3,
// which SparseGPT prunes to; the same counting as a sparse-times-dense product with the sparse operand on the
// left). The positions come from a 256-entry table per code byte.
//
// What bounds it: every FMA loads its own vector of x (no other row keeps the same inputs), so it runs at the load
// ports' rate, not the FMA units'. Measured (Xeon with AMX, 1 thread, everything in cache, fp32, the layout before
// 2026-11-30): 1.7-2.0 G FMAs/s against dense F.linear's 3.7-4.2 G, so with half the FMAs it about tied dense at 128+
// tokens, where dense is compute-bound, and won where dense was not yet (16-64 tokens: 4096x4096 at 32 tokens 8.2 ms
// against 14.9 dense, 12.3 for the AVX-512 permute kernel, 16.8 for the hand-over; at 64, 15.0 / 20.3 / 22.9 / 22.6);
// rows in register tiles of 16 accumulators instead of 8, and blocks of x of 16 KiB instead of 32, measured alike
// there. The same kernel on 256-bit vectors (the AVX2 build on that Xeon) issued 2.9-3.8 G FMAs/s against 512-bit's
// 1.7-2.4 G, which pointed at the 512-bit loads. On an AMD Zen 5, with the blocks below, 3.8-4.0 G at 128+ tokens
// against dense's 7.3 G: 1.05-1.19x dense on the LLaMA-7B shapes.
//
//   xT chunk (tokens_pack_xt): [in][W] fp32, W = 16·NV tokens (AVX-512; 8·NV on AVX2), tokens past the end zero
//   a block of KB inputs of a chunk (KB·W·4 bytes, 16 or 24 KiB): stays in L1 while a block of rows reads it
//   ys [16 or 64 rows][W]: each row's running sums; every block's products are summed in fresh registers
//   and then added (a cascade: no lane adds more than KB/2 products in a row, so fp32 rounding stays near the
//   dense product's)
#pragma once

#include <immintrin.h>

#include "common.h"

namespace {

// For a code byte (8 inputs, 4 kept values in ascending order): each kept value's input, 0..7.
struct sec24_position_table {
    uint8_t pos[256][4];
    constexpr sec24_position_table() : pos() {
        for (int b = 0; b < 256; ++b)
            for (int q = 0; q < 4; ++q) pos[b][q] = (uint8_t)(4 * (q / 2) + ((b >> (2 * q)) & 3));
    }
};
constexpr sec24_position_table sec24_positions;

// How a chunk of x meets the rows. Each block of inputs of the xT chunk (kb inputs × W tokens) stays in L1 while a
// block of rows reads it; the whole chunk passes through L1 once per row block, from L2 or L3. Two regimes, measured
// (AMD EPYC Zen 5, 1 thread, fp32, two weight copies alternated (68-180 MB), medians of 9; G vector FMAs/s, LLaMA-7B
// shapes 4096x4096, 11008x4096, 4096x11008 / SmolLM2's 1536x576, 576x1536, 576x576):
// * full chunks of 512-bit vectors (NV = kMaxVectors: 128 tokens): blocks of 64 rows and 16 KiB of x, no prefetch:
//   3.8-4.0 / 3.3-3.8 at 128 and 512 tokens, where blocks of 16 rows with the prefetch below ran 3.3-3.5 / 3.2-3.8
//   and the layout before 2026-11-30 (64 rows from 1 MiB chunks, 32 KiB blocks) 1.9-2.2 on the LLaMA-7B shapes
//   (likely cause: 64 rows' sums, 32 KiB, and a 32 KiB block of x cannot share the 48 KiB L1);
// * everything else (fewer tokens, a chunk's last, every AVX2 chunk): blocks of 16 rows and 24 KiB of x, the next
//   block's packed bytes prefetched while this one computes: 2.6-2.8 at 32 tokens and 2.9-3.2 at 64, where 64-row
//   blocks fell to 1.2-2.2 on 4096x11008 (an 11008-input chunk of 64 tokens is 2.75 MiB) and the earlier layout ran
//   2.3-2.4 at 32 and 1.8-2.8 at 64; SmolLM2's shapes alike within 5 % either way. The AVX2 build on the same Zen 5
//   (8-lane vectors: full chunks of 64 tokens) ran its full chunks at 0.9-1.0 in 64-row blocks, 2.3-2.4 in 16-row
//   ones (the earlier layout 1.8-2.2), so there they take 16-row blocks too; from 8 to 32 tokens all alike (5 %).
// The tall blocks need an L1d that holds 64 rows' sums (32 KiB) beside the 16 KiB of x: 48 KiB (Zen 5, the Xeon's
// Golden Cove cores). Where it is smaller every chunk takes the 16-row blocks (sec24_args.tokens_tall, set by the
// dispatcher from the L1d size): measured (AMD EPYC Zen 4, CPU family 25 model 17, L1d 32 KiB; 1 thread, fp32,
// two weight copies alternated, interleaved call by call, medians of 6; G vector FMAs/s, 4096x4096 and 4096x11008 at
// 128 and 512 tokens): 64-row blocks 1.05-1.12, 16-row blocks 1.94-2.13 (dense's FMAs at its rate, halved for
// comparison, 1.30-1.43); 32-row blocks with 12 KiB of x and the prefetch 1.27-2.14.
// On an Intel Xeon (family 6 model 207, L1d 48 KiB; 1 thread, fp32, weights rotated over 300 MB, interleaved call by
// call, medians) the tall blocks ran the LLaMA-7B shapes 12-33 % faster than 16-row ones at 128 and 512 tokens
// (4096x11008 at 512: 327 against 435 ms), SmolLM2's 1536x576 and 576x1536 alike (-10 ... +2 %).
// (The Xeon of 2026-11-29, with the earlier layout, had measured 64-row blocks 15-25 % faster at 64 and 512 tokens.)
constexpr int kTokensRowBlockFull = 64, kTokensRowBlock = 16;
constexpr int64_t kTokensXBlockFull = 16 << 10, kTokensXBlock = 24 << 10;
static_assert(kTokensRowBlockFull * 128 * 4 + kTokensXBlockFull <= SEC24_TOKENS_TALL_L1_BYTES, "see packed24.h");

// Whether a chunk of NV vectors may take the 64-row blocks: full chunks of 512-bit vectors only (above), and only
// where the L1d holds them (args->tokens_tall).
template <class V>
constexpr bool tokens_tall_blocks(int nv) {
    return V::kLanes == 16 && nv == V::kMaxVectors;
}

// Rows per register tile for NV token vectors: enough independent accumulators (R·NV ≥ 8) to hide the FMA latency
// with two FMA units, within the register file (V::kAccumulators).
template <class V, int NV>
constexpr int tokens_rows() {
    constexpr int r = (8 + NV - 1) / NV;
    return r * NV <= V::kAccumulators ? r : 1;
}

// Weight j of a row as fp32.
template <bool BF16>
inline float tokens_weight(const void* v, int64_t j) {
    return BF16 ? sec24_bf16_to_f32(((const uint16_t*)v)[j]) : ((const float*)v)[j];
}

// A code byte's four kept weights (j .. j + 3 of a row, fp32 or bf16) as fp32 in 128 bits: one load, bf16 widened.
// The vector types broadcast it to every 128-bit lane and spread weight q of it over the vector by an in-lane shuffle
// (V::broadcast4, V::spread), instead of a broadcast load per weight (measurements at Vec256 and Vec512).
template <bool BF16>
inline __m128 tokens_weights4(const void* v, int64_t j) {
    if constexpr (BF16) {
        const __m128i h = _mm_loadl_epi64((const __m128i*)((const uint16_t*)v + j));  // 4 bf16
        return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
    } else {
        return _mm_loadu_ps((const float*)v + j);
    }
}

// Code byte b of R rows (their first Q kept values: 4, or 2 for a last byte that holds one group of 4 inputs) against
// the xT rows of its 8 inputs (xb): one broadcast weight and NV FMAs per kept value.
template <class V, int NV, int R, int Q, bool BF16>
__attribute__((always_inline)) inline void tokens_byte(typename V::reg (&acc)[R][NV], const char* const (&v)[R],
                                                       const uint8_t* const (&c)[R], const float* xb, int64_t b) {
    constexpr int W = V::kLanes * NV;
    SEC24_UNROLL
    for (int i = 0; i < R; ++i) {
        const uint8_t* p = sec24_positions.pos[c[i][b]];
        // A whole byte's four weights in one load (tokens_weights4); a last half byte's two one broadcast each.
        typename V::reg quad{};
        if constexpr (Q == 4) quad = V::broadcast4(tokens_weights4<BF16>(v[i], 4 * b));
        SEC24_UNROLL
        for (int q = 0; q < Q; ++q) {
            typename V::reg w;
            if constexpr (Q == 4)
                w = V::spread(quad, q);
            else
                w = V::set1(tokens_weight<BF16>(v[i], 4 * b + q));
            const float* xr = xb + p[q] * W;
            SEC24_UNROLL
            for (int n = 0; n < NV; ++n) acc[i][n] = V::fmadd(w, V::load(xr + n * V::kLanes), acc[i][n]);
        }
    }
}

// R rows starting at row r × the NV token vectors of an xT block of inputs [k0, k0 + 8·bytes) (the last byte may
// hold one group, `half`): sums into ys rows (row stride W floats).
template <class V, int NV, int R, bool BF16>
inline void tokens_tile(const sec24_args* a, const float* xblk, int64_t k0, int64_t bytes, bool half, int64_t r,
                        float* ys) {
    constexpr int W = V::kLanes * NV;
    const int64_t kept = a->in / 2, vsize = BF16 ? 2 : 4;
    typename V::reg acc[R][NV];
    const char* v[R];
    const uint8_t* c[R];
    SEC24_UNROLL
    for (int i = 0; i < R; ++i) {
        v[i] = (const char*)a->values + ((r + i) * kept + k0 / 2) * vsize;
        c[i] = a->codes + (r + i) * a->code_bytes + k0 / 8;
        SEC24_UNROLL
        for (int n = 0; n < NV; ++n) acc[i][n] = V::zero();
    }
    for (int64_t b = 0; b < bytes; ++b) tokens_byte<V, NV, R, 4, BF16>(acc, v, c, xblk + 8 * b * W, b);
    if (half) tokens_byte<V, NV, R, 2, BF16>(acc, v, c, xblk + 8 * bytes * W, bytes);  // in % 8 == 4: one group left
    SEC24_UNROLL
    for (int i = 0; i < R; ++i)
        SEC24_UNROLL
        for (int n = 0; n < NV; ++n) {
            float* s = ys + i * W + n * V::kLanes;
            V::store(s, V::add(V::load(s), acc[i][n]));
        }
}

// ys rows [0, m) × tokens [0, count) (row stride W) into y rows [rb, rb + m) of tokens [t0, t0 + count): squares of
// kLanes rows × kLanes tokens transposed in registers, each token's kLanes rows one vector store; rows left over one
// element at a time. (Element by element throughout, the store took a third of the time of 1536x576 at 512 tokens:
// measured, Xeon, 1 thread, 8.47 ms against 5.39 ms without any store.)
template <class V>
inline void tokens_write(const sec24_args* a, const float* ys, int64_t W, int m, int64_t t0, int64_t count,
                         int64_t rb) {
    constexpr int L = V::kLanes;
    int i = 0;
    for (; i + L <= m; i += L)
        for (int64_t t = 0; t < count; t += L) {
            typename V::reg v[L];
            SEC24_UNROLL
            for (int q = 0; q < L; ++q) v[q] = V::load(ys + (i + q) * W + t);  // row i + q, tokens t..t + L - 1
            V::transpose(v);                                                    // v[n]: token t + n, rows i..i + L - 1
            const int64_t tokens = sec24_min(L, count - t);
            for (int64_t n = 0; n < tokens; ++n) V::store_y(a, t0 + t + n, rb + i, v[n]);
        }
    for (; i < m; ++i)
        for (int64_t t = 0; t < count; ++t) sec24_store(a, t0 + t, rb + i, ys[i * W + t]);
}

// Rows [r0, r1) × the tokens [t0, t0 + count) of one xT chunk (count ≤ W), in blocks of rows as above.
template <class V, int NV, bool BF16>
void tokens_chunk(const sec24_args* a, const float* xt, int64_t t0, int64_t count, int64_t r0, int64_t r1) {
    constexpr int W = V::kLanes * NV, R = tokens_rows<V, NV>();
    constexpr int max_rows = tokens_tall_blocks<V>(NV) ? kTokensRowBlockFull : kTokensRowBlock;
    const bool full = tokens_tall_blocks<V>(NV) && a->tokens_tall;
    const int block_rows = full ? kTokensRowBlockFull : kTokensRowBlock;
    const int64_t in = a->in, row_values = in / 2 * (a->values_bf16 ? 2 : 4);
    // Inputs per block: a multiple of 8 (one code byte) whose xT rows fill about the block's bytes.
    const int64_t fit = (full ? kTokensXBlockFull : kTokensXBlock) / (W * 4) / 8 * 8;
    const int64_t kb = sec24_min((in + 7) / 8 * 8, fit > 8 ? fit : 8);
    alignas(64) float ys[max_rows * W];
    for (int64_t rb = r0; rb < r1; rb += block_rows) {
        const int m = (int)sec24_min(block_rows, r1 - rb);
        for (int64_t i = 0; i < m * W; ++i) ys[i] = 0.0f;
        // The next block's rows are one contiguous range of values and one of codes: one prefetch step per tile.
        const int64_t next = full ? 0 : sec24_min(block_rows, r1 - rb - m);
        const int64_t steps = (in + kb - 1) / kb * (m / R + m % R);
        const char* next_values = (const char*)a->values + (rb + m) * row_values;
        sec24_prefetch nv = sec24_prefetch_range(next_values, next * row_values, steps);
        sec24_prefetch nc = sec24_prefetch_range(a->codes + (rb + m) * a->code_bytes, next * a->code_bytes, steps);
        for (int64_t k0 = 0; k0 < in; k0 += kb) {
            const int64_t inputs = sec24_min(kb, in - k0), bytes = inputs / 8;
            const bool half = inputs % 8 != 0;  // 4 inputs left: in % 8 == 4 and this is the last block
            const float* xblk = xt + k0 * W;
            int i = 0;
            for (; i + R <= m; i += R) {
                sec24_prefetch_step(&nv);
                sec24_prefetch_step(&nc);
                tokens_tile<V, NV, R, BF16>(a, xblk, k0, bytes, half, rb + i, ys + i * W);
            }
            for (; i < m; ++i) {
                sec24_prefetch_step(&nv);
                sec24_prefetch_step(&nc);
                tokens_tile<V, NV, 1, BF16>(a, xblk, k0, bytes, half, rb + i, ys + i * W);
            }
        }
        tokens_write<V>(a, ys, W, m, t0, count, rb);
    }
}

template <class V, bool BF16>
void tokens_rows_all(const sec24_args* a, int64_t r0, int64_t r1) {
    constexpr int64_t chunk = V::kLanes * V::kMaxVectors;
    for (int64_t t0 = 0; t0 < a->tokens; t0 += chunk) {
        const int64_t count = sec24_min(chunk, a->tokens - t0);
        const float* xt = a->x_t + t0 * a->in;  // chunks before this one are full: [in][chunk] each
        switch ((count + V::kLanes - 1) / V::kLanes) {
            case 1: tokens_chunk<V, 1, BF16>(a, xt, t0, count, r0, r1); break;
            case 2: tokens_chunk<V, 2, BF16>(a, xt, t0, count, r0, r1); break;
            case 3: tokens_chunk<V, 3, BF16>(a, xt, t0, count, r0, r1); break;
            case 4: tokens_chunk<V, 4, BF16>(a, xt, t0, count, r0, r1); break;
            case 5: tokens_chunk<V, 5, BF16>(a, xt, t0, count, r0, r1); break;
            case 6: tokens_chunk<V, 6, BF16>(a, xt, t0, count, r0, r1); break;
            case 7: tokens_chunk<V, 7, BF16>(a, xt, t0, count, r0, r1); break;
            default: tokens_chunk<V, 8, BF16>(a, xt, t0, count, r0, r1); break;
        }
    }
}

// The layout tokens_rows reads from args->x_t: chunks of V::kMaxVectors vectors of V::kLanes tokens, chunk c holding
// tokens [c·chunk, ...) as [in][W] with W = chunk, or for the last chunk its tokens rounded up to whole vectors
// (tokens past the end zero). Chunk c starts at c·chunk·in floats. The floats it takes:
template <class V>
int64_t tokens_xt_floats(int64_t tokens, int64_t in) {
    constexpr int64_t chunk = V::kLanes * V::kMaxVectors;
    const int64_t full = tokens / chunk * chunk;
    return full * in + (tokens - full + V::kLanes - 1) / V::kLanes * V::kLanes * in;
}

// x (fp32, args->x) into that layout, kLanes tokens at a time: kLanes × kLanes blocks loaded a token row per
// vector, transposed in registers and stored an input row per vector; inputs past the last whole block and the
// last partial vector of tokens element by element. (Element by element throughout, with inputs in the outer loop,
// the pack of 512 tokens × 4096 inputs took 6.2 ms, measured (AMD Zen 4, 1 thread): 5 % of the 4096 × 4096 product
// and 13 % of 576 × 576's (0.42 of 3.15 ms), on the calling thread before any other thread starts.)
template <class V>
void tokens_pack_xt(const sec24_args* a, float* xt) {
    constexpr int64_t chunk = V::kLanes * V::kMaxVectors;
    constexpr int L = V::kLanes;
    const int64_t in = a->in;
    for (int64_t t0 = 0; t0 < a->tokens; t0 += chunk) {
        const int64_t count = sec24_min(chunk, a->tokens - t0);
        const int64_t width = (count + L - 1) / L * L;
        float* dst = xt + t0 * in;  // [in][width]
        for (int64_t t = 0; t < width; t += L) {
            const int64_t tokens = sec24_min(L, count - t);  // x rows t0 + t .. (the rest of the vector: zeros)
            const float* x = a->x + (t0 + t) * a->x_stride;
            int64_t k = 0;
            if (tokens == L)
                for (; k + L <= in; k += L) {
                    typename V::reg v[L];
                    SEC24_UNROLL
                    for (int q = 0; q < L; ++q) v[q] = V::load(x + q * a->x_stride + k);  // token t + q, inputs k..
                    V::transpose(v);                                                   // v[n]: input k + n, tokens t..
                    SEC24_UNROLL
                    for (int n = 0; n < L; ++n) V::store(dst + (k + n) * width + t, v[n]);
                }
            for (; k < in; ++k)
                for (int64_t u = 0; u < L; ++u) dst[k * width + t + u] = u < tokens ? x[u * a->x_stride + k] : 0.0f;
        }
    }
}

// The kernel's entry for one instruction set's vector type: rows [r0, r1) × all tokens.
template <class V>
void tokens_rows(const sec24_args* a, int64_t r0, int64_t r1) {
    if (a->values_bf16)
        tokens_rows_all<V, true>(a, r0, r1);
    else
        tokens_rows_all<V, false>(a, r0, r1);
}

}  // namespace
