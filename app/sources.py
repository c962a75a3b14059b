"""Where a job's model and texts may come from, checked at the API's door (GUIDE §3, "Security").

A model is a hub id (+ revision), an absolute local path under one of the allow-listed roots, or
``upload:<id>`` (an archive uploaded before). Texts likewise: a dataset name, an allow-listed file, or an upload.
Local paths are refused when they contain ``..`` or resolve (symlinks followed) outside every root. A model
folder's ``config.json`` is checked before anything loads it: safetensors only, no remote code, no
quantization config. Nothing here imports torch; the worker repeats the checks that need transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from secateurs.app.errors import DataSourceError, ModelSourceError, PathNotAllowedError
from secateurs.app.schemas import JobSpec, TextSource

UPLOAD_PREFIX = "upload:"
_UPLOAD_ID = re.compile(r"^upl_[0-9a-f]{20}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_model_folder(folder: Path) -> None:
    """Safetensors weights, a readable config.json with a model_type, no remote code, no quantization."""
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder} has no config.json", hint="pass a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        found = f" (found pickle weights: {', '.join(pickles[:3])})" if pickles else ""
        raise ModelSourceError(
            f"{folder} has no *.safetensors weights{found}; secateurs never loads pickle checkpoints",
            hint="convert the checkpoint to safetensors (model.save_pretrained(dir, safe_serialization=True))",
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{folder}/config.json is not valid JSON: {exc}", hint="fix or replace it") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelSourceError(f"{folder}/config.json has no model_type", hint="pass a Hugging Face model folder")
    if config.get("auto_map"):
        raise ModelSourceError(
            f"{folder} needs remote code (config.json has auto_map); secateurs never runs code from a checkpoint",
            hint="use a model whose architecture ships with transformers",
        )
    if "quantization_config" in config:
        raise ModelSourceError(
            f"{folder}/config.json carries a quantization_config; secateurs prunes plain checkpoints",
            hint="dequantize the model first",
        )


def allowed_path(raw: str, roots: list[Path], what: str) -> Path:
    """``raw`` resolved, if it is absolute, has no ``..`` and lies under one of ``roots`` after symlinks."""
    path = Path(raw)
    if not path.is_absolute():
        raise PathNotAllowedError(
            f"{what} path {raw!r} is relative; the server cannot know what it is relative to",
            hint="send an absolute path (the secateurs CLI does this for you), a hub id like org/name, or upload it",
        )
    if ".." in PurePosixPath(raw).parts:
        raise PathNotAllowedError(f"{what} path {raw!r} contains '..'", hint="send the plain absolute path")
    if not roots:
        raise PathNotAllowedError(
            f"this server reads no local paths ({what} {raw!r})",
            hint="upload the files (POST /v1/uploads), use a hub id, or ask the operator to set "
            "SECATEURS_ALLOWED_ROOTS",
        )
    resolved = path.resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    shown = ", ".join(str(root) for root in roots)
    escape = " (it is a symlink that leads outside them)" if resolved != path else ""
    raise PathNotAllowedError(
        f"{what} path {raw!r} is not under the server's allowed roots ({shown}){escape}",
        hint="put the files under an allowed root, or upload them with POST /v1/uploads",
    )


def upload_path(raw: str, uploads: Path, kind: str) -> Path:
    """The stored file or folder of ``upload:<id>``."""
    upload_id = raw.removeprefix(UPLOAD_PREFIX)
    target = uploads / upload_id / kind
    if not _UPLOAD_ID.match(upload_id) or not target.exists():
        raise DataSourceError(
            f"no {kind} upload {upload_id!r}",
            hint=f"upload it first (POST /v1/uploads?kind={kind}) and use the id it returns",
        )
    return target


def _text(source: TextSource | None, roots: list[Path], uploads: Path, what: str) -> TextSource | None:
    if source is None or source.file is None:
        return source
    if source.file.startswith(UPLOAD_PREFIX):
        path = upload_path(source.file, uploads, "text")
    else:
        path = allowed_path(source.file, roots, what)
        if not path.is_file():
            raise DataSourceError(f"{what} file {source.file} does not exist", hint="pass an existing text file")
    return source.model_copy(update={"file": str(path)})


def resolve_sources(spec: JobSpec, roots: list[Path], uploads: Path) -> JobSpec:
    """The spec with every local source checked and replaced by the server path it names."""
    model = spec.model
    if model.startswith(UPLOAD_PREFIX):
        folder = upload_path(model, uploads, "model")
        check_model_folder(folder)
        model = str(folder)
    elif model.startswith(("/", ".", "~")) or ".." in PurePosixPath(model).parts:
        folder = allowed_path(model, roots, "model")
        if not folder.is_dir():
            raise ModelSourceError(f"model folder {model} does not exist", hint="pass an existing model folder")
        check_model_folder(folder)
        model = str(folder)
    elif not _HUB_ID.match(model):
        raise ModelSourceError(
            f"model {model!r} is neither a hub id (org/name) nor an absolute path nor upload:<id>",
            hint="e.g. HuggingFaceTB/SmolLM2-135M-Instruct, /models/my-llama, or upload:upl_…",
        )
    return spec.model_copy(
        update={
            "model": model,
            "calibration": _text(spec.calibration, roots, uploads, "calibration"),
            "evaluation": _text(spec.evaluation, roots, uploads, "evaluation"),
        }
    )
