"""Building secateurs' C++ extensions from source on first use, and caching the builds.

Each extension is a :class:`Recipe`: the packed 2:4 CPU kernel (:mod:`secateurs.kernels.sparse.cpu.build`) and the
pruning math (:mod:`secateurs.kernels.pruning.native`). Its sources are compiled with the machine's C++ compiler,
never downloaded: each instruction-set unit to an object, with its own flags (GUIDE §6: never ``-march=native`` for a
cached build, the machine kind changes between sessions), by the compiler torch uses
(``torch.utils.cpp_extension.get_cxx_compiler``); then the Python-facing source (a dispatcher that picks among the
units at run time from the CPU's flags) is built and linked with them by ``torch.utils.cpp_extension.load``
(ninja). A unit the compiler cannot build (an old compiler without ``-mavx512bf16``, a non-x86 machine) is left out
and logged; the ``scalar`` unit and the Python-facing source are required.

The cache: ``<build_root>/<recipe prefix>_<key>/`` where the key hashes the sources, each unit's flags, the
instruction sets compiled, the torch version, the compiler's ``--version`` line, Python's ABI and the machine.
A build runs in a temporary folder under a file lock and is renamed into place when complete, so two processes
starting together build once, and a half-written build is never loaded. Later processes import the cached
library directly (no compiler, no ninja needed).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.util
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

COMMON_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fno-math-errno")


@dataclass(frozen=True)
class Unit:
    """One kernel translation unit: its instruction set, source file and flags."""

    isa: str
    source: str
    flags: tuple[str, ...]
    x86_only: bool = True


@dataclass(frozen=True)
class Recipe:
    """One extension: its name prefix, source folder, headers, the Python-facing source (compiled and linked by
    ``torch.utils.cpp_extension.load``) and the instruction-set units compiled to objects before it (a unit named
    ``scalar`` is required; the others are left out, and logged, where the compiler cannot build them).

    With ``python_module=False`` the source is a plain shared library with a C ABI, compiled by one compiler call
    and loaded with :mod:`ctypes`: no torch or pybind11 headers, so it builds in about a second instead of ~50 s
    (measured on the AVX2 EPYC VM, g++ 12), for code that needs only raw buffers."""

    prefix: str
    csrc: Path
    dispatch: str
    headers: tuple[str, ...] = ()
    units: tuple[Unit, ...] = ()
    python_module: bool = True  # False: ``dispatch`` is plain C ABI code (no torch, no pybind11), loaded by ctypes


class BuildError(RuntimeError):
    """The extension could not be built or loaded; ``log_path`` holds the compiler's output when there is one."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


@dataclass(frozen=True)
class Built:
    """A loaded build: the module, where it lives, what went into it, and how long getting it took."""

    module: Any  # the imported extension module, or a ctypes.CDLL (Recipe.python_module=False)
    folder: Path
    isas: tuple[str, ...]  # kernels compiled in (the CPU may run fewer)
    compiler: str
    cached: bool
    seconds: float


def _machine_is_x86() -> bool:
    return platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}


def _compiler() -> tuple[str, str]:
    """The C++ compiler torch builds extensions with, and its ``--version`` line (raises BuildError)."""
    from torch.utils.cpp_extension import get_cxx_compiler

    compiler = get_cxx_compiler()
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"no working C++ compiler ({compiler!r}: {type(exc).__name__}: {exc})") from None
    lines = done.stdout.strip().splitlines()
    return compiler, (lines[0].strip() if lines else compiler)


def dispatch_flags() -> tuple[str, ...]:
    """Flags of the dispatcher: OpenMP where torch runs its intra-op threads on it. ``at::parallel_for`` is a header
    template whose OpenMP body compiles only under ``_OPENMP``; without ``-fopenmp`` it runs the whole range on the
    calling thread, so ``torch.set_num_threads`` would govern nothing. The process already holds torch's
    ``libgomp.so.1``, which the extension's reference to that soname resolves to: one thread pool."""
    if sys.platform == "darwin" or not torch.backends.openmp.is_available():
        return ()
    return ("-fopenmp",)


def _units(recipe: Recipe) -> tuple[Unit, ...]:
    return tuple(unit for unit in recipe.units if _machine_is_x86() or not unit.x86_only)


def cache_key(recipe: Recipe, compiler_version: str) -> str:
    """The hash naming a build: sources, per-unit flags and instruction sets, torch, compiler, Python, machine."""
    digest = hashlib.sha256()
    for name in (*recipe.headers, recipe.dispatch, *(unit.source for unit in _units(recipe))):
        digest.update(name.encode() + b"\0" + (recipe.csrc / name).read_bytes() + b"\0")
    for unit in _units(recipe):
        digest.update(f"{unit.isa}:{' '.join(unit.flags)}\0".encode())
    parts = (
        " ".join(COMMON_FLAGS),
        " ".join(dispatch_flags()),
        torch.__version__,
        compiler_version,
        sys.implementation.cache_tag,
    )
    digest.update("\0".join((*parts, platform.machine())).encode())
    return digest.hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _import(name: str, folder: Path) -> ModuleType:
    path = folder / f"{name}.so"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise BuildError(f"cannot import {path}: {exc}") from None
    return module


