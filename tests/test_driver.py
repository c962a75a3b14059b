"""The layer-by-layer driver on tiny models of every supported architecture."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from secateurs.kernels.errors import PatternError
from secateurs.kernels.measure.perplexity import perplexity
from secateurs.kernels.patterns import SparsityPattern, satisfies_nm
from secateurs.kernels.pruning.discovery import find_decoder_blocks, prunable_layers
from secateurs.kernels.pruning.driver import (
    BlockProgress,
    PruneConfig,
    _BlockPruner,
    _capture_block_calls,
    _exact_math,
    _run_block,
    prune_model_,
)
from secateurs.kernels.pruning.hessian import HessianAccumulator, dampened_inverse_cholesky
from secateurs.kernels.pruning.sparsegpt import sparsegpt_
from tests.models import ARCHITECTURES, VOCAB, tiny_model


def _calibration(samples: int = 6, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def _block_outputs(model: nn.Module, run: Any) -> list[list[torch.Tensor]]:
    """Every output of every decoder block while ``run()`` executes: ``outputs[block][call]``."""
    _, blocks = find_decoder_blocks(model)
    outputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [
        block.register_forward_hook(
            lambda _m, _a, out, i=i: outputs[i].append(out[0] if isinstance(out, tuple) else out)
        )
        for i, block in enumerate(blocks)
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_replayed_calls_reproduce_the_models_own_block_outputs(arch: str) -> None:
    """Capture + replay of every block's arguments (per-layer masks included) equals the real forward."""
    model = tiny_model(arch, num_layers=3)
    tokens = _calibration(samples=2, seqlen=40)  # longer than Gemma3's sliding window of 16
    with torch.no_grad():
        expected = _block_outputs(model, lambda: model(input_ids=tokens, use_cache=False))
        _, blocks = find_decoder_blocks(model)
        hidden, calls = _capture_block_calls(model, blocks, [tokens], torch.device("cpu"))
        state = hidden[0]
        for index, block in enumerate(blocks):
            state = _run_block(block, state, calls[0][index])
            torch.testing.assert_close(state, expected[index][0])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("batch_size", [None, 4])
def test_every_pruned_layer_is_2_4_and_the_model_still_runs(arch: str, batch_size: int | None) -> None:
    model = tiny_model(arch)
    events: list[BlockProgress] = []
    result = prune_model_(model, _calibration(), PruneConfig(batch_size=batch_size), on_block=events.append)
    prefix, blocks = find_decoder_blocks(model)
    layers = [layer for i, block in enumerate(blocks) for layer in prunable_layers(block, f"{prefix}.{i}")]
    assert {r.name for r in result.layers} == {layer.name for layer in layers}
    for layer in layers:
        assert satisfies_nm(layer.weight(), 2, 4), layer.name
    for r in result.layers:
        assert r.sparsity == pytest.approx(0.5)
        assert r.error is not None and 0 <= r.error < 1
    assert [e.index for e in events] == list(range(len(blocks)))
    assert all(e.total == len(blocks) for e in events)
    with torch.no_grad():
        logits = model(input_ids=_calibration(samples=1), use_cache=False).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("batch_size", [None, 2])
