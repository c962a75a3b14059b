"""``run_job``: load → calibrate → evaluate dense → prune → evaluate pruned → measure speed (when on) → verify →
save (the HF folder, its packed N:M copy in ``packed/``, ``report.json``), as one function.

This is the whole job, for the CLI's ``prune`` and for the service's workers alike. Every error a user can
act on leaves as an :class:`secateurs.app.errors.SecateursError`; the output folder appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.app.errors import (
    DataSourceError,
    DeviceError,
    ModelSourceError,
    PruningError,
    SecateursError,
)
from secateurs.app.schemas import (
    CalibrationReport,
    DecodeSpeedup,
    Environment,
    JobSpec,
    LayerReport,
    MemoryReport,
    Method,
    ModelInfo,
    PackedLayer,
    PackedReport,
    PerplexityProtocol,
    PerplexityReport,
    ProgressEvent,
    Report,
    SparsityReport,
    SpeedReport,
    Stage,
    Timings,
)
from secateurs.app.sources import check_model_folder
from secateurs.kernels.errors import FactorizationError, PatternError
from secateurs.kernels.matmul import cpu_gemm_backend
from secateurs.kernels.measure.perplexity import Perplexity, eval_windows, perplexity
from secateurs.kernels.measure.speed import sparse_paths
from secateurs.kernels.patterns import SparsityPattern, satisfies_nm, sparsity_of
from secateurs.kernels.pruning.discovery import PrunableLayer
from secateurs.kernels.pruning.driver import (
    BlockProgress,
    BlockSource,
    LayerResult,
    PruneConfig,
    plan_layers,
    prune_model_,
)
from secateurs.kernels.pruning.native import describe as native_sweep
from secateurs.kernels.sparse.packing import MAX_M
from secateurs.workers.allocator import Heap, heap_allocations
from secateurs.workers.cpu_kernel import configure_cpu_kernel
from secateurs.workers.data import LoadedText, calibration_windows, read_text, tokenize
from secateurs.workers.dense_cache import DenseCache, cached_dense_perplexity
from secateurs.workers.packed import FORMAT as PACKED_FORMAT
from secateurs.workers.packed import PACKED_DIR, PackedStream, PackSummary
from secateurs.workers.speed import (
    decode_speedup,
    default_settings,
    not_measured,
    run_speed_step,
    speed_enabled,
)
from secateurs.workers.storage import atomic_output_dir, check_output_dir
from secateurs.workers.streaming import CheckpointWriter, PrunedBlocks, StreamedModel, plan_checkpoint

log = logging.getLogger(__name__)

ProgressCallback = Callable[[ProgressEvent], None]
REPORT_NAME = "report.json"


def quiet_libraries() -> None:
    """No download/loading progress bars or advisory warnings from transformers and the hub client:
    secateurs reports progress itself (CLI bar, job events)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
    hf_logging.set_verbosity_error()


class JobCancelled(Exception):
    """Raised between blocks when ``should_stop()`` says so; nothing is written."""


