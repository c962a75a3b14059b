// The N:M column sweep of SparseGPT within one block of columns (Frantar & Alistarh 2023, arXiv 2301.00774,
// §3.3 "lazy batch updates" and §3.4 "adaptive mask selection"), row by row.
//
// The reference is secateurs.kernels.pruning.sparsegpt._nm_block_reference_ (PyTorch, ~10 tensor operations per
// group of M columns): the same arithmetic. Within a block every update a row receives comes from that row's own
// errors (block[:, g:] -= E_g · H⁻¹[g:g+M, g:] touches row r only through E_g[r]), so rows are independent and are
// split over torch's intra-op threads (at::parallel_for). The lazy update of the columns after the block is one
// large product and stays with the caller (BLAS). Compiled without instruction-set flags: the work is
// rows × cols × blocksize / 2 multiply-adds per layer, small beside the Hessian products, and the per-group Python
// overhead it replaces was the cost (SmolLM2 block, AVX2 EPYC: ~0.45 s of ~5 s).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// Rows [r0, r1) of one block. block: [rows, count] with row stride `row_stride` (a column slice of the weight),
// updated in place; errors: [rows, count] contiguous, written; hinv: [count, count] contiguous, the block's
// diagonal block of the upper Cholesky factor U of H⁻¹; tables: [count / m, m, patterns · m] contiguous (the map
// W_g ↦ E_g per pattern, see _group_tables); hdiag2: [count], U_jj²; lut: [2^m] pattern index of a bit code.
void sweep_rows(float* block, int64_t row_stride, float* errors, int64_t count, const float* hinv,
                const float* tables, int64_t patterns, const float* hdiag2, const int64_t* lut, int n, int m,
                int64_t r0, int64_t r1) {
    const int k = m - n;  // pruned per group
    const int64_t table_row = patterns * m;
    std::vector<float> saliency(m), e(m), update(count);
    std::vector<int> order(m);
    for (int64_t r = r0; r < r1; ++r) {
        float* w = block + r * row_stride;  // [count], already updated by the earlier blocks
        float* err = errors + r * count;
        for (int64_t g = 0; g < count; g += m) {
            for (int j = 0; j < m; ++j) {
                saliency[j] = w[g + j] * w[g + j] / hdiag2[g + j];  // w² / [H⁻¹]_jj²
                order[j] = j;
            }
            // the k smallest saliencies (on equal ones the lower position first)
            std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
                return saliency[a] < saliency[b] || (saliency[a] == saliency[b] && a < b);
            });
            int code = 0;
            for (int i = 0; i < k; ++i) code |= 1 << order[i];
            const int64_t pattern = lut[code];
            const float* table = tables + (g / m) * m * table_row + pattern * m;  // [m, ·] rows, this pattern's m
            for (int j = 0; j < m; ++j) {  // E_g = W_g A_{g,P}: [m]
                float sum = 0.0f;
                for (int i = 0; i < m; ++i) sum += w[g + i] * table[i * table_row + j];
                e[j] = sum;
                err[g + j] = sum;
            }
            // OBS update of this group's columns and the block's later ones: w[g:] -= E_g · U[g:g+m, g:]
            const int64_t width = count - g;
            std::fill(update.begin(), update.begin() + width, 0.0f);
            for (int j = 0; j < m; ++j) {
                const float ej = e[j];
                const float* h = hinv + (g + j) * count + g;
                for (int64_t c = 0; c < width; ++c) update[c] += ej * h[c];
            }
            for (int64_t c = 0; c < width; ++c) w[g + c] -= update[c];
            for (int i = 0; i < k; ++i) w[g + order[i]] = 0.0f;  // pruned: exactly +0.0 (no later group reads it)
        }
    }
}

// Sweep the block (a column slice [rows, count] of an fp32 weight, unit column stride) in place; returns the
// errors E [rows, count] ((w − q) / d on pruned entries, 0 on kept ones) for the caller's lazy update.
torch::Tensor nm_sweep_block_(torch::Tensor block, torch::Tensor hinv, torch::Tensor tables, torch::Tensor hdiag2,
                              torch::Tensor lut, int64_t n, int64_t m) {
    TORCH_CHECK(block.dim() == 2 && block.scalar_type() == torch::kFloat32 && block.stride(1) == 1,
                "block must be a 2-D fp32 column slice with unit column stride");
    TORCH_CHECK(block.device().is_cpu(), "nm_sweep_block_ runs on CPU tensors");
    TORCH_CHECK(m >= 1 && m <= 16 && n >= 0 && n <= m, "need 0 <= N <= M <= 16, got ", n, ":", m);
    const int64_t rows = block.size(0), count = block.size(1);
    TORCH_CHECK(count % m == 0, "the block's width ", count, " is not a multiple of M=", m);
    const int64_t patterns = tables.dim() == 3 ? tables.size(2) / m : 0;
    TORCH_CHECK(hinv.sizes() == torch::IntArrayRef({count, count}) && hinv.is_contiguous() &&
                    hinv.scalar_type() == torch::kFloat32,
                "hinv must be a contiguous fp32 [count, count]");
    TORCH_CHECK(tables.dim() == 3 && tables.size(0) == count / m && tables.size(1) == m && patterns > 0 &&
                    tables.size(2) == patterns * m && tables.is_contiguous() && tables.scalar_type() == torch::kFloat32,
                "tables must be a contiguous fp32 [count / M, M, patterns * M]");
    TORCH_CHECK(hdiag2.numel() == count && hdiag2.is_contiguous() && hdiag2.scalar_type() == torch::kFloat32,
                "hdiag2 must be a contiguous fp32 [count]");
    TORCH_CHECK(lut.numel() == (int64_t{1} << m) && lut.is_contiguous() && lut.scalar_type() == torch::kInt64,
                "lut must be a contiguous int64 [2^M]");
    auto errors = torch::empty({rows, count}, block.options());
    float* data = block.data_ptr<float>();
    float* err = errors.data_ptr<float>();
    const int64_t stride = block.stride(0);
    const float* h = hinv.data_ptr<float>();
    const float* t = tables.data_ptr<float>();
    const float* d = hdiag2.data_ptr<float>();
    const int64_t* l = lut.data_ptr<int64_t>();
    // about 64 KiB of a block's rows per task
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, count));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        sweep_rows(data, stride, err, count, h, t, patterns, d, l, static_cast<int>(n), static_cast<int>(m), r0, r1);
    });
    return errors;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.doc() = "secateurs pruning math in C++ (see secateurs.kernels.pruning.native)";
    module.def("nm_sweep_block_", &nm_sweep_block_,
               "SparseGPT's N:M sweep of one block of columns in place; returns the errors for the lazy update");
}
