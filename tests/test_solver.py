"""SparseGPT solve, Hessians and baselines against their defining properties."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from secateurs.kernels.errors import FactorizationError
from secateurs.kernels.patterns import SparsityPattern, satisfies_nm
from secateurs.kernels.pruning import native
from secateurs.kernels.pruning.baselines import magnitude_, wanda_
from secateurs.kernels.pruning.hessian import HessianAccumulator, dampened_inverse_cholesky, lower_triangular_inverse
from secateurs.kernels.pruning.refine import masked_refine_
from secateurs.kernels.pruning.sparsegpt import _group_tables, _nm_block_reference_, sparsegpt_
from tests.conftest import KERNEL_DIR


def _layer_error(original: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W X − Ŵ X||² on inputs x [tokens, in]."""
    return float(((x @ original.T - x @ pruned.T) ** 2).sum())


def _correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen) / width**0.5
    scales = torch.logspace(-1, 1, width)
    return (torch.randn(tokens, width, generator=gen) * scales) @ mixing  # strongly correlated columns


def test_hessian_is_the_running_mean_of_x_xt() -> None:
    x = torch.randn(3, 50, 16, dtype=torch.float64)
    acc = HessianAccumulator(16, "cpu")
    for part in x.split(1):
        acc.add(part)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(acc.hessian, (flat.T @ flat / flat.shape[0]).float())
    assert acc.tokens == 150


