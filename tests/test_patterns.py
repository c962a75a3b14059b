"""N:M masks and the pattern check."""

from __future__ import annotations

import pytest
import torch

from secateurs.kernels import patterns
from secateurs.kernels.errors import PatternError
from secateurs.kernels.patterns import SparsityPattern, nm_prune_mask, prune_mask, satisfies_nm, sparsity_of


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2), (3, 4)])
def test_every_group_of_m_has_at_least_m_minus_n_zeros(n: int, m: int) -> None:
    weight = torch.randn(33, 8 * m)
    weight.masked_fill_(nm_prune_mask(weight.abs(), n, m), 0)
    zeros = (weight.reshape(33, 8, m) == 0).sum(-1)
    assert bool((zeros >= m - n).all())
    assert satisfies_nm(weight, n, m)
    assert sparsity_of(weight) == pytest.approx(1 - n / m)


def test_nm_mask_prunes_the_smallest_scores_of_each_group() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.9, 0.1]])
    assert nm_prune_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, False, False, True]]


def test_pattern_check_rejects_dense_groups() -> None:
    weight = torch.ones(4, 8)
    assert not satisfies_nm(weight, 2, 4)
    weight[:, ::2] = 0
    assert satisfies_nm(weight, 2, 4)
    assert not satisfies_nm(torch.zeros(4, 6), 2, 4)  # width not a multiple of M


def test_pattern_check_reads_every_slice_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check walks the rows a slice at a time (no int64 temporary of the weight's size): a dense group in the
    last row of the last slice is still found, and the zero count equals the one-shot reference."""
    monkeypatch.setattr(patterns, "_CHUNK_ELEMENTS", 3 * 16)  # slices of 3 rows of 16 inputs
    weight = torch.randn(10, 16)
    weight.masked_fill_(nm_prune_mask(weight.abs(), 2, 4), 0)
    weight[3, 5] = -0.0  # a negative zero is a zero
    assert satisfies_nm(weight, 2, 4)
    assert sparsity_of(weight) == float((weight == 0).sum()) / weight.numel()
    weight[9, 12:16] = 1.0
    assert not satisfies_nm(weight, 2, 4)


@pytest.mark.parametrize(("n", "m"), [(3, 2), (0, 4), (4, 4)])
def test_invalid_nm_patterns_are_refused(n: int, m: int) -> None:
    with pytest.raises(PatternError):
        SparsityPattern.nm(n, m)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_invalid_ratios_are_refused(ratio: float) -> None:
    with pytest.raises(PatternError):
        SparsityPattern.unstructured(ratio)


def test_shape_check_names_the_layer_and_the_fix() -> None:
    with pytest.raises(PatternError, match=r"layer model\.layers\.0\.mlp\.up_proj has 37 input features.*--exclude"):
        SparsityPattern.nm(2, 4).check_shape("model.layers.0.mlp.up_proj", 37)


def test_unstructured_masks_hit_the_ratio_per_layer_and_per_row() -> None:
    scores = torch.rand(16, 64)
    assert float(prune_mask(scores, SparsityPattern.unstructured(0.25)).float().mean()) == pytest.approx(0.25)
    per_row = prune_mask(scores, SparsityPattern.unstructured(0.5), per_row=True)
    assert bool((per_row.sum(1) == 32).all())
