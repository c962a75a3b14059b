// The N:M column sweep of SparseGPT within one block of columns (Frantar & Alistarh 2023, arXiv 2301.00774,
// §3.3 "lazy batch updates" and §3.4 "adaptive mask selection"), row by row.
//
// The reference is secateurs.kernels.pruning.sparsegpt._nm_block_reference_ (PyTorch, ~10 tensor operations per
// group of M columns): the same arithmetic. Within a block every update a row receives comes from that row's own
// errors (block[:, g:] -= E_g · U[g:g+M, g:] touches row r only through E_g[r]), so rows are independent and are
// split over OpenMP threads (the caller passes torch's thread count; the process's libgomp is torch's). The lazy
// update of the columns after the block is one large product and stays with the caller (BLAS).
//
// A plain C ABI library (no torch, no pybind11 headers: it builds in about a second; the caller checks shapes,
// dtypes and layouts, secateurs.kernels.pruning.native). Compiled without instruction-set flags: the work is
// rows × cols × blocksize / 2 multiply-adds per layer, small beside the Hessian products; the per-group Python
// overhead it replaces was the cost (SmolLM2 block, AVX2 EPYC: ~0.45 s of ~5 s).
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
        float* err = errors + r * count;  // [count]
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

}  // namespace

extern "C" {

// Sweep rows × count of an fp32 weight's column slice (row stride `row_stride`, unit column stride) in place and write
// the errors E [rows, count] ((w − q) / d on pruned entries, 0 on kept ones) for the caller's lazy update. Returns 0,
// or 1 for arguments it cannot take (the caller checks them first).
int sec_nm_sweep_block(float* block, int64_t rows, int64_t count, int64_t row_stride, float* errors, const float* hinv,
                       const float* tables, int64_t patterns, const float* hdiag2, const int64_t* lut, int n, int m,
                       int threads) {
    if (m < 1 || m > 16 || n < 0 || n > m || count % m != 0 || row_stride < count || patterns < 1 || threads < 1) {
        return 1;
    }
    if (rows <= 0 || count == 0) return 0;
    // about 64 KiB of a block's rows per chunk of work
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / count);
    const int64_t chunks = (rows + grain - 1) / grain;
    const int workers = static_cast<int>(std::min<int64_t>(threads, chunks));
#pragma omp parallel for num_threads(workers) schedule(static)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t r0 = chunk * grain, r1 = std::min(rows, r0 + grain);
        sweep_rows(block, row_stride, errors, count, hinv, tables, patterns, hdiag2, lut, n, m, r0, r1);
    }
    return 0;
}

}  // extern "C"
