"""Layer Hessians for one-shot pruning (SparseGPT, Frantar & Alistarh 2023, arXiv 2301.00774, §3).

For a linear layer y = W x with calibration inputs X = [x_1 … x_T], the layer-wise reconstruction objective
||W X − Ŵ X||² has Hessian H = 2 X Xᵀ. We keep the running *mean* H = (1/T) Σ x xᵀ in fp32: the factor 2 and
the scale cancel, because the dampening is relative (λ = δ · mean(diag H), §3 "dampening").
"""

from __future__ import annotations

import logging

import torch

from secateurs.kernels.errors import FactorizationError
from secateurs.kernels.matmul import gram_upper_, mm

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running mean of x xᵀ over every token fed to :meth:`add`, in fp32 on the inputs' device.

    Only the upper triangle is accumulated (H is symmetric), in row panels of about ``panel`` features
    (:func:`secateurs.kernels.matmul.gram_upper_`, whose default suits the library it uses); :attr:`hessian`
    mirrors it into the full matrix when read.
    """

    def __init__(self, columns: int, device: torch.device | str, *, panel: int | None = None) -> None:
        self._upper = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # [in, in]
        self._full: torch.Tensor | None = None
        self.panel = panel
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Fold a batch of inputs [..., in] into the mean."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)  # [tokens, in]
        count = x.shape[0]
        if count == 0:
            return
        total = self.tokens + count
        self._upper.mul_(self.tokens / total)
        gram_upper_(self._upper, x, alpha=1.0 / total, panel=self.panel)  # upper triangle += xᵀx / total
        self.tokens = total
        self._full = None

    @property
    def hessian(self) -> torch.Tensor:
        """The full symmetric mean H = (1/T) Σ x xᵀ: [in, in], fp32."""
        if self._full is None:
            self._full = torch.triu(self._upper) + torch.triu(self._upper, diagonal=1).T
        return self._full


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Input features that were always zero during calibration (diag H == 0): bool [in]."""
    return torch.diagonal(hessian) == 0


def lower_triangular_inverse(lower: torch.Tensor, *, leaf: int = 256) -> torch.Tensor:
    """L⁻¹ for a lower-triangular ``lower`` [n, n] with non-zero diagonal, by 2×2 block recursion:
    [[A, 0], [C, B]]⁻¹ = [[A⁻¹, 0], [−B⁻¹ C A⁻¹, B⁻¹]], so almost all the work is two matrix products per
    level (:func:`secateurs.kernels.matmul.mm`, oneDNN on CPU) instead of LAPACK's triangular solves.
    """
    n = lower.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    k = n // 2
    a_inv = lower_triangular_inverse(lower[:k, :k], leaf=leaf)  # [k, k]
    b_inv = lower_triangular_inverse(lower[k:, k:], leaf=leaf)  # [n-k, n-k]
    out = torch.zeros_like(lower)  # [n, n]
    out[:k, :k] = a_inv
    out[k:, k:] = b_inv
    out[k:, :k] = mm(b_inv, mm(lower[k:, :k], a_inv)).neg_()  # [n-k, k]
    return out


def dampened_inverse_cholesky(
    hessian: torch.Tensor, dampening: float, *, layers: list[str], max_retries: int = 4
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = Uᵀ U), as SparseGPT's solve needs (§3).

    The reference code factors H, inverts it from its factor and factors the inverse again (≈ 4n³/3 flops).
    The same U comes from one Cholesky of the *reversed* matrix and one triangular inverse (≈ 2n³/3): with J
    the reversal permutation, J (H + λI) J = L Lᵀ gives H + λI = R Rᵀ with R = J L J upper triangular, so
    (H + λI)⁻¹ = R⁻ᵀ R⁻¹ = Uᵀ U with U = R⁻¹ = J L⁻¹ J, and U is *the* Cholesky factor (upper triangular,
    positive diagonal, hence unique): equal to the reference's up to rounding (tested).

    Dead inputs get H_ii = 1 so the matrix stays invertible (their weights are zeroed by the caller). If the
    factorization fails (or the inverse is not finite), λ is multiplied by 10 up to ``max_retries`` times; then
    :class:`FactorizationError` names the layers. Returns ``(U [in, in], dampening used)``. The input is not
    modified.
    """
    h = hessian.flip(0, 1)  # J H J: a copy; dead inputs and the diagonal are where they were, mirrored
    dead = dead_inputs(h)
    h[dead, dead] = 1.0
    diag = torch.diagonal(h)
    mean_diag = float(diag.mean())
    damp = dampening
    for attempt in range(max_retries + 1):
        damped = h.clone()
        torch.diagonal(damped).add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)  # J (H + λI) J = L Lᵀ
        if int(info) == 0:
            upper = lower_triangular_inverse(lower).flip(0, 1)  # U = J L⁻¹ J: [in, in], upper triangular
            if bool(torch.isfinite(upper).all()):
                if attempt:
                    log.warning("%s: Hessian factored only with dampening %g", ", ".join(layers), damp)
                return upper, damp
        damp *= 10.0
    raise FactorizationError(layers, damp / 10.0)
