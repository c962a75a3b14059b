"""The packed 2:4 CPU kernel's build: its sources and instruction-set units (:mod:`secateurs.kernels.cpp_build`
compiles and caches it). Each instruction set's kernel is its own translation unit with its own flags (GUIDE §6:
never ``-march=native`` for a cached build, the machine kind changes between sessions); the dispatcher
(``dispatch.cpp``) picks among them at run time from the CPU's flags. The cache folder is
``<build_root>/secateurs_cpu24_<key>/``."""

from __future__ import annotations

from pathlib import Path

from secateurs.kernels.cpp_build import COMMON_FLAGS, BuildError, Built, Recipe, Unit, dispatch_flags
from secateurs.kernels.cpp_build import build as _build
from secateurs.kernels.cpp_build import cache_key as _cache_key

__all__ = ["COMMON_FLAGS", "RECIPE", "BuildError", "Built", "Unit", "build", "cache_key", "dispatch_flags"]

RECIPE = Recipe(
    prefix="secateurs_cpu24",
    csrc=Path(__file__).resolve().parent / "csrc",
    dispatch="dispatch.cpp",
    headers=("packed24.h", "common.h", "masks512.h", "store512.h", "tokens.h"),
    units=(
        Unit("scalar", "scalar.cpp", (), x86_only=False),
        Unit("avx2", "avx2.cpp", ("-mavx2", "-mfma")),
        Unit("avx512", "avx512.cpp", ("-mavx512f", "-mavx512bw", "-mavx512vl")),
        Unit(
            "avx512bf16",
            "avx512bf16.cpp",
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi", "-mavx512vbmi2"),
        ),
        Unit("amx", "amx.cpp", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi2", "-mamx-tile", "-mamx-bf16")),
    ),
)


def build(build_root: Path) -> Built:
    """The packed 2:4 CPU kernel for this machine's compiler and torch, from the cache in ``build_root`` or built
    there (:func:`secateurs.kernels.cpp_build.build`)."""
    return _build(RECIPE, build_root)


def cache_key(compiler_version: str) -> str:
    """The hash naming this kernel's build (:func:`secateurs.kernels.cpp_build.cache_key`)."""
    return _cache_key(RECIPE, compiler_version)
