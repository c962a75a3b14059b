"""fp32 matrix products on CPU through oneDNN instead of MKL, for the two big products of one-shot pruning.

PyTorch's x86 CPU build sends fp32 ``F.linear`` / ``mm`` to MKL's sgemm, which on AMD CPUs takes its AVX2
code path; oneDNN (also inside every x86 PyTorch build) chooses its kernels by instruction set, so it runs
AVX-512 there. Measured on the 2-core AMD EPYC (Zen 5) VM, fp32, 2 threads: [32768 × 1536] @ [1536 × 576]
174 GFLOP/s with MKL, 355 with oneDNN; 4096³ 179 vs 365 (``docs/engine.md``, "CPU matrix products"). Both
are exact fp32 products that differ only in summation order, so results agree to rounding (tested).

* :func:`linear` – ``F.linear`` for CPU fp32 tensors outside autograd and autocast, else ``F.linear`` itself.
* :func:`fast_linears` – inside it, every ``nn.Linear`` and GPT-2 ``Conv1D`` of a module computes through
  :func:`linear` (a per-instance ``forward``, removed on exit; forward hooks still run).
* :func:`mm` – ``a @ b`` for 2-D operands, the same way (the triangular inverse of the factorization).
* :func:`gram_upper_` – accumulate the upper triangle of ``α XᵀX`` (the Hessian products, SparseGPT §3);
  :func:`cross_` – ``α AᵀB`` (the dense-target cross products).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


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


def _onednn_applies(*tensors: torch.Tensor) -> bool:
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and _onednn_linear_op() is not None
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in] → [..., out]; through oneDNN where it
    applies (CPU, fp32, no autograd, no autocast), through ``F.linear`` everywhere else."""
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


def gram_upper_(out: torch.Tensor, x: torch.Tensor, *, alpha: float, panel: int = 384, chunk: int = 4096) -> None:
    """``out += alpha · xᵀx`` on and above the diagonal (below it, ``out`` holds partial sums: read ``triu``).

    out: [in, in] fp32; x: [tokens, in]. The symmetric product is cut into row panels of about ``panel``
    features, each computed from the diagonal onwards (about half the work of the full product once the
    width is a few panels). On CPU with oneDNN the tokens go in chunks of ``chunk``, each transposed once so
    that both operands are contiguous ([in, chunk]; oneDNN is slow on transposed views); elsewhere one
    ``addmm_`` per panel.
    """
    width = x.shape[1]
    panels = max(1, round(width / panel))
    size = -(-width // panels)
    bounds = [(lo, min(lo + size, width)) for lo in range(0, width, size)]
    if not _onednn_applies(out, x):
        for lo, hi in bounds:  # [hi-lo, width-lo] += x[:, lo:hi]ᵀ x[:, lo:]
            out[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:], alpha=alpha)
        return
    for start in range(0, x.shape[0], chunk):
        xt = x[start : start + chunk].T.contiguous()  # [in, chunk]
        for lo, hi in bounds:  # linear(a, b) = a bᵀ: [hi-lo, chunk] @ [chunk, width-lo]
            out[lo:hi, lo:].add_(linear(xt[lo:hi], xt[lo:]), alpha=alpha)


def cross_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float, chunk: int = 4096) -> None:
    """``out += alpha · aᵀb``: out [p, q]; a [tokens, p], b [tokens, q] (oneDNN in token chunks where it
    applies, as :func:`gram_upper_`; else one ``addmm_``)."""
    if not _onednn_applies(out, a, b):
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


@contextmanager
def fast_linears(module: nn.Module) -> Iterator[None]:
    """Route every ``nn.Linear`` / ``Conv1D`` inside ``module`` through :func:`linear` for the duration.

    Each layer gets an instance ``forward`` that shadows its class's (hooks still run around it); on exit
    the attribute is removed. Layers on other devices or dtypes fall through to ``F.linear`` call by call.
    Does nothing when this PyTorch build has no oneDNN linear.
    """
    with ExitStack() as stack:
        if _onednn_linear_op() is not None:
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
