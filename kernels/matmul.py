"""fp32 matrix products on CPU through whichever of oneDNN and MKL is faster on this CPU, for the two big
products of one-shot pruning (the calibration forward and the Hessians, SparseGPT §3).

PyTorch's x86 CPU build sends fp32 ``F.linear`` / ``mm`` to MKL's sgemm, which on AMD CPUs takes its AVX2
code path; oneDNN (also inside every x86 PyTorch build) chooses its kernels by instruction set, so it runs
AVX-512 there. Measured on the 2-core AMD EPYC (Zen 5) VM, fp32, 2 threads: [32768 × 1536] @ [1536 × 576]
174 GFLOP/s with MKL, 355 with oneDNN; 4096³ 179 vs 365. On an AVX2-only EPYC (Zen 3) the order reverses:
MKL 70 GFLOP/s against oneDNN's 44 on [16384 × 1536] @ [1536 × 576] at one thread, and MKL's in-place
``addmm_`` on the Hessian panels 1.3–1.7× faster than oneDNN's chunks (``docs/engine.md``, "CPU matrix
products"). So the choice is measured once per process, at first use (:func:`cpu_gemm_backend`), never
guessed from the CPU's name. Both are exact fp32 products that differ only in summation order, so results
agree to rounding (tested).

* :func:`cpu_gemm_backend` – ``"onednn"`` or ``"aten"`` (``F.linear``: MKL on x86 builds), measured at first
  use; :func:`use_cpu_gemm` forces one for a ``with`` block (tests, benchmarks).
* :func:`linear` – ``F.linear`` through oneDNN for CPU fp32 tensors outside autograd and autocast when oneDNN
  is the faster, else ``F.linear`` itself.
* :func:`fast_linears` – inside it, every ``nn.Linear`` and GPT-2 ``Conv1D`` of a module computes through
  :func:`linear` (a per-instance ``forward``, removed on exit; forward hooks still run).
* :func:`mm` – ``a @ b`` for 2-D operands, the same way (the triangular inverse of the factorization).
* 16-bit (bf16, fp16) linears on CPU: where this CPU has no 16-bit matrix arithmetic, PyTorch's bf16 product
  converts inside its kernel and runs several times slower than fp32 (measured on the AVX2 EPYC, 2 threads:
  [2048 × 4096] · [4096 × 11008] bf16 19.5 GFLOP/s, fp32 82). So :func:`linear` computes them as fp32 products
  of fp32 copies, a slice of tokens at a time, rounded back to the input's dtype — the same products and fp32
  accumulation, a different summation order — wherever that measured faster at first use
  (:func:`upcast_pays`; on CPUs with AVX512-BF16 or AMX the native product wins and is kept), and only from
  :func:`upcast_min_tokens` tokens: the weight's copy is made on every call, which a decode step's few tokens do not
  repay.
* :func:`gram_upper_` – accumulate the upper triangle of ``α XᵀX`` (the Hessian products, SparseGPT §3);
  :func:`cross_` – ``α AᵀB`` (the dense-target cross products).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import cache
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)


@cache
def _onednn_linear_op() -> Callable[..., torch.Tensor] | None:
    """oneDNN's fp32 linear (``mkldnn::_linear_pointwise``, what Inductor calls on CPU), if this build has it."""
    if not torch.backends.mkldnn.is_available():
        return None
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return None
    try:  # the op's signature is private: check it once on a tiny input rather than trust it
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        if not torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)):
            return None
    except (RuntimeError, TypeError):
        return None
    return op


GemmBackend = Literal["onednn", "aten"]
ProductKind = Literal["linear", "gram"]
_forced: list[GemmBackend] = []  # the innermost use_cpu_gemm() wins


_Key = TypeVar("_Key", bound=str)


def _best_seconds(runs: dict[_Key, Callable[[], object]], repeats: int = 3) -> dict[_Key, float]:
    """Best-of-``repeats`` wall time of each run, interleaved (so a burst of load hits both alike)."""
    best = dict.fromkeys(runs, float("inf"))
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up (oneDNN creates its primitives)
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - started)
    return best