@pytest.mark.parametrize(
    "pattern", [SparsityPattern.nm(2, 4), SparsityPattern.nm(4, 8), SparsityPattern.unstructured(0.5)]
)
def test_with_identity_hessian_sparsegpt_equals_magnitude(pattern: SparsityPattern) -> None:
    weight = torch.randn(24, 64)
    upper, _ = dampened_inverse_cholesky(torch.eye(64) * 3.0, 0.01, layers=["w"])
    ours = weight.clone()
    sparsegpt_(ours, upper, pattern, blocksize=64)  # one block: per-block threshold == per-layer threshold
    reference = weight.clone()
    magnitude_(reference, pattern)
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("pattern", [SparsityPattern.nm(2, 4), SparsityPattern.unstructured(0.5)])
def test_sparsegpt_error_is_below_magnitude_and_wanda_on_correlated_inputs(pattern: SparsityPattern) -> None:
    x = _correlated_inputs(2048, 128)
    weight = torch.randn(64, 128)
    acc = HessianAccumulator(128, "cpu")
    acc.add(x)
    upper, _ = dampened_inverse_cholesky(acc.hessian, 0.01, layers=["w"])
    ours = weight.clone()
    sparsegpt_(ours, upper, pattern, blocksize=32)
    by_magnitude = weight.clone()
    magnitude_(by_magnitude, pattern)
    by_wanda = weight.clone()
    wanda_(by_wanda, x.norm(dim=0), pattern)
    error = _layer_error(weight, ours, x)
    assert error < 0.7 * _layer_error(weight, by_magnitude, x)
    assert error < 0.7 * _layer_error(weight, by_wanda, x)
    if pattern.is_nm:
        assert satisfies_nm(ours, 2, 4)
    else:
        assert float((ours == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_blocksize_changes_speed_not_the_n_m_result_much() -> None:
    x = _correlated_inputs(1024, 64, seed=1)
    weight = torch.randn(16, 64)
    acc = HessianAccumulator(64, "cpu")
    acc.add(x)
    upper, _ = dampened_inverse_cholesky(acc.hessian, 0.01, layers=["w"])
    small, large = weight.clone(), weight.clone()
    sparsegpt_(small, upper, SparsityPattern.nm(2, 4), blocksize=8)
    sparsegpt_(large, upper, SparsityPattern.nm(2, 4), blocksize=64)
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-4)  # lazy updates are exact, up to rounding


def test_dead_inputs_are_zeroed_and_do_not_break_the_solve() -> None:
    x = _correlated_inputs(512, 32)
    x[:, 5] = 0
    acc = HessianAccumulator(32, "cpu")
    acc.add(x)
    upper, _ = dampened_inverse_cholesky(acc.hessian, 0.01, layers=["w"])
    weight = torch.randn(8, 32)
    sparsegpt_(weight, upper, SparsityPattern.nm(2, 4), dead=torch.diagonal(acc.hessian) == 0)
    assert bool((weight[:, 5] == 0).all())
    assert bool(torch.isfinite(weight).all())


@pytest.mark.parametrize("width", [8, 300, 600])
def test_factor_equals_the_reference_three_step_factorization(width: int) -> None:
    """U from one reversed Cholesky + a triangular inverse == the reference's cholesky → cholesky_inverse →
    cholesky(upper) (the SparseGPT code), dead inputs included."""
    x = _correlated_inputs(4 * width, width).double()
    x[:, 3] = 0  # a dead input
    acc = HessianAccumulator(width, "cpu")
    acc.add(x)
    h = acc.hessian.double()
    upper, damp = dampened_inverse_cholesky(h, 0.01, layers=["w"])
    ref = h.clone()
    ref[3, 3] = 1.0
    torch.diagonal(ref).add_(0.01 * float(torch.diagonal(ref).mean()))
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True)
    assert damp == 0.01
    torch.testing.assert_close(upper, expected, rtol=1e-9, atol=1e-12)
    upper32, _ = dampened_inverse_cholesky(h.float(), 0.01, layers=["w"])  # fp32, as the driver runs it
    torch.testing.assert_close(upper32.double(), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize(("n", "leaf"), [(5, 256), (257, 64), (700, 256)])
def test_lower_triangular_inverse(n: int, leaf: int) -> None:
    lower = torch.randn(n, n, dtype=torch.float64).tril() / n**0.5
    lower.diagonal().copy_(torch.rand(n, dtype=torch.float64) + 1.0)
    inverse = lower_triangular_inverse(lower, leaf=leaf)
    torch.testing.assert_close(inverse @ lower, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    assert bool((inverse.triu(1) == 0).all())


def test_failed_factorization_retries_then_names_the_layer() -> None:
    bad = torch.full((8, 8), float("nan"))
    with pytest.raises(FactorizationError, match=r"model\.layers\.3\.mlp\.up_proj"):
        dampened_inverse_cholesky(bad, 0.01, layers=["model.layers.3.mlp.up_proj"], max_retries=2)


def test_indefinite_hessian_succeeds_with_more_dampening() -> None:
    h = torch.eye(8)
    h[0, 0] = -0.5  # mean diag 0.8125: 1% dampening is not enough, 10% is
    upper, damp = dampened_inverse_cholesky(h, 0.01, layers=["w"], max_retries=3)
    assert damp > 0.01
    assert bool(torch.isfinite(upper).all())


@pytest.mark.parametrize(("width", "panel"), [(1000, 384), (576, 100), (64, 384)])
def test_panelled_hessian_equals_full_gram(width: int, panel: int) -> None:
    x = torch.randn(2, 300, width, dtype=torch.float64)
    acc = HessianAccumulator(width, "cpu", panel=panel)
    acc.add(x[0].float())
    acc.add(x[1].float())
    flat = x.reshape(-1, width)
    reference = (flat.T @ flat / flat.shape[0]).float()
    torch.testing.assert_close(acc.hessian, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acc.hessian, acc.hessian.T, rtol=0, atol=0)


def _inverse_factor(tokens: int, width: int, seed: int) -> torch.Tensor:
    """U of (H + λI)⁻¹ for the Hessian of correlated inputs [tokens, width] (δ = 0.01)."""
    acc = HessianAccumulator(width, "cpu")
    acc.add(_correlated_inputs(tokens, width, seed=seed))
    return dampened_inverse_cholesky(acc.hessian, 0.01, layers=["w"])[0]


def _textbook_sparsegpt(weight: torch.Tensor, hinv_upper: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """SparseGPT N:M without lazy blocks or grouping: one column at a time, updating every later column."""
    w = weight.clone()
    cols = w.shape[1]
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i in range(cols):
        if i % m == 0:
            saliency = w[:, i : i + m] ** 2 / torch.diagonal(hinv_upper)[i : i + m] ** 2
            drop = saliency.topk(m - n, dim=1, largest=False).indices
            mask[:, i : i + m].scatter_(1, drop, True)
        err = w[:, i] * mask[:, i] / hinv_upper[i, i]
        w[:, i:] -= err[:, None] * hinv_upper[i, i:][None, :]
        w[:, i][mask[:, i]] = 0
    return w


@pytest.fixture(params=["cpp", "reference"])
def sweep(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test runs with the C++ sweep (``csrc/nm_sweep.cpp``) and with its PyTorch reference."""
    native.configure(build_dir=KERNEL_DIR, enabled=request.param == "cpp")
    if request.param == "cpp":
        assert native.available(), native.describe()  # g++ is there: the C++ sweep must build
    try:
        yield request.param
    finally:
        native.configure(build_dir=KERNEL_DIR)


@pytest.mark.parametrize("blocksize", [8, 16, 128])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8)])
def test_blocked_sparsegpt_equals_the_textbook_column_loop(blocksize: int, n: int, m: int, sweep: str) -> None:
    """The grouped sweep (one product per group of M from precomputed per-pattern maps) is the column loop."""
    upper = _inverse_factor(1024, 64, seed=2)
    weight = torch.randn(12, 64)
    fast = weight.clone()
    sparsegpt_(fast, upper, SparsityPattern.nm(n, m), blocksize=blocksize)
    torch.testing.assert_close(fast, _textbook_sparsegpt(weight, upper, n, m), rtol=1e-4, atol=1e-5)
    assert satisfies_nm(fast, n, m)
    assert not bool(torch.signbit(fast[fast == 0]).any()), "pruned entries are +0.0"


def test_blocked_sparsegpt_with_dead_inputs_equals_the_textbook_loop(sweep: str) -> None:
    x = _correlated_inputs(1024, 64, seed=3)
    x[:, [3, 17, 40]] = 0
    acc = HessianAccumulator(64, "cpu")
    acc.add(x)
    dead = torch.diagonal(acc.hessian) == 0
    upper, _ = dampened_inverse_cholesky(acc.hessian, 0.01, layers=["w"])
    weight = torch.randn(20, 64)
    fast = weight.clone()
    sparsegpt_(fast, upper, SparsityPattern.nm(2, 4), blocksize=32, dead=dead)
    reference = weight.clone()
    reference[:, dead] = 0
    torch.testing.assert_close(fast, _textbook_sparsegpt(reference, upper, 2, 4), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n", "m", "rows"), [(2, 4, 301), (2, 4, 1), (1, 4, 67), (4, 8, 130)])
def test_the_cpp_block_sweep_equals_its_reference(n: int, m: int, rows: int, threads: int) -> None:
    """``nm_sweep_block_`` on one block of a layer's columns: the same pruned weights, the same errors for the lazy
    update, the same mask, on a column slice of a wider weight (row stride ≠ width), rows that no thread split
    divides evenly, with one and two threads; the weight's other columns untouched."""
    native.configure(build_dir=KERNEL_DIR)
    assert native.available(), native.describe()
    upper = _inverse_factor(2048, 256, seed=4)
    tables, lut = _group_tables(upper, n, m)
    hdiag2 = torch.diagonal(upper).square()
    start, end = 64, 192
    weight = torch.randn(rows, 256, generator=torch.Generator().manual_seed(5))
    ours, theirs = weight.clone(), weight.clone()
    args = (upper[start:end, start:end].contiguous(), tables[start // m : end // m], hdiag2[start:end], lut, n, m)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        errors = native.nm_sweep_block_(ours[:, start:end], *args)
    finally:
        torch.set_num_threads(before)
    expected = _nm_block_reference_(theirs[:, start:end], *args)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(errors, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[:, start:end] == 0, theirs[:, start:end] == 0), "the same entries are pruned"
    assert torch.equal(ours[:, :start], weight[:, :start]) and torch.equal(ours[:, end:], weight[:, end:])
    assert satisfies_nm(ours[:, start:end], n, m)
    assert not bool(torch.signbit(ours[ours == 0]).any()), "pruned entries are +0.0"


def test_the_cpp_sweep_refuses_what_it_cannot_compute() -> None:
    """Wrong shapes, dtypes or layouts raise a clear error instead of reading out of bounds."""
    native.configure(build_dir=KERNEL_DIR)
    assert native.available(), native.describe()
    upper = torch.eye(8)
    tables, lut = _group_tables(upper, 2, 4)
    hdiag2 = torch.ones(8)
    good = (upper, tables, hdiag2, lut, 2, 4)
    with pytest.raises(ValueError, match="fp32 CPU column slice"):
        native.nm_sweep_block_(torch.ones(3, 16)[:, ::2], *good)
    with pytest.raises(ValueError, match="fp32 CPU column slice"):
        native.nm_sweep_block_(torch.ones(3, 8, dtype=torch.float64), *good)
    with pytest.raises(ValueError, match="hinv must be"):
        native.nm_sweep_block_(torch.ones(3, 8), upper.T, *good[1:])
    with pytest.raises(ValueError, match="not a multiple of M"):
        native.nm_sweep_block_(torch.ones(3, 6), torch.eye(6), tables, torch.ones(6), lut, 2, 4)
    with pytest.raises(ValueError, match="tables must be"):
        native.nm_sweep_block_(torch.ones(3, 8), upper, tables[:1], hdiag2, lut, 2, 4)
    with pytest.raises(ValueError, match="lut must be"):
        native.nm_sweep_block_(torch.ones(3, 8), upper, tables, hdiag2, lut.int(), 2, 4)


def test_without_a_compiler_the_reference_sweep_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed build (no compiler) is one warning, and the PyTorch sweep gives the same result."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.configure(build_dir=tmp_path / "kernels")
    monkeypatch.setattr(native, "_STATE", native._State(build_root=tmp_path / "kernels"))
    try:
        assert not native.available()
        described = native.describe()
        assert described is not None and "could not be built" in described and "no working C++ compiler" in described
        upper = _inverse_factor(1024, 64, seed=6)
        weight = torch.randn(12, 64)
        fast = weight.clone()
        sparsegpt_(fast, upper, SparsityPattern.nm(2, 4))
        torch.testing.assert_close(fast, _textbook_sparsegpt(weight, upper, 2, 4), rtol=1e-4, atol=1e-5)
    finally:
        monkeypatch.undo()
        native.configure(build_dir=KERNEL_DIR)


def _masked_optimum(weight: torch.Tensor, original: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Reference: row by row, ŵ_K = w_K + H_KK⁻¹ H_KP w_P for the kept set K (P: pruned) of that row."""
    out = torch.zeros_like(weight)
    for row in range(weight.shape[0]):
        kept = weight[row] != 0
        pruned = ~kept
        rhs = hessian[kept][:, pruned] @ original[row, pruned]
        out[row, kept] = original[row, kept] + torch.linalg.solve(hessian[kept][:, kept], rhs)
    return out


def _objective(weight: torch.Tensor, original: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = original - weight
    return float(((delta @ hessian) * delta).sum())


def test_refinement_reaches_the_masked_least_squares_optimum_of_every_row() -> None:
    x = _correlated_inputs(4096, 32).double()
    hessian = x.T @ x / x.shape[0] + 0.01 * torch.eye(32, dtype=torch.float64)
    original = torch.randn(6, 32, dtype=torch.float64)
    weight = original.clone()
    magnitude_(weight, SparsityPattern.nm(2, 4))
    expected = _masked_optimum(weight, original, hessian)
    masked_refine_(weight, original, hessian, iterations=64)  # CG is exact after ≤ 16 steps per row (16 kept)
    torch.testing.assert_close(weight, expected)
    assert satisfies_nm(weight, 2, 4)


def test_refinement_after_sparsegpt_keeps_the_mask_and_lowers_the_error_monotonically() -> None:
    x = _correlated_inputs(2048, 128)
    acc = HessianAccumulator(128, "cpu")
    acc.add(x)
    hessian = acc.hessian
    damped = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(128)
    upper, _ = dampened_inverse_cholesky(hessian, 0.01, layers=["w"])
    original = torch.randn(64, 128)
    pruned = original.clone()
    sparsegpt_(pruned, upper, SparsityPattern.nm(2, 4), blocksize=32)
    errors = [_objective(pruned, original, damped)]
    for iterations in (1, 3, 10):
        refined = pruned.clone()
        masked_refine_(refined, original, damped, iterations)
        assert torch.equal(refined == 0, pruned == 0)  # the zeros are the mask: none moves, none appears
        assert not torch.signbit(refined[refined == 0]).any()  # exact +0.0
        errors.append(_objective(refined, original, damped))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.95 * errors[0]
