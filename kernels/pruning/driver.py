"""Layer-by-layer one-shot pruning of a decoder-only language model, one block on the device at a time.

SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774) §3.5 and Algorithm 1 prune *sequentially*: block
``i + 1`` is calibrated on the outputs of the already-pruned block ``i``, so the model never needs to fit on the
device, only one block and its activations. This driver is generic over architectures:

1. **Capture.** Every block's ``forward`` is swapped for a recording stub and the model is run once on the
   calibration tokens: the stubs record *every* positional and keyword argument each block receives (masks,
   rotary embeddings, per-layer sliding-window masks, …) and pass the hidden states through; the last stub
   stops the forward with a private exception. Only embeddings and other non-block modules touch the device.
2. **Per block.** Move it to the device and run it on the recorded inputs with a forward pre-hook on each
   prunable linear. The hook accumulates the layer's Hessian (:mod:`secateurs.kernels.pruning.hessian`) once
   per *distinct input tensor* (q/k/v and gate/up read the same tensor, detected from the inputs themselves), factors it
   once, prunes the layer, and lets the forward continue with the pruned weights. So the block's output *is*
   the pruned block's output (the next block's input) after a single pass, and layers later in a block are
   calibrated on the outputs of earlier, already-pruned layers (the reference code's "true sequential"
   option). With ``batch_size`` set, the calibration set runs in chunks instead: one pass gathers statistics
   from the dense block, the layers are pruned, and a second pass computes the outputs (bounded memory).
3. Move the block back, report the block's layers through ``on_block``.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from secateurs.kernels.matmul import cross_, fast_linears, linear
from secateurs.kernels.patterns import SparsityPattern, sparsity_of
from secateurs.kernels.pruning.baselines import magnitude_, wanda_
from secateurs.kernels.pruning.discovery import PrunableLayer, find_decoder_blocks, prunable_layers
from secateurs.kernels.pruning.hessian import HessianAccumulator, dampened_inverse_cholesky, dead_inputs
from secateurs.kernels.pruning.refine import masked_refine_
from secateurs.kernels.pruning.sparsegpt import sparsegpt_

log = logging.getLogger(__name__)

MethodName = Literal["sparsegpt", "wanda", "magnitude"]
CalibrationPrecision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. ``batch_size=None`` runs the whole calibration set in one pass per block.

    ``calibration_precision="bf16"`` runs the calibration forward of each block under bf16 autocast (its
    matrix products and attention in bf16, the residual stream stays fp32), while every Hessian, factorization
    and solve stays fp32. It is faster on CPUs with bf16 matrix units (AVX512-BF16, AMX) and GPUs, and
    changes the numbers slightly: a protocol of its own, never the default.

    ``refine_iterations > 0`` re-solves each pruned layer's kept weights for its fixed mask by that many
    conjugate-gradient steps (:mod:`secateurs.kernels.pruning.refine`; SparseGPT and Wanda): lower layer errors,
    more time.

    ``dense_target = α > 0`` (SparseGPT, one pass) also runs each block *dense* on the dense model's hidden
    states and moves every layer's weight toward reproducing the dense layer's outputs from the pruned
    model's inputs before its mask is chosen (see :meth:`_BlockPruner._toward_dense_target`): it corrects
    the error the earlier pruned blocks left in the inputs. About twice the time and ~0.5 GB more memory.
    """

    method: MethodName = "sparsegpt"
    pattern: SparsityPattern = field(default_factory=lambda: SparsityPattern.nm(2, 4))
    blocksize: int = 128
    dampening: float = 0.01
    exclude: tuple[str, ...] = ()
    batch_size: int | None = None
    max_damp_retries: int = 4
    calibration_precision: CalibrationPrecision = "fp32"
    refine_iterations: int = 0
    dense_target: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in ("sparsegpt", "wanda", "magnitude"):
            raise ValueError(f"unknown method {self.method!r}: use sparsegpt, wanda or magnitude")
        if self.calibration_precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown calibration precision {self.calibration_precision!r}: use fp32 or bf16")
        if self.refine_iterations < 0:
            raise ValueError(f"refine_iterations must be >= 0, got {self.refine_iterations}")
        if self.refine_iterations and self.method == "magnitude":
            raise ValueError("refinement re-solves against calibration statistics: magnitude pruning has none")
        if not 0.0 <= self.dense_target <= 1.0:
            raise ValueError(f"dense_target must be within [0, 1], got {self.dense_target}")
        if self.dense_target and (self.method != "sparsegpt" or self.batch_size is not None):
            raise ValueError("dense_target works with method sparsegpt in one pass (no calibration batch size)")
        if self.method == "sparsegpt" and self.pattern.is_nm and self.blocksize % self.pattern.m:  # type: ignore[operator]
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={self.pattern.m}")


