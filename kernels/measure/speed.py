"""Measured speed of dense versus 2:4 sparse execution: timing, a registry of sparse paths, the sweeps.

What is measured and how (GUIDE §3 "2:4 execution in 2026", "Physical limits"):

* **Per linear shape**, at several token counts: the dense product on the dense-with-zeros weight (on CPU in fp32
  the faster of MKL's ``F.linear`` and oneDNN at each point, as the benchmarks take it; ``F.linear`` otherwise,
  cuBLAS on GPU) versus every registered sparse path that runs on the device. Each weight and input exists in several
  copies, used in turn, so that repeated reads are not served from cache (on GPU enough copies to span twice the
  L2 cache).
* **End to end**: prefill latency and decode tokens/s of the whole model, dense versus each path (every pruned
  linear swapped for the path's module), both eager, and on both sides every linear that stays dense (all of the
  dense model's; ``lm_head`` and the like in the sparse one) through the same faster dense products
  (:func:`secateurs.kernels.matmul.fast_linears`). Until 2026-11-30 the dense side ran transformers' ``F.linear``,
  which on an AMD Zen 5 took 1.2-2.2x oneDNN's time in fp32 from 16 to 512 tokens: the report's CPU speedups
  then counted MKL's slowness there as the kernels' gain (the quick start's decode read 2.02x against F.linear,
  1.61x against oneDNN).
* **Correctness gate**: before a path is timed, its output is compared with the dense-with-zeros output by
  ``torch.testing.assert_close`` (rtol: torch's default for the dtype; atol: rtol × RMS of the reference (× 8 in
  fp32, where dense libraries differ that much among themselves), since
  outputs that cancel to ~0 otherwise fail on summation order alone). A path that fails is reported ``failed``
  with the mismatch message and is never timed; one that raises is reported ``error``.
* **Timing**: on CUDA, events around each call after warm-up (no host sync inside the timed region); on CPU,
  ``time.perf_counter``. Median, quartiles, min and max of the repetitions.
* **Physical limit**: a 2:4 layer can at most halve the FLOPs (2×, compute-bound) and move
  ``packed/dense`` of the weight bytes (16/9 = 1.78× for 16-bit weights, memory-bound). With datasheet peaks of
  the GPU the roofline decides which applies; without, the larger bound is used. Each figure states its basis.

No estimate is ever reported as a measurement: a path that cannot run is ``unavailable`` with the reason.
This module does no file I/O; the device follows the inputs (or is passed explicitly to the sweep).
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.kernels import matmul
from secateurs.kernels.matmul import fast_linears
from secateurs.kernels.matmul import linear as dense_linear
from secateurs.kernels.patterns import SparsityPattern, prune_mask
from secateurs.kernels.sparse.packing import PackedLinear, describe_packed_kernels, packed_kernels, packed_nbytes

Status = Literal["measured", "failed", "error", "unavailable", "skipped"]

# --- Timing --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Statistics of ``repetitions`` timed calls after ``warmup`` untimed ones, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    warmup: int
    repetitions: int
    rotation: int  # distinct weight/input copies used in turn
    timer: str  # "cuda_events" or "perf_counter"


def summarize(samples_ms: Sequence[float], *, warmup: int, rotation: int, timer: str) -> Timing:
    ordered = sorted(samples_ms)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(
        median_ms=statistics.median(ordered),
        q1_ms=q1,
        q3_ms=q3,
        min_ms=ordered[0],
        max_ms=ordered[-1],
        warmup=warmup,
        repetitions=len(ordered),
        rotation=rotation,
        timer=timer,
    )


class Stopwatch:
    """Times regions of work on one device: CUDA events on the current stream, or ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.timer = "cuda_events" if self.cuda else "perf_counter"
        self._events: list[tuple[Any, Any]] = []
        self._samples: list[float] = []

    @contextmanager
    def region(self, record: bool = True) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            if record:
                self._events.append((start, end))
        else:
            started = time.perf_counter()
            yield
            if record:
                self._samples.append((time.perf_counter() - started) * 1e3)

    def samples_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [float(start.elapsed_time(end)) for start, end in self._events]
        return list(self._samples)


def time_calls(
    run: Callable[[int], object], device: torch.device, *, warmup: int, repetitions: int, rotation: int = 1
) -> Timing:
    """Time ``run(i)`` for i = warmup .. warmup + repetitions - 1 after ``warmup`` untimed calls.

    ``run`` picks its inputs from ``i`` (``i % rotation``), so consecutive calls touch different memory.
    """
    watch = Stopwatch(device)
    for i in range(warmup):
        run(i)
    if watch.cuda:
        torch.cuda.synchronize(device)
    for i in range(warmup, warmup + repetitions):
        with watch.region():
            run(i)
    return summarize(watch.samples_ms(), warmup=warmup, rotation=rotation, timer=watch.timer)


def copies_for(nbytes: int, span_bytes: int, max_copies: int) -> int:
    """How many copies of an ``nbytes`` tensor to rotate through so that together they span ``span_bytes``."""
    return max(2, min(max_copies, math.ceil(span_bytes / max(nbytes, 1))))


# --- The correctness gate ------------------------------------------------------------------------------------


def gate_rtol(dtype: torch.dtype) -> float:
    """torch.testing's default relative tolerance for ``dtype``."""
    return {torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float32: 1.3e-6, torch.float64: 1e-7}.get(dtype, 1e-3)


