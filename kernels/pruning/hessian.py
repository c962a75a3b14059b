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

    One [in, in] matrix and nothing else of that size: only the upper triangle is accumulated (H is symmetric),
    in row panels of about ``panel`` features (:func:`secateurs.kernels.matmul.gram_upper_`, whose default suits
    the library it uses), from inputs of another dtype cast to fp32 ``chunk`` tokens at a time; :attr:`hessian`
    mirrors the upper triangle into the lower one in place when read (on a 7B model's 11008-wide MLP the matrix
    is 485 MB: a mirrored copy, or an fp32 copy of 8192 bf16 calibration tokens, would be another 485 / 360 MB).
    """

    def __init__(
        self, columns: int, device: torch.device | str, *, panel: int | None = None, chunk: int = 2048
    ) -> None:
        self._matrix = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # [in, in]
        self._symmetric = True  # whether the lower triangle mirrors the upper one
        self.panel = panel
        self.chunk = chunk
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Fold a batch of inputs [..., in] into the mean."""
        x = inputs.reshape(-1, inputs.shape[-1])  # [tokens, in]
        count = x.shape[0]
        if count == 0:
            return
        total = self.tokens + count
        self._matrix.mul_(self.tokens / total)
        # fp32 inputs in one product; others cast ``chunk`` tokens at a time (one [chunk, in] fp32 copy at most)
        parts = [x] if x.dtype == torch.float32 else x.split(self.chunk)
        for part in parts:  # [≤ tokens, in]
            gram_upper_(self._matrix, part.to(torch.float32), alpha=1.0 / total, panel=self.panel)
        self.tokens = total
        self._symmetric = False

    @property
    def hessian(self) -> torch.Tensor:
        """The full symmetric mean H = (1/T) Σ x xᵀ: [in, in], fp32 (the accumulator's own matrix: read it,
        do not write it)."""
        if not self._symmetric:
            _mirror_upper_(self._matrix)
            self._symmetric = True
        return self._matrix


