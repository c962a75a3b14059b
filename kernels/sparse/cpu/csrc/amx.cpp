// AMX kernel for bf16 weights × bf16 activations at several tokens. Compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512vbmi2 -mamx-tile -mamx-bf16 and called only on CPUs that have them, once the OS has granted the process
// the tile state (dispatch.cpp asks, ARCH_REQ_XCOMP_PERM).
//
// Why: the permute kernels pay one permute per token for every 32 kept weights, so at 16 tokens a bf16 product is
// compute-bound on the permute port, while the dense product on an AMX CPU runs on the tile unit and stays
// memory-bound (measured, Xeon with AMX, 1 thread: 4096x4096 bf16 at 16 tokens, dense 3.6 ms, permute kernel 6.1 ms).
// Here the permutation moves to the weight side, once for every token: 16 rows × 32 inputs of W are expanded from
// their 16 kept values (VPEXPANDW under the 32-bit mask of kept positions, VBMI2) into a 1 KiB tile in L1, and one
// TDPBF16PS multiplies it with 16 tokens at once (Intel AMX: C[16 rows][16 tokens] += A[16 rows][32 inputs] ·
// B[32 inputs][16 tokens], B in the VNNI layout of pairs). Only the packed bytes come from memory; the dense tile
// never leaves L1.
//
//   A (tile 4): W rows r..r+15, inputs k..k+31, bf16, row stride 64 bytes     (expanded here, one row per VPEXPANDW)
//   B (tile 5): tokens 16·b..16·b+15, inputs k..k+31, as 16 rows of pairs      (x packed once per call: pack_x)
//   C (tiles 0..NB-1): fp32 [16 rows][16 tokens], one per block of 16 tokens, NB ≤ 4
#include <immintrin.h>

#include <type_traits>

#include "common.h"
#include "store512.h"

namespace {

constexpr int kMaxTokenTiles = 4;  // C tiles per pass (tiles 0..3); 64 tokens per pass, more tokens take more passes
constexpr int64_t kGroupBytes = 1 << 20;  // packed x of one group of tokens sharing each expanded panel (see below)

struct TileConfig {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

int64_t padded_pairs(int64_t in) { return (in + 31) / 32 * 16; }  // input pairs, rounded up to whole tiles

// Rows [r, r + m) × inputs [k, k + 32) of W, expanded into tile[i * stride + 0..31] for rows i < 16 (rows m..15 and
// inputs past `in` zero).
inline void expand_tile(const sec24_args* a, int64_t r, int m, int64_t k, uint16_t* tile, int64_t stride) {
    const int64_t kept = a->in / 2, rest = a->in - k;
    const uint16_t* v = (const uint16_t*)a->values + r * kept + k / 2;
    const uint8_t* c = a->codes + r * a->code_bytes + k / 8;
    if (rest >= 32) {
        for (int i = 0; i < m; ++i, v += kept, c += a->code_bytes) {
            const uint32_t mask = (uint32_t)sec24_masks.mask[c[0]] | ((uint32_t)sec24_masks.mask[c[1]] << 8) |
                                  ((uint32_t)sec24_masks.mask[c[2]] << 16) | ((uint32_t)sec24_masks.mask[c[3]] << 24);
            const __m512i w = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)v));
            _mm512_store_si512((void*)(tile + stride * i), _mm512_maskz_expand_epi16((__mmask32)mask, w));
        }
    } else {  // the last 4..28 inputs: only their code bytes and values are read
        const int bytes = (int)((rest + 7) / 8);
        const uint32_t valid = (1u << rest) - 1;
        for (int i = 0; i < m; ++i, v += kept, c += a->code_bytes) {
            uint32_t mask = 0;
            for (int b = 0; b < bytes; ++b) mask |= (uint32_t)sec24_masks.mask[c[b]] << (8 * b);
            const __m256i w = _mm256_maskz_loadu_epi16((__mmask16)((1u << (rest / 2)) - 1), v);
            _mm512_store_si512((void*)(tile + stride * i),
                               _mm512_maskz_expand_epi16((__mmask32)(mask & valid), _mm512_castsi256_si512(w)));
        }
    }
    for (int i = m; i < 16; ++i) _mm512_store_si512((void*)(tile + stride * i), _mm512_setzero_si512());
}