# fp32 products that sum in different orders differ by more than fp32's rtol × RMS: measured (2-core Xeon, 16
# tokens, 2:4 weights of 1536x576, 576x1536, 4096x4096) MKL's F.linear is up to 1.8e-6 × RMS from the exact product,
# the project's oneDNN path up to 3.0e-6 × RMS, and the two disagree past rtol × RMS on most draws. So the fp32 gate
# allows 8 × rtol × RMS (1.04e-5 × RMS): room for a correct summation order, still far below a wrong weight or index.
_ATOL_FACTOR = {torch.float32: 8.0}


def mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when ``actual`` matches ``expected`` at the dtype's tolerance, else assert_close's message."""
    rtol = gate_rtol(expected.dtype)
    rms = float(expected.detach().float().pow(2).mean().sqrt()) if expected.numel() else 0.0
    atol = rtol * rms * _ATOL_FACTOR.get(expected.dtype, 1.0)
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol + 1e-30)
    except AssertionError as exc:
        return " ".join(str(exc).split())
    return None


# --- Sparse paths --------------------------------------------------------------------------------------------


class SparsePath(ABC):
    """One way to compute y = x Wᵀ + b from an N:M weight; register new ones with :func:`register_sparse_path`."""

    name: str = ""
    description: str = ""
    hardware: bool = False  # runs on 2:4 sparse tensor cores

    @abstractmethod
    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why the path cannot run on ``device`` in ``dtype``, or None if it can."""

    def unsupported(self, shape: tuple[int, int], dtype: torch.dtype, pattern: SparsityPattern) -> str | None:
        """Why the path cannot take a weight of ``shape`` (out, in) with ``pattern``, or None."""
        return None

    def declines(self, tokens: int) -> str | None:
        """Why the per-shape sweep does not time the path at ``tokens`` (a decode-only kernel), or None."""
        return None

    @abstractmethod
    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsityPattern) -> nn.Module:
        """A module computing ``F.linear(x, weight, bias)`` from the dense-with-zeros ``weight`` [out, in]."""


class _SemiStructuredLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, subclass: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(subclass.from_dense(weight.detach().contiguous()), requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return F.linear(x, self.weight, self.bias)


class SemiStructuredPath(SparsePath):
    """PyTorch's ``to_sparse_semi_structured`` (prototype) with an explicit backend: cuSPARSELt or CUTLASS.

    Needs CUDA compute capability ≥ 8.0 (sparse tensor cores, Mishra et al. 2021); GUIDE §3: CUTLASS kernels
    target Ampere (PyTorch's raise on anything but 8.x, seen on an H200), Hopper needs cuSPARSELt.
    """

    hardware = True

    def __init__(self, backend: Literal["cusparselt", "cutlass"]) -> None:
        self.backend = backend
        self.name = f"semi_structured_{backend}"
        self.description = (
            f"torch.sparse.to_sparse_semi_structured, {'cuSPARSELt' if backend == 'cusparselt' else 'CUTLASS'} "
            "backend, default algorithm; F.linear on the compressed weight"
        )

    @property
    def subclass(self) -> Any:
        name = (
            "SparseSemiStructuredTensorCUSPARSELT"
            if self.backend == "cusparselt"
            else "SparseSemiStructuredTensorCUTLASS"
        )
        return getattr(torch.sparse, name)

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"needs a CUDA GPU of compute capability >= 8.0 (2:4 sparse tensor cores), not {device.type}"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"compute capability {major}.{minor} < 8.0: this GPU has no 2:4 sparse tensor cores"
        if self.backend == "cutlass" and major != 8:  # measured on an H200: "Supported only on ... 8.x"
            return f"PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x (Ampere/Ada) only, not {major}.{minor}"
        if self.backend == "cusparselt" and not torch.backends.cusparselt.is_available():
            return "this torch build has no cuSPARSELt"
        if dtype not in self.subclass._DTYPE_SHAPE_CONSTRAINTS:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.subclass._DTYPE_SHAPE_CONSTRAINTS)
            return f"{self.backend} takes {names}, not {str(dtype).removeprefix('torch.')}"
        return None

    def unsupported(self, shape: tuple[int, int], dtype: torch.dtype, pattern: SparsityPattern) -> str | None:
        if not pattern.is_nm or (pattern.n, pattern.m) != (2, 4):
            return f"sparse tensor cores run 2:4 only, not {pattern}"
        limits = self.subclass._DTYPE_SHAPE_CONSTRAINTS[dtype]
        rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
        if shape[0] % rows or shape[1] % cols:
            return f"weight {shape} (out, in): {self.backend} needs out % {rows} == 0 and in % {cols} == 0"
        return None

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsityPattern) -> nn.Module:
        return _SemiStructuredLinear(weight, bias, self.subclass)


class PackedReferencePath(SparsePath):
    """The project's packed N:M format (:mod:`secateurs.kernels.sparse.packing`), reference forward: decompress,
    then dense.

    It measures what the format costs when no kernel reads it directly; it is not expected to be faster.
    """

    name = "packed_reference"
    description = (
        "secateurs packed N:M (values + 2-bit positions for 2:4), reference forward: decompress to dense, then "
        "F.linear (the hook where the project's own packed kernels plug in)"
    )

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def unsupported(self, shape: tuple[int, int], dtype: torch.dtype, pattern: SparsityPattern) -> str | None:
        if not pattern.is_nm:
            return f"the packed format stores N:M patterns, not the unstructured ratio {pattern}"
        return None

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsityPattern) -> nn.Module:
        assert pattern.n is not None and pattern.m is not None
        module = PackedLinear.from_dense(weight, bias, pattern.n, pattern.m)
        module.use_kernels = False
        return module


_PATHS: dict[str, SparsePath] = {}


def register_sparse_path(path: SparsePath) -> None:
    """Make ``path`` part of every sweep that does not name its paths (replaces one of the same name)."""
    _PATHS[path.name] = path