# --- loading -------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """The torch device for a spec's device string, or :class:`DeviceError` saying what exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise DeviceError(
                f"device {name!r} does not exist: this machine has {have}",
                hint="use --device cpu" + (f" or one of cuda:0..cuda:{count - 1}" if count else ""),
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' is not available on this machine", hint="use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _model_folder(spec: JobSpec) -> Path:
    """A local folder holding the model: the path itself, or a hub snapshot (safetensors files only)."""
    local = Path(spec.model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelSourceError(f"{local} is a file, not a model folder", hint="pass the folder holding config.json")
        return local
    if spec.model.startswith((".", "/", "~")) or os.sep in spec.model.strip("/").replace("/", "", 1):
        raise ModelSourceError(
            f"model folder {spec.model} does not exist",
            hint="pass an existing folder or a hub id like org/name",
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                spec.model,
                revision=spec.revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # the hub client raises many types; all mean "cannot get it"
        raise ModelSourceError(
            f"could not fetch {spec.model!r} (revision {spec.revision or 'main'}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="check the model id and revision, that the hub is reachable (HF_TOKEN for gated models), "
            "or pass a local folder",
        ) from None


def _check_folder(folder: Path) -> None:
    """The API's checks (:func:`secateurs.app.sources.check_model_folder`), then: does the config name a causal LM?"""
    check_model_folder(folder)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = config["model_type"]
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        architectures and not any(a in causal for a in architectures)
    ):
        raise ModelSourceError(
            f"{folder} holds a {'/'.join(architectures) or model_type} model, not a causal language model",
            hint="secateurs prunes decoder-only causal LMs (AutoModelForCausalLM), e.g. Llama, Qwen2, OPT, GPT-2",
        )


# What transformers raises for a folder it cannot read (as opposed to bugs, which should surface as such).
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(spec: JobSpec, dtype: torch.dtype) -> tuple[StreamedModel, Any, Path]:
    """The model with streamed weights (:class:`secateurs.workers.streaming.StreamedModel`: built on the meta
    device, non-block tensors loaded, each block read when the driver reaches it), tokenizer, and the folder."""
    folder = _model_folder(spec)
    _check_folder(folder)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except _LOAD_ERRORS as exc:
        raise ModelSourceError(
            f"{folder} has no usable tokenizer: {_first_line(exc)}",
            hint="save the tokenizer into the model folder (tokenizer.save_pretrained(dir))",
        ) from None
    try:
        streamed = StreamedModel(folder, dtype)
    except _LOAD_ERRORS as exc:
        raise ModelSourceError(
            f"transformers could not load {folder}: {_first_line(exc)}",
            hint="check that the folder is a complete Hugging Face checkpoint whose weights match config.json",
        ) from None
    return streamed, tokenizer, folder


def _bos_id(spec: JobSpec, tokenizer: Any) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if spec.bos == "never":
        return None
    if spec.bos == "always":
        if bos is None:
            raise DataSourceError("bos='always' but the tokenizer has no BOS token", hint="use bos 'auto' or 'never'")
        return int(bos)
    ids = tokenizer("a")["input_ids"]
    return int(bos) if bos is not None and ids and ids[0] == bos else None


# --- the job -------------------------------------------------------------------------------------------------


@dataclass
class _Clock:
    started: float

    def since(self) -> float:
        return time.perf_counter() - self.started


def _pattern(spec: JobSpec) -> SparsityPattern:
    parsed = spec.parsed_pattern
    if isinstance(parsed, tuple):
        return SparsityPattern.nm(*parsed)
    return SparsityPattern.unstructured(parsed)


def _layer_report(result: LayerResult) -> LayerReport:
    return LayerReport(
        name=result.name,
        shape=result.shape,
        sparsity=result.sparsity,
        error=result.error,
        shares_input_with=list(result.shares_input_with),
        dampening=result.dampening,
        skipped=result.skipped,
    )


_PRODUCT_LIBRARIES = {"onednn": "oneDNN", "aten": "F.linear"}


def _environment(device: torch.device) -> Environment:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as info:
                name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), name)
        except OSError:
            pass
    try:
        version = metadata.version("secateurs")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return Environment(
        secateurs=version,
        python=sys.version.split()[0],
        torch=torch.__version__,
        transformers=transformers.__version__,
        platform=platform.platform(),
        device=str(device),
        device_name=name,
        threads=torch.get_num_threads(),
        cuda=torch.version.cuda,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_products=(
            {kind: _PRODUCT_LIBRARIES[cpu_gemm_backend(kind)] for kind in ("linear", "gram")}
            if device.type == "cpu"
            else None
        ),
        cpu_sweep=native_sweep() if device.type == "cpu" else None,
    )


def _verify(model: nn.Module, results: list[LayerResult], pattern: SparsityPattern) -> bool:
    """Re-check the pattern on the model's actual weights (not on what the solver said it did)."""
    modules = dict(model.named_modules())
    for result in results:
        if result.skipped:
            continue
        weight = PrunableLayer(result.name, modules[result.name]).weight().detach()  # [out, in]
        if pattern.is_nm:
            assert pattern.n is not None and pattern.m is not None
            if not satisfies_nm(weight, pattern.n, pattern.m):
                return False
        elif sparsity_of(weight) < pattern.sparsity - 0.01:
            return False
    return True


