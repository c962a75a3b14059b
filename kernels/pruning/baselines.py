"""Calibration-light baselines on the same pattern options as SparseGPT.

- Magnitude: prune the smallest |W| (per layer for ratios, per group for N:M).
- Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024,
  arXiv 2306.11695, §3): score |W_ij| · ||X_j||₂, compared within each output row (per group for N:M),
  no weight update.
"""

from __future__ import annotations

import torch

from secateurs.kernels.patterns import SparsityPattern, prune_mask


@torch.no_grad()
def magnitude_(weight: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Zero the smallest-magnitude weights of ``weight`` [out, in] in place; returns the prune mask."""
    mask = prune_mask(weight.abs().float(), pattern, per_row=False)
    weight.masked_fill_(mask, 0)
    return mask


@torch.no_grad()
def wanda_(weight: torch.Tensor, input_norm: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Wanda in place: ``input_norm`` [in] is ||X_j||₂ (any common scale); returns the prune mask."""
    scores = weight.abs().float() * input_norm.float().unsqueeze(0)  # [out, in]
    mask = prune_mask(scores, pattern, per_row=True)
    weight.masked_fill_(mask, 0)
    return mask
