"""The Python API behind ``secateurs.prune`` and ``secateurs.load``: the same job as ``secateurs prune``, for
notebooks and scripts, and the loader users run on its output.

:func:`prune` builds the same :class:`~secateurs.app.schemas.JobSpec` as the CLI and the REST API (same
validation, same errors: every problem a user can act on is a :class:`~secateurs.app.errors.SecateursError`)
and runs the same :func:`~secateurs.workers.pipeline.run_job`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from transformers import PreTrainedModel

from secateurs.app.errors import InvalidSpecError, ModelSourceError
from secateurs.app.schemas import JobSpec, Method, ProgressEvent, Report, Stage, TextSource, describe_validation_error
from secateurs.app.settings import get_settings
from secateurs.workers.pipeline import quiet_libraries, run_job
from secateurs.workers.runtime import load_pruned

log = logging.getLogger(__name__)

TextLike = str | Path | TextSource | Mapping[str, Any]


def _text_source(value: TextLike | None) -> TextSource | dict[str, Any] | None:
    """A path (str or Path, ``~`` expanded) names a local file; a TextSource or a dict ({"dataset": ...}) passes
    as it is."""
    if value is None or isinstance(value, TextSource):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    return TextSource(file=str(Path(value).expanduser()))


def job_spec(
    model: str | Path,
    *,
    method: Method | str = Method.SPARSEGPT,
    pattern: str = "2:4",
    calibration: TextLike | None = None,
    evaluation: TextLike | None = None,
    **options: Any,
) -> JobSpec:
    """The :class:`JobSpec` for these arguments (fields as in ``POST /v1/jobs``), or :class:`InvalidSpecError`
    naming every field that is wrong."""
    try:
        return JobSpec.model_validate(
            {
                "model": str(model),  # a hub id, or a local folder (run_job expands ~)
                "method": method,
                "pattern": pattern,
                "calibration": _text_source(calibration),
                "evaluation": _text_source(evaluation),
                **options,
            }
        )
    except ValidationError as exc:
        raise InvalidSpecError(
            describe_validation_error(exc), hint="the fields are those of `secateurs prune --help` and POST /v1/jobs"
        ) from None


def _log_progress(event: ProgressEvent) -> None:
    if event.stage is Stage.PRUNE and event.block is not None:
        log.info("pruned block %d/%d in %.1f s", event.block, event.blocks or 0, event.seconds or 0.0)
    else:
        log.info("%s: %s", event.stage.value, event.message)


def prune(
    model: str | Path,
    *,
    method: Method | str = Method.SPARSEGPT,
    pattern: str = "2:4",
    calibration: TextLike | None = None,
    evaluation: TextLike | None = None,
    output: str | Path,
    overwrite: bool = False,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    **options: Any,
) -> Report:
    """Prune ``model`` (a local Hugging Face folder or a hub id) and write ``output`` (an HF folder, its packed
    N:M copy in ``packed/`` and ``report.json``), atomically; return the report.

    The job is the one ``secateurs prune`` runs: SparseGPT (Frantar & Alistarh, ICML 2023) by default, one
    decoder block at a time. ``calibration`` and ``evaluation`` are a text file's path, a
    :class:`~secateurs.app.schemas.TextSource` or a dict like ``{"dataset": "wikitext", "dataset_config":
    "wikitext-2-raw-v1"}``. ``options`` are the other :class:`JobSpec` fields (``calibration_samples``,
    ``calibration_seqlen``, ``eval_seqlen``, ``eval_windows``, ``device``, ``dtype``, ``seed``, ...).
    ``on_progress`` sees one event per stage and per pruned block (default: logged at INFO). The dense
    perplexity is computed once per model, text and protocol and cached in ``$SECATEURS_DENSE_CACHE_DIR``
    (default ``<cache_dir>/dense-perplexity``); ``dense_cache=False`` always computes it.

    Raises :class:`~secateurs.app.errors.SecateursError` subclasses with a message and a hint: a wrong
    field (:class:`InvalidSpecError`), an unusable model or text, a missing device, an existing ``output``.
    """
    spec = job_spec(model, method=method, pattern=pattern, calibration=calibration, evaluation=evaluation, **options)
    quiet_libraries()
    return run_job(
        spec,
        on_progress or _log_progress,
        output_dir=Path(output),
        overwrite=overwrite,
        dense_cache=get_settings().local_dense_cache_dir,
    )


def load(
    path: str | Path,
    *,
    device: str = "auto",
    dtype: torch.dtype | str | None = None,
    packed: bool | None = None,
    verify: bool = True,
) -> PreTrainedModel:
    """Load a pruned output folder (what :func:`prune`, ``secateurs prune`` or ``secateurs download`` wrote)
    for inference: a transformers causal LM in eval mode on ``device``, ready for ``generate``.

    When the folder has its packed N:M copy (``packed/``, written for every N:M job), the pruned linears are
    :class:`~secateurs.kernels.sparse.packing.PackedLinear` modules built from it, never from dense weights: each
    call runs the fastest registered kernel that takes it, else the reference (decompress, then dense).
    ``secateurs.workers.runtime.paths_that_ran(model)`` says which ran; ``model.secateurs_source`` where the
    model came from. Without a packed copy the dense-with-zeros HF folder loads (a log line says so).

    ``device``: ``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``. ``dtype``: a torch dtype or
    its name (``float32``, ``bfloat16``, ``float16``); ``None`` keeps the checkpoint's (a packed model converts
    its kept values, never a dense copy). ``packed``: ``None`` uses the packed copy when there is one, ``True``
    requires it, ``False`` loads the dense folder. ``verify``: check every tensor's sha256 against the packed
    manifest (shapes, dtypes and positions are always checked).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        raise ModelSourceError(
            f"{folder} {what}: not a secateurs output folder",
            hint="pass the folder `secateurs prune --output` or `secateurs download --output` wrote",
        )
    quiet_libraries()
    model = load_pruned(folder, device=device, dtype=dtype, packed=packed, verify=verify)
    assert isinstance(model, PreTrainedModel)
    return model