// C tile out to y: rows [r, r + m) of token tile `block`, its tokens that exist, plus bias, in y's dtype. The tile is
// [16 rows][16 tokens] and y [tokens][out]: transposed in registers, each token's 16 rows are one vector store.
// (Storing it element by element cost as much as the products at 512 tokens: measured, 1 thread, 576x576 bf16
// 0.745 ms with that store against 0.356 ms with none; 0.504 ms gathering each token's column.)
inline void write(const sec24_args* a, int64_t r, int m, int64_t block, const float* c) {
    const int64_t t0 = block * 16, tokens = sec24_min(16, a->tokens - t0);
    const __mmask16 rows = (__mmask16)(m >= 16 ? 0xffffu : (1u << m) - 1);
    __m512 v[16];
    for (int i = 0; i < 16; ++i) v[i] = _mm512_load_ps(c + 16 * i);
    sec24_transpose16(v);  // v[n]: rows r.. of token t0 + n
    for (int64_t n = 0; n < tokens; ++n) sec24_store16(a, t0 + n, r, rows, v[n]);
}

// GCC's tile intrinsics are macros that paste their tile numbers into the instruction: literals only.
#define SEC24_ACCUMULATE(T, B) \
    do {                       \
        _tile_loadd(5, (B), 64); \
        _tile_dpbf16ps(T, 4, 5); \
    } while (0)
#define SEC24_WRITE(T)                         \
    do {                                       \
        _tile_stored(T, c, 64);                \
        write(a, r, m, first + (T), c);        \
    } while (0)

// Rows [r, r + m) × NB token tiles starting at token tile `first`: a_tile(s) gives step s's weight tile (16 rows ×
// inputs 32s..32s+31, row stride 64 bytes), expanded there and then or read from a panel.
template <int NB, typename ATile>
inline void block(const sec24_args* a, int64_t r, int m, int64_t first, ATile a_tile) {
    alignas(64) float c[16 * 16];
    const int64_t pairs = padded_pairs(a->in), steps = (a->in + 31) / 32;
    const uint32_t* xb = a->x_vnni + first * pairs * 16;  // [NB][pairs][16 tokens] pairs of bf16
    _tile_zero(0);
    if constexpr (NB > 1) _tile_zero(1);
    if constexpr (NB > 2) _tile_zero(2);
    if constexpr (NB > 3) _tile_zero(3);
    for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(4, a_tile(s), 64);
        const uint32_t* b = xb + s * 16 * 16;  // this step's 16 pairs × 16 tokens
        SEC24_ACCUMULATE(0, b);
        if constexpr (NB > 1) SEC24_ACCUMULATE(1, b + pairs * 16);
        if constexpr (NB > 2) SEC24_ACCUMULATE(2, b + 2 * pairs * 16);
        if constexpr (NB > 3) SEC24_ACCUMULATE(3, b + 3 * pairs * 16);
    }
    SEC24_WRITE(0);
    if constexpr (NB > 1) SEC24_WRITE(1);
    if constexpr (NB > 2) SEC24_WRITE(2);
    if constexpr (NB > 3) SEC24_WRITE(3);
}

// pass(width, b) for the passes over token tiles [begin, end): up to kMaxTokenTiles each, `width` a compile-time int.
template <typename Pass>
inline void passes(int64_t begin, int64_t end, Pass pass) {
    for (int64_t b = begin; b < end; b += kMaxTokenTiles) {
        switch (sec24_min(kMaxTokenTiles, end - b)) {
            case 1: pass(std::integral_constant<int, 1>{}, b); break;
            case 2: pass(std::integral_constant<int, 2>{}, b); break;
            case 3: pass(std::integral_constant<int, 3>{}, b); break;
            default: pass(std::integral_constant<int, 4>{}, b); break;
        }
    }
}

// Rows [row_begin, row_end) × NB token tiles starting at token tile `first`, each weight tile expanded as it is used.
// (Expanding 512 inputs of the 16 rows into two alternating 16 KiB buffers before loading their tiles, so that no
// tile load waits for the stores just made, measured slower: 4096x4096 at 16 tokens 3.17 ms against 2.63 ms
// expanding one tile at a time.)
template <int NB>
void pass(const sec24_args* a, int64_t row_begin, int64_t row_end, int64_t first) {
    alignas(64) uint16_t tile[16 * 32];
    for (int64_t r = row_begin; r < row_end; r += 16) {
        const int m = (int)sec24_min(16, row_end - r);
        // The next 16 rows follow these in memory: one contiguous range each of values and codes, streamed in
        // while these compute (16 rows are 32 streams, more than the hardware prefetcher follows at once).
        const int64_t row_bytes = a->in, steps = (a->in + 31) / 32;  // bf16: in/2 values of 2 bytes per row
        sec24_prefetch next_values =
            sec24_prefetch_range((const char*)a->values + (r + 16) * row_bytes, 16 * row_bytes, steps);
        sec24_prefetch next_codes =
            sec24_prefetch_range(a->codes + (r + 16) * a->code_bytes, 16 * a->code_bytes, steps);
        block<NB>(a, r, m, first, [&](int64_t s) {
            sec24_prefetch_step(&next_values);
            sec24_prefetch_step(&next_codes);
            expand_tile(a, r, m, s * 32, tile, 32);
            return tile;
        });
    }
}