def unregister_sparse_path(name: str) -> None:
    _PATHS.pop(name, None)


def sparse_paths() -> list[SparsePath]:
    return list(_PATHS.values())


class _KernelLinear(nn.Module):
    """A :class:`PackedLinear` computed by one named packed kernel; calls it declines run the reference forward."""

    def __init__(self, layer: PackedLinear, kernel: str) -> None:
        super().__init__()
        self.layer, self.kernel = layer, kernel
        self.last_path: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        y = packed_kernels()[self.kernel](x, self.layer)
        if y is not None:
            self.last_path = self.kernel
            return y
        self.last_path = "reference"
        return F.linear(x, self.layer.dense_weight(), self.layer.bias)


class PackedKernelPath(SparsePath):
    """The packed N:M format computed by one kernel registered with
    :func:`secateurs.kernels.sparse.packing.register_packed_kernel` (e.g. the Triton decode kernel).

    Calls the kernel declines (more tokens than ``max_tokens``) run the packed reference forward, as in a loaded
    model: the per-shape sweep does not time those token counts (:meth:`declines`), end to end they count.
    """

    def __init__(
        self,
        kernel: str,
        description: str,
        *,
        device_type: str,
        dtypes: tuple[torch.dtype, ...],
        patterns: tuple[tuple[int, int], ...],
        max_tokens: int | None = None,
    ) -> None:
        self.name = f"packed_{kernel}"
        self.kernel, self.description = kernel, description
        self.device_type, self.dtypes, self.patterns, self.max_tokens = device_type, dtypes, patterns, max_tokens

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != self.device_type:
            return f"the {self.kernel} kernel runs on {self.device_type}, not {device.type}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"the {self.kernel} kernel takes {names}, not {str(dtype).removeprefix('torch.')}"
        described = next((d for d in describe_packed_kernels() if d.name == self.kernel), None)
        if described is None:
            return f"no packed kernel named {self.kernel!r} is registered"
        return None if described.available else described.detail

    def unsupported(self, shape: tuple[int, int], dtype: torch.dtype, pattern: SparsityPattern) -> str | None:
        if not pattern.is_nm or (pattern.n, pattern.m) not in self.patterns:
            names = ", ".join(f"{n}:{m}" for n, m in self.patterns)
            return f"the {self.kernel} kernel computes {names}, not {pattern}"
        return None

    def declines(self, tokens: int) -> str | None:
        if self.max_tokens is not None and tokens > self.max_tokens:
            return (
                f"the {self.kernel} kernel takes 1..{self.max_tokens} tokens (decode); larger calls run the packed "
                "reference forward in a loaded model"
            )
        return None

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsityPattern) -> nn.Module:
        assert pattern.n is not None and pattern.m is not None
        return _KernelLinear(PackedLinear.from_dense(weight, bias, pattern.n, pattern.m), self.kernel)


register_sparse_path(SemiStructuredPath("cusparselt"))
register_sparse_path(SemiStructuredPath("cutlass"))
register_sparse_path(PackedReferencePath())
register_sparse_path(
    PackedKernelPath(
        "triton",
        "secateurs packed 2:4, Triton decode kernel (kernels/sparse/triton_decode.py): kept values and 2-bit codes "
        "read directly, x gathered through the codes, fp32 accumulation; 1-16 tokens, the packed reference beyond",
        device_type="cuda",
        dtypes=(torch.float16, torch.bfloat16),
        patterns=((2, 4),),
        max_tokens=16,
    )
)


# --- Device facts and physical limits ------------------------------------------------------------------------


@dataclass(frozen=True)
class Peaks:
    """Datasheet peaks of a GPU: dense 16-bit tensor-core FLOP/s and memory bandwidth (bytes/s)."""

    flops: float
    bandwidth: float
    source: str


# NVIDIA datasheets (dense, i.e. without the 2:4 sparsity factor). Matched by substring of the device name, in
# order. GUIDE §3 quotes the H100 SXM and H200 figures.
PEAKS: tuple[tuple[str, Peaks], ...] = (
    ("H100 PCIe", Peaks(756e12, 2.0e12, "NVIDIA H100 PCIe datasheet")),
    ("H100 NVL", Peaks(835e12, 3.9e12, "NVIDIA H100 NVL datasheet")),
    ("H100", Peaks(989e12, 3.35e12, "NVIDIA H100 SXM5 datasheet")),
    ("H200", Peaks(989e12, 4.8e12, "NVIDIA H200 SXM datasheet")),
    ("A100-SXM4-80GB", Peaks(312e12, 2.039e12, "NVIDIA A100 SXM4 80GB datasheet")),
    ("A100 80GB PCIe", Peaks(312e12, 1.935e12, "NVIDIA A100 80GB PCIe datasheet")),
    ("A100", Peaks(312e12, 1.555e12, "NVIDIA A100 40GB datasheet")),
)