@cache
def _measured_backend(kind: ProductKind) -> GemmBackend:
    """The faster library for ``kind`` on this machine at the current thread count, timed once on products
    shaped like a small model's calibration (≈ 0.3 s): ``"linear"`` on x [2048, 576] · Wᵀ [576, 1536] and
    x [2048, 1536] · Wᵀ [1536, 576] (an MLP's up and down projections: the two libraries differ most on the
    second); ``"gram"`` on the upper triangle of XᵀX for X [4096, 768], as :func:`gram_upper_` computes it
    each way. oneDNN only where it is clearly (10 %) faster."""
    op = _onednn_linear_op()
    if op is None:
        return "aten"
    generator = torch.Generator().manual_seed(0)
    if kind == "linear":
        pairs = [
            (torch.randn(2048, i, generator=generator), torch.randn(o, i, generator=generator))
            for i, o in ((576, 1536), (1536, 576))
        ]
        flops = sum(2 * x.shape[0] * w.shape[0] * w.shape[1] for x, w in pairs)
        runs: dict[GemmBackend, Callable[[], object]] = {
            "aten": lambda: [F.linear(x, w) for x, w in pairs],
            "onednn": lambda: [op(x, w, None, "none", [], "") for x, w in pairs],
        }
    else:
        x = torch.randn(4096, 768, generator=generator)
        out = torch.zeros(768, 768)
        flops = 2 * 4096 * 768 * 768  # counted as the full product, for comparison with "linear"
        runs = {
            "aten": lambda: _gram_aten_(out, x, 1.0, 192),
            "onednn": lambda: _gram_onednn_(out, x, 1.0, 384, 4096),
        }
    seconds = _best_seconds(runs)
    choice: GemmBackend = "onednn" if seconds["onednn"] < 0.9 * seconds["aten"] else "aten"
    log.info(
        "CPU fp32 %s products: %s (measured: oneDNN %.0f GFLOP/s, F.linear %.0f GFLOP/s, %d threads)",
        kind,
        "oneDNN" if choice == "onednn" else "F.linear",
        flops / seconds["onednn"] / 1e9,
        flops / seconds["aten"] / 1e9,
        torch.get_num_threads(),
    )
    return choice


def cpu_gemm_backend(kind: ProductKind = "linear") -> GemmBackend:
    """Which library computes this module's CPU fp32 products of ``kind``: ``"onednn"`` or ``"aten"``
    (``F.linear`` / ``addmm_``: MKL on x86 builds). ``"linear"``: :func:`linear`, :func:`mm`,
    :func:`fast_linears`; ``"gram"``: :func:`gram_upper_`, :func:`cross_` (tokens as the inner dimension).

    Measured once per process and kind at first call, unless :func:`use_cpu_gemm` forces one."""
    return _forced[-1] if _forced else _measured_backend(kind)


@contextmanager
def use_cpu_gemm(backend: GemmBackend) -> Iterator[None]:
    """Force ``backend`` for every product of this module inside the block (tests, benchmarks; ``"onednn"``
    still needs a build with oneDNN)."""
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def _onednn_applies(*tensors: torch.Tensor, kind: ProductKind = "linear") -> bool:
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and _onednn_linear_op() is not None
        and cpu_gemm_backend(kind) == "onednn"
    )


HALF_DTYPES = (torch.bfloat16, torch.float16)
_forced_upcast: list[bool] = []  # the innermost use_upcast() wins