def test_driver_block_outputs_equal_a_hand_run_of_the_pruned_blocks(batch_size: int | None) -> None:
    """What the driver feeds block i+1 is exactly what the pruned model computes at block i."""
    model = tiny_model("llama", num_layers=3)
    calibration = _calibration(samples=4)
    during = _block_outputs(model, lambda: prune_model_(model, calibration, PruneConfig(batch_size=batch_size)))
    with torch.no_grad():
        after = _block_outputs(model, lambda: model(input_ids=calibration, use_cache=False))
    chunks = -(-4 // batch_size) if batch_size else 1
    for index, outputs in enumerate(during):
        final = torch.cat(outputs[-chunks:])  # the block's last pass over every chunk
        torch.testing.assert_close(final, after[index][0])


def test_shared_hessian_path_equals_the_per_layer_path() -> None:
    """q/k/v share one Hessian and factorization: same result as computing each layer's own."""
    model = tiny_model("llama", num_layers=1)
    reference = tiny_model("llama", num_layers=1)
    calibration = _calibration(samples=4)
    inputs: dict[str, torch.Tensor] = {}
    attn = reference.model.layers[0].self_attn
    handles = [
        getattr(attn, name).register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
        for name in ("q_proj", "k_proj", "v_proj")
    ]
    with torch.no_grad():
        reference(input_ids=calibration, use_cache=False)
    for handle in handles:
        handle.remove()
    result = prune_model_(model, calibration, PruneConfig())
    shared = {r.name.rsplit(".", 1)[-1]: r.shares_input_with for r in result.layers}
    assert len(shared["q_proj"]) == 2 and len(shared["k_proj"]) == 2
    assert shared["o_proj"] == ()
    for name in ("q_proj", "k_proj", "v_proj"):
        acc = HessianAccumulator(64, "cpu")
        acc.add(inputs[name])
        upper, _ = dampened_inverse_cholesky(acc.hessian, 0.01, layers=[name])
        weight = getattr(attn, name).weight.detach().clone()
        sparsegpt_(weight, upper, SparsityPattern.nm(2, 4), dead=torch.diagonal(acc.hessian) == 0)
        torch.testing.assert_close(getattr(model.model.layers[0].self_attn, name).weight, weight)


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda_on_every_layer_on_average() -> None:
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model = tiny_model("llama")
        result = prune_model_(model, _calibration(samples=8, seqlen=32), PruneConfig(method=method))
        errors[method] = sum(r.error for r in result.layers if r.error is not None) / len(result.layers)
    assert errors["sparsegpt"] < errors["wanda"] <= errors["magnitude"] * 1.05


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_refinement_lowers_every_layers_error_and_keeps_the_pattern(method: str) -> None:
    errors = {}
    for iterations in (0, 8):
        model = tiny_model("llama")
        config = PruneConfig(method=method, refine_iterations=iterations)  # type: ignore[arg-type]
        result = prune_model_(model, _calibration(samples=8, seqlen=32), config)
        errors[iterations] = [r.error for r in result.layers]
        for block in model.model.layers:
            for layer in prunable_layers(block, ""):
                assert satisfies_nm(layer.weight(), 2, 4)
    assert all(after <= before * 1.0001 for before, after in zip(errors[0], errors[8], strict=True))
    assert sum(errors[8]) < 0.97 * sum(errors[0])


def test_refinement_needs_calibration_statistics() -> None:
    with pytest.raises(ValueError, match="magnitude"):
        PruneConfig(method="magnitude", refine_iterations=4)


def test_magnitude_needs_no_calibration_and_unstructured_ratios_work() -> None:
    model = tiny_model("gpt2")
    result = prune_model_(model, None, PruneConfig(method="magnitude", pattern=SparsityPattern.unstructured(0.3)))
    assert all(r.sparsity == pytest.approx(0.3, abs=0.01) and r.error is None for r in result.layers)
    model = tiny_model("opt")
    result = prune_model_(model, _calibration(), PruneConfig(pattern=SparsityPattern.unstructured(0.6)))
    assert all(r.sparsity == pytest.approx(0.6, abs=0.02) for r in result.layers)


def test_excluded_layers_stay_dense() -> None:
    model = tiny_model("qwen2")
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    result = prune_model_(model, _calibration(), PruneConfig(exclude=("*.down_proj", "model.layers.0.*")))
    names = {r.name for r in result.layers}
    assert not any(name.endswith("down_proj") or name.startswith("model.layers.0.") for name in names)
    assert names
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)


def test_a_width_not_divisible_by_m_is_refused_before_any_work() -> None:
    model = tiny_model("llama")
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model.model.layers[1].mlp.down_proj = nn.Linear(250, 64, bias=False)  # a width of 250 breaks 2:4
    with pytest.raises(PatternError, match=r"model\.layers\.1\.mlp\.down_proj has 250 input features"):
        prune_model_(model, _calibration(), PruneConfig())
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_bf16_calibration_prunes_every_layer_with_fp32_math_and_close_errors(batch_size: int | None) -> None:
    """bf16 calibration changes only the forward's precision: same pattern, fp32 weights, errors close to fp32's."""
    errors = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model("llama")
        config = PruneConfig(batch_size=batch_size, calibration_precision=precision)
        result = prune_model_(model, _calibration(samples=6, seqlen=32), config)
        assert all(
            satisfies_nm(layer.weight, 2, 4) for layer in model.model.layers.modules() if isinstance(layer, nn.Linear)
        )
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        errors[precision] = [r.error for r in result.layers]
    assert not torch.is_autocast_enabled("cpu")
    for fp32, bf16 in zip(errors["fp32"], errors["bf16"], strict=True):
        assert fp32 is not None and bf16 is not None
        assert bf16 == pytest.approx(fp32, rel=0.25, abs=1e-3)


def test_calibration_hooks_run_exact_fp32_math_under_autocast() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with _exact_math():
            assert (a @ b).dtype == torch.float32
        assert (a @ b).dtype == torch.bfloat16