def peaks_for(device_name: str, dtype: torch.dtype) -> Peaks | None:
    """Datasheet peaks for a 16-bit GEMM on this GPU, or None (other dtypes, other devices)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    return next((peaks for key, peaks in PEAKS if key in device_name), None)


@dataclass(frozen=True)
class DeviceFacts:
    """Where the figures were measured."""

    device: str
    device_name: str
    compute_capability: str | None
    cuda: str | None
    driver: str | None  # filled by the caller (the driver release is not visible from torch)
    driver_cuda: str | None  # CUDA version the driver supports, as torch sees it
    cusparselt: str | None
    torch: str
    threads: int
    sparse_hardware: bool
    sparse_hardware_note: str


def _version(number: int | None) -> str | None:
    if not number:
        return None
    return f"{number // 1000}.{number % 1000 // 10}"


def device_facts(device: torch.device, device_name: str | None = None) -> DeviceFacts:
    """Facts torch can tell about ``device`` (``device_name`` names a CPU; GPUs are asked)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        capability: str | None = f"{major}.{minor}"
        hardware = major >= 8
        note = (
            f"{name} (compute capability {capability}) has 2:4 sparse tensor cores"
            if hardware
            else f"{name} (compute capability {capability}) has no 2:4 sparse tensor cores (they need >= 8.0): "
            "only the paths that run without them are measured, and no speedup is estimated"
        )
        driver_version = vars(torch._C).get("_cuda_getDriverVersion")
        driver_cuda = _version(int(driver_version())) if callable(driver_version) else None
    else:
        name = device_name or device.type
        capability, hardware, driver_cuda = None, False, None
        note = (
            f"{device.type} has no 2:4 sparse hardware (sparse tensor cores are on NVIDIA GPUs of compute capability "
            ">= 8.0): only dense and the paths that run here are measured; no speedup is estimated"
        )
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    return DeviceFacts(
        device=str(device),
        device_name=name,
        compute_capability=capability,
        cuda=torch.version.cuda,
        driver=None,
        driver_cuda=driver_cuda,
        cusparselt=str(cusparselt) if cusparselt is not None else None,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        sparse_hardware=hardware,
        sparse_hardware_note=note,
    )


def packed_ratio(shape: tuple[int, int], pattern: SparsityPattern, element_size: int) -> float:
    """Bytes of the packed N:M weight / dense bytes (9/16 for 2:4 in 16-bit); 1.0 for unstructured ratios."""
    if not pattern.is_nm:
        return 1.0
    assert pattern.n is not None and pattern.m is not None
    return packed_nbytes(shape, pattern.n, pattern.m, element_size) / (shape[0] * shape[1] * element_size)


def linear_limit(
    tokens: int, shape: tuple[int, int], dtype: torch.dtype, pattern: SparsityPattern, peaks: Peaks | None
) -> tuple[float, str]:
    """Upper bound on the speedup of y = x Wᵀ for x [tokens, in] with W sparse, and how it was derived."""
    out, inp = shape
    size = torch.empty((), dtype=dtype).element_size()
    ratio = packed_ratio(shape, pattern, size)
    weight, activations = out * inp * size, tokens * (inp + out) * size
    memory_limit = (weight + activations) / (weight * ratio + activations)
    if peaks is None:
        return max(2.0, memory_limit), (
            "no datasheet peaks for this device and dtype: the larger of the compute-bound (2x) and memory-bound "
            f"({memory_limit:.3f}x: weight bytes x{ratio:.4f}) limits"
        )
    compute = 2.0 * tokens * out * inp / peaks.flops
    dense_time = max(compute, (weight + activations) / peaks.bandwidth)
    sparse_time = max(compute / 2, (weight * ratio + activations) / peaks.bandwidth)
    regime = "compute" if compute >= (weight + activations) / peaks.bandwidth else "memory"
    return dense_time / sparse_time, (
        f"roofline at {peaks.source} peaks ({peaks.flops / 1e12:.0f} TFLOP/s, {peaks.bandwidth / 1e12:.2f} TB/s): "
        f"{regime}-bound; sparse halves the FLOPs and moves x{ratio:.4f} of the weight bytes"
    )


# --- Results -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathInfo:
    name: str
    description: str
    hardware: bool
    available: bool
    reason: str | None


@dataclass(frozen=True)
class PathResult:
    """One sparse path at one point of a sweep. Only ``measured`` results carry a timing."""

    path: str
    status: Status
    reason: str | None = None
    timing: Timing | None = None
    speedup: float | None = None  # dense median / path median
    fraction_of_limit: float | None = None
    tokens_per_second: float | None = None  # end-to-end figures only
    kernels: tuple[str, ...] | None = None  # end to end: what the path's PackedLinear layers ran on their last call


@dataclass(frozen=True)
class LinearResult:
    shape: tuple[int, int]  # (out, in)
    layers: int  # linears of the model with this shape
    tokens: int
    dense: Timing
    dense_tflops: float
    physical_limit: float
    limit_basis: str
    paths: tuple[PathResult, ...]


@dataclass(frozen=True)
class EndToEndResult:
    kind: Literal["prefill", "decode"]
    batch: int
    prompt_tokens: int
    new_tokens: int  # decode steps timed (0 for prefill)
    status: Literal["measured", "skipped"]
    reason: str | None = None
    dense: Timing | None = None  # prefill: one forward; decode: all ``new_tokens`` steps
    dense_tokens_per_second: float | None = None
    physical_limit: float | None = None
    limit_basis: str | None = None
    paths: tuple[PathResult, ...] = ()


