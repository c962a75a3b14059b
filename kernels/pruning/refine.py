"""Re-solve the kept weights once the mask is fixed: masked least squares, per row, by preconditioned CG.

SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774, §3.2–3.3) updates each pruned column's error only into
the columns to its right, so once the mask is fixed the kept weights are not yet the best ones for it. The
layer-wise objective with the mask fixed is a least-squares problem per output row r with kept set K_r:

    min_ŵ (ŵ − w) H (ŵ − w)ᵀ   subject to ŵ_j = 0 for j ∉ K_r,   H = (1/T) X Xᵀ (+ λI, the same dampening)

whose solution is ŵ_K = w_K + H_KK⁻¹ H_KP w_P. Boža (2024, "Fast and Optimal Weight Update for Pruned Large
Language Models", arXiv 2401.02938) solves it with ADMM; here all rows run conjugate gradients (Hestenes &
Stiefel 1952) at once, Jacobi-preconditioned, starting from the SparseGPT weights, so every iteration is one
[out, in] × [in, in] product and the zeros never move. Measured under P-CPU (SmolLM2-135M, 2:4): the layer
errors fall by about 20 % and perplexity from 110.9 to about 100 (``docs/engine.md``, "Beyond the target").
"""

from __future__ import annotations

import torch

from secateurs.kernels.matmul import linear


@torch.no_grad()
def masked_refine_(weight: torch.Tensor, original: torch.Tensor, hessian: torch.Tensor, iterations: int) -> None:
    """Move the nonzero entries of ``weight`` toward the masked least-squares optimum, in place.

    weight: [out, in] fp32, already pruned (its zeros are the mask, kept exactly); original: [out, in] the
    dense weight; hessian: [in, in] symmetric positive definite (dampened). ``iterations`` CG steps per row;
    the objective never increases from the starting point (CG on a convex quadratic).
    """
    if iterations <= 0:
        return
    keep = weight != 0  # [out, in]
    inverse_diag = 1.0 / torch.diagonal(hessian).clamp_min(torch.finfo(hessian.dtype).tiny)  # [in], Jacobi
    residual = linear(original - weight, hessian).mul_(keep)  # −gradient of the objective (H symmetric)
    z = residual * inverse_diag
    direction = z.clone()
    rz = (residual * z).sum(dim=1, keepdim=True)  # [out, 1]
    tiny = torch.finfo(weight.dtype).tiny
    for _ in range(iterations):
        step = linear(direction, hessian).mul_(keep)  # H p on the kept entries
        curvature = (direction * step).sum(dim=1, keepdim=True)  # [out, 1], ≥ 0
        alpha = torch.where(curvature > tiny, rz / curvature.clamp_min(tiny), 0.0)  # converged rows: 0
        weight.add_(alpha * direction)
        residual.sub_(alpha * step)
        z = residual * inverse_diag
        rz_next = (residual * z).sum(dim=1, keepdim=True)
        direction.mul_(torch.where(rz > tiny, rz_next / rz.clamp_min(tiny), 0.0)).add_(z)
        rz = rz_next
    weight.mul_(keep).add_(0.0)  # exact (+0.0) zeros on the mask
