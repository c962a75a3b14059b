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

import itertools

import torch

from secateurs.kernels.patterns import SparsityPattern, topk_prune_mask
from secateurs.kernels.pruning import native


@torch.no_grad()
def sparsegpt_(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    dead: torch.Tensor | None = None,
) -> None:
    """Prune ``weight`` [rows, cols] in place (fp32).

    ``hinv_upper`` [cols, cols] is the upper Cholesky factor of the dampened inverse Hessian
    (:func:`secateurs.kernels.pruning.hessian.dampened_inverse_cholesky`); ``dead`` marks input columns never
    active, whose weights are zeroed first (they cannot affect the output). For N:M, ``blocksize`` must be a
    multiple of M.
    """
    cols = weight.shape[1]
    if weight.dtype != torch.float32:
        raise TypeError(f"sparsegpt_ works on fp32 weights, got {weight.dtype}; cast a copy first")
    if pattern.is_nm and blocksize % pattern.m:  # type: ignore[operator]
        raise ValueError(f"blocksize {blocksize} is not a multiple of M={pattern.m}")
    if dead is not None:
        weight[:, dead] = 0
    diag = torch.diagonal(hinv_upper)  # [cols]
    if pattern.is_nm:
        assert pattern.n is not None and pattern.m is not None
        _nm_sweep_(weight, hinv_upper, pattern.n, pattern.m, blocksize=blocksize)
        return
    assert pattern.ratio is not None
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = weight[:, start:end].clone()  # [rows, count], updated as columns are visited
        errors = torch.empty_like(block)  # [rows, count], (w - q) / d per column
        hinv = hinv_upper[start:end, start:end]  # [count, count]
        mask = topk_prune_mask(block.square() / diag[start:end].square(), pattern.ratio)  # adaptive per block
        for j in range(end - start):
            err = block[:, j] * mask[:, j] / hinv[j, j]  # [rows]; (w - q) / d, q = w with pruned entries 0
            errors[:, j] = err
            if j + 1 < end - start:  # OBS update of the block's remaining columns
                block[:, j + 1 :].sub_(err.unsqueeze(1) * hinv[j, j + 1 :].unsqueeze(0))
        block.masked_fill_(mask, 0.0)
        weight[:, start:end] = block
        if end < cols:
            weight[:, end:].addmm_(errors, hinv_upper[start:end, end:], alpha=-1.0)  # lazy update of the rest


