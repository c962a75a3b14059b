"""The SparseGPT solve (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023, arXiv 2301.00774).

Columns are visited left to right in blocks of ``blocksize`` (§3.3 "lazy batch updates"). Within a block, the
mask is chosen adaptively (§3.4): for N:M, at the first column of every group of M, the M−N weights of each
row with the smallest saliency w² / [H⁻¹]_ii² (computed on the already-updated weights) are pruned; for
unstructured sparsity a per-block threshold on the same saliency. Each pruned column's error is spread over the
columns not yet visited with the optimal brain surgeon update δ = −(w_i / [H⁻¹]_ii) · H⁻¹_{i,:} (§3.2), using the rows
of the Cholesky factor of H⁻¹ (§3.3), exactly for the current column's block and lazily for the rest.
"""

from __future__ import annotations

import torch

from kernels.patterns import SparsityPattern, nm_prune_mask, topk_prune_mask


@torch.no_grad()
def sparsegpt_(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    dead: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune ``weight`` [rows, cols] in place (fp32) and return the OBS loss per weight [rows, cols].

    ``hinv_upper`` [cols, cols] is the upper Cholesky factor of the dampened inverse Hessian
    (:func:`kernels.hessian.dampened_inverse_cholesky`); ``dead`` marks input columns never active, whose
    weights are zeroed first (they cannot affect the output). For N:M, ``blocksize`` must be a multiple of M.
    """
    cols = weight.shape[1]
    if weight.dtype != torch.float32:
        raise TypeError(f"sparsegpt_ works on fp32 weights, got {weight.dtype}; cast a copy first")
    if pattern.is_nm and blocksize % pattern.m:  # type: ignore[operator]
        raise ValueError(f"blocksize {blocksize} is not a multiple of M={pattern.m}")
    if dead is not None:
        weight[:, dead] = 0
    losses = torch.zeros_like(weight)  # [rows, cols]
    diag = torch.diagonal(hinv_upper)  # [cols]
    # Columns are visited in steps of ``step``: M for N:M (the mask of a group is chosen at its first column),
    # 1 for unstructured. Inside a step the OBS updates touch only the step's own columns; the step's errors
    # then reach the rest of the block in one matrix product, and the rest of the matrix after the block.
    step = pattern.m if pattern.is_nm else 1
    assert step is not None
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = weight[:, start:end].clone()  # [rows, count], updated as columns are visited
        errors = torch.empty_like(block)  # [rows, count], (w - q) / d per column
        hinv = hinv_upper[start:end, start:end]  # [count, count]
        hdiag = diag[start:end]  # [count]
        if pattern.is_nm:
            assert pattern.n is not None
            mask = torch.empty_like(block, dtype=torch.bool)
        else:
            assert pattern.ratio is not None
            mask = topk_prune_mask(block.square() / hdiag.square(), pattern.ratio)  # adaptive per block
        for g in range(0, end - start, step):
            h = g + step
            cols_g = block[:, g:h]  # [rows, step] view
            if pattern.is_nm:
                assert pattern.n is not None
                saliency = cols_g.square() / hdiag[g:h].square()  # [rows, m], on already-updated weights
                mask[:, g:h] = nm_prune_mask(saliency, pattern.n, step)
            for j in range(step):
                d = hinv[g + j, g + j]
                err = cols_g[:, j] * mask[:, g + j] / d  # [rows]; (w - q) / d, q = w with pruned entries 0
                errors[:, g + j] = err
                if j + 1 < step:  # OBS update of the step's remaining columns
                    cols_g[:, j + 1 :].sub_(err.unsqueeze(1) * hinv[g + j, g + j + 1 : h].unsqueeze(0))
            if h < end - start:
                block[:, h:].addmm_(errors[:, g:h], hinv[g:h, h:], alpha=-1.0)  # [rows, step] @ [step, rest]
        losses[:, start:end] = errors.square() / 2  # (w - q)² / d² / 2, the OBS saliency of what was pruned
        block.masked_fill_(mask, 0.0)
        weight[:, start:end] = block
        if end < cols:
            weight[:, end:].addmm_(errors, hinv_upper[start:end, end:], alpha=-1.0)  # lazy update of the rest
    return losses