def _mirror_upper_(matrix: torch.Tensor, panel: int = 512) -> None:
    """Copy the upper triangle of the square ``matrix`` onto its lower triangle, in place, a row panel at a time
    (temporaries of one panel)."""
    n = matrix.shape[0]
    for lo in range(0, n, panel):
        hi = min(lo + panel, n)
        matrix[lo:hi, :lo] = matrix[:lo, lo:hi].T  # strictly left of the panel's diagonal block: [hi-lo, lo]
        diagonal = matrix[lo:hi, lo:hi]  # [hi-lo, hi-lo]
        diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, 1).T)


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Input features that were always zero during calibration (diag H == 0): bool [in]."""
    return torch.diagonal(hessian) == 0


def lower_triangular_inverse_(lower: torch.Tensor, *, leaf: int = 256, panel: int = 1024) -> torch.Tensor:
    """L⁻¹ for a lower-triangular ``lower`` [n, n] with non-zero diagonal and zeros above it, written over
    ``lower`` and returned, by 2×2 block recursion: [[A, 0], [C, B]]⁻¹ = [[A⁻¹, 0], [−B⁻¹ C A⁻¹, B⁻¹]], so almost
    all the work is matrix products (:func:`secateurs.kernels.matmul.mm`) instead of LAPACK's triangular solves.
    A and B are inverted in place; −B⁻¹ (C A⁻¹) is formed ``panel`` rows of B⁻¹ at a time (each panel needs only
    B⁻¹'s columns up to its diagonal), so the temporaries are one [n−k, k] product and one panel.
    """
    n = lower.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        lower.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
        return lower
    k = n // 2
    a_inv = lower_triangular_inverse_(lower[:k, :k], leaf=leaf, panel=panel)  # [k, k]
    b_inv = lower_triangular_inverse_(lower[k:, k:], leaf=leaf, panel=panel)  # [n-k, n-k]
    c = lower[k:, :k]  # [n-k, k]
    ca = mm(c, a_inv)  # C A⁻¹: [n-k, k]
    for lo in range(0, n - k, panel):
        hi = min(lo + panel, n - k)
        c[lo:hi] = mm(b_inv[lo:hi, :hi], ca[:hi]).neg_()  # rows lo:hi of −B⁻¹ C A⁻¹: [hi-lo, k]
    return lower


def lower_triangular_inverse(lower: torch.Tensor, *, leaf: int = 256) -> torch.Tensor:
    """L⁻¹ for a lower-triangular ``lower`` [n, n] (read only the triangle), as a new tensor."""
    return lower_triangular_inverse_(torch.tril(lower), leaf=leaf)


def _reverse_(matrix: torch.Tensor, panel: int = 256) -> None:
    """J M J in place for a square ``matrix`` (J the reversal permutation: element (i, j) goes to
    (n−1−i, n−1−j)), exchanging row panels from both ends (temporaries of one panel)."""
    n = matrix.shape[0]
    half = n // 2
    for lo in range(0, half, panel):
        hi = min(lo + panel, half)
        top = matrix[lo:hi].flip(0, 1)  # a copy: [hi-lo, n]
        matrix[lo:hi] = matrix[n - hi : n - lo].flip(0, 1)
        matrix[n - hi : n - lo] = top
    if n % 2:
        matrix[half] = matrix[half].flip(0)


def _cholesky_lower_(matrix: torch.Tensor) -> bool:
    """The lower Cholesky factor of the symmetric positive definite ``matrix`` [n, n], written over it (zeros
    above the diagonal); whether it succeeded. LAPACK works in column-major order: the transposed view of the
    row-major buffer is column-major and, the matrix being symmetric, holds the same values, so the factor is
    computed in place (no second [n, n] buffer) as the upper factor Lᵀ of that view."""
    view = matrix.mT  # column-major, same values (symmetric)
    info = torch.empty((), dtype=torch.int32, device=matrix.device)
    torch.linalg.cholesky_ex(view, upper=True, out=(view, info))  # view = Lᵀ, i.e. matrix = L
    return int(info) == 0


def dampened_inverse_cholesky(
    hessian: torch.Tensor, dampening: float, *, layers: list[str], max_retries: int = 4
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = Uᵀ U), as SparseGPT's solve needs (§3).

    The reference code factors H, inverts it from its factor and factors the inverse again (≈ 4n³/3 flops).
    The same U comes from one Cholesky of the *reversed* matrix and one triangular inverse (≈ 2n³/3): with J
    the reversal permutation, J (H + λI) J = L Lᵀ gives H + λI = R Rᵀ with R = J L J upper triangular, so
    (H + λI)⁻¹ = R⁻ᵀ R⁻¹ = Uᵀ U with U = R⁻¹ = J L⁻¹ J, and U is *the* Cholesky factor (upper triangular,
    positive diagonal, hence unique): equal to the reference's up to rounding (tested). Every step works in
    one [n, n] buffer (the reversed copy of H), so the factorization holds H plus one matrix of its size and
    panel-sized temporaries (on a 7B model's 11008-wide MLP input each matrix is 485 MB).

    Dead inputs get H_ii = 1 so the matrix stays invertible (their weights are zeroed by the caller). If the
    factorization fails (or the inverse is not finite), λ is multiplied by 10 up to ``max_retries`` times; then
    :class:`FactorizationError` names the layers. Returns ``(U [in, in], dampening used)``. The input is not
    modified.
    """
    dead = dead_inputs(hessian).flip(0)  # [in], in the reversed order
    damp = dampening
    mean_diag: float | None = None
    for attempt in range(max_retries + 1):
        work = hessian.flip(0, 1)  # J H J: the one working copy [in, in]
        diag = torch.diagonal(work)
        diag.masked_fill_(dead, 1.0)
        if mean_diag is None:
            mean_diag = float(diag.mean())
        diag.add_(damp * mean_diag)
        if _cholesky_lower_(work):  # J (H + λI) J = L Lᵀ, L in work
            lower_triangular_inverse_(work)  # L⁻¹
            _reverse_(work)  # U = J L⁻¹ J: [in, in], upper triangular
            if bool(torch.isfinite(work.amax())) and bool(torch.isfinite(work.amin())):  # amax/amin keep NaN
                if attempt:
                    log.warning("%s: Hessian factored only with dampening %g", ", ".join(layers), damp)
                return work, damp
        del work
        damp *= 10.0
    raise FactorizationError(layers, damp / 10.0)