@dataclass(frozen=True)
class SpeedSettings:
    """What a sweep measures and how often. :meth:`for_device` gives the defaults of each device kind."""

    token_counts: tuple[int, ...] = (1, 16, 128, 512, 2048)
    warmup: int = 25
    repetitions: int = 100
    rotation_bytes: int = 0  # rotate copies of weights and inputs until they span this many bytes (min 2 copies)
    max_copies: int = 256
    end_to_end: bool = True
    prefill: tuple[tuple[int, int], ...] = ((1, 512), (8, 2048))  # (batch, tokens)
    decode_batches: tuple[int, ...] = (1, 16)
    decode_prompt: int = 128
    decode_new_tokens: int = 64
    e2e_warmup: int = 2
    e2e_repetitions: int = 10
    gate_tokens: int = 16  # tokens of the random input each swapped layer is checked on
    seed: int = 0
    e2e_paths: tuple[str, ...] | None = None  # paths timed end to end (None: all); the others are "skipped" there
    # End to end, the first path timed alternates with dense repetition by repetition (a slow spell of a shared
    # machine then falls on both sides); False: all of dense's repetitions first, then each path's.
    e2e_interleaved: bool = True

    @classmethod
    def for_device(cls, device: torch.device, *, cache_bytes: int = 0) -> SpeedSettings:
        """GPU: twice the L2 cache in rotation, 25 + 100 calls. CPU: the short sweep of a job's speed step (about a
        minute for SmolLM2 on 2 cores): each shape at 1 and 16 tokens with 20 timed calls, weights rotated over
        1.5x ``cache_bytes`` (the last-level cache, passed in by the caller; at most 32 copies), prefill 1 x 512
        and greedy decode at batch 1, end to end (5 runs each, dense and the path alternating).
        ``benchmarks/speed.py`` runs the full sweep."""
        if device.type == "cuda":
            l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
            return cls(rotation_bytes=2 * l2)
        return cls(
            token_counts=(1, 16),
            warmup=5,
            repetitions=20,
            rotation_bytes=cache_bytes * 3 // 2,
            max_copies=32,
            prefill=((1, 512),),
            decode_batches=(1,),
            decode_prompt=64,
            decode_new_tokens=32,
            e2e_warmup=1,
            e2e_repetitions=5,  # 3 until 2026-12-01; SmolLM2's whole step 20 s -> 29-31 s on a Zen 4, 2 threads
        )


@dataclass(frozen=True)
class SpeedResult:
    """A whole measurement; field for field what ``secateurs.app.schemas.SpeedReport`` serializes."""

    conditions: DeviceFacts
    dtype: str
    pattern: str
    runtime_mode: str
    settings: dict[str, Any]
    paths: tuple[PathInfo, ...]
    linear: tuple[LinearResult, ...]
    end_to_end: tuple[EndToEndResult, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


# --- The per-shape sweep -------------------------------------------------------------------------------------


def _pruned_weight(
    shape: tuple[int, int], pattern: SparsityPattern, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """A random weight [out, in] pruned by magnitude to ``pattern`` (dense with zeros)."""
    weight = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32) * 0.02
    weight = weight.masked_fill(prune_mask(weight.abs(), pattern), 0.0)  # [out, in]
    return weight.to(dtype)


def path_infos(paths: Sequence[SparsePath], device: torch.device, dtype: torch.dtype) -> tuple[PathInfo, ...]:
    infos = []
    for path in paths:
        reason = path.unavailable(device, dtype)
        infos.append(PathInfo(path.name, path.description, path.hardware, reason is None, reason))
    return tuple(infos)


def _measure_path(
    path: SparsePath,
    *,
    modules: Sequence[nn.Module],
    inputs: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor],
    device: torch.device,
    settings: SpeedSettings,
    dense: Timing,
    limit: float,
) -> PathResult:
    """Gate every copy, then time; a copy that mismatches makes the whole path ``failed``."""
    try:
        for index, (module, reference) in enumerate(zip(modules, references, strict=True)):
            problem = mismatch(module(inputs[index % len(inputs)]), reference)
            if problem is not None:
                return PathResult(path.name, "failed", f"output differs from dense-with-zeros: {problem}")
        timing = time_calls(
            lambda i: modules[i % len(modules)](inputs[i % len(inputs)]),
            device,
            warmup=settings.warmup,
            repetitions=settings.repetitions,
            rotation=len(modules),
        )
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
        return _error(path.name, exc)
    speedup = dense.median_ms / timing.median_ms
    return PathResult(path.name, "measured", timing=timing, speedup=speedup, fraction_of_limit=speedup / limit)


def _rotating_linear(
    weights: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], backend: matmul.GemmBackend | None = None
) -> Callable[[int], torch.Tensor]:
    """Call i: the dense product on weight copy i and input copy i (each modulo its count): ``F.linear``, or with
    ``backend`` (``"onednn"``, ``"aten"``) :func:`dense_linear` forced to that CPU backend."""
    if backend is None:
        return lambda i: F.linear(inputs[i % len(inputs)], weights[i % len(weights)])

    def call(i: int) -> torch.Tensor:
        with matmul.use_cpu_gemm(backend):
            return dense_linear(inputs[i % len(inputs)], weights[i % len(weights)])

    return call


def _dense_timing(
    weights: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], device: torch.device, settings: SpeedSettings
) -> Timing:
    """The dense product's timing: ``F.linear``, and on CPU in fp32 where this build has oneDNN also oneDNN's
    product; the faster median (the benchmarks' "faster of F.linear and oneDNN": neither wins everywhere, e.g. on
    an AMD Zen 5 oneDNN took 0.78-0.85x MKL's time at one token on three of SmolLM2's shapes and 1.37x on 192x576)."""
    variants: list[matmul.GemmBackend | None] = [None]
    if device.type == "cpu" and weights[0].dtype == torch.float32 and matmul._onednn_linear_op() is not None:
        variants.append("onednn")
    timings = [
        time_calls(
            _rotating_linear(weights, inputs, backend),
            device,
            warmup=settings.warmup,
            repetitions=settings.repetitions,
            rotation=len(weights),
        )
        for backend in variants
    ]
    return min(timings, key=lambda timing: timing.median_ms)


