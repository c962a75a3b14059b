"""One import name: the distribution installs only ``secateurs``; its public API; ``python -m secateurs``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import secateurs
from secateurs.app.errors import InvalidSpecError, ModelSourceError, OutputExistsError
from tests.conftest import REPO_ROOT, TinyDir

LAYERS = ("app", "workers", "kernels")


def _run(code: str, cwd: Path, **env: str) -> str:
    """``code`` in a fresh interpreter of this environment, from ``cwd`` (outside the repository)."""
    clean = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the checkout (links kept as links), so the build leaves nothing in the repository."""
    source = tmp_path_factory.mktemp("source") / "secateurs"
    skip = shutil.ignore_patterns(".git", ".venv", ".cache", "node_modules", "build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("secateurs-*.whl")
    return found


def test_the_wheel_has_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    roots = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert roots == {"secateurs"}
    assert top_level == ["secateurs"]
    for layer in LAYERS:  # the three layers ship as real files under the one name
        assert f"secateurs/{layer}/__init__.py" in names
    assert "secateurs/app/static/job.js" in names and "secateurs/app/migrations/env.py" in names
    # the C++ sources every installed copy compiles on first use
    assert (
        "secateurs/kernels/sparse/cpu/csrc/dispatch.cpp" in names
        and "secateurs/kernels/pruning/csrc/nm_sweep.cpp" in names
    )
    assert "secateurs = secateurs.workers.cli:main" in entry_points


def test_the_installed_wheel_imports_from_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    """The wheel's files alone (no checkout on the path): one name, a version, no torch on import."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import sys, importlib.util as u, secateurs; "
        "print(secateurs.__file__); print(secateurs.__version__); "
        "print([u.find_spec(n) for n in ('app', 'workers', 'kernels')]); print('torch' in sys.modules)"
    )
    where, version, specs, torch_loaded = _run(code, tmp_path, PYTHONPATH=str(target)).splitlines()
    assert where == str(target / "secateurs" / "__init__.py")
    assert version == secateurs.__version__
    assert specs == "[None, None, None]"
    assert torch_loaded == "False"


def test_import_secateurs_is_light_and_names_no_bare_layer(tmp_path: Path) -> None:
    code = (
        "import sys, importlib.util as u, secateurs; "
        "client = secateurs.Client; spec = secateurs.JobSpec; "
        "print('torch' in sys.modules, [u.find_spec(n) for n in ('app', 'workers', 'kernels')])"
    )
    assert _run(code, tmp_path) == "False [None, None, None]"


def test_transformers_does_not_take_secateurs_for_its_kernels_package(tmp_path: Path) -> None:
    code = (
        "from transformers.utils.import_utils import _is_package_available as available; "
        "print(available('kernels', return_version=True)[0])"
    )
    assert _run(code, tmp_path) == "False"


def test_python_dash_m_secateurs_is_the_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "secateurs", "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "Usage: python -m secateurs" in result.stdout and "prune" in result.stdout
    assert "secateurs quickstart" in result.stdout  # the help leads with the README's quick start


def test_no_code_imports_a_bare_layer() -> None:
    """Every import in the code, tests and benchmarks uses ``secateurs.<layer>``."""
    bare = re.compile(r"^\s*(from|import)\s+(app|workers|kernels)\b", re.MULTILINE)
    folders = ("app", "workers", "kernels", "tests", "benchmarks", "secateurs")
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: {match.group(0).strip()}"
        for folder in folders
        for path in (REPO_ROOT / folder).rglob("*.py")
        if not path.is_symlink() and "node_modules" not in path.parts and (REPO_ROOT / folder).is_dir()
        for match in bare.finditer(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_public_api_names() -> None:
    assert set(secateurs.__all__) >= {"prune", "load", "Client", "__version__"}
    assert secateurs.Client.__name__ == "SecateursClient"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = secateurs.nope  # type: ignore[attr-defined]


def test_prune_rejects_a_bad_spec_with_the_cli_s_words(tmp_path: Path, tiny_dir: TinyDir) -> None:
    model = tiny_dir("llama")
    with pytest.raises(InvalidSpecError, match="pattern"):
        secateurs.prune(model, pattern="3:2", calibration=None, output=tmp_path / "out")
    with pytest.raises(InvalidSpecError, match="calibration_sample"):
        secateurs.prune(model, method="magnitude", calibration_sample=3, output=tmp_path / "out")
    with pytest.raises(ModelSourceError, match="does not exist"):
        secateurs.prune(tmp_path / "missing", method="magnitude", output=tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        secateurs.prune(model, method="magnitude", output=tmp_path / "taken")


def test_prune_then_load_gives_the_pruned_model(tmp_path: Path, tiny_dir: TinyDir) -> None:
    model_dir = tiny_dir("llama")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text" for i in range(3000)), encoding="utf-8")
    out = tmp_path / "out"
    events: list[str] = []
    report = secateurs.prune(
        model_dir,
        calibration=text,
        evaluation=str(text),
        output=out,
        calibration_samples=4,
        calibration_seqlen=32,
        eval_seqlen=32,
        eval_windows=4,
        device="cpu",
        measure_speed=False,
        on_progress=lambda event: events.append(event.stage.value),
    )
    assert isinstance(report, secateurs.Report) and report.sparsity.verified
    assert events[0] == "load" and "prune" in events
    model = secateurs.load(out, device="cpu")
    assert not model.training
    tokens = torch.arange(16).unsqueeze(0)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits)


def test_load_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        secateurs.load(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelSourceError, match="is a file"):
        secateurs.load(tmp_path / "file")
    with pytest.raises(ModelSourceError, match=r"has no config\.json"):
        secateurs.load(tmp_path)