def test_unknown_calibration_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="calibration precision"):
        PruneConfig(calibration_precision="fp8")  # type: ignore[arg-type]


def test_block_pruner_frees_its_hessians_without_the_garbage_collector() -> None:
    """No reference cycle keeps a block's Hessians alive once the block is done (peak RSS on real models)."""
    model = tiny_model("llama", num_layers=1)
    _, blocks = find_decoder_blocks(model)
    layers = prunable_layers(blocks[0], "model.layers.0")
    tokens = _calibration(samples=2)
    gc.disable()
    try:
        with torch.no_grad():
            hidden, calls = _capture_block_calls(model, blocks, [tokens], torch.device("cpu"))
            pruner = _BlockPruner(layers, PruneConfig())
            with pruner.hooks(prune_on_first_call=True):
                _run_block(blocks[0], hidden[0], calls[0][0])
        assert len(pruner.groups) == 4  # q/k/v, o, gate/up, down
        live = [group.hessian for group in pruner.groups if group.hessian is not None]
        assert len(live) == 1  # q/k/v, o and gate/up were let go as soon as the forward moved past them
        hessians = [weakref.ref(accumulator) for accumulator in live]
        del live
        pruner.results()
        pruner.release()
        del pruner
        assert all(ref() is None for ref in hessians)
    finally:
        gc.enable()


def test_cpu_threads_are_restored_after_pruning() -> None:
    before = torch.get_num_threads()
    prune_model_(tiny_model("llama"), _calibration(), PruneConfig())
    assert torch.get_num_threads() == before


