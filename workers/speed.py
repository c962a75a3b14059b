"""The speed step of a job: measure dense versus 2:4 sparse execution of the pruned model, as a report section.

The measurement itself is :func:`secateurs.kernels.measure.speed.measure_speed`; this module decides when it runs
(by default on every device: a short sweep on CPU), moves the model to the device and back, adds what torch cannot
tell (the CPU's name and vector instruction sets, its last-level cache, the NVIDIA driver release), turns the result
into :class:`secateurs.app.schemas.SpeedReport`, and distils the figure a report leads with
(:class:`secateurs.app.schemas.DecodeSpeedup`: the greedy-decode speedup and its conditions, or why there is none).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.app.schemas import DecodeSpeedup, JobSpec, SpeedReport
from secateurs.kernels.measure.speed import (
    LinearResult,
    PackedReferencePath,
    SparsePath,
    SpeedResult,
    SpeedSettings,
    measure_speed,
    sparse_paths,
)
from secateurs.kernels.patterns import SparsityPattern
from secateurs.kernels.sparse.packing import describe_packed_kernels
from secateurs.workers.cpu_kernel import configure_cpu_kernel  # registers the CPU kernel's sweep path

log = logging.getLogger(__name__)


def speed_enabled(spec: JobSpec, device: torch.device) -> bool:
    """``spec.measure_speed`` when set; otherwise on, on every device (a short sweep on CPU)."""
    return spec.measure_speed is not False


_ISA_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "avx2", "fma", "asimd", "sve")


def cpu_isa() -> str | None:
    """The CPU's vector instruction sets that matter to the kernels (from ``/proc/cpuinfo`` flags), e.g.
    ``avx512f avx512bw avx512vl avx512_bf16 amx_bf16 avx2 fma``; None when they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            line = next((ln for ln in info if ln.startswith(("flags", "Features"))), None)
    except OSError:
        return None
    if line is None:
        return None
    flags = set(line.split(":", 1)[1].split())
    present = [flag for flag in _ISA_FLAGS if flag in flags]
    return " ".join(present) if present else "none of " + "/".join(_ISA_FLAGS)


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_cache_bytes() -> int:
    """The largest CPU cache (the last level) as Linux reports it for CPU 0, or 32 MiB when it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text(encoding="utf-8").strip().upper()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 * 1024**2)


def default_settings(device: torch.device, dtype: torch.dtype, paths: Sequence[SparsePath]) -> SpeedSettings:
    """The job's sweep on ``device`` (:meth:`SpeedSettings.for_device`). On CPU it is short: end to end it times the
    packed kernels that run here and leaves out ``packed_reference`` (decompress-then-dense, tens of seconds on a
    512-token prefill) whenever such a kernel exists; the per-shape sweep still times it."""
    if device.type != "cpu":
        return SpeedSettings.for_device(device)
    settings = SpeedSettings.for_device(device, cache_bytes=cpu_cache_bytes())
    runnable = [path.name for path in paths if path.unavailable(device, dtype) is None]
    faster = [name for name in runnable if name != PackedReferencePath.name]
    return dataclasses.replace(settings, e2e_paths=tuple(faster)) if faster else settings


def cpu_name() -> str:
    """The CPU's model name and, where ``/proc/cpuinfo`` gives them, its family and model numbers (a cloud VM's
    "AMD EPYC" alone does not tell a Zen 3 from a Zen 5, whose caches and kernels' speeds differ); else what
    ``platform`` knows."""
    fallback = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            fields: dict[str, str] = {}
            for line in info:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return fallback
    name = fields.get("model name", fallback)
    family, model = fields.get("cpu family"), fields.get("model")
    return f"{name} (family {family}, model {model})" if family and model else name


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


def to_report(
    result: SpeedResult, seconds: float | None = None, load_average: list[float] | None = None
) -> SpeedReport:
    """A :class:`secateurs.kernels.measure.speed.SpeedResult` as the report's section (same fields), plus the
    driver release or the CPU's instruction sets, and the load average the step began with."""
    data = dataclasses.asdict(result)
    if data["conditions"]["device"].startswith("cuda"):
        data["conditions"]["driver"] = driver_release()
    else:
        data["conditions"]["isa"] = cpu_isa()
    data["conditions"]["load_average"] = load_average
    data["settings"] = json.loads(json.dumps(data["settings"]))  # tuples as JSON lists, as report.json has them
    return SpeedReport.model_validate({**data, "seconds": seconds})