def _evaluate(
    model: nn.Module,
    windows: torch.Tensor | None,
    spec: JobSpec,
    bos: int | None,
    device: torch.device,
    *,
    emit: ProgressCallback,
    stage: Stage,
    label: str,
    source: BlockSource,
) -> tuple[Perplexity | None, float | None]:
    """Perplexity and the seconds it took, announced as ``stage``; ``(None, None)`` without evaluation text.

    One decoder block at a time is read from ``source`` (the source checkpoint, or the pruned one being
    written) and visits ``device``; the logits are computed in slices (:mod:`secateurs.kernels.measure.perplexity`).
    """
    if windows is None:
        return None, None
    emit(ProgressEvent(stage=stage, message=f"{label} perplexity on {windows.shape[0]} windows, one block at a time"))
    started = time.perf_counter()
    try:
        result = perplexity(
            model,
            windows,
            batch_size=spec.eval_batch_size,
            bos_token_id=bos,
            device=device,
            by_block=True,
            source=source,
        )
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    seconds = time.perf_counter() - started
    emit(ProgressEvent(stage=stage, message=f"{label} perplexity {result.value:.3f}", seconds=seconds))
    return result, seconds


# The pruned model is loaded whole for the speed step (end to end decode needs it) only when it takes at most
# this share of the memory available; otherwise one layer per distinct shape is (per-layer figures only).
_SPEED_WHOLE_SHARE = 0.25


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _speed_subject(folder: Path, streamed: StreamedModel, names: list[str]) -> tuple[nn.Module, list[str], bool]:
    """What the speed step measures, loaded from the pruned checkpoint just written in ``folder``: the whole
    model when it is small next to the memory available (then end to end too), else one real pruned layer per
    distinct shape (per-layer figures only). Returns (module, layer names inside it, whole)."""
    size = sum(t.numel() * t.element_size() for t in streamed.model.state_dict().values())
    if size <= _SPEED_WHOLE_SHARE * _available_memory():
        from transformers import AutoModelForCausalLM

        whole = AutoModelForCausalLM.from_pretrained(
            folder, dtype=streamed.dtype, trust_remote_code=False, use_safetensors=True, low_cpu_mem_usage=True
        )
        return whole.eval(), names, True
    modules = dict(streamed.model.named_modules())
    layers = nn.ModuleDict()
    seen: set[tuple[int, int]] = set()
    for name in names:
        layer = PrunableLayer(name, modules[name])
        shape = (layer.out_features, layer.in_features)
        if shape in seen:
            continue
        seen.add(shape)
        weight = streamed.files.get(streamed.stored_name(f"{name}.weight")).to(streamed.dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta", dtype=streamed.dtype)
        linear.weight = nn.Parameter(weight.T.contiguous() if layer.transposed else weight, requires_grad=False)
        layers[str(len(layers))] = linear
    return layers, list(layers.keys()), False


def _measure_speed(
    folder: Path,
    streamed: StreamedModel,
    layers: list[LayerResult],
    pattern: SparsityPattern,
    spec: JobSpec,
    *,
    device: torch.device,
    emit: ProgressCallback,
    should_stop: Callable[[], bool] | None,
) -> tuple[SpeedReport | None, DecodeSpeedup]:
    """The speed section (:mod:`secateurs.workers.speed`) and the decode speedup the report leads with; without a
    measurement, ``(None, why not)``. The pruned layers are read back from ``folder`` (:func:`_speed_subject`)."""
    dtype = streamed.dtype
    if not speed_enabled(spec, device):
        reason = "turned off for this job (measure_speed=false, --no-measure-speed)"
        return None, not_measured(reason, device, dtype)
    if not pattern.is_nm:
        reason = f"pattern {pattern} is unstructured: no sparse path executes it (packed kernels need N:M)"
        return None, not_measured(reason, device, dtype)
    emit(ProgressEvent(stage=Stage.MEASURE_SPEED, message=f"measuring dense versus sparse speed on {device}"))

    def on_point(_point: object) -> None:
        if should_stop is not None and should_stop():
            raise JobCancelled("cancelled while measuring speed")

    try:
        subject, names, whole = _speed_subject(folder, streamed, [r.name for r in layers if not r.skipped])
        settings = None
        if not whole:
            settings = dataclasses.replace(default_settings(device, dtype, sparse_paths()), end_to_end=False)
        report = run_speed_step(subject, names, pattern, device, on_point=on_point, settings=settings)
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:  # the pruned model is still good
        log.exception("the speed step failed")
        return None, not_measured(f"the speed step failed: {type(exc).__name__}: {_first_line(exc)}", device, dtype)
    decode = decode_speedup(report)
    figure = f"decode {decode.speedup:.2f}x dense ({decode.path})" if decode.speedup else "no decode figure"
    emit(ProgressEvent(stage=Stage.MEASURE_SPEED, message=f"speed measured: {figure}", seconds=report.seconds))
    return report, decode


def _packing_plan(
    streamed: StreamedModel,
    per_block: list[list[PrunableLayer]],
    pattern: SparsityPattern,
    folder: Path,
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
) -> tuple[PackedStream | None, str | None]:
    """The packed copy to write beside the checkpoint (:class:`secateurs.workers.packed.PackedStream`), or why
    there is none."""
    if not pattern.is_nm:
        return None, f"pattern {pattern} is unstructured: packing stores N:M only"
    assert pattern.n is not None and pattern.m is not None
    if pattern.m > MAX_M:
        return None, f"the packed format stores N:M with M <= {MAX_M}, not {pattern}"
    targets = {
        streamed.stored_name(f"{layer.name}.weight"): layer.transposed for layers in per_block for layer in layers
    }
    return PackedStream(folder / PACKED_DIR, plan, targets, pattern.n, pattern.m), None


def _packed_report(summary: PackSummary | None, reason: str | None) -> PackedReport:
    if summary is None:
        return PackedReport(written=False, reason=reason)
    return PackedReport(
        written=True,
        path=PACKED_DIR,
        format=PACKED_FORMAT,
        pattern=summary.pattern,
        index_bits=summary.index_bits,
        dtypes=list(summary.dtypes),
        layers=[
            PackedLayer(
                name=layer.name,
                shape=layer.shape,
                dense_bytes=layer.dense_bytes,
                packed_bytes=layer.packed_bytes,
                ratio=layer.ratio,
            )
            for layer in summary.layers
        ],
        layers_dense_bytes=summary.layers_dense_bytes,
        layers_packed_bytes=summary.layers_packed_bytes,
        layers_ratio=summary.layers_packed_bytes / summary.layers_dense_bytes if summary.layers_dense_bytes else None,
        checkpoint_dense_bytes=summary.checkpoint_dense_bytes,
        checkpoint_packed_bytes=summary.checkpoint_packed_bytes,
        checkpoint_ratio=summary.checkpoint_packed_bytes / summary.checkpoint_dense_bytes,
        file_bytes=summary.file_bytes,
        seconds=summary.seconds,
    )


def run_job(
    spec: JobSpec,
    on_progress: ProgressCallback | None = None,
    *,
    output_dir: Path,
    overwrite: bool = False,
    should_stop: Callable[[], bool] | None = None,
    dense_cache: Path | None = None,
    job_id: str | None = None,
) -> Report:
    """Run one pruning job end to end and write ``output_dir`` (an HF folder + ``report.json``) atomically.

    ``on_progress`` receives a :class:`ProgressEvent` per stage and per pruned block; ``should_stop`` is
    polled between blocks and stops the job with :class:`JobCancelled`, leaving nothing behind.
    ``dense_cache``: the folder of the dense-perplexity cache (:mod:`secateurs.workers.dense_cache`; None: no
    cache); ``job_id`` names this job in the entries it stores.
    """
    try:
        configure_cpu_kernel()  # where the C++ extensions are built (SECATEURS_KERNEL_DIR), the packed kernel's ISA
        with heap_allocations() as heap:
            emit = on_progress or (lambda _event: None)
            cache = DenseCache(dense_cache) if dense_cache is not None and spec.dense_cache else None
            return _run(
                spec, emit, output_dir, overwrite, should_stop=should_stop, heap=heap, cache=cache, job_id=job_id
            )
    except (SecateursError, JobCancelled):
        raise
    except PatternError as exc:
        raise PruningError(str(exc), hint="exclude the layer with --exclude, or use another pattern") from None
    except FactorizationError as exc:
        raise PruningError(
            str(exc), hint="use more calibration samples or tokens, or raise --dampening (e.g. 0.1)"
        ) from None
    except torch.cuda.OutOfMemoryError as exc:
        raise PruningError(
            f"the device ran out of memory: {str(exc).splitlines()[0]}",
            hint="set --calibration-batch-size (e.g. 8) to prune in bounded memory, or use fewer samples",
        ) from None


_PROC_STATUS = Path("/proc/self/status")


def _reset_peak_memory(device: torch.device) -> bool:
    """Restart the peaks :class:`_Peaks` reads: Linux's VmHWM (``/proc/self/clear_refs``) and, on CUDA, torch's
    peak-allocation counter. False where the host peak cannot be reset (it then covers the process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _host_peak() -> int | None:
    """The process's peak resident set since its last reset (VmHWM), in bytes; None without /proc."""
    try:
        with _PROC_STATUS.open(encoding="ascii") as status:
            return next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), None)
    except (OSError, ValueError):
        return None


