// The packed 2:4 product y = x·Wᵀ (+ b) read straight from secateurs' packed form, shared by every instruction set.
//
// Layout (kernels/sparse/packing.py): for a dense W [out, in] (in a multiple of 4), every group of 4 consecutive
// inputs keeps exactly 2 values, in ascending position order:
//   values [out, in/2]          fp32 or bf16, contiguous rows;
//   codes  [out, ceil(in/8)]    uint8, the 2-bit position of each kept value inside its group, 4 per byte, the
//                               first in the low bits: 8 kept values = 4 groups = 16 inputs = 16 bits.
// Kept value j of a row (j = 0 .. in/2-1) multiplies input 4·(j/2) + code_j.
//
// This header is plain C: each instruction set's translation unit includes only it and <immintrin.h>, and exports
// `extern "C"` functions with nothing else visible, so no inline function compiled for one instruction set can be
// linked into code that runs on a CPU without it.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const float* x;          // [tokens, in] fp32 activations; row stride x_stride elements, unit stride in a row
    int64_t x_stride;
    const uint16_t* x_bf16;  // the same activations as bf16 when they came as bf16, else NULL (stride x_bf16_stride)
    int64_t x_bf16_stride;
    const void* values;      // [out, in/2] fp32 (values_bf16 = 0) or bf16 (1), contiguous
    const uint8_t* codes;    // [out, code_bytes] uint8, contiguous
    const float* bias;       // [out] fp32, or NULL
    void* y;                 // [tokens, out] fp32 (y_bf16 = 0) or bf16 (1); row stride y_stride elements
    int64_t y_stride;
    int64_t tokens, out, in, code_bytes;
    int32_t values_bf16, y_bf16;
    const uint32_t* x_vnni;  // the AMX kernel's copy of x_bf16 (sec24_amx_pack_x), else NULL
    const float* x_t;        // the token-vector kernels' copy of x (their sec24_tokens_pack_xt_*), else NULL
    int32_t tokens_tall;     // the token-vector kernels: full chunks of 512-bit vectors in tall row blocks (tokens.h)
    int32_t amx_input_blocks;  // the AMX kernel's input blocks (amx.cpp): -1 by its rule, 0 never, 1 wherever they fit
    int64_t amx_sums_bytes;    // the AMX kernel's input blocks: bytes their sums may take (0: the kernel's own cap)
    int32_t prefetch_long_rows;  // the AVX-512 general kernel's prefetch of the next rows at one token where a row's
                                 // values take SEC24_LONG_ROW_BYTES or more: 1 on, 0 off (kernel.py measures which)
} sec24_args;

// Rows whose kept values take at least this many bytes (4096 fp32 inputs) are "long": on some CPUs the hardware
// prefetcher follows a tile's long rows well enough that the kernel's own prefetch of the next rows only competes
// with it (avx512.cpp, where it is measured).
#define SEC24_LONG_ROW_BYTES (8 << 10)

// The L1 data cache a tall block of the token-vector kernel needs (tokens.h): 64 rows' sums of 128 tokens (32 KiB)
// beside a 16 KiB block of x. The dispatcher sets sec24_args.tokens_tall where the CPU's L1d holds that.
#define SEC24_TOKENS_TALL_L1_BYTES (48 << 10)

// y rows [0, tokens) × output columns [row_begin, row_end).
typedef void (*sec24_rows_fn)(const sec24_args* args, int64_t row_begin, int64_t row_end);

// The token-vector kernels' copy of x (tokens.h defines its layout): the floats it takes, and x (args->x) packed in.
typedef int64_t (*sec24_xt_floats_fn)(int64_t tokens, int64_t in);
typedef void (*sec24_pack_xt_fn)(const sec24_args* args, float* x_t);

// Dense rows [row_begin, row_end) of W into dense[(r - row_begin)·in + k] (the weight's dtype).
typedef void (*sec24_decompress_fn)(const void* values, const uint8_t* codes, int32_t values_bf16, int64_t in,
                                    int64_t code_bytes, int64_t row_begin, int64_t row_end, void* dense);

void sec24_rows_scalar(const sec24_args* args, int64_t row_begin, int64_t row_end);
void sec24_decompress_scalar(const void* values, const uint8_t* codes, int32_t values_bf16, int64_t in,
                             int64_t code_bytes, int64_t row_begin, int64_t row_end, void* dense);
#if defined(SEC24_HAVE_AVX2)
void sec24_rows_avx2(const sec24_args* args, int64_t row_begin, int64_t row_end);
// The token-vector kernel (tokens.h): fp32 activations, args->x_t packed by sec24_tokens_pack_xt_avx2.
void sec24_rows_avx2_tokens(const sec24_args* args, int64_t row_begin, int64_t row_end);
int64_t sec24_tokens_xt_floats_avx2(int64_t tokens, int64_t in);
void sec24_tokens_pack_xt_avx2(const sec24_args* args, float* x_t);
void sec24_decompress_avx2(const void* values, const uint8_t* codes, int32_t values_bf16, int64_t in,
                           int64_t code_bytes, int64_t row_begin, int64_t row_end, void* dense);
#endif
#if defined(SEC24_HAVE_AVX512)
void sec24_rows_avx512(const sec24_args* args, int64_t row_begin, int64_t row_end);
// The token-vector kernel (tokens.h): fp32 activations, args->x_t packed by sec24_tokens_pack_xt_avx512.
void sec24_rows_avx512_tokens(const sec24_args* args, int64_t row_begin, int64_t row_end);
int64_t sec24_tokens_xt_floats_avx512(int64_t tokens, int64_t in);
void sec24_tokens_pack_xt_avx512(const sec24_args* args, float* x_t);
void sec24_decompress_avx512(const void* values, const uint8_t* codes, int32_t values_bf16, int64_t in,
                             int64_t code_bytes, int64_t row_begin, int64_t row_end, void* dense);
#endif
#if defined(SEC24_HAVE_AVX512BF16)
// bf16 weights × bf16 activations only (args->x_bf16 set); everything else goes to sec24_rows_avx512.
void sec24_rows_avx512bf16(const sec24_args* args, int64_t row_begin, int64_t row_end);
// bf16 weights only.
void sec24_decompress_avx512bf16(const void* values, const uint8_t* codes, int32_t values_bf16, int64_t in,
                                 int64_t code_bytes, int64_t row_begin, int64_t row_end, void* dense);
#endif

#if defined(SEC24_HAVE_AMX)
// bf16 weights × bf16 activations on the AMX tile unit; args->x_vnni must hold sec24_amx_pack_x's copy of x.
void sec24_rows_amx(const sec24_args* args, int64_t row_begin, int64_t row_end);
int64_t sec24_amx_x_words(int64_t tokens, int64_t in);  // the 32-bit words sec24_amx_pack_x writes
void sec24_amx_pack_x(const sec24_args* args, uint32_t* x_vnni);
#endif

#ifdef __cplusplus
}
#endif