@cache
def _measured_upcast(dtype: torch.dtype) -> bool:
    """Whether fp32 products of fp32 copies beat this CPU's own ``dtype`` product, timed once at the current
    thread count on a calibration-shaped product (x [1024, 1024] · Wᵀ [1024, 2048], ≈ 4 GFLOP, a fraction of a
    second where the native product is slow); only where clearly (10 %) faster."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1024, generator=generator).to(dtype)
    w = torch.randn(2048, 1024, generator=generator).to(dtype)
    runs: dict[str, Callable[[], object]] = {
        "native": lambda: F.linear(x, w),
        "upcast": lambda: _upcast_linear(x, w, None),
    }
    seconds = _best_seconds(runs)
    choice = seconds["upcast"] < 0.9 * seconds["native"]
    flops = 2 * 1024 * 1024 * 2048
    log.info(
        "CPU %s linears: %s (measured: native %.0f GFLOP/s, fp32 copies %.0f GFLOP/s, %d threads)",
        dtype,
        "fp32 copies" if choice else "native",
        flops / seconds["native"] / 1e9,
        flops / seconds["upcast"] / 1e9,
        torch.get_num_threads(),
    )
    return choice


def upcast_pays(dtype: torch.dtype) -> bool:
    """Whether CPU linears in ``dtype`` (bf16, fp16) compute as fp32 products here (see the module docstring):
    measured once per process and dtype at first call, unless :func:`use_upcast` forces it."""
    if dtype not in HALF_DTYPES:
        return False
    return _forced_upcast[-1] if _forced_upcast else _measured_upcast(dtype)


@contextmanager
def use_upcast(upcast: bool) -> Iterator[None]:
    """Force (or forbid) the fp32 computation of 16-bit CPU linears inside the block (tests, benchmarks)."""
    _forced_upcast.append(upcast)
    try:
        yield
    finally:
        _forced_upcast.pop()


# The fp32 copy of the weight is made on every call, so it pays only from a number of tokens: measured (AVX2 EPYC
# Zen 3, 1 thread, bf16, native F.linear against fp32 copies, ms): 576x576 at 1 / 2 / 4 tokens 0.07 / 0.14 / 0.27
# against 0.14 / 0.15 / 0.19; 1536x576 at 4 tokens 0.76 against 0.41; 4096x4096 at 16 / 32 tokens 51 / 100 against
# 71 / 86; a 49152x576 output head at 16 / 32 tokens 97 / 204 against 108 / 132. The native product costs the same
# per token at any count (a GEMV each), the copy once per call: cheap while it fits the cache, a page-faulted
# stream beyond. So from 4 tokens for weights whose fp32 copy fits 4 MiB, from 32 above.
_UPCAST_MIN_TOKENS = 4
_UPCAST_MIN_TOKENS_LARGE = 32
_UPCAST_CACHED_BYTES = 4 << 20


def upcast_min_tokens(weight: torch.Tensor) -> int:
    """The fewest tokens from which a 16-bit ``weight`` [out, in] computes as fp32 products (where they pay)."""
    return _UPCAST_MIN_TOKENS if 4 * weight.numel() <= _UPCAST_CACHED_BYTES else _UPCAST_MIN_TOKENS_LARGE


def _upcast_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        x.dtype in HALF_DTYPES
        and x.numel() >= upcast_min_tokens(weight) * x.shape[-1]
        and all(t.device.type == "cpu" and t.dtype == x.dtype for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and upcast_pays(x.dtype)
    )


def _upcast_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_bytes: int = 64 << 20
) -> torch.Tensor:
    """``F.linear`` of 16-bit operands as fp32 products: x [..., in], weight [out, in] → [..., out] in x's dtype.
    The weight is converted once per call; the tokens ``chunk_bytes`` of fp32 at a time (input or output slice,
    whichever is wider), so the fp32 copies stay bounded on long calibration inputs."""
    w32 = weight.float()  # [out, in]
    b32 = bias.float() if bias is not None else None
    flat = x.reshape(-1, x.shape[-1])  # [tokens, in]
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=x.dtype)  # [tokens, out]
    step = max(1, chunk_bytes // (4 * max(weight.shape)))
    for start in range(0, flat.shape[0], step):
        out[start : start + step] = linear(flat[start : start + step].float(), w32, b32)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in] → [..., out]; through oneDNN where it
    applies (CPU, fp32, no autograd, no autocast), as fp32 products for 16-bit operands where that pays
    (:func:`upcast_pays`), through ``F.linear`` everywhere else."""
    if x.ndim >= 2 and x.dtype in HALF_DTYPES and _upcast_applies(x, weight, bias):
        return _upcast_linear(x, weight, bias)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if x.ndim < 2 or not _onednn_applies(*tensors):
        return F.linear(x, weight, bias)
    op = _onednn_linear_op()
    assert op is not None
    # contiguous operands: oneDNN on strided views is far slower than the copy (seen: 30 s instead of 0.1 s)
    return op(x.contiguous(), weight.contiguous(), bias, "none", [], "")


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D a [p, k], b [k, q] → [p, q]; through oneDNN where it applies (:func:`linear`)."""
    if not _onednn_applies(a, b):
        return a @ b
    return linear(a, b.T)  # linear(a, w) = a wᵀ; linear makes w = bᵀ contiguous for oneDNN


def gram_upper_(
    out: torch.Tensor, x: torch.Tensor, *, alpha: float, panel: int | None = None, chunk: int = 4096
) -> None:
    """``out += alpha · xᵀx`` on and above the diagonal (below it, ``out`` holds partial sums: read ``triu``).

    out: [in, in] fp32; x: [tokens, in]. The symmetric product is cut into row panels of about ``panel``
    features, each computed from the diagonal onwards (about half the work of the full product once the
    width is a few panels). On CPU with oneDNN the tokens go in chunks of ``chunk``, each transposed once so
    that both operands are contiguous ([in, chunk]; oneDNN is slow on transposed views); elsewhere one
    in-place ``addmm_`` per panel. The default panel suits each (measured): 384 features for oneDNN's chunks,
    192 for ``addmm_``, whose thinner panels skip more of the lower triangle at the same speed per flop.
    """
    onednn = _onednn_applies(out, x, kind="gram")
    if onednn:
        _gram_onednn_(out, x, alpha, panel or 384, chunk)
    else:
        _gram_aten_(out, x, alpha, panel or 192)


def _panels(width: int, panel: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of about ``panel`` features covering ``width``."""
    count = max(1, round(width / panel))
    size = -(-width // count)
    return [(lo, min(lo + size, width)) for lo in range(0, width, size)]


def _gram_aten_(out: torch.Tensor, x: torch.Tensor, alpha: float, panel: int) -> None:
    for lo, hi in _panels(x.shape[1], panel):  # [hi-lo, width-lo] += x[:, lo:hi]ᵀ x[:, lo:]
        out[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:], alpha=alpha)