// More than one pass of tokens: rows [r, r + m) are expanded once, whole, into `panel` ([steps][16 rows][32 inputs],
// 1 KiB per step: 18 KiB at 576 inputs, 128 KiB at 4096), and every pass of up to 64 tokens of a group loads its A
// tiles from there instead of reading the packed bytes and expanding them again. A group is as many tokens as keep
// their packed x within kGroupBytes (L2), since each block of 16 rows reads the whole group's x: measured, 1 thread,
// 512 tokens, one group of all tokens: 576x576 1.09 -> 0.78 ms, but 4096x4096 33 -> 65 ms (4 MiB of x per block).
inline void expand_panel(const sec24_args* a, int64_t r, int m, uint16_t* panel) {
    const int64_t steps = (a->in + 31) / 32;
    sec24_prefetch next_values = sec24_prefetch_range((const char*)a->values + (r + 16) * a->in, 16 * a->in, steps);
    sec24_prefetch next_codes = sec24_prefetch_range(a->codes + (r + 16) * a->code_bytes, 16 * a->code_bytes, steps);
    for (int64_t s = 0; s < steps; ++s) {
        sec24_prefetch_step(&next_values);
        sec24_prefetch_step(&next_codes);
        expand_tile(a, r, m, s * 32, panel + s * 512, 32);
    }
}

