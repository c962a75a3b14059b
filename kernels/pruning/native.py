"""Pruning math in C++ (``csrc/``), built from source on first use and cached (:mod:`secateurs.kernels.cpp_build`;
never downloaded): a plain C ABI library called through :mod:`ctypes`, whose arguments are checked here. Each
function has a PyTorch reference beside its caller, which runs instead where the library cannot be built (no
compiler: one log line) and which the tests compare it with.

* :func:`nm_sweep_block_` (``csrc/nm_sweep.cpp``): SparseGPT's N:M sweep within one block of columns (Frantar &
  Alistarh 2023, §3.3-3.4), rows split over as many threads as ``torch.get_num_threads()``; the reference is
  :func:`secateurs.kernels.pruning.sparsegpt._nm_block_reference_`.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from secateurs.kernels.cpp_build import BuildError, Recipe, build

log = logging.getLogger(__name__)

RECIPE = Recipe(
    prefix="secateurs_prune",
    csrc=Path(__file__).resolve().parent / "csrc",
    dispatch="nm_sweep.cpp",
    python_module=False,
)


@dataclass
class _State:
    build_root: Path | None = None
    enabled: bool = True
    module: Any = None  # the ctypes.CDLL
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


def extension() -> Any:
    """The built library (a ctypes.CDLL, built or loaded once per process), or None where it is turned off or
    cannot be built."""
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
            library = built.module
            library.sec_nm_sweep_block.restype = ctypes.c_int
            library.sec_nm_sweep_block.argtypes = (
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                ctypes.c_int,
            )  # fmt: skip
            _STATE.module = library
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


def available() -> bool:
    """Whether the C++ functions can run (building the library now if needed)."""
    return extension() is not None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _fp32_contiguous(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()


def nm_sweep_block_(  # noqa: PLR0917 (the reference's signature, so callers and tests call both alike)
    block: torch.Tensor,
    hinv: torch.Tensor,
    tables: torch.Tensor,
    hdiag2: torch.Tensor,
    lut: torch.Tensor,
    n: int,
    m: int,
) -> torch.Tensor:
    """SparseGPT's N:M sweep of one block of columns, in place, by ``csrc/nm_sweep.cpp``; returns the errors E
    [rows, count] for the lazy update. Arguments as :func:`secateurs.kernels.pruning.sparsegpt._nm_block_reference_`
    takes them: block [rows, count] an fp32 CPU column slice with unit column stride, hinv [count, count], tables
    [count / m, m, patterns·m], hdiag2 [count] fp32 contiguous, lut [2^m] int64. Raises ValueError on anything else
    (and RuntimeError where the library is unavailable: check :func:`available` first)."""
    library = extension()
    if library is None:
        raise RuntimeError(describe() or "the C++ sweep is unavailable")
    _check(
        block.dim() == 2 and block.dtype == torch.float32 and block.device.type == "cpu" and block.stride(1) == 1,
        "block must be a 2-D fp32 CPU column slice with unit column stride",
    )
    rows, count = block.shape
    _check(1 <= m <= 16 and 0 <= n <= m, f"need 0 <= N <= M <= 16, got {n}:{m}")
    _check(count % m == 0, f"the block's width {count} is not a multiple of M={m}")
    _check(hinv.shape == (count, count) and _fp32_contiguous(hinv), "hinv must be a contiguous fp32 [count, count]")
    patterns = tables.shape[2] // m if tables.dim() == 3 else 0
    _check(
        tables.shape == (count // m, m, patterns * m) and patterns > 0 and _fp32_contiguous(tables),
        "tables must be a contiguous fp32 [count / M, M, patterns * M]",
    )
    _check(hdiag2.shape == (count,) and _fp32_contiguous(hdiag2), "hdiag2 must be a contiguous fp32 [count]")
    _check(
        lut.shape == (1 << m,) and lut.dtype == torch.int64 and lut.device.type == "cpu" and lut.is_contiguous(),
        "lut must be a contiguous int64 [2^M]",
    )
    errors = torch.empty(rows, count, dtype=torch.float32)
    status = library.sec_nm_sweep_block(
        block.data_ptr(), rows, count, block.stride(0) if rows > 1 else count, errors.data_ptr(), hinv.data_ptr(),
        tables.data_ptr(), patterns, hdiag2.data_ptr(), lut.data_ptr(), n, m, torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise ValueError(f"the C++ sweep refused its arguments (status {status})")
    return errors