def _group_tables(hinv_upper: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of M columns and per pruning pattern P (which M−N of the M are pruned), the map W_g ↦ E_g.

    Visiting a group's columns one by one, pruning column j ∈ P and updating the group's later columns
    (§3.2's OBS step with the rows of the Cholesky factor U of H⁻¹, §3.3), gives errors
    E_j = (w_j − Σ_{i<j, i∈P} E_i U_ij) / U_jj, i.e. E_P U_PP = W_P, where U_PP (rows and columns P of the
    group's diagonal block of U) is upper triangular. So E_g = W_g A_{g,P} with A_{g,P} = U_PP⁻¹ placed at
    rows and columns P. Returns ``(tables [groups, m, patterns·m], lut [2^m])``: ``lut`` maps the bit code
    Σ_{j∈P} 2^j of a pattern to its index (−1 for codes that are not patterns).
    """
    cols = hinv_upper.shape[0]
    groups, k = cols // m, m - n
    patterns = list(itertools.combinations(range(m), k))
    # [groups, m, m]: the diagonal blocks U[g·m:(g+1)·m, g·m:(g+1)·m]
    diagonal_blocks = hinv_upper.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    tables = hinv_upper.new_zeros(groups, m, len(patterns), m)  # [groups, m, patterns, m]
    lut = torch.full((1 << m,), -1, dtype=torch.long, device=hinv_upper.device)
    eye = torch.eye(k, dtype=hinv_upper.dtype, device=hinv_upper.device).expand(groups, k, k)
    for index, pruned in enumerate(patterns):
        p = torch.tensor(pruned, device=hinv_upper.device)
        u_pp = diagonal_blocks[:, p.unsqueeze(1), p.unsqueeze(0)]  # [groups, k, k], upper triangular
        tables[:, p.unsqueeze(1), index, p.unsqueeze(0)] = torch.linalg.solve_triangular(u_pp, eye, upper=True)
        lut[sum(1 << j for j in pruned)] = index
    return tables.reshape(groups, m, len(patterns) * m), lut


def _nm_sweep_(weight: torch.Tensor, hinv_upper: torch.Tensor, n: int, m: int, *, blocksize: int) -> None:
    """The N:M column sweep of :func:`sparsegpt_`, a group of M columns at a time (§3.3, §3.4).

    At each group, the mask is chosen from the saliency w² / [H⁻¹]_jj² on the already-updated weights; the
    group's errors E_g come from the precomputed map of each row's pattern (:func:`_group_tables`) and are
    applied to the group's own kept columns and to the rest of the block; after each block, one product applies
    its errors to every later column (the lazy update). Within a block, on CPU, the C++ sweep
    (``csrc/nm_sweep.cpp``, rows over threads) runs where it could be built; elsewhere
    :func:`_nm_block_reference_`. The same arithmetic as the textbook column-by-column loop.
    """
    cols = weight.shape[1]
    tables, lut = _group_tables(hinv_upper, n, m)  # [groups, m, patterns·m], [2^m]
    hdiag2 = torch.diagonal(hinv_upper).square()  # [cols]
    cpp = weight.device.type == "cpu" and weight.stride(1) == 1 and native.available()
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = weight[:, start:end]  # [rows, count] view, swept in place
        hinv = hinv_upper[start:end, start:end]  # [count, count]
        block_tables = tables[start // m : end // m]  # [count / m, m, patterns·m]
        if cpp:
            errors = native.nm_sweep_block_(block, hinv.contiguous(), block_tables, hdiag2[start:end], lut, n, m)
        else:
            errors = _nm_block_reference_(block, hinv, block_tables, hdiag2[start:end], lut, n, m)
        if end < cols:
            weight[:, end:].addmm_(errors, hinv_upper[start:end, end:], alpha=-1.0)  # lazy update of the rest


def _nm_block_reference_(  # noqa: PLR0917 (the C++ sweep's signature, so tests call both alike)
    weight_block: torch.Tensor,
    hinv: torch.Tensor,
    tables: torch.Tensor,
    hdiag2: torch.Tensor,
    lut: torch.Tensor,
    n: int,
    m: int,
) -> torch.Tensor:
    """The sweep within one block of columns, in PyTorch (the reference of ``csrc/nm_sweep.cpp``).

    weight_block [rows, count] is pruned in place; hinv [count, count] is the block's diagonal block of U;
    tables [count / m, m, patterns·m] and lut as :func:`_group_tables` returns them (this block's groups); hdiag2
    [count] = U_jj². Returns the errors E [rows, count] ((w − q) / d on pruned entries, 0 elsewhere). About ten
    tensor operations per group of M columns.
    """
    rows, count = weight_block.shape
    k = m - n  # pruned per group
    patterns = tables.shape[2] // m
    bits = 1 << torch.arange(m, device=weight_block.device)  # [m]
    row_index = torch.arange(rows, device=weight_block.device)  # [rows]
    block = weight_block.clone()  # [rows, count], updated as groups are visited
    errors = torch.empty_like(block)  # [rows, count]
    mask = torch.zeros_like(block, dtype=torch.bool)  # [rows, count], True = pruned
    for g in range(0, count, m):
        h = g + m
        w_g = block[:, g:h]  # [rows, m] view, already updated by the earlier groups
        saliency = w_g.square() / hdiag2[g:h]  # [rows, m]
        drop = saliency.topk(k, dim=1, largest=False, sorted=False).indices  # [rows, k]
        pattern = lut[bits[drop].sum(dim=1)]  # [rows]
        every = (w_g @ tables[g // m]).view(rows, patterns, m)  # [rows, patterns, m]
        errors[:, g:h] = every[row_index, pattern]  # [rows, m]
        mask[:, g:h].scatter_(1, drop, True)
        block[:, g:].addmm_(errors[:, g:h], hinv[g:h, g:], alpha=-1.0)  # [rows, m] @ [m, count − g]
    # exact zeros (the update leaves pruned entries at rounding level); a product with the kept mask is
    # several times faster than masked_fill_ on CPU, and adding 0.0 turns its −0.0 into +0.0
    block.mul_(mask.logical_not()).add_(0.0)
    weight_block.copy_(block)
    return errors