def _compile_units(recipe: Recipe, compiler: str, folder: Path, log_lines: list[str]) -> dict[str, Path]:
    """Compile every kernel unit to an object in ``folder``, in parallel; the ones that compiled, by ISA."""
    jobs = []
    csrc = recipe.csrc
    for unit in _units(recipe):
        target = folder / f"{unit.isa}.o"
        command = [compiler, *COMMON_FLAGS, *unit.flags, f"-I{csrc}", "-c", str(csrc / unit.source), "-o", str(target)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        jobs.append((unit, target, command, process))
    objects = {}
    for unit, target, command, process in jobs:
        output, _ = process.communicate()
        log_lines += [f"$ {' '.join(command)}", output, f"exit {process.returncode}"]
        if process.returncode == 0 and target.is_file():
            objects[unit.isa] = target
        elif unit.isa == "scalar":
            raise BuildError(f"compiling {unit.source} failed (exit {process.returncode})")
        else:
            log.warning("the %s kernel was left out of the build: %s could not compile it", unit.isa, compiler)
    return objects


def _build_into(
    recipe: Recipe, name: str, folder: Path, compiler: str, log_lines: list[str]
) -> tuple[Any, tuple[str, ...]]:
    from torch.utils.cpp_extension import load

    if not recipe.python_module:
        return _build_library(recipe, name, folder, compiler, log_lines), ()
    objects = _compile_units(recipe, compiler, folder, log_lines)
    isas = tuple(unit.isa for unit in _units(recipe) if unit.isa in objects)
    defines = [f"-DSEC24_HAVE_{isa.upper()}" for isa in isas if isa != "scalar"]
    try:
        module = load(
            name=name,
            sources=[str(recipe.csrc / recipe.dispatch)],
            extra_cflags=[*COMMON_FLAGS, *dispatch_flags(), *defines],
            extra_ldflags=[*(str(path) for path in objects.values()), *dispatch_flags()],
            extra_include_paths=[str(recipe.csrc)],
            build_directory=str(folder),
            verbose=False,
            with_cuda=False,
        )
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as exc:
        log_lines.append(str(exc))
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise BuildError(f"building the dispatcher failed: {first.strip()[:300]}") from None
    assert isinstance(module, ModuleType)
    return module, isas


def _build_library(recipe: Recipe, name: str, folder: Path, compiler: str, log_lines: list[str]) -> ctypes.CDLL:
    """A plain shared library from ``recipe.dispatch`` (one compiler call), loaded with ctypes."""
    target = folder / f"{name}.so"
    command = [
        compiler, *COMMON_FLAGS, *dispatch_flags(), "-shared", f"-I{recipe.csrc}",
        str(recipe.csrc / recipe.dispatch), "-o", str(target),
    ]  # fmt: skip
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    log_lines += [f"$ {' '.join(command)}", done.stdout, f"exit {done.returncode}"]
    if done.returncode != 0 or not target.is_file():
        raise BuildError(f"compiling {recipe.dispatch} failed (exit {done.returncode})")
    return _load(recipe, name, folder)


def _load(recipe: Recipe, name: str, folder: Path) -> Any:
    """The built extension in ``folder``: imported, or opened with ctypes (a plain library)."""
    if recipe.python_module:
        return _import(name, folder)
    try:
        return ctypes.CDLL(str(folder / f"{name}.so"))
    except OSError as exc:
        raise BuildError(f"cannot load {folder / f'{name}.so'}: {exc}") from None


def build(recipe: Recipe, build_root: Path) -> Built:
    """The extension for this machine's compiler and torch: from the cache in ``build_root``, or built there.

    Raises :class:`BuildError` (with the compiler's output written to ``<build_root>/<name>.log``) when it cannot
    be built or loaded.
    """
    started = time.perf_counter()
    build_root = build_root.absolute()  # ninja runs inside the build folder: every path it is given must be absolute
    compiler, version = _compiler()
    name = f"{recipe.prefix}_{cache_key(recipe, version)}"
    final = build_root / name
    meta_path = final / "build.json"
    try:
        build_root.mkdir(parents=True, exist_ok=True)
        with _locked(build_root / f"{name}.lock"):
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                module, isas, cached = _load(recipe, name, final), tuple(meta["isas"]), True
            else:
                module, isas = _build_fresh(recipe, name, build_root, compiler, version)
                cached = False
    except (OSError, ValueError) as exc:  # an unwritable cache folder, a damaged build.json
        raise BuildError(f"the build cache {build_root} cannot be used: {type(exc).__name__}: {exc}") from None
    return Built(module, final, isas, version, cached, time.perf_counter() - started)


def _build_fresh(
    recipe: Recipe, name: str, build_root: Path, compiler: str, version: str
) -> tuple[Any, tuple[str, ...]]:
    """Build in a temporary folder, then rename it to ``<build_root>/<name>`` (the caller holds the lock)."""
    final = build_root / name
    log_lines: list[str] = []
    log_path = build_root / f"{name}.log"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=build_root))
    try:
        module, isas = _build_into(recipe, name, tmp, compiler, log_lines)
        meta = {"name": name, "isas": isas, "compiler": version, "torch": torch.__version__}
        (tmp / "build.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if final.exists():  # a folder without build.json (copied in by hand, or from an older layout)
            shutil.rmtree(final)
        tmp.rename(final)
    except BuildError as exc:
        log_path.write_text("\n".join(log_lines) + "\n", encoding="utf-8")
        raise BuildError(str(exc), log_path) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return module, isas
