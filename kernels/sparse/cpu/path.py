"""The packed 2:4 CPU kernel as a path of the speed sweep (:mod:`secateurs.kernels.measure.speed`).

The sweep checks every path against dense-with-zeros before timing it; this one builds a
:class:`~secateurs.kernels.sparse.packing.PackedLinear`, which on the CPU runs the registered ``cpu_packed`` kernel
up to each shape's measured crossover and ``cpu_dense_tiles`` above it, exactly as a loaded model would.
"""

from __future__ import annotations

import torch
from torch import nn

from secateurs.kernels.measure.speed import SparsePath, register_sparse_path
from secateurs.kernels.patterns import SparsityPattern
from secateurs.kernels.sparse.cpu import kernel
from secateurs.kernels.sparse.packing import PackedLinear


class CpuPackedPath(SparsePath):
    """secateurs' own packed 2:4 CPU kernel (C++ SIMD), with its measured hand-over to dense tiles."""

    name = kernel.KERNEL_NAME

    @property
    def description(self) -> str:  # type: ignore[override]
        """What runs, with the instruction set and crossovers as they stand when the report is written."""
        described = kernel.describe()
        what = (
            "secateurs packed 2:4 CPU kernel (C++: reads the kept values and their 2-bit positions, never a dense "
            "copy); above each shape's measured crossover, dense tiles (decompressed a cache-sized tile at a time, "
            "then the faster dense product)"
        )
        return f"{what}. {described.detail}" if described.available else what

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"runs on the CPU, not {device.type}"
        if dtype not in kernel.DTYPES:
            return f"takes float32 and bfloat16 weights, not {str(dtype).removeprefix('torch.')}"
        try:
            if not kernel.ensure():
                return kernel.describe().detail
        except kernel.CpuKernelError as exc:
            return str(exc)
        return None

    def unsupported(self, shape: tuple[int, int], dtype: torch.dtype, pattern: SparsityPattern) -> str | None:
        if not pattern.is_nm or (pattern.n, pattern.m) != (2, 4):
            return f"the CPU kernel computes 2:4 weights, not {pattern}"
        return None

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsityPattern) -> nn.Module:
        return PackedLinear.from_dense(weight, bias, 2, 4)


register_sparse_path(CpuPackedPath())
