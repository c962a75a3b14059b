"""The packed 2:4 CPU kernel (C++ SIMD, built on first use) and its hand-over to dense tiles; importing this
package registers both with :class:`~secateurs.kernels.sparse.packing.PackedLinear` and the speed sweep.
See :mod:`secateurs.kernels.sparse.cpu.kernel`."""

from secateurs.kernels.sparse.cpu.kernel import (
    ISA_CHOICES,
    KERNEL_NAME,
    TILES_NAME,
    CpuKernelError,
    Crossover,
    IsaChoice,
    configure,
    dense_tiles_product,
    describe,
    describe_tiles,
    ensure,
    isa_in_use,
    kernel_in_use,
    measure_crossover,
    measured_crossovers,
    packed_product,
)
from secateurs.kernels.sparse.cpu.path import CpuPackedPath

__all__ = [
    "ISA_CHOICES",
    "KERNEL_NAME",
    "TILES_NAME",
    "CpuKernelError",
    "CpuPackedPath",
    "Crossover",
    "IsaChoice",
    "configure",
    "dense_tiles_product",
    "describe",
    "describe_tiles",
    "ensure",
    "isa_in_use",
    "kernel_in_use",
    "measure_crossover",
    "measured_crossovers",
    "packed_product",
]