@torch.no_grad()
def sweep_linear(
    shapes: Mapping[tuple[int, int], int],
    pattern: SparsityPattern,
    dtype: torch.dtype,
    device: torch.device,
    settings: SpeedSettings,
    *,
    paths: Sequence[SparsePath] | None = None,
    device_name: str = "",
    on_point: Callable[[LinearResult], None] | None = None,
) -> list[LinearResult]:
    """Dense versus every path, for each (out, in) shape in ``shapes`` (shape -> layers of the model) and token count.

    Weights are random, pruned by magnitude to ``pattern``; no bias (as in LLaMA-style blocks).
    """
    paths = sparse_paths() if paths is None else list(paths)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    peaks = peaks_for(device_name, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    results = []
    for shape, count in shapes.items():
        out, inp = shape
        n_weights = copies_for(out * inp * size, settings.rotation_bytes, settings.max_copies)
        weights = [_pruned_weight(shape, pattern, dtype, generator) for _ in range(n_weights)]  # each [out, in]
        built: dict[str, list[nn.Module] | str] = {}
        for path in paths:
            reason = path.unavailable(device, dtype) or path.unsupported(shape, dtype, pattern)
            if reason is not None:
                built[path.name] = reason
                continue
            try:
                built[path.name] = [path.build(w, None, pattern) for w in weights]
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
                built[path.name] = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        for tokens in settings.token_counts:
            n_inputs = copies_for(tokens * inp * size, settings.rotation_bytes, settings.max_copies)
            inputs = [
                torch.randn(tokens, inp, generator=generator, device=device, dtype=torch.float32).to(dtype)
                for _ in range(n_inputs)
            ]  # each [tokens, in]
            references = [F.linear(inputs[i % n_inputs], w) for i, w in enumerate(weights)]  # each [tokens, out]
            dense = _dense_timing(weights, inputs, device, settings)
            limit, basis = linear_limit(tokens, shape, dtype, pattern, peaks)
            point = []
            for path in paths:
                entry = built[path.name]
                if isinstance(entry, str):
                    status: Status = "error" if entry.startswith("error: ") else "unavailable"
                    point.append(PathResult(path.name, status, entry.removeprefix("error: ")))
                    continue
                declined = path.declines(tokens)
                if declined is not None:
                    point.append(PathResult(path.name, "unavailable", declined))
                    continue
                point.append(
                    _measure_path(
                        path,
                        modules=entry,
                        inputs=inputs,
                        references=references,
                        device=device,
                        settings=settings,
                        dense=dense,
                        limit=limit,
                    )
                )
            result = LinearResult(
                shape=shape,
                layers=count,
                tokens=tokens,
                dense=dense,
                dense_tflops=2.0 * tokens * out * inp / (dense.median_ms * 1e-3) / 1e12,
                physical_limit=limit,
                limit_basis=basis,
                paths=tuple(point),
            )
            results.append(result)
            if on_point is not None:
                on_point(result)
    return results


# --- End to end ----------------------------------------------------------------------------------------------


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias) of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    weight, bias = module.weight, getattr(module, "bias", None)
    assert isinstance(weight, torch.Tensor)
    return (weight.T.contiguous() if isinstance(module, Conv1D) else weight), (
        bias if isinstance(bias, torch.Tensor) else None
    )


def _swap_in(
    model: nn.Module,
    names: Sequence[str],
    path: SparsePath,
    pattern: SparsityPattern,
    *,
    generator: torch.Generator,
    gate_tokens: int,
) -> tuple[dict[str, nn.Module], PathResult | None]:
    """Replace each named linear with the path's module, gating each one first.

    Returns the originals (to restore) and, if a layer cannot be swapped, the path's result saying why.
    """
    originals: dict[str, nn.Module] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        weight, bias = _linear_weight(module)
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        reason = path.unsupported(shape, weight.dtype, pattern)
        if reason is not None:
            return originals, PathResult(path.name, "unavailable", f"{name}: {reason}")
        try:
            replacement = path.build(weight, bias, pattern)
            x = torch.randn(gate_tokens, shape[1], generator=generator, device=weight.device).to(weight.dtype)
            problem = mismatch(replacement(x), F.linear(x, weight, bias))
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
            return originals, _error(path.name, exc, f"{name}: ")
        if problem is not None:
            return originals, PathResult(
                path.name, "failed", f"{name}: output differs from dense-with-zeros: {problem}"
            )
        originals[name] = module
        setattr(parent, child, replacement)
    return originals, None