def test_model_state_is_restored_after_pruning() -> None:
    model = tiny_model("mistral")
    model.train()
    model.config.use_cache = True
    prune_model_(model, _calibration(), PruneConfig())
    assert model.training and model.config.use_cache
    assert all(type(block).forward is not None and "forward" not in vars(block) for block in model.model.layers)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_dense_target_changes_nothing_where_the_inputs_are_still_dense() -> None:
    # q/k/v of block 0 read the same input in the dense and the pruned model (C = H): their step is zero
    # (o_proj onwards already see the pruned q/k/v, so their step is not)
    weights = []
    for alpha in (0.0, 0.5):
        model = tiny_model("llama", num_layers=1)
        prune_model_(model, _calibration(samples=8, seqlen=32), PruneConfig(dense_target=alpha))
        attn = model.model.layers[0].self_attn
        weights.append([getattr(attn, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj", "o_proj")])
    for ours, reference in zip(weights[1][:3], weights[0][:3], strict=True):
        torch.testing.assert_close(ours, reference)
    assert not torch.equal(weights[1][3], weights[0][3])


def test_dense_target_step_equals_its_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    pruned_inputs = torch.randn(512, 16, generator=gen)
    dense_inputs = pruned_inputs + 0.3 * torch.randn(512, 16, generator=gen)
    layer = nn.Linear(16, 8, bias=False)
    config = PruneConfig(dense_target=0.5)
    pruner = _BlockPruner(prunable_layers(nn.Sequential(layer), ""), config, {"0": dense_inputs})
    with pruner.hooks(prune_on_first_call=False), torch.no_grad():
        layer(pruned_inputs)
    group = pruner.groups[0]
    hessian = pruned_inputs.T @ pruned_inputs / 512
    cross = dense_inputs.T @ pruned_inputs / 512  # C = X_dᵀ X / T
    torch.testing.assert_close(group.shift, cross - hessian, rtol=1e-4, atol=1e-5)
    weight = layer.weight.detach().clone()
    damped = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(16)
    expected = weight + 0.5 * weight @ (cross - hessian) @ torch.linalg.inv(damped)
    pruner._toward_dense_target(group, weight, group.hessian.hessian)
    torch.testing.assert_close(weight, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "config", [{"method": "wanda", "dense_target": 0.5}, {"batch_size": 4, "dense_target": 0.5}, {"dense_target": 2.0}]
)
def test_dense_target_is_refused_where_it_cannot_run(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="dense_target"):
        PruneConfig(**config)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("bos", [None, 1])
def test_perplexity_by_block_equals_the_whole_model_forward(arch: str, bos: int | None) -> None:
    model = tiny_model(arch, num_layers=3)
    windows = torch.randint(4, VOCAB, (5, 24), generator=torch.Generator().manual_seed(1))
    whole = perplexity(model, windows, batch_size=2, bos_token_id=bos)
    by_block = perplexity(model, windows, batch_size=2, bos_token_id=bos, by_block=True)
    assert by_block.predicted_tokens == whole.predicted_tokens
    assert by_block.value == pytest.approx(whole.value, rel=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # every stub removed


@pytest.mark.parametrize("by_block", [False, True])
def test_an_error_during_evaluation_leaves_the_model_as_it_was(by_block: bool) -> None:
    model = tiny_model("llama")
    windows = torch.randint(4, VOCAB, (4, 16))

    def stop(_done: int, _total: int) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        perplexity(model, windows, batch_size=2, by_block=by_block, on_batch=stop)
    assert not any("forward" in m.__dict__ for m in model.modules())  # no stub, no fast_linears override


def _reference_nll(model: nn.Module, windows: torch.Tensor, bos: int | None) -> tuple[float, int]:
    """Summed NLL and predicted tokens from plain ``model(ids).logits`` (the full [batch, len, vocab])."""
    if bos is not None:
        ids = torch.cat([torch.full((windows.shape[0], 1), bos), windows], dim=1)
        logits, labels = model(ids).logits[:, :-1], windows
    else:
        logits, labels = model(windows).logits[:, :-1], windows[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1), reduction="sum")
    return float(nll), labels.numel()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("bos", [None, 1])
@pytest.mark.parametrize("by_block", [False, True])
def test_sliced_nll_equals_the_full_logits_reference(arch: str, bos: int | None, by_block: bool) -> None:
    # Gemma 3 with final logit soft-capping: the head's post-processing must apply to every slice.
    overrides = {"final_logit_softcapping": 5.0} if arch == "gemma3" else {}
    model = tiny_model(arch, num_layers=2, **overrides)
    windows = torch.randint(4, VOCAB, (5, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        nll, tokens = _reference_nll(model, windows, bos)
    # 2 rows x 128 vocab x 12 bytes per position: slices of 5 positions, a short last slice included.
    result = perplexity(model, windows, batch_size=2, bos_token_id=bos, by_block=by_block, slice_bytes=2 * 128 * 12 * 5)
    assert result.predicted_tokens == tokens
    assert result.nll == pytest.approx(nll / tokens, rel=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_evaluation_never_asks_for_the_logits_of_every_position() -> None:
    model = tiny_model("llama")
    windows = torch.randint(4, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))
    widths: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    try:
        perplexity(model, windows, batch_size=4, slice_bytes=4 * 128 * 12 * 8)
    finally:
        handle.remove()
    assert max(widths) <= 8 and sum(widths) == 31  # 31 predicted positions per window, in slices of <= 8


class _NoLogitsToKeep(nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (evaluation falls back to full logits)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> Any:
        return self.inner(input_ids=input_ids, use_cache=use_cache)


@pytest.mark.parametrize("by_block", [False, True])
def test_a_model_without_logits_to_keep_is_evaluated_on_full_logits(
    by_block: bool, caplog: pytest.LogCaptureFixture
) -> None:
    inner = tiny_model("llama")
    windows = torch.randint(4, VOCAB, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        nll, tokens = _reference_nll(inner, windows, None)
    result = perplexity(_NoLogitsToKeep(inner), windows, batch_size=2, by_block=by_block, slice_bytes=2 * 128 * 12 * 4)
    assert result.nll == pytest.approx(nll / tokens, rel=1e-5)
    assert "no logits_to_keep" in caplog.text


class _Fork(nn.Module):
    """b reads a's output, then c reads the block's input again, after the forward moved past it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.c(x)


def test_a_layer_reading_a_released_input_gets_the_same_hessian(monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass drops a group's Hessian once the forward moves on; a later reader of that input recomputes it
    and prunes to exactly what keeping it would have given."""
    torch.manual_seed(0)
    block = _Fork()
    x = torch.randn(4, 64, 32)

    def pruned(release: bool) -> dict[str, torch.Tensor]:
        copy = _Fork()
        copy.load_state_dict(block.state_dict())
        if not release:
            monkeypatch.setattr(_BlockPruner, "_release_done_groups", lambda self: None)
        pruner = _BlockPruner(prunable_layers(copy, "f"), PruneConfig())
        with torch.no_grad(), pruner.hooks(prune_on_first_call=True):
            copy(x)
        results = pruner.results()
        assert {r.name: r.shares_input_with for r in results}["f.c"] == ("f.a",)
        monkeypatch.undo()
        return {name: p.detach().clone() for name, p in copy.named_parameters()}

    kept, released = pruned(release=False), pruned(release=True)
    assert kept.keys() == released.keys()
    for name in kept:
        assert torch.equal(kept[name], released[name]), name
