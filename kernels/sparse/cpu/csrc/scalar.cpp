// The portable kernel: plain C++ for any CPU, and the reference every SIMD kernel is tested against
// (tests/test_cpu_kernel.py compares all of them with the dense product). Compiled without instruction-set flags.
// Each row's positions are decoded once, then every token's dot product is summed in double: not fast, but exact
// enough to trust.
#include <vector>

#include "common.h"

extern "C" void sec24_rows_scalar(const sec24_args* a, int64_t row_begin, int64_t row_end) {
    const int64_t kept = a->in / 2;
    std::vector<int32_t> inputs((size_t)kept);
    std::vector<float> weights((size_t)kept);
    for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t* codes = a->codes + r * a->code_bytes;
        for (int64_t j = 0; j < kept; ++j) {
            inputs[j] = (int32_t)(4 * (j / 2) + ((codes[j >> 2] >> (2 * (j & 3))) & 3));
            weights[j] = a->values_bf16 ? sec24_bf16_to_f32(((const uint16_t*)a->values)[r * kept + j])
                                        : ((const float*)a->values)[r * kept + j];
        }
        for (int64_t t = 0; t < a->tokens; ++t) {
            const float* x = a->x + t * a->x_stride;
            double acc = 0.0;
            for (int64_t j = 0; j < kept; ++j) acc += (double)weights[j] * (double)x[inputs[j]];
            sec24_store(a, t, r, (float)acc);
        }
    }
}

extern "C" void sec24_decompress_scalar(const void* values, const uint8_t* codes, int32_t values_bf16, int64_t in,
                                        int64_t code_bytes, int64_t row_begin, int64_t row_end, void* dense) {
    const int64_t size = values_bf16 ? 2 : 4;
    for (int64_t r = row_begin; r < row_end; ++r)
        sec24_decompress_from(values, codes, values_bf16, in, code_bytes, r, 0,
                              (char*)dense + (r - row_begin) * in * size);
}