def _fit_positions(settings: SpeedSettings, model: nn.Module) -> SpeedSettings:
    """Shorten the decode prompt (and if need be the steps) to the model's positions, so that a small model still
    gets a decode figure (a prefill longer than the model takes is reported skipped)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(positions, int) or settings.decode_prompt + settings.decode_new_tokens <= positions:
        return settings
    steps = min(settings.decode_new_tokens, max(1, positions // 2))
    return dataclasses.replace(settings, decode_prompt=max(1, positions - steps), decode_new_tokens=steps)


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
    configure_cpu_kernel()
    load = _load_average()
    paths = sparse_paths() if paths is None else list(paths)
    dtype = next(model.parameters()).dtype
    settings = settings or _fit_positions(default_settings(device, dtype, paths), model)
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
    return to_report(result, time.perf_counter() - started, load)


def _lead(report: SpeedReport, **fields: Any) -> DecodeSpeedup:
    """A :class:`DecodeSpeedup` with the conditions of ``report`` and ``fields``."""
    c = report.conditions
    return DecodeSpeedup(
        device=c.device,
        device_name=c.device_name,
        isa=c.isa,
        threads=c.threads,
        dtype=report.dtype,
        torch=c.torch,
        load_average=c.load_average,
        **fields,
    )


def decode_speedup(report: SpeedReport) -> DecodeSpeedup:
    """The figure a report leads with: greedy decode at the smallest batch measured, the fastest sparse path
    measured there, with its conditions; or ``measured=False`` and why."""
    runs = sorted((run for run in report.end_to_end if run.kind == "decode"), key=lambda run: run.batch)
    if not runs:
        return _lead(report, measured=False, reason="the sweep timed no decoding")
    run = runs[0]
    shape = {"batch": run.batch, "prompt_tokens": run.prompt_tokens, "new_tokens": run.new_tokens}
    if run.status != "measured" or run.dense is None:
        reason = f"decode at batch {run.batch} was {run.status}: {run.reason or 'no reason recorded'}"
        return _lead(report, measured=False, reason=reason, **shape)
    measured = [r for r in run.paths if r.status == "measured" and r.speedup is not None]
    if not measured:
        why = "; ".join(f"{r.path} {r.status}" + (f" ({r.reason})" if r.reason else "") for r in run.paths)
        return _lead(
            report,
            measured=False,
            reason=f"no sparse path ran end to end here: {why or 'none registered'}",
            dense_tokens_per_second=run.dense_tokens_per_second,
            **shape,
        )
    best = max(measured, key=lambda r: r.speedup or 0.0)
    kernels = list(best.kernels or [])
    described = {d.name: d for d in describe_packed_kernels()}
    return _lead(
        report,
        measured=True,
        speedup=best.speedup,
        dense_tokens_per_second=run.dense_tokens_per_second,
        sparse_tokens_per_second=best.tokens_per_second,
        path=best.path,
        kernels=kernels,
        kernel_details=[f"{name}: {described[name].detail}" for name in kernels if name in described],
        repetitions=run.dense.repetitions,
        **shape,
    )


def not_measured(reason: str, device: torch.device, dtype: torch.dtype) -> DecodeSpeedup:
    """The report's lead when the speed step did not run: ``measured=False`` with ``reason`` and where it would have."""
    return DecodeSpeedup(
        measured=False,
        reason=reason,
        device=str(device),
        device_name=cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        isa=cpu_isa() if device.type == "cpu" else None,
        threads=torch.get_num_threads(),
        dtype=str(dtype).removeprefix("torch."),
        torch=torch.__version__,
        load_average=_load_average(),
    )