def _gram_onednn_(out: torch.Tensor, x: torch.Tensor, alpha: float, panel: int, chunk: int) -> None:
    op = _onednn_linear_op()
    assert op is not None
    bounds = _panels(x.shape[1], panel)
    for start in range(0, x.shape[0], chunk):
        xt = x[start : start + chunk].T.contiguous()  # [in, chunk]
        for lo, hi in bounds:  # a bᵀ: [hi-lo, chunk] @ [chunk, width-lo]; both contiguous views of xt
            out[lo:hi, lo:].add_(op(xt[lo:hi], xt[lo:], None, "none", [], ""), alpha=alpha)


def cross_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float, chunk: int = 4096) -> None:
    """``out += alpha · aᵀb``: out [p, q]; a [tokens, p], b [tokens, q] (oneDNN in token chunks where it
    applies, as :func:`gram_upper_`; else one ``addmm_``)."""
    if not _onednn_applies(out, a, b, kind="gram"):
        out.addmm_(a.T, b, alpha=alpha)
        return
    for start in range(0, a.shape[0], chunk):
        at = a[start : start + chunk].T.contiguous()  # [p, chunk]
        bt = b[start : start + chunk].T.contiguous()  # [q, chunk]
        out.add_(linear(at, bt), alpha=alpha)  # [p, q]


def _linear_forward(module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(x, module.weight, module.bias)

    return forward


def _conv1d_forward(module: Conv1D) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:  # Conv1D stores its weight as [in, out]
        return linear(x, module.weight.T, module.bias)

    return forward


def linear_route(dtype: torch.dtype) -> Literal["onednn", "upcast", "aten"]:
    """The route :func:`linear` takes for CPU operands of ``dtype`` (outside autograd and autocast): ``"onednn"``
    (fp32, where oneDNN is the faster here), ``"upcast"`` (16-bit as fp32 products, where that pays), else
    ``"aten"`` (``F.linear`` itself)."""
    if dtype == torch.float32 and _onednn_linear_op() is not None and cpu_gemm_backend() == "onednn":
        return "onednn"
    if dtype in HALF_DTYPES and upcast_pays(dtype):
        return "upcast"
    return "aten"


@contextmanager
def fast_linears(module: nn.Module) -> Iterator[None]:
    """Route every ``nn.Linear`` / ``Conv1D`` inside ``module`` through :func:`linear` for the duration.

    Each layer gets an instance ``forward`` that shadows its class's (hooks still run around it); on exit
    the attribute is removed. Layers on other devices or dtypes fall through to ``F.linear`` call by call.
    Does nothing when neither of :func:`linear`'s own routes applies to the module's CPU weights: oneDNN for
    fp32 (this PyTorch build has it, and it is the faster here: :func:`cpu_gemm_backend`), fp32 products for
    16-bit weights (:func:`upcast_pays`).
    """
    with ExitStack() as stack:
        dtypes = {p.dtype for p in module.parameters() if p.device.type == "cpu"}
        if any(linear_route(dtype) != "aten" for dtype in dtypes):
            for layer in module.modules():
                if "forward" in layer.__dict__:
                    continue  # already overridden (a nested fast_linears, or a capture stub)
                if isinstance(layer, nn.Linear):
                    layer.forward = _linear_forward(layer)  # type: ignore[method-assign,assignment]
                elif isinstance(layer, Conv1D):
                    layer.forward = _conv1d_forward(layer)  # type: ignore[method-assign]
                else:
                    continue
                stack.callback(delattr, layer, "forward")
        yield
