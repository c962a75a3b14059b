"""benchmarks/gpu_check.py and .sh on CPU: every section's logic at toy sizes (the Triton kernel under the
interpreter), the JSON it writes, and that the GPU machine will have everything the check imports."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"

# The Python packages of the GPU machine's image ('cuda', as listed in /work/.library/device/KINDS.md on
# 2026-11-17), as distribution names normalized to lower case with '-'.
GPU_IMAGE = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
    huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
    lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
    nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
    optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
    pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
    pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
    scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
    statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken
    timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
    xarray xxhash yarl zipp""".split()  # noqa: SIM905 (a list of 200 names reads better as text)
)

# Everything the check imports: its own imports and those of the sections, and the gpu-marked test files.
IMPORTS = """
import json, sys
sys.path.insert(0, {root!r})
import benchmarks.gpu_check
import secateurs.workers.pipeline, secateurs.workers.speed, secateurs.app.schemas
import secateurs.kernels.measure.speed, secateurs.kernels.sparse.triton_decode, secateurs.kernels.pruning.driver
import tests.conftest, tests.models, tests.test_speed, tests.test_triton_decode
import transformers, pytest, _pytest.junitxml
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirements_of(names: set[str]) -> set[str]:
    """Every distribution installed here that the ``names`` distributions need, transitively (on the GPU image
    those come with them, whatever their versions need there)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        try:
            requires = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement:
                continue
            dep = _normalized(re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0])
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_gpu_machine_has_or_receives_every_distribution_the_check_imports() -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.gpu_check import CARRIED_WHEELS

    done = subprocess.run(
        [sys.executable, "-c", IMPORTS.format(root=str(REPO_ROOT))],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    owners = importlib.metadata.packages_distributions()
    needed = {_normalized(dist) for module in modules for dist in owners.get(module, [])}
    needed -= {"secateurs"}
    carried = {_normalized(name) for name in CARRIED_WHEELS}
    # A distribution only an image package pulls in here (a newer version of it, perhaps) is the image's business;
    # what secateurs itself or a carried wheel requires is not.
    project = {
        _normalized(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0])
        for r in importlib.metadata.requires("secateurs") or []
    }
    excused = _requirements_of(needed & GPU_IMAGE) - project - _requirements_of(carried)
    # Imported by torch only where installed (torch.utils.data's datapipes try `dill`): not needed there.
    optional = {"dill"}
    missing = needed - GPU_IMAGE - carried - excused - optional
    assert not missing, f"the GPU check imports distributions the GPU machine lacks and .whl does not carry: {missing}"


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (the dev extra installs it)"
)


@needs_triton
def test_smoke_run_writes_every_section(tmp_path: Path) -> None:
    sections = (
        "environment,kernel_check,kernel_timing,eager_calls,speed_llama,decode_graph,prune_cuda,speed_smollm2,"
        "kernel_configs"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--smoke", "--only", sections],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: entry["status"] for name, entry in results["sections"].items()}
    assert statuses == dict.fromkeys(sections.split(","), "ok"), statuses
    data = {name: entry["data"] for name, entry in results["sections"].items()}
    environment = data["environment"]
    assert {"torch", "triton", "cuda", "transformers", "python"} <= environment.keys()
    assert environment["triton_interpret"] == "1"
    assert data["kernel_check"]["cases"] > 0 and data["kernel_check"]["worst_relative_error"] < 5e-3
    point = data["kernel_timing"]["points"][0]
    assert point["eager_triton"]["median_ms"] > 0 and 1.5 < point["limit"] < 1.8
    assert data["kernel_configs"]["results"][0]["best"]["status"] == "ok"
    eager = data["eager_calls"]["points"][0]
    assert eager["launcher_us"] > 0 and eager["bound_us"] > 0  # CPU: the Python part, the launch stubbed
    paths = {r["path"]: r for r in data["speed_llama"]["linear"][0]["paths"]}
    assert paths["packed_triton"]["status"] == "unavailable"  # CPU: the path says why
    assert paths["packed_reference"]["status"] == "measured"
    jobs = data["prune_cuda"]["jobs"]
    assert len(jobs) == 2 and all("timings" in job and "environment" in job for job in jobs)
    assert data["speed_smollm2"]["end_to_end"], data["speed_smollm2"]
    decode = data["decode_graph"]["results"][0]
    assert decode["dense"]["tokens_per_s"] > 0
    assert decode["packed_reference"]["tokens_equal"] == decode["steps"]  # fp32: the same greedy tokens


def test_shell_wrapper_runs_the_check_and_keeps_its_log(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--smoke", "--only", "environment"],
        cwd=REPO_ROOT,
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["sections"]["environment"]["status"] == "ok"
    assert "environment: ok" in (tmp_path / "gpu_check.log").read_text()


def test_an_unknown_section_is_refused_with_the_list(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--smoke", "--only", "kernel_chek"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert "no section kernel_chek" in done.stderr and "kernel_check" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()
