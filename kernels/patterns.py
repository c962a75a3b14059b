"""Sparsity patterns, masks and the N:M pattern check.

``N:M`` semi-structured sparsity keeps at most N non-zeros in every group of M consecutive weights along the
input dimension (NVIDIA Ampere's 2:4 "fine-grained structured sparsity", Mishra et al. 2021, arXiv 2104.08378).
A mask here is boolean and marks weights to *prune* (``True`` = set to zero).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from secateurs.kernels.errors import PatternError


@dataclass(frozen=True)
class SparsityPattern:
    """Either ``n:m`` (keep ``n`` of every ``m``) or an unstructured ``ratio`` of weights pruned."""

    n: int | None = None
    m: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is None:
            if self.n is None or self.m is None or not 0 < self.n < self.m:
                raise PatternError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")
        elif self.n is not None or self.m is not None or not 0.0 < self.ratio < 1.0:
            raise PatternError(f"give either N:M or a ratio in (0, 1), got n={self.n} m={self.m} ratio={self.ratio}")

    @classmethod
    def nm(cls, n: int, m: int) -> SparsityPattern:
        return cls(n=n, m=m)

    @classmethod
    def unstructured(cls, ratio: float) -> SparsityPattern:
        return cls(ratio=ratio)

    @property
    def is_nm(self) -> bool:
        return self.ratio is None

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned."""
        if self.ratio is not None:
            return self.ratio
        assert self.n is not None and self.m is not None
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    def check_shape(self, name: str, in_features: int) -> None:
        """Raise :class:`PatternError` when a layer's input width is not a multiple of M."""
        if self.is_nm and in_features % self.m:  # type: ignore[operator]
            raise PatternError(
                f"layer {name} has {in_features} input features, not a multiple of M={self.m}, so {self} "
                "cannot apply to it; leave it dense with --exclude, or use an unstructured ratio like "
                f"{self.sparsity:g}"
            )


_CHUNK_ELEMENTS = 1 << 20  # weights per slice of rows (row_slices)


def row_slices(rows: int, cols: int) -> Iterator[slice]:
    """Slices of a [rows, cols] weight's rows, about :data:`_CHUNK_ELEMENTS` weights each (at least one row): for
    checks and conversions whose per-group temporaries (int32/int64 counts, masks, indices) would be several times
    the weight's bytes if taken over the whole weight at once."""
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    return (slice(lo, min(rows, lo + step)) for lo in range(0, rows, step))


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the ``m - n`` lowest-scoring weights in every group of ``m`` consecutive columns.

    scores: [rows, cols] with cols % m == 0 -> bool mask [rows, cols], True = prune.
    """
    rows, cols = scores.shape
    if cols % m:
        raise PatternError(f"{cols} columns is not a multiple of M={m}")
    groups = scores.reshape(rows, cols // m, m)  # [rows, groups, m]
    drop = torch.topk(groups, m - n, dim=-1, largest=False).indices  # [rows, groups, m-n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def topk_prune_mask(scores: torch.Tensor, ratio: float, dim: int | None = None) -> torch.Tensor:
    """Mask of the ``ratio`` lowest scores: over the whole tensor (``dim=None``) or within each slice of ``dim``."""
    if dim is None:
        k = int(scores.numel() * ratio)
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        if k:
            mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
        return mask.reshape(scores.shape)
    k = int(scores.shape[dim] * ratio)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(dim, torch.topk(scores, k, dim=dim, largest=False).indices, True)
    return mask


def prune_mask(scores: torch.Tensor, pattern: SparsityPattern, *, per_row: bool = False) -> torch.Tensor:
    """The pattern's mask for ``scores`` [rows, cols]; unstructured ratios per layer, or per row if asked."""
    if pattern.is_nm:
        assert pattern.n is not None and pattern.m is not None
        return nm_prune_mask(scores, pattern.n, pattern.m)
    assert pattern.ratio is not None
    return topk_prune_mask(scores, pattern.ratio, dim=1 if per_row else None)


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights has at most ``n`` non-zeros.

    weight: [out, in] (``nn.Linear`` layout).
    """
    rows, cols = weight.shape
    if cols % m:
        return False
    groups = weight.reshape(rows, cols // m, m)  # [rows, groups, m]
    # A slice of rows at a time: the per-group counts are int64, twice the bytes of an fp32 weight per group of 4
    # (92 MB on a 5632 x 2048 layer) if taken at once.
    return all(
        bool((torch.count_nonzero(groups[part], dim=-1) <= n).all())  # [part rows, groups]
        for part in row_slices(rows, cols)
    )


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros (``-0.0`` counts; NaN does not). Counted without a temporary of the weight's size."""
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
