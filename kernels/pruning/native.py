"""Pruning math in C++ (``csrc/``), built from source on first use and cached like the packed 2:4 CPU kernel
(:mod:`secateurs.kernels.cpp_build`; never downloaded). Each function has a PyTorch reference beside its caller,
which runs instead where the extension cannot be built (no compiler: one log line) and which the tests compare it
with.

* ``nm_sweep_block_`` (``csrc/nm_sweep.cpp``): SparseGPT's N:M sweep within one block of columns (Frantar &
  Alistarh 2023, §3.3-3.4), rows split over torch's intra-op threads; the reference is
  :func:`secateurs.kernels.pruning.sparsegpt._nm_block_reference_`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from secateurs.kernels.cpp_build import BuildError, Recipe, build

log = logging.getLogger(__name__)

RECIPE = Recipe(prefix="secateurs_prune", csrc=Path(__file__).resolve().parent / "csrc", dispatch="nm_sweep.cpp")


@dataclass
class _State:
    build_root: Path | None = None
    enabled: bool = True
    module: ModuleType | None = None
    failure: str | None = None  # why the extension is unavailable
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATE = _State()


def configure(*, build_dir: Path | None = None, enabled: bool = True) -> None:
    """Where the extension is built and cached (None: torch's extension folder), and whether it is used at all
    (False: the PyTorch references run). A build that failed is tried again only in another folder."""
    with _STATE.lock:
        if build_dir != _STATE.build_root and _STATE.module is None:
            _STATE.failure = None
        _STATE.build_root = build_dir
        _STATE.enabled = enabled


def extension() -> ModuleType | None:
    """The built extension (built or loaded once per process), or None where it is turned off or cannot be built."""
    if not _STATE.enabled:
        return None
    if _STATE.module is not None or _STATE.failure is not None:
        return _STATE.module
    with _STATE.lock:
        if _STATE.module is None and _STATE.failure is None:
            root = _STATE.build_root
            if root is None:
                from torch.utils.cpp_extension import get_default_build_root

                root = Path(get_default_build_root())
            try:
                built = build(RECIPE, root)
            except BuildError as exc:
                where = f" (compiler output: {exc.log_path})" if exc.log_path else ""
                _STATE.failure = f"{exc}{where}"
                log.warning("pruning's C++ sweep unavailable: %s; the PyTorch reference runs", _STATE.failure)
                return None
            _STATE.module = built.module
            log.info(
                "pruning's C++ sweep %s in %.1f s (%s)", "loaded from cache" if built.cached else "built",
                built.seconds, built.folder,
            )  # fmt: skip
    return _STATE.module


def describe() -> str | None:
    """Which implementation the sweep ran in this process, for reports and logs; None before any sweep asked for the
    extension (nothing is built here)."""
    if not _STATE.enabled:
        return "PyTorch reference (the C++ sweep is turned off)"
    if _STATE.module is not None:
        return "C++ (csrc/nm_sweep.cpp, built on this machine)"
    if _STATE.failure is not None:
        return f"PyTorch reference (the C++ sweep could not be built: {_STATE.failure})"
    return None