def kernels_that_ran(model: nn.Module) -> tuple[str, ...] | None:
    """What the model's :class:`PackedLinear` layers ran on their latest call (kernel names or ``"reference"``),
    most layers first; None when the model has none."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, PackedLinear) and module.last_path is not None:
            counts[module.last_path] = counts.get(module.last_path, 0) + 1
    return tuple(sorted(counts, key=lambda name: -counts[name])) or None


def _restore(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    for name, module in originals.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def model_limits(model: nn.Module, names: Sequence[str], pattern: SparsityPattern) -> dict[str, tuple[float, str]]:
    """Bounds on the whole model's prefill and decode speedup when the ``names`` linears are sparse."""
    from transformers.pytorch_utils import Conv1D

    sparse = set(names)
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    pruned_params = pruned_bytes = other_params = head_params = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | Conv1D):
            continue
        weight, _ = _linear_weight(module)
        params = float(weight.numel())
        if name in sparse:
            pruned_params += params
            pruned_bytes += params * packed_ratio((weight.shape[0], weight.shape[1]), pattern, weight.element_size())
        elif module is output:
            head_params += params
        else:
            other_params += params
    prefill = (pruned_params + other_params) / (pruned_params / 2 + other_params) if pruned_params else 1.0
    decode_total = pruned_params + other_params + head_params
    decode = decode_total / (pruned_bytes + other_params + head_params) if pruned_params else 1.0
    return {
        "prefill": (
            prefill,
            "compute-bound: the sparse linears' FLOPs halved, the other matmuls' kept (lm_head on the last token only "
            "and attention scores not counted, so the true bound is lower)",
        ),
        "decode": (
            decode,
            "memory-bound: weight bytes read per step (sparse linears packed, the rest dense incl. lm_head); "
            "KV-cache and activation traffic not counted, so the true bound is lower",
        ),
    }


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    accepts = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _cache_keyword(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` in newer transformers (``past_key_values`` is deprecated
    there and warns on every call), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _decode_steps(model: nn.Module, prompt: torch.Tensor, steps: int, watch: Stopwatch, record: bool) -> None:
    """Greedy decoding of ``steps`` tokens after ``prompt`` [batch, tokens]; only the steps are timed."""
    keyword = _cache_keyword(model)
    out = model(input_ids=prompt, use_cache=True, **_forward_kwargs(model))
    cache, token = out[keyword], out.logits[:, -1:].argmax(-1)  # token: [batch, 1]
    with watch.region(record):
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{keyword: cache})
            cache, token = out[keyword], out.logits[:, -1:].argmax(-1)


def _run_plan_once(model: nn.Module, plan: _Plan, i: int, watch: Stopwatch, record: bool) -> None:
    """Repetition ``i`` of ``plan`` (its input copy ``i``) on the model as it stands, into ``watch``."""
    prompt = plan.inputs[i % len(plan.inputs)]  # [batch, length]
    if plan.kind == "decode":
        _decode_steps(model, prompt, plan.steps, watch, record)
        return
    with watch.region(record):
        model(input_ids=prompt, use_cache=False, **_forward_kwargs(model))


def _time_interleaved(
    model: nn.Module,
    plan: _Plan,
    device: torch.device,
    settings: SpeedSettings,
    sides: Mapping[str, Mapping[str, nn.Module]],
) -> dict[str, Timing]:
    """Each side's modules swapped in and one repetition timed, side after side, warm-up included: dense and a
    sparse path alternate, so that a slow spell of a shared machine (seconds long on 2-vCPU VMs) falls on both
    rather than on one side's repetitions. The last side's modules stay in place, also after an error."""
    watches = {name: Stopwatch(device) for name in sides}
    try:
        for i in range(settings.e2e_warmup + settings.e2e_repetitions):
            for name, modules in sides.items():
                _restore(model, modules)
                with fast_linears(model):  # entered per side: it routes the linears in place at entry
                    _run_plan_once(model, plan, i, watches[name], record=i >= settings.e2e_warmup)
    finally:
        _restore(model, list(sides.values())[-1])
    return {
        name: summarize(watch.samples_ms(), warmup=settings.e2e_warmup, rotation=len(plan.inputs), timer=watch.timer)
        for name, watch in watches.items()
    }


def _vocab(model: nn.Module) -> int:
    get_input = getattr(model, "get_input_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    if isinstance(embeddings, nn.Embedding):
        return int(embeddings.num_embeddings)
    config: Any = getattr(model, "config", None)
    return int(config.vocab_size)


@dataclass(frozen=True)
class _Plan:
    kind: Literal["prefill", "decode"]
    batch: int
    length: int  # prompt tokens
    steps: int  # decode steps (0 for prefill)
    inputs: tuple[torch.Tensor, ...]  # copies of [batch, length] token ids

    def per_second(self, timing: Timing) -> float:
        return self.batch * (self.steps if self.kind == "decode" else self.length) / (timing.median_ms * 1e-3)


def _time_plan(model: nn.Module, plan: _Plan, device: torch.device, settings: SpeedSettings) -> Timing:
    """``plan`` on the model as it stands: :func:`_time_interleaved` with a single side that swaps nothing."""
    return _time_interleaved(model, plan, device, settings, {"as it stands": {}})["as it stands"]


def _error(path: str, exc: BaseException, where: str = "") -> PathResult:
    text = " ".join(str(exc).split())[:500]
    return PathResult(path, "error", f"{where}{type(exc).__name__}: {text}")


@torch.no_grad()
def measure_end_to_end(
    model: nn.Module,
    names: Sequence[str],
    pattern: SparsityPattern,
    settings: SpeedSettings,
    paths: Sequence[SparsePath] | None = None,
) -> list[EndToEndResult]:
    """Prefill latency and decode tokens/s of ``model`` (already on its device, eval mode), dense versus each path.

    ``names`` are the sparse linears. Both sides run eagerly; dense and the first path timed alternate, one
    repetition each in turn (``settings.e2e_interleaved``), and later paths are timed after them against that
    dense timing. The model is left as it came (swaps are undone).
    """
    paths = sparse_paths() if paths is None else list(paths)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    vocab, positions = _vocab(model), _max_positions(model)
    limits = model_limits(model, names, pattern)
    copies = max(2, min(settings.e2e_repetitions, 4))
    shapes = [("prefill", batch, length, 0) for batch, length in settings.prefill] + [
        ("decode", batch, settings.decode_prompt, settings.decode_new_tokens) for batch in settings.decode_batches
    ]
    results: list[EndToEndResult | _Plan] = []
    for kind, batch, length, steps in shapes:
        if positions is not None and length + steps > positions:
            reason = f"needs {length + steps} positions, the model has {positions}"
            results.append(EndToEndResult(kind, batch, length, steps, "skipped", reason))  # type: ignore[arg-type]
            continue
        inputs = tuple(
            torch.randint(0, vocab, (batch, length), generator=generator, device=device) for _ in range(copies)
        )  # each [batch, length]
        results.append(_Plan(kind, batch, length, steps, inputs))  # type: ignore[arg-type]
    plans = [plan for plan in results if isinstance(plan, _Plan)]
    dense: dict[int, Timing] = {}  # per plan: alternating with the first path timed, else alone (below)
    if not settings.e2e_interleaved:
        dense = {id(plan): _time_plan(model, plan, device, settings) for plan in plans}
    sparse: dict[int, list[PathResult]] = {id(plan): [] for plan in plans}
    for path in paths:
        missing = path.unavailable(device, dtype)
        if missing is None and settings.e2e_paths is not None and path.name not in settings.e2e_paths:
            for plan in plans:
                sparse[id(plan)].append(PathResult(path.name, "skipped", "not timed end to end in this sweep"))
            continue
        if missing is not None:
            for plan in plans:
                sparse[id(plan)].append(PathResult(path.name, "unavailable", missing))
            continue
        originals, problem = _swap_in(
            model, names, path, pattern, generator=generator, gate_tokens=settings.gate_tokens
        )
        replacements = {name: model.get_submodule(name) for name in originals}  # the path's modules, in place
        try:
            for plan in plans:
                if problem is not None:
                    sparse[id(plan)].append(problem)
                    continue
                try:
                    if id(plan) in dense:
                        timing = _time_plan(model, plan, device, settings)
                    else:  # the first path timed on this plan: it and dense alternate
                        sides = {"dense": originals, "sparse": replacements}
                        timed = _time_interleaved(model, plan, device, settings, sides)
                        dense[id(plan)], timing = timed["dense"], timed["sparse"]
                except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
                    sparse[id(plan)].append(_error(path.name, exc))
                    continue
                speedup = dense[id(plan)].median_ms / timing.median_ms
                sparse[id(plan)].append(
                    PathResult(
                        path.name,
                        "measured",
                        timing=timing,
                        speedup=speedup,
                        fraction_of_limit=speedup / limits[plan.kind][0],
                        tokens_per_second=plan.per_second(timing),
                        kernels=kernels_that_ran(model),
                    )
                )
        finally:
            _restore(model, originals)
    for plan in plans:  # no path timed on it (none available, or each failed): dense alone
        if id(plan) not in dense:
            dense[id(plan)] = _time_plan(model, plan, device, settings)
    return [
        item
        if isinstance(item, EndToEndResult)
        else EndToEndResult(
            kind=item.kind,
            batch=item.batch,
            prompt_tokens=item.length,
            new_tokens=item.steps,
            status="measured",
            dense=dense[id(item)],
            dense_tokens_per_second=item.per_second(dense[id(item)]),
            physical_limit=limits[item.kind][0],
            limit_basis=limits[item.kind][1],
            paths=tuple(sparse[id(item)]),
        )
        for item in results
    ]


def _cpu_dense(dtype: torch.dtype) -> str:
    """What the CPU's dense side computes with, for the report (:func:`matmul.linear_route`)."""
    name = str(dtype).removeprefix("torch.")
    return {
        "onednn": "oneDNN, the faster of it and F.linear (MKL) measured on this CPU",
        "upcast": f"{name} as fp32 products (measured faster than the native one here)",
        "aten": "F.linear (MKL), the faster of it and oneDNN measured on this CPU"
        if dtype == torch.float32
        else f"F.linear's native {name} product",
    }[matmul.linear_route(dtype)]


def distinct_shapes(model: nn.Module, names: Sequence[str]) -> dict[tuple[int, int], int]:
    """(out, in) -> how many of the named linears have it, in first-seen order."""
    from transformers.pytorch_utils import Conv1D

    shapes: dict[tuple[int, int], int] = {}
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        rows, cols = (int(d) for d in weight.shape)
        shape = (cols, rows) if isinstance(module, Conv1D) else (rows, cols)  # (out, in)
        shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    names: Sequence[str],
    pattern: SparsityPattern,
    settings: SpeedSettings,
    *,
    paths: Sequence[SparsePath] | None = None,
    device_name: str = "",
    on_point: Callable[[LinearResult], None] | None = None,
) -> SpeedResult:
    """The whole measurement for a pruned ``model`` (on its device): every distinct shape of the ``names``
    linears, then end to end. ``device_name`` names a CPU (GPUs are asked)."""
    paths = sparse_paths() if paths is None else list(paths)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    facts = device_facts(device, device_name)
    linear = sweep_linear(
        distinct_shapes(model, names),
        pattern,
        dtype,
        device,
        settings,
        paths=paths,
        device_name=facts.device_name,
        on_point=on_point,
    )
    end_to_end = measure_end_to_end(model, names, pattern, settings, paths) if settings.end_to_end else []
    notes = [facts.sparse_hardware_note]
    ran = {r.path for point in linear for r in point.paths if r.status == "measured"}
    if not any(path.hardware and path.name in ran for path in paths):
        notes.append(
            "no 2:4 hardware path ran here, so no figure below is a 2:4 hardware speedup; packed_reference "
            "decompresses to dense before every product and measures the cost of the format"
        )
    notes.append("end to end: dense and sparse both run eagerly; prefill without KV cache, decode greedy with it")
    if device.type == "cpu":
        notes.append(
            "dense products: per layer the faster of F.linear and oneDNN at each point (fp32; F.linear otherwise), "
            f"end to end every linear that stays dense on {_cpu_dense(dtype)}"
        )
    return SpeedResult(
        conditions=facts,
        dtype=str(dtype).removeprefix("torch."),
        pattern=str(pattern),
        runtime_mode="eager",
        settings=asdict(settings),
        paths=path_infos(paths, device, dtype),
        linear=tuple(linear),
        end_to_end=tuple(end_to_end),
        notes=tuple(notes),
    )