@dataclass(frozen=True)
class LayerResult:
    """One pruned layer. ``error`` is ||(W − Ŵ) X||² / ||W X||² on its calibration inputs X (None without)."""

    name: str
    shape: tuple[int, int]  # (out, in)
    sparsity: float
    error: float | None
    shares_input_with: tuple[str, ...] = ()
    dampening: float | None = None
    skipped: str | None = None  # why a layer was left dense


@dataclass(frozen=True)
class BlockProgress:
    """Reported after every block: its index (0-based), the block count, its layers, seconds it took."""

    index: int
    total: int
    layers: tuple[LayerResult, ...]
    seconds: float


@dataclass(frozen=True)
class PruneResult:
    layers: tuple[LayerResult, ...]
    seconds: float
    calibration_tokens: int


class BlockSource(Protocol):
    """Where a decoder block's tensors live when they are not on the block (the I/O-free hook for streaming).

    The driver enters ``weights(index, block)`` around everything it does with block ``index``: inside, the
    block's parameters and buffers are real tensors (on the CPU); on exit they may be released again (e.g.
    back to the meta device). While pruning, ``pruned(index, block)`` is called inside that context once the
    block is pruned and back on the CPU, with what was done to its layers, before it is released (e.g. to write
    its tensors out).
    """

    def weights(self, index: int, block: nn.Module) -> AbstractContextManager[None]: ...

    def outside(self, *, head: bool = True) -> AbstractContextManager[None]:
        """The tensors outside the blocks (embeddings, final norm, head) are real inside this context: the driver
        enters it only to reach the first block (capture, ``head=False``: the output head may stay released) and
        to leave the last one (the head)."""
        ...

    def pruned(self, index: int, block: nn.Module, layers: tuple[LayerResult, ...]) -> None: ...


class ResidentBlocks:
    """The :class:`BlockSource` of a model whose blocks hold their weights all along (nothing to do)."""

    def weights(self, index: int, block: nn.Module) -> AbstractContextManager[None]:
        return nullcontext()

    def outside(self, *, head: bool = True) -> AbstractContextManager[None]:
        return nullcontext()

    def pruned(self, index: int, block: nn.Module, layers: tuple[LayerResult, ...]) -> None:
        return None


class _StopForward(Exception):
    """Ends a forward pass early once every block's inputs are recorded (private, never escapes)."""


