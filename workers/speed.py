"""The speed step of a job: measure dense versus 2:4 sparse execution of the pruned model, as a report section.

The measurement itself is :func:`secateurs.kernels.measure.speed.measure_speed`; this module decides when it runs, moves
the model to the device and back, adds what torch cannot tell (the CPU's name, the NVIDIA driver release) and turns the
result into :class:`secateurs.app.schemas.SpeedReport`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from secateurs.app.schemas import JobSpec, SpeedReport
from secateurs.kernels.measure.speed import LinearResult, SparsePath, SpeedResult, SpeedSettings, measure_speed
from secateurs.kernels.patterns import SparsityPattern
from secateurs.workers.cpu_kernel import configure_cpu_kernel  # registers the CPU kernel's sweep path

log = logging.getLogger(__name__)


def speed_enabled(spec: JobSpec, device: torch.device) -> bool:
    """``spec.measure_speed`` when set; otherwise on for CUDA workers, off elsewhere (slow, and no 2:4 hardware)."""
    if spec.measure_speed is not None:
        return spec.measure_speed
    return device.type == "cuda"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:
        return name


def driver_release() -> str | None:
    """The NVIDIA driver release (e.g. '550.54.15') from ``nvidia-smi``, or None when it cannot be asked."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def to_report(result: SpeedResult, seconds: float | None = None) -> SpeedReport:
    """A :class:`secateurs.kernels.measure.speed.SpeedResult` as the report's section (same fields), plus the
    driver release."""
    data = dataclasses.asdict(result)
    if data["conditions"]["device"].startswith("cuda"):
        data["conditions"]["driver"] = driver_release()
    data["settings"] = json.loads(json.dumps(data["settings"]))  # tuples as JSON lists, as report.json has them
    return SpeedReport.model_validate({**data, "seconds": seconds})


def run_speed_step(
    model: nn.Module,
    names: Sequence[str],
    pattern: SparsityPattern,
    device: torch.device,
    *,
    settings: SpeedSettings | None = None,
    paths: Sequence[SparsePath] | None = None,
    on_point: Callable[[LinearResult], None] | None = None,
) -> SpeedReport:
    """Measure ``model`` (pruned; its ``names`` linears sparse) on ``device``; it goes back to CPU afterwards."""
    started = time.perf_counter()
    settings = settings or SpeedSettings.for_device(device)
    configure_cpu_kernel()
    model.to(device)
    try:
        result = measure_speed(
            model,
            names,
            pattern,
            settings,
            paths=paths,
            device_name=cpu_name() if device.type == "cpu" else "",
            on_point=on_point,
        )
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return to_report(result, time.perf_counter() - started)