class _Peaks:
    """Peak memory of a job, stage by stage: :meth:`end` reads the peak of the stage that just ended and restarts
    the counters for the next, so the report says which stage set the job's peak (the largest of them)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset = _reset_peak_memory(device)
        self.by_stage: dict[Stage, int] = {}
        self.gpu = 0

    def end(self, stage: Stage) -> None:
        host = _host_peak()
        if host is not None:
            self.by_stage[stage] = host
        if self.device.type == "cuda":
            self.gpu = max(self.gpu, int(torch.cuda.max_memory_allocated(self.device)))
        if self.reset:
            self.reset = _reset_peak_memory(self.device)

    def report(self) -> MemoryReport:
        host = max(self.by_stage.values(), default=None)  # the job's peak: its largest stage's
        if self.reset:
            source = "VmHWM of the job's process, reset as each stage of the job started: the largest stage's"
        else:
            source = "VmHWM of the process's lifetime"
        return MemoryReport(
            peak_rss_bytes=host,
            peak_rss_source=source if host is not None else "not available (no /proc/self/status)",
            peak_device_bytes=self.gpu if self.device.type == "cuda" else None,
            peak_rss_by_stage=dict(self.by_stage) if self.reset and self.by_stage else None,
        )


def _run(
    spec: JobSpec,
    emit: ProgressCallback,
    output_dir: Path,
    overwrite: bool,
    *,
    should_stop: Callable[[], bool] | None,
    heap: Heap,
    cache: DenseCache | None = None,
    job_id: str | None = None,
) -> Report:
    clock = _Clock(time.perf_counter())
    check_output_dir(output_dir, overwrite=overwrite)
    device = resolve_device(spec.device)
    peaks = _Peaks(device)
    dtype = resolve_dtype(spec.dtype, device)
    pattern = _pattern(spec)
    config = PruneConfig(
        method=spec.method.value,
        pattern=pattern,
        blocksize=spec.blocksize,
        dampening=spec.dampening,
        exclude=spec.exclude,
        batch_size=spec.calibration_batch_size,
        calibration_precision=spec.calibration_precision,
        refine_iterations=spec.refine_iterations,
        dense_target=spec.dense_target,
    )

    emit(ProgressEvent(stage=Stage.LOAD, message=f"loading {spec.model}"))
    streamed, tokenizer, folder = load_model(spec, dtype)
    peaks.end(Stage.LOAD)
    try:
        return _run_streamed(
            spec,
            emit=emit,
            output_dir=output_dir,
            overwrite=overwrite,
            streamed=streamed,
            tokenizer=tokenizer,
            config=config,
            should_stop=should_stop,
            heap=heap,
            clock=clock,
            peaks=peaks,
            folder=folder,
            cache=cache,
            job_id=job_id,
        )
    finally:
        streamed.close()


# One block's weights (at the job's dtype) from which the job maps its large allocations instead of reusing the
# heap (:meth:`secateurs.workers.allocator.Heap.map_large_allocations`): TinyLlama's shape in fp32 (176 MB) and
# LLaMA-7B's in bf16 (404 MB) are above, SmolLM2's (14 MB) and Gemma-3-270M's (~20 MB) below.
_LARGE_BLOCK_BYTES = 64 << 20


def _run_streamed(
    spec: JobSpec,
    *,
    emit: ProgressCallback,
    output_dir: Path,
    overwrite: bool,
    streamed: StreamedModel,
    tokenizer: Any,
    config: PruneConfig,
    should_stop: Callable[[], bool] | None,
    heap: Heap,
    clock: _Clock,
    peaks: _Peaks,
    folder: Path,
    cache: DenseCache | None,
    job_id: str | None,
) -> Report:
    device = resolve_device(spec.device)
    dtype = streamed.dtype
    pattern = config.pattern
    model = streamed.model
    _, blocks, per_block = plan_layers(model, config)  # shape errors surface here, before any heavy work
    if sum(t.numel() * t.element_size() for t in blocks[0].parameters()) >= _LARGE_BLOCK_BYTES:
        heap.map_large_allocations()
    load_seconds = clock.since()
    bos = _bos_id(spec, tokenizer)

    emit(ProgressEvent(stage=Stage.CALIBRATE, message="reading and tokenizing text"))
    data_started = time.perf_counter()
    calibration: torch.Tensor | None = None
    calib_text: LoadedText | None = None
    calib_tokens: int | None = None
    if spec.calibration is not None and spec.method is not Method.MAGNITUDE:
        calib_text = read_text(spec.calibration)
        tokens = tokenize(tokenizer, calib_text.text)
        calib_tokens = tokens.numel()
        calibration = calibration_windows(
            tokens, spec.calibration_samples, spec.calibration_seqlen, spec.seed, bos_token_id=bos
        )
    windows: torch.Tensor | None = None
    eval_text: LoadedText | None = None
    eval_tokens = 0
    if spec.evaluation is not None:
        eval_text = read_text(spec.evaluation)
        stream = tokenize(tokenizer, eval_text.text)
        eval_tokens = stream.numel()
        if eval_tokens < spec.eval_seqlen:
            raise DataSourceError(
                f"evaluation text has {eval_tokens} tokens, fewer than one window of {spec.eval_seqlen}",
                hint="use a longer evaluation text or a smaller --eval-seqlen",
            )
        windows = eval_windows(stream, spec.eval_seqlen, spec.eval_windows)
    data_seconds = time.perf_counter() - data_started
    peaks.end(Stage.CALIBRATE)

    dense, eval_dense_seconds, dense_hit = cached_dense_perplexity(
        cache,
        lambda: _evaluate(
            model, windows, spec, bos, device, emit=emit, stage=Stage.EVALUATE_DENSE, label="dense", source=streamed
        ),
        model_folder=folder,
        text_sha256=eval_text.sha256 if eval_text else None,
        windows=windows,
        bos_token_id=bos,
        dtype=dtype,
        device=device,
        batch_size=spec.eval_batch_size,
        job_id=job_id,
        output=output_dir,
        emit=emit,
    )
    heap.release()  # before the stage's peak is read: the next stage's starts from what stays resident
    peaks.end(Stage.EVALUATE_DENSE)
    emit(
        ProgressEvent(
            stage=Stage.PRUNE,
            message=f"{spec.method.value} {pattern} on {len(blocks)} blocks",
            blocks=len(blocks),
        )
    )

    def on_block(progress: BlockProgress) -> None:
        heap.between_blocks()
        emit(
            ProgressEvent(
                stage=Stage.PRUNE,
                message=f"block {progress.index + 1}/{progress.total}",
                block=progress.index + 1,
                blocks=progress.total,
                seconds=progress.seconds,
                layers=[_layer_report(r) for r in progress.layers],
            )
        )
        if should_stop is not None and should_stop():
            raise JobCancelled(f"cancelled after block {progress.index + 1} of {progress.total}")

    # Everything is written into a fresh temporary folder of this attempt (atomic_output_dir): the checkpoint
    # block by block as the driver prunes, then the pruned evaluation reads its blocks back from there.
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        plan = plan_checkpoint(streamed)
        packed, packed_reason = _packing_plan(streamed, per_block, pattern, tmp, plan)
        writer = CheckpointWriter(tmp, plan)
        sink = PrunedBlocks(streamed, writer, check=lambda layers: _verify(model, list(layers), pattern), packed=packed)
        sink.write(streamed.read_outside_tensors())  # one tensor in memory at a time
        result = prune_model_(model, calibration, config, device=device, on_block=on_block, source=sink)
        writer.finish()
        prune_seconds = result.seconds
        layers = list(result.layers)
        verified = sink.verified
        if device.type == "cuda":
            torch.cuda.empty_cache()

        save_started = time.perf_counter()
        streamed.save_config(tmp)
        tokenizer.save_pretrained(tmp)
        summary = sink.packed.finish(tmp) if sink.packed is not None else None
        packed_report = _packed_report(summary, sink.packing_failed or packed_reason)
        save_seconds = time.perf_counter() - save_started

        heap.release()
        peaks.end(Stage.PRUNE)
        streamed.read_from(tmp)
        pruned, eval_pruned_seconds = _evaluate(
            model, windows, spec, bos, device, emit=emit, stage=Stage.EVALUATE_PRUNED, label="pruned", source=streamed
        )
        heap.release()
        peaks.end(Stage.EVALUATE_PRUNED)
        speed, decode = _measure_speed(
            tmp, streamed, layers, pattern, spec, device=device, emit=emit, should_stop=should_stop
        )
        peaks.end(Stage.MEASURE_SPEED)

        emit(ProgressEvent(stage=Stage.SAVE, message=f"saving to {output_dir}"))
        report_started = time.perf_counter()
        done = [r for r in layers if not r.skipped]
        pruned_weights = sum(r.shape[0] * r.shape[1] for r in done)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in done)
        total_params = sum(p.numel() for p in model.parameters())
        protocol = None
        if dense is not None and eval_text is not None:
            protocol = PerplexityProtocol(
                text=eval_text.source,
                text_sha256=eval_text.sha256,
                text_tokens=eval_tokens,
                window=dense.seqlen,
                windows=dense.windows,
                predicted_tokens=dense.predicted_tokens,
                bos=dense.bos,
                batch_size=spec.eval_batch_size,
            )
        config_obj = getattr(model, "config", None)
        report = Report(
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            spec=spec,
            model=ModelInfo(
                source=spec.model,
                revision=spec.revision,
                architecture=type(model).__name__,
                model_type=str(getattr(config_obj, "model_type", "unknown")),
                parameters=total_params,
                decoder_blocks=len(blocks),
                dtype=str(dtype).removeprefix("torch."),
            ),
            perplexity=PerplexityReport(
                dense=dense.value if dense else None,
                pruned=pruned.value if pruned else None,
                protocol=protocol,
                dense_cached=dense_hit,
            ),
            sparsity=SparsityReport(
                pattern=str(pattern),
                method=spec.method,
                verified=verified,
                layers_pruned=len(done),
                layers_skipped=len(layers) - len(done),
                pruned_fraction=zeros / pruned_weights if pruned_weights else 0.0,
                model_fraction=zeros / total_params if total_params else 0.0,
            ),
            layers=[_layer_report(r) for r in layers],
            calibration=CalibrationReport(
                source=calib_text.source if calib_text else None,
                sha256=calib_text.sha256 if calib_text else None,
                samples=int(calibration.shape[0]) if calibration is not None else 0,
                seqlen=int(calibration.shape[1]) if calibration is not None else 0,
                seed=spec.seed,
                text_tokens=calib_tokens,
                bos=bos is not None and calibration is not None,
                batch_size=spec.calibration_batch_size,
                precision=spec.calibration_precision,
            ),
            environment=_environment(device),
            timings=Timings(
                load_seconds=load_seconds,
                data_seconds=data_seconds,
                eval_dense_seconds=eval_dense_seconds,
                prune_seconds=prune_seconds,
                eval_pruned_seconds=eval_pruned_seconds,
                save_seconds=save_seconds + time.perf_counter() - report_started,
                total_seconds=clock.since(),
            ),
            memory=peaks.report(),
            packed=packed_report,
            speed=speed,
            decode=decode,
        )
        (tmp / REPORT_NAME).write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    emit(ProgressEvent(stage=Stage.DONE, message=f"wrote {output_dir}", seconds=clock.since()))
    return report