@dataclass
class _Call:
    """Everything a block received, minus the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool


def _call_block(block: nn.Module, hidden: torch.Tensor, call: _Call) -> tuple[torch.Tensor, bool]:
    """The block's output hidden states in the dtype of its input (under autocast a block may return bf16),
    and whether the block returns them inside a tuple (as some architectures' blocks do)."""
    dtype = hidden.dtype
    if call.hidden_as_kwarg:
        out = block(*call.args, hidden_states=hidden, **call.kwargs)
    else:
        out = block(hidden, *call.args, **call.kwargs)
    wrapped = isinstance(out, tuple | list)
    return (out[0] if wrapped else out).to(dtype), wrapped


def _run_block(block: nn.Module, hidden: torch.Tensor, call: _Call) -> torch.Tensor:
    """The block's output hidden states, in the dtype of its input."""
    return _call_block(block, hidden, call)[0]


@contextmanager
def _inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no KV cache for the duration; restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None and use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache


@contextmanager
def _on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Move the *own* parameters and buffers of ``modules`` to ``device``, and back on exit (tensors on the meta
    device, released by a :class:`BlockSource`, stay there)."""
    homes: list[tuple[nn.Module, torch.device]] = []
    for module in modules:
        tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        tensors = [t for t in tensors if t.device.type != "meta"]
        if tensors:
            homes.append((module, tensors[0].device))
            module._apply(lambda t: t if t.device.type == "meta" else t.to(device), recurse=False)
    try:
        yield
    finally:
        for module, home in homes:
            module._apply(lambda t, home=home: t if t.device.type == "meta" else t.to(home), recurse=False)


@contextmanager
def _calibration_precision(device: torch.device, precision: CalibrationPrecision) -> Iterator[None]:
    """bf16 autocast for a calibration forward when asked (fp32: nothing changes). Entered per forward pass,
    so autocast's cache of bf16 weight copies never outlives a pass (weights change between passes)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


@contextmanager
def _exact_math() -> Iterator[None]:
    """Inside a calibration hook: no autocast, so Hessians, factorizations and solves stay fp32."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    with ExitStack() as stack:
        for device_type in devices:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """At most ``count`` intra-op CPU threads for the duration (restored afterwards)."""
    before = torch.get_num_threads()
    if before > count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _outside(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """Every module of ``model`` that is not a block or inside one."""
    inside = {id(m) for m in blocks.modules()}
    return [m for m in model.modules() if id(m) not in inside]


@contextmanager
def _stubbed_blocks(blocks: nn.ModuleList, make_stub: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """Block ``i`` runs ``make_stub(i)`` instead of its forward for the duration (an instance attribute that
    shadows the class's forward; removed on exit)."""
    with ExitStack() as stack:
        for index, block in enumerate(blocks):
            block.forward = make_stub(index)
            stack.callback(delattr, block, "forward")
        yield


@torch.no_grad()
def _capture_block_calls(
    model: nn.Module, blocks: nn.ModuleList, chunks: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[list[_Call]]]:
    """Hidden states entering block 0 per chunk, and every block's call per chunk (``calls[chunk][block]``)."""
    hidden: list[torch.Tensor] = []
    calls: list[list[_Call]] = []
    last = len(blocks) - 1

    def make_stub(index: int) -> Callable[..., Any]:
        def stub(*args: Any, **kwargs: Any) -> Any:
            as_kwarg = not args
            state = kwargs.pop("hidden_states") if as_kwarg else args[0]
            rest = args[1:]
            if index == 0:
                hidden.append(state)
            calls[-1].append(_Call(rest, kwargs, as_kwarg))
            if index == last:
                raise _StopForward
            return state

        return stub

    with _stubbed_blocks(blocks, make_stub), _on_device(_outside(model, blocks), device):
        for chunk in chunks:
            calls.append([])
            with suppress(_StopForward):
                model(input_ids=chunk.to(device), use_cache=False)
            if len(calls[-1]) != len(blocks):
                raise RuntimeError(
                    f"the model called {len(calls[-1])} of its {len(blocks)} decoder blocks; secateurs needs "
                    "every block to run once per forward"
                )
    return hidden, calls


_SERIAL_SOLVE = 8 << 20  # weights per layer below which a CPU factorization and sweep run on one thread


@dataclass
class _Group:
    """Linears that read one and the same input tensor: one Hessian, one factorization."""

    hessian: HessianAccumulator | None  # None once released (:meth:`_BlockPruner._release_done_groups`)
    first_input: weakref.ref[torch.Tensor] | None  # a weak reference: a freed input cannot be shared
    members: list[_LayerState] = field(default_factory=list)
    factor: tuple[torch.Tensor, float] | None = None
    shift: torch.Tensor | None = None  # dense target: C − H, C = (1/T) X_denseᵀ X [in, in]


@dataclass
class _LayerState:
    layer: PrunableLayer
    group: _Group | None = None
    result: LayerResult | None = None


def _quadratic_form(weight: torch.Tensor, hessian: torch.Tensor, rows: int = 1024) -> float:
    """tr(W H Wᵀ) for weight [out, in] and a symmetric hessian [in, in], ``rows`` rows of W at a time (the
    temporaries stay one [rows, in] product)."""
    return sum(float((linear(part, hessian) * part).sum()) for part in weight.split(rows))


def _same_input(first: weakref.ref[torch.Tensor] | None, b: torch.Tensor) -> bool:
    """Whether ``b`` is the (still alive) tensor ``first`` points to, or the same view of the same storage.

    Sharing is read from the inputs themselves, not from layer names. A weak reference keeps no activation
    alive; once the first tensor is freed, nothing later can share it (a new tensor at a reused address is
    a different input), so a dead reference never matches.
    """
    a = first() if first is not None else None
    if a is None:
        return False
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a._version == b._version
    )


class _BlockPruner:
    """Pre-hooks on one block's linears: accumulate statistics, and prune at first call (one-pass) or later."""

    def __init__(
        self, layers: list[PrunableLayer], config: PruneConfig, dense_inputs: dict[str, torch.Tensor] | None = None
    ) -> None:
        self.config = config
        self.states = [_LayerState(layer) for layer in layers]
        self.groups: list[_Group] = []
        self.prune_on_first_call = True
        self.dense_inputs = dense_inputs or {}  # layer name → its input in the dense block [..., in]

    @contextmanager
    def hooks(self, *, prune_on_first_call: bool) -> Iterator[None]:
        self.prune_on_first_call = prune_on_first_call
        handles = [state.layer.module.register_forward_pre_hook(self._make_hook(state)) for state in self.states]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for group in self.groups:
                group.first_input = None

    def _make_hook(self, state: _LayerState) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]  # [..., in]
            if state.result is not None:
                return  # pruned already (one-pass mode, or a layer called twice)
            with _exact_math():
                if state.group is None:
                    state.group = self._join_group(state, x)
                elif state.group.members[0] is state:
                    assert state.group.hessian is not None  # groups are released only in one pass
                    state.group.hessian.add(x.detach())
                if self.prune_on_first_call:
                    self._prune(state)

        return hook

    def _join_group(self, state: _LayerState, x: torch.Tensor) -> _Group:
        for group in self.groups:
            if _same_input(group.first_input, x):
                group.members.append(state)
                if group.hessian is None:  # released (below), and yet one more layer reads the same input
                    group.hessian = HessianAccumulator(state.layer.in_features, x.device)
                    group.hessian.add(x.detach())
                return group
        if self.prune_on_first_call:
            self._release_done_groups()
        accumulator = HessianAccumulator(state.layer.in_features, x.device)
        accumulator.add(x.detach())
        group = _Group(accumulator, weakref.ref(x), [state])
        dense = self.dense_inputs.get(state.layer.name)
        if dense is not None:  # C − H, both means over the same tokens: [in, in]
            for name in [name for name, tensor in self.dense_inputs.items() if tensor is dense]:
                del self.dense_inputs[name]  # the group's dense input is needed only here: let it go
            ours = x.detach().reshape(-1, x.shape[-1])  # [tokens, in]
            cross = torch.zeros_like(accumulator.hessian)
            cross_(cross, dense.reshape(-1, dense.shape[-1]), ours, alpha=1.0 / ours.shape[0])
            group.shift = cross.sub_(accumulator.hessian)
        self.groups.append(group)
        return group

    def _release_done_groups(self) -> None:
        """One pass: a new input means the forward moved on, so the Hessians and factors of the groups whose
        layers are all pruned are dropped now rather than at the end of the block (on a 7B block, 3 × 2 × 67 MB
        while the 11008-wide MLP input is solved). A later layer that still reads one of those inputs (the
        input tensor is alive and unchanged, :func:`_same_input`) gets its Hessian recomputed from it: the same
        numbers, from the same tokens. Not with a dense target, whose C − H needs the dense inputs already let go.
        """
        for group in self.groups:
            if group.shift is None and all(member.result is not None for member in group.members):
                group.hessian = None
                group.factor = None

    def prune_remaining(self) -> None:
        for state in self.states:
            if state.result is None and state.group is not None:
                self._prune(state)

    @torch.no_grad()
    def _prune(self, state: _LayerState) -> None:
        # Factorization, sweep and error are small LAPACK calls and thousands of small operations: on CPU one
        # thread avoids an OpenMP barrier per call, which costs whole scheduler slices when the cores are
        # shared. Measured on the 2-core VM at load average ~3.7: a 1536-wide factorization took 0.18–11.3 s
        # with 2 threads, 0.15–0.25 s with 1; the 7 sweeps of a SmolLM2 block 1.1–7.9 s vs 0.17–0.25 s.
        # The Hessian products, the refinement and the error (large products) keep every thread, and so do the
        # factorization and sweep of large layers (at least _SERIAL_SOLVE weights: LLaMA-7B's, TinyLlama's MLP),
        # whose lazy updates and triangular products are large enough to pay for the threads.
        group, layer, config = state.group, state.layer, self.config
        assert group is not None and group.hessian is not None
        hessian = group.hessian.hessian  # [in, in]
        original = layer.weight().to(torch.float32, copy=True)  # [out, in]
        weight = original.clone()
        cpu = weight.device.type == "cpu"
        if group.shift is not None:
            self._toward_dense_target(group, weight, hessian)
        serial = cpu and layer.out_features * layer.in_features < _SERIAL_SOLVE
        with _threads(1 if serial else torch.get_num_threads()):
            dampening = self._mask_and_solve(group, weight, hessian)
        if config.refine_iterations:
            damped = hessian.clone()  # the solve's dampening λ (δ · mean diag H) also regularizes the re-solve
            torch.diagonal(damped).add_((dampening or config.dampening) * float(torch.diagonal(hessian).mean()))
            masked_refine_(weight, original, damped, config.refine_iterations)
        reference = _quadratic_form(original, hessian)  # tr(W H Wᵀ)
        delta = original.sub_(weight)  # W − Ŵ: [out, in], over the dense copy (no longer needed)
        error = _quadratic_form(delta, hessian) / reference if reference > 0 else 0.0
        del original, delta
        layer.set_weight_(weight)
        state.result = LayerResult(
            name=layer.name,
            shape=(layer.out_features, layer.in_features),
            sparsity=sparsity_of(weight),
            error=error,
            dampening=dampening,
        )

    def _factor(self, group: _Group, hessian: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The group's U (upper Cholesky factor of (H + λI)⁻¹) and λ/δ, computed once per group."""
        if group.factor is None:
            names = [m.layer.name for m in group.members]
            group.factor = dampened_inverse_cholesky(
                hessian, self.config.dampening, layers=names, max_retries=self.config.max_damp_retries
            )
        return group.factor

    def _toward_dense_target(self, group: _Group, weight: torch.Tensor, hessian: torch.Tensor) -> None:
        """W ← W + α · W (C − H)(H + λI)⁻¹, in place (weight [out, in]).

        SparseGPT fits each layer to its own dense outputs on the *pruned* model's inputs X: min ||W X − Ŵ X||².
        The outputs the model needs are the dense model's, W X_d on the dense inputs X_d. Unconstrained,
        min ||W X_d − Ŵ X||² is solved by Ŵ = W C H⁻¹ with C = X_dᵀ X / T, i.e. W + W (C − H) H⁻¹, and
        ||W X_d − Ŵ X||² = ||W' X − Ŵ X||² + const for that W'; so pruning W' on H targets the dense outputs.
        The same idea as GPTAQ's asymmetric calibration for quantization (Li et al. 2025, arXiv 2504.02692).
        With the full step (α = 1) the perplexity got worse under P-CPU (136.5 vs 110.9: the solve on
        32 K tokens overfits), with α = 0.5 better (97.9); so α is a damping of the step.
        """
        assert group.shift is not None
        upper, _ = self._factor(group, hessian)  # (H + λI)⁻¹ = Uᵀ U
        step = linear(weight, group.shift.T)  # W (C − H): [out, in]
        step = linear(linear(step, upper), upper.T)  # · Uᵀ U
        weight.add_(step, alpha=self.config.dense_target)

    def _mask_and_solve(self, group: _Group, weight: torch.Tensor, hessian: torch.Tensor) -> float | None:
        """Prune ``weight`` [out, in] (fp32) in place by the configured method; SparseGPT's dampening λ/δ."""
        config = self.config
        if config.method == "sparsegpt":
            upper, dampening = self._factor(group, hessian)
            sparsegpt_(weight, upper, config.pattern, blocksize=config.blocksize, dead=dead_inputs(hessian))
            return dampening
        if config.method == "wanda":
            wanda_(weight, torch.diagonal(hessian).clamp_min(0).sqrt(), config.pattern)
        else:
            magnitude_(weight, config.pattern)
        return None

    def results(self) -> list[LayerResult]:
        out = []
        for state in self.states:
            if state.result is None:
                out.append(
                    LayerResult(
                        name=state.layer.name,
                        shape=(state.layer.out_features, state.layer.in_features),
                        sparsity=sparsity_of(state.layer.weight()),
                        error=None,
                        skipped="never called during calibration; left dense",
                    )
                )
                continue
            group = state.group
            assert group is not None
            peers = tuple(m.layer.name for m in group.members if m is not state)
            out.append(LayerResult(**{**state.result.__dict__, "shares_input_with": peers}))
        return out

    def release(self) -> None:
        """Drop every Hessian and factor now: groups and states point at each other (a reference cycle that
        only the cyclic garbage collector would free, measured at ~40 MB of Hessians left per SmolLM2 block)."""
        for state in self.states:
            state.group = None
        self.groups.clear()


@contextmanager
def _recording_inputs(layers: list[PrunableLayer], inputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record each layer's first input into ``inputs`` (by layer name) while a forward runs."""

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.setdefault(name, args[0].detach())

        return hook

    handles = [layer.module.register_forward_pre_hook(make_hook(layer.name)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def plan_layers(model: nn.Module, config: PruneConfig) -> tuple[str, nn.ModuleList, list[list[PrunableLayer]]]:
    """Blocks and the layers to prune in each; checks every layer's shape against the pattern up front."""
    prefix, blocks = find_decoder_blocks(model)
    per_block = [prunable_layers(block, f"{prefix}.{i}", config.exclude) for i, block in enumerate(blocks)]
    for layers in per_block:
        for layer in layers:
            config.pattern.check_shape(layer.name, layer.in_features)
    if not any(per_block):
        raise ValueError("no linear layer left to prune: check the --exclude patterns")
    return prefix, blocks, per_block


def _prune_without_calibration(
    blocks: nn.ModuleList,
    per_block: list[list[PrunableLayer]],
    config: PruneConfig,
    device: torch.device,
    *,
    on_block: Callable[[BlockProgress], None] | None,
    source: BlockSource,
) -> list[LayerResult]:
    results: list[LayerResult] = []
    for index, (block, layers) in enumerate(zip(blocks, per_block, strict=True)):
        started = time.perf_counter()
        with source.weights(index, block):
            with _on_device(list(block.modules()), device), torch.no_grad():
                block_results = []
                for layer in layers:
                    weight = layer.weight().to(torch.float32).clone()
                    magnitude_(weight, config.pattern)
                    layer.set_weight_(weight)
                    block_results.append(
                        LayerResult(layer.name, (layer.out_features, layer.in_features), sparsity_of(weight), None)
                    )
            source.pruned(index, block, tuple(block_results))
        results.extend(block_results)
        if on_block:
            on_block(BlockProgress(index, len(blocks), tuple(block_results), time.perf_counter() - started))
    return results


@torch.no_grad()
def prune_model_(
    model: nn.Module,
    calibration: torch.Tensor | None,
    config: PruneConfig,
    *,
    device: torch.device | str | None = None,
    on_block: Callable[[BlockProgress], None] | None = None,
    source: BlockSource | None = None,
) -> PruneResult:
    """Prune ``model`` in place, block by block, and return what was done to every layer.

    calibration: token ids [samples, seqlen] (None only for magnitude pruning). ``device`` is where each
    block is computed (default: where the model's parameters are); the model itself stays where it is.
    ``on_block`` is called after every block with a :class:`BlockProgress`. ``source`` materializes each
    block's weights only while the driver works on it (:class:`BlockSource`; default: they are resident).
    """
    started = time.perf_counter()
    source = source or ResidentBlocks()
    compute = torch.device(device) if device is not None else next(model.parameters()).device
    _, blocks, per_block = plan_layers(model, config)
    if calibration is None:
        if config.method != "magnitude":
            raise ValueError(f"{config.method} needs calibration tokens")
        with _inference_mode(model):
            results = _prune_without_calibration(blocks, per_block, config, compute, on_block=on_block, source=source)
        return PruneResult(tuple(results), time.perf_counter() - started, 0)
    if calibration.ndim != 2:
        raise ValueError(f"calibration must be token ids [samples, seqlen], got shape {tuple(calibration.shape)}")
    size = config.batch_size or calibration.shape[0]
    chunks = list(calibration.split(size))
    one_pass = len(chunks) == 1
    results = []
    with _inference_mode(model):
        with source.outside(head=False):
            hidden, calls = _capture_block_calls(model, blocks, chunks, compute)
        dense_hidden = hidden[0] if config.dense_target else None  # the dense model's stream (one pass)
        for index, (block, layers) in enumerate(zip(blocks, per_block, strict=True)):
            block_started = time.perf_counter()
            precision = config.calibration_precision
            with source.weights(index, block):
                with _on_device(list(block.modules()), compute), fast_linears(block):
                    block_calls = [call[index] for call in calls]  # captured on the compute device
                    dense_inputs: dict[str, torch.Tensor] = {}
                    if dense_hidden is not None:
                        with _recording_inputs(layers, dense_inputs), _calibration_precision(compute, precision):
                            dense_hidden = _run_block(block, dense_hidden, block_calls[0])
                    pruner = _BlockPruner(layers, config, dense_inputs)
                    if one_pass:
                        with pruner.hooks(prune_on_first_call=True), _calibration_precision(compute, precision):
                            hidden = [_run_block(block, hidden.pop(), block_calls[0])]
                    else:
                        with pruner.hooks(prune_on_first_call=False):
                            for h, call in zip(hidden, block_calls, strict=True):
                                with _calibration_precision(compute, precision):
                                    _run_block(block, h, call)
                        pruner.prune_remaining()
                        for chunk, call in enumerate(block_calls):  # each chunk's input is replaced by its output
                            with _calibration_precision(compute, precision):
                                hidden[chunk] = _run_block(block, hidden[chunk], call)
                block_results = pruner.results()
                pruner.release()
                dense_inputs.clear()
                source.pruned(index, block, tuple(block_results))
            results.extend(block_results)
            for result in block_results:
                if result.error is not None and not math.isfinite(result.error):
                    log.warning("%s: reconstruction error is not finite", result.name)
            if on_block:
                on_block(BlockProgress(index, len(blocks), tuple(block_results), time.perf_counter() - block_started))
    return PruneResult(tuple(results), time.perf_counter() - started, int(calibration.numel()))


_NO_LOGITS_TO_KEEP = "%s.forward has no logits_to_keep: evaluation holds the full [batch, len, vocab] logits"

Head = Callable[[torch.Tensor | None], torch.Tensor]
"""``head(positions)``: the logits [batch, len(positions), vocab] of one chunk at the 1-D positions given
(``None``: every position, [batch, len, vocab]); see :func:`heads_by_block` and :func:`heads_whole_model`."""


def keeps_logits_selectively(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs: ``lm_head`` and any
    post-processing, e.g. Gemma's final logit soft-capping, then run on the kept positions only)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def _head_replay(
    model: nn.Module, blocks: nn.ModuleList, device: torch.device, wrapped: bool
) -> Iterator[Callable[[torch.Tensor, torch.Tensor], Head]]:
    """``bind(ids, final)`` → a :data:`Head` for one chunk: a forward of the modules outside the blocks
    (embeddings, final norm, head) with every block stubbed out, the last stub handing over ``final`` (the
    last block's output for ``ids``, [batch, len, hidden]), and ``logits_to_keep`` selecting positions."""
    last = len(blocks) - 1
    current: list[torch.Tensor] = []
    selective = keeps_logits_selectively(model)

    def make_stub(index: int) -> Callable[..., Any]:
        def stub(*args: Any, **kwargs: Any) -> Any:
            state = current[0] if index == last else (args[0] if args else kwargs["hidden_states"])
            return (state,) if wrapped else state

        return stub

    def bind(ids: torch.Tensor, final: torch.Tensor) -> Head:
        full: list[torch.Tensor] = []  # without logits_to_keep: the full logits, computed once per chunk

        def forward(**kwargs: Any) -> torch.Tensor:
            current[:] = [final]
            try:
                return model(input_ids=ids, use_cache=False, **kwargs).logits
            finally:
                current.clear()

        def head(positions: torch.Tensor | None) -> torch.Tensor:
            if positions is None:
                return forward()  # [batch, len, vocab]
            if selective:
                return forward(logits_to_keep=positions.to(device))  # [batch, kept, vocab]
            if not full:
                full.append(forward())
            return full[0][:, positions.to(device)]

        return head

    with _stubbed_blocks(blocks, make_stub), _on_device(_outside(model, blocks), device), fast_linears(model):
        yield bind


@torch.no_grad()
def heads_by_block(
    model: nn.Module,
    chunks: list[torch.Tensor],
    device: torch.device | str,
    *,
    on_block: Callable[[int, int], None] | None = None,
    source: BlockSource | None = None,
) -> Generator[Head, None, None]:
    """A :data:`Head` per chunk of token ids [batch, len], computed one decoder block on ``device`` at a time.

    The same capture and replay as :func:`prune_model_` (so a model far larger than the device can be
    evaluated): block inputs are captured for every chunk, every block runs on all chunks in turn (hidden
    states wait on the CPU between blocks), then each chunk's head replays the modules outside the blocks
    (embeddings, final norm, head) with every block replaced by a stub: the last one hands over the
    precomputed final hidden states. ``on_block(done, total)`` after each block; ``source`` materializes
    each block's weights only while it runs (:class:`BlockSource`). Each head is valid until the generator
    advances; its logits are on ``device``.
    """
    compute = torch.device(device)
    _, blocks = find_decoder_blocks(model)
    store = torch.device("cpu")
    if not keeps_logits_selectively(model):
        log.warning(_NO_LOGITS_TO_KEEP, type(model).__name__)
    source = source or ResidentBlocks()
    with _inference_mode(model):
        with source.outside(head=False):
            hidden, calls = _capture_block_calls(model, blocks, chunks, compute)
        hidden = [h.to(store) for h in hidden]
        wrapped = False
        for index, block in enumerate(blocks):
            with source.weights(index, block), _on_device(list(block.modules()), compute), fast_linears(block):
                for chunk, call in enumerate(calls):
                    out, wrapped = _call_block(block, hidden[chunk].to(compute), call[index])
                    hidden[chunk] = out.to(store)  # [batch, len, hidden]
            if on_block:
                on_block(index + 1, len(blocks))
        with source.outside(), _head_replay(model, blocks, compute, wrapped) as bind:
            for chunk, ids in enumerate(chunks):
                final = hidden[chunk].to(compute)
                hidden[chunk] = torch.empty(0)  # done with it: free the CPU copy as we go
                yield bind(ids.to(compute), final)


@torch.no_grad()
def heads_whole_model(
    model: nn.Module, chunks: list[torch.Tensor], device: torch.device | str
) -> Generator[Head, None, None]:
    """A :data:`Head` per chunk of token ids [batch, len] for a model that sits on ``device`` as a whole.

    One ordinary forward per chunk with ``logits_to_keep`` empty (no logits at all) records the last block's
    output; each head then replays only what follows the blocks, as :func:`heads_by_block` does. Without
    ``logits_to_keep`` the head is the full forward's logits, sliced (a warning says so).
    """
    compute = torch.device(device)
    _, blocks = find_decoder_blocks(model)
    selective = keeps_logits_selectively(model)
    with _inference_mode(model), fast_linears(model):
        if not selective:
            log.warning(_NO_LOGITS_TO_KEEP, type(model).__name__)
            for chunk in chunks:
                yield _full_logits_head(model(input_ids=chunk.to(compute), use_cache=False).logits)
            return
        for chunk in chunks:
            ids = chunk.to(compute)
            final, wrapped = _last_block_output(model, blocks[-1], ids)  # [batch, len, hidden]
            with _head_replay(model, blocks, compute, wrapped) as bind:
                yield bind(ids, final)


def _full_logits_head(logits: torch.Tensor) -> Head:
    """A :data:`Head` over logits already computed for every position ([batch, len, vocab])."""

    def head(positions: torch.Tensor | None) -> torch.Tensor:
        return logits if positions is None else logits[:, positions.to(logits.device)]

    return head


def _last_block_output(model: nn.Module, last: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The output hidden states of the model's last block for ``ids`` (a forward that computes no logits),
    and whether the block returns them inside a tuple."""
    outputs: list[Any] = []
    handle = last.register_forward_hook(lambda _module, _args, out: outputs.append(out))
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device))
    finally:
        handle.remove()
    if len(outputs) != 1:
        raise RuntimeError(f"the last decoder block ran {len(outputs)} times in one forward; secateurs needs once")
    out = outputs[0]
    wrapped = isinstance(out, tuple | list)
    return (out[0] if wrapped else out), wrapped


def logits_by_block(
    model: nn.Module,
    chunks: list[torch.Tensor],
    device: torch.device | str,
    *,
    on_block: Callable[[int, int], None] | None = None,
) -> Generator[torch.Tensor, None, None]:
    """The model's full logits [batch, len, vocab] for each chunk (see :func:`heads_by_block`); for callers
    that need every position at once (evaluation does not: :mod:`secateurs.kernels.measure.perplexity`)."""
    heads = heads_by_block(model, chunks, device, on_block=on_block)
    try:
        for head in heads:
            yield head(None)
    finally:
        heads.close()