// Rows [r, r + 32) × token tiles b and, when TWO, b + 1, over steps [k0, k0 + ks) of two expanded panels (rows r..,
// r + 16..; their step k0 first): the 2 × 2 blocking of AMX products, C tiles 0-3 (1 and 3 only when TWO), A tiles 4-5
// (the two panels' step), B tiles 6-7 (the token tiles' step). Each B tile loaded from x (L2) serves two row blocks,
// where block<NB> loads one B tile per multiply. The C tiles start from zero when `first`, else from `sums` (rows r..
// at sums[0], rows r + 16.. at sums[1], each two consecutive 16 × 16 tiles); they go to y when `last`, else back there.
template <bool TWO>
inline void block_2x2(const sec24_args* a, int64_t r, int64_t b, int64_t k0, int64_t ks, bool first, bool last,
                      const uint16_t* top, const uint16_t* bottom, float* const (&sums)[2]) {
    alignas(64) float c[16 * 16];
    const int64_t pairs = padded_pairs(a->in);
    const uint32_t* x0 = a->x_vnni + b * pairs * 16 + k0 * 256;  // [steps][16 pairs][16 tokens] of token tile b
    const uint32_t* x1 = x0 + pairs * 16;                        // the same of token tile b + 1
    if (first) {
        _tile_zero(0);
        _tile_zero(2);
        if constexpr (TWO) {
            _tile_zero(1);
            _tile_zero(3);
        }
    } else {
        _tile_loadd(0, sums[0], 64);
        _tile_loadd(2, sums[1], 64);
        if constexpr (TWO) {
            _tile_loadd(1, sums[0] + 256, 64);
            _tile_loadd(3, sums[1] + 256, 64);
        }
    }
    for (int64_t s = 0; s < ks; ++s) {
        _tile_loadd(4, top + s * 512, 64);
        _tile_loadd(5, bottom + s * 512, 64);
        _tile_loadd(6, x0 + s * 256, 64);
        if constexpr (TWO) _tile_loadd(7, x1 + s * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        if constexpr (TWO) _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (TWO) _tile_dpbf16ps(3, 5, 7);
    }
    if (!last) {
        _tile_stored(0, sums[0], 64);
        _tile_stored(2, sums[1], 64);
        if constexpr (TWO) {
            _tile_stored(1, sums[0] + 256, 64);
            _tile_stored(3, sums[1] + 256, 64);
        }
        return;
    }
    _tile_stored(0, c, 64);
    write(a, r, 16, b, c);
    if constexpr (TWO) {
        _tile_stored(1, c, 64);
        write(a, r, 16, b + 1, c);
    }
    _tile_stored(2, c, 64);
    write(a, r + 16, 16, b, c);
    if constexpr (TWO) {
        _tile_stored(3, c, 64);
        write(a, r + 16, 16, b + 1, c);
    }
}

// False when the panels cannot be allocated (the caller then runs the passes that expand as they go).
bool rows_panels(const sec24_args* a, int64_t row_begin, int64_t row_end, int64_t group) {
    const int64_t steps = (a->in + 31) / 32, blocks = (a->tokens + 15) / 16;
    uint16_t* panel = (uint16_t*)aligned_alloc(64, (size_t)steps * 2048);  // two: rows r.. and r + 16..
    if (!panel) return false;
    uint16_t* bottom = panel + steps * 512;
    for (int64_t g = 0; g < blocks; g += group) {  // token tiles [g, g + group)
        const int64_t g_end = sec24_min(blocks, g + group);
        int64_t r = row_begin;
        for (; r + 32 <= row_end; r += 32) {  // 2 x 2: two row blocks share each token tile's loads
            expand_panel(a, r, 16, panel);
            expand_panel(a, r + 16, 16, bottom);
            int64_t b = g;
            float* const no_sums[2] = {nullptr, nullptr};  // all steps at once: from zero straight to y
            for (; b + 2 <= g_end; b += 2) block_2x2<true>(a, r, b, 0, steps, true, true, panel, bottom, no_sums);
            if (b < g_end) block_2x2<false>(a, r, b, 0, steps, true, true, panel, bottom, no_sums);  // an odd last one
        }
        for (; r < row_end; r += 16) {  // the last 16 rows or fewer
            const int m = (int)sec24_min(16, row_end - r);
            expand_panel(a, r, m, panel);
            passes(g, g_end, [&](auto width, int64_t b) {
                block<decltype(width)::value>(a, r, m, b, [&](int64_t s) { return panel + s * 512; });
            });
        }
    }
    free(panel);
    return true;
}

// Many tokens on wide rows: the inputs in blocks of kInputSteps steps (32 inputs each), the blocks outermost. For each
// block, every 32 rows are expanded into two panels (32 KiB each, their steps of this block only) that every pair of
// token tiles reads, while the block's slice of x (1 MiB at 512 tokens) stays in L2 for all the rows; the fp32 sums of
// every row and token wait in `sums` ([32-row blocks][2][token tiles][16 × 16], at most kInputBlocksSumsBytes) between
// input blocks. So each weight tile is expanded once per call, where rows_panels expands it once per group of tokens and
// the passes once per 64 tokens (8 times at 512 tokens on 11008 inputs, whose 1 MiB group holds less than two passes).
// Measured (Xeon, family 6 model 207; weights rotated over 300-400 MB, interleaved call by call, medians of the paired
// ratios against the other paths). In the extension (set_amx_input_blocks), 1 thread: 4096x4096 1.04x faster at 256
// tokens and 1.22x at 512 (0.78x -> 0.92x dense), 11008x4096 1.05x / 1.20x (0.85x -> 1.03x), 4096x11008 1.01x /
// 1.16x (0.80x -> 0.85x); 2 threads at 512: 1.15x, 0.88x, 1.19x. Standalone, 1 thread: 128 tokens 0.80-0.88x,
// 2048x2048 at 512 0.90-0.95x, SmolLM2's shapes at 512 0.88-0.97x (blocks of 24 and 48 steps between 16 and 32;
// the rows outermost, x of all tokens read again for every 32 rows from L3, 0.75-0.86x). Hence only from
// kInputBlocksMinTokens tokens on rows of kInputBlocksMinIn inputs.
constexpr int64_t kInputSteps = 32, kInputBlocksMinTokens = 256, kInputBlocksMinIn = 4096;

// False when the buffers cannot be allocated (the caller then takes another path). The sums take at most
// kInputBlocksSumsBytes (args->amx_sums_bytes when a test sets it): the token tiles go in groups that fit (an even
// count), each group expanding the weight once; at 512 tokens one group up to 16,384 rows (every weight measured).
constexpr int64_t kInputBlocksSumsBytes = 32 << 20;
bool rows_input_blocks(const sec24_args* a, int64_t row_begin, int64_t row_end) {
    const int64_t steps = (a->in + 31) / 32, blocks = (a->tokens + 15) / 16, row_blocks = (row_end - row_begin) / 32;
    const int64_t cap = a->amx_sums_bytes > 0 ? a->amx_sums_bytes : kInputBlocksSumsBytes;
    const int64_t fit = cap / (row_blocks * 2 * 1024) / 2 * 2;  // token tiles per group
    const int64_t group = sec24_min(blocks, fit > 2 ? fit : 2);
    uint16_t* panel = (uint16_t*)aligned_alloc(64, (size_t)kInputSteps * 2048);  // two: rows r.. and r + 16..
    float* sums = (float*)aligned_alloc(64, (size_t)(row_blocks * 2 * group * 256) * 4);  // [row blocks][2][group][256]
    if (!panel || !sums) {
        free(panel);
        free(sums);
        return false;
    }
    uint16_t* bottom = panel + kInputSteps * 512;
    for (int64_t g = 0; g < blocks; g += group) {  // token tiles [g, g_end)
        const int64_t g_end = sec24_min(blocks, g + group);
        for (int64_t k0 = 0; k0 < steps; k0 += kInputSteps) {
            const int64_t ks = sec24_min(kInputSteps, steps - k0);
            const bool first = k0 == 0, last = k0 + ks == steps;
            for (int64_t q = 0; q < row_blocks; ++q) {
                const int64_t r = row_begin + 32 * q;
                for (int64_t s = 0; s < ks; ++s) {
                    expand_tile(a, r, 16, (k0 + s) * 32, panel + s * 512, 32);
                    expand_tile(a, r + 16, 16, (k0 + s) * 32, bottom + s * 512, 32);
                }
                float* top_sums = sums + q * 2 * group * 256;  // rows r.., then rows r + 16.. at + group tiles
                for (int64_t b = g; b < g_end; b += 2) {
                    float* const at[2] = {top_sums + (b - g) * 256, top_sums + (group + b - g) * 256};
                    if (b + 1 < g_end)
                        block_2x2<true>(a, r, b, k0, ks, first, last, panel, bottom, at);
                    else
                        block_2x2<false>(a, r, b, k0, ks, first, last, panel, bottom, at);
                }
            }
        }
    }
    free(panel);
    free(sums);
    for (int64_t r = row_begin + 32 * row_blocks; r < row_end; r += 16) {  // the last 16 rows or fewer
        const int64_t e = sec24_min(row_end, r + 16);
        passes(0, blocks, [&](auto width, int64_t b) { pass<decltype(width)::value>(a, r, e, b); });
    }
    return true;
}

}  // namespace

