"""The C++ extensions (the packed 2:4 CPU kernel, pruning's sweep), configured from
:class:`~secateurs.app.settings.Settings`.

``secateurs.kernels`` reads no settings: the worker side tells it where to build and cache the C++ extensions
(``SECATEURS_KERNEL_DIR``, default ``<cache_dir>/kernels``) and which instruction set the packed kernel runs
(``SECATEURS_CPU_ISA``). Importing this module registers the kernel with ``PackedLinear`` and the speed sweep.
"""

from __future__ import annotations

from secateurs.app.errors import DeviceError
from secateurs.app.settings import Settings, get_settings
from secateurs.kernels.pruning import native
from secateurs.kernels.sparse import cpu


def configure_cpu_kernel(settings: Settings | None = None) -> None:
    """Pass the build folder and instruction set down. A forced instruction set is checked now (building the
    extension if needed), so a CPU that lacks it fails here with :class:`DeviceError`, not inside a forward."""
    settings = settings or get_settings()
    native.configure(build_dir=settings.kernel_build_dir)
    cpu.configure(build_dir=settings.kernel_build_dir, isa=settings.cpu_isa)
    if settings.cpu_isa != "auto":
        try:
            cpu.ensure()
        except cpu.CpuKernelError as exc:
            raise DeviceError(
                str(exc), hint="set SECATEURS_CPU_ISA=auto, or to an instruction set this CPU has"
            ) from None