extern "C" int64_t sec24_amx_x_words(int64_t tokens, int64_t in) { return (tokens + 15) / 16 * padded_pairs(in) * 16; }

// x (bf16, args->x_bf16) into the B layout: for each block of 16 tokens, [pairs][16 tokens] 32-bit words holding
// inputs (2p, 2p + 1) of each token; tokens past the end and inputs past `in` are zero.
extern "C" void sec24_amx_pack_x(const sec24_args* a, uint32_t* x_vnni) {
    const int64_t pairs = padded_pairs(a->in), blocks = (a->tokens + 15) / 16;
    memset(x_vnni, 0, (size_t)(blocks * pairs * 16) * 4);
    for (int64_t t = 0; t < a->tokens; ++t) {
        const uint16_t* x = a->x_bf16 + t * a->x_bf16_stride;
        uint32_t* dst = x_vnni + (t / 16) * pairs * 16 + t % 16;
        for (int64_t p = 0; p < a->in / 2; ++p) {
            uint32_t word;
            memcpy(&word, x + 2 * p, 4);
            dst[p * 16] = word;
        }
    }
}

extern "C" void sec24_rows_amx(const sec24_args* a, int64_t row_begin, int64_t row_end) {
    TileConfig config = {};
    config.palette = 1;
    for (int t = 0; t < 8; ++t) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
    const int64_t blocks = (a->tokens + 15) / 16;
    // Token tiles per group (a multiple of a pass): panels pay only where a group holds more than one pass.
    const int64_t group = kGroupBytes / ((a->in + 31) / 32 * 1024) / kMaxTokenTiles * kMaxTokenTiles;
    const bool by_rule = a->tokens >= kInputBlocksMinTokens && a->in >= kInputBlocksMinIn;
    const bool input_blocks = a->amx_input_blocks < 0 ? by_rule : a->amx_input_blocks > 0;
    if (input_blocks && row_end - row_begin >= 32 && rows_input_blocks(a, row_begin, row_end)) {
        _tile_release();
        return;
    }
    if (blocks > kMaxTokenTiles && group > kMaxTokenTiles && rows_panels(a, row_begin, row_end, group)) {
        _tile_release();
        return;
    }
    passes(0, blocks, [&](auto width, int64_t b) { pass<decltype(width)::value>(a, row_begin, row_end, b); });
    _tile_release();
}
