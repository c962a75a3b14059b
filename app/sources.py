"""Where a job's model and texts may come from, checked at the API's door (GUIDE §3, "Security").

A model is a hub id (+ revision), an absolute local path under one of the allow-listed roots, or
``upload:<id>`` (an archive uploaded before). Texts likewise: a dataset name, an allow-listed file, or an upload.
Local paths are refused when they contain ``..`` or resolve (symlinks followed) outside every root. What the
server can see is checked here, each problem with its own message: a path too long for the file system, a
missing path, a file where a folder is expected and the reverse, an empty or whitespace-only text. A model
folder's ``config.json`` is checked before anything loads it: safetensors only, no remote code, no
quantization config. Nothing here imports torch; the worker repeats the checks that need transformers (and a
tokenizer: a text too short for one window is a job failure that says how many tokens it has and needs).
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from secateurs.app.errors import DataSourceError, ModelSourceError, PathNotAllowedError, SecateursError
from secateurs.app.schemas import JobSpec, TextSource

UPLOAD_PREFIX = "upload:"
_UPLOAD_ID = re.compile(r"^upl_[0-9a-f]{20}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
NAME_MAX = 255  # bytes in one path component (Linux, macOS, Windows)
PATH_MAX = 4095  # bytes in a whole path (Linux's 4096 with its terminating NUL)
SAFETENSORS_INDEX = "model.safetensors.index.json"  # the standard index of a sharded checkpoint (transformers)
_WHITESPACE_SCAN = 64 << 20  # a longer text is not read to its end at the door: the worker checks it anyway


def _error_for(what: str) -> type[SecateursError]:
    return ModelSourceError if what == "model" else DataSourceError


def _kind(path: Path, what: str, shown: str) -> str:
    """'file', 'folder', 'other' or 'missing' for ``path`` (symlinks followed); unreadable is an error."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        raise _error_for(what)(
            f"{what} path {shown} cannot be read here ({exc.strerror or exc})",
            hint="check the path and that the server may read it",
        ) from None
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def check_model_path(folder: Path, shown: str) -> None:
    """``folder`` is an existing folder holding a usable model (:func:`check_model_folder`); else why not."""
    kind = _kind(folder, "model", shown)
    if kind == "missing":
        raise ModelSourceError(
            f"model folder {shown} does not exist", hint="pass an existing model folder, or a hub id like org/name"
        )
    if kind == "file":
        raise ModelSourceError(
            f"model path {shown} is a file, not a folder",
            hint=f"a model is a Hugging Face folder (config.json + *.safetensors): pass the folder, e.g. "
            f"{PurePosixPath(shown).parent}",
        )
    if kind != "folder":
        raise ModelSourceError(f"model path {shown} is not a folder", hint="pass a Hugging Face model folder")
    check_model_folder(folder)


def check_text_file(path: Path, what: str, shown: str) -> None:
    """``path`` is a regular file with some text in it (not only whitespace); else a message naming the problem.

    The bytes are read only until the first non-whitespace character (the first few, for any real text).
    """
    kind = _kind(path, what, shown)
    if kind == "missing":
        raise DataSourceError(f"{what} file {shown} does not exist", hint="pass the path of an existing text file")
    if kind == "folder":
        raise DataSourceError(
            f"{what} path {shown} is a folder, not a text file",
            hint=f"pass the text file itself, e.g. {PurePosixPath(shown) / 'wiki.test.raw'}",
        )
    if kind != "file":
        raise DataSourceError(f"{what} path {shown} is not a regular file", hint="pass the path of a UTF-8 text file")
    size = path.stat().st_size
    if size == 0:
        raise DataSourceError(f"{what} file {shown} is empty (0 bytes)", hint="give a file with real text in it")
    if _only_whitespace(path, what, shown):
        raise DataSourceError(
            f"{what} file {shown} holds only whitespace ({size} bytes)", hint="give a file with real text in it"
        )


def _only_whitespace(path: Path, what: str, shown: str) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    seen = 0
    try:
        with path.open("rb") as fh:
            while seen < _WHITESPACE_SCAN and (chunk := fh.read(1 << 16)):
                seen += len(chunk)
                if decoder.decode(chunk).strip():
                    return False
    except OSError as exc:
        raise DataSourceError(
            f"{what} file {shown} cannot be read here ({exc.strerror or exc})",
            hint="check the path and that the server may read it",
        ) from None
    return seen < _WHITESPACE_SCAN and not decoder.decode(b"", final=True).strip()


def _check_lengths(raw: str, what: str) -> None:
    """Paths the file system cannot hold are named as such (ENAMETOOLONG), before any system call sees them."""
    encoded = os.fsencode(raw)
    if len(encoded) > PATH_MAX:
        raise _error_for(what)(
            f"{what} path is {len(encoded)} bytes long; a path has at most {PATH_MAX}",
            hint="send the real path of the file or folder",
        )
    for part in PurePosixPath(raw).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise _error_for(what)(
                f"{what} path has a component of {len(os.fsencode(part))} bytes ({part[:32]!r}…); a file or folder "
                f"name has at most {NAME_MAX}",
                hint="send the real path of the file or folder",
            )


def check_model_folder(folder: Path) -> None:
    """Safetensors weights, a readable config.json with a model_type, no remote code, no quantization."""
    try:
        _check_model_folder(folder)
    except OSError as exc:
        raise ModelSourceError(
            f"model folder {folder} cannot be read here ({exc.strerror or exc})",
            hint="check the folder and that the server may read it",
        ) from None


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder} has no config.json", hint="pass a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        shard = _missing_shard(folder)
        if shard is not None:
            raise ModelSourceError(
                f"{folder}: {SAFETENSORS_INDEX} names {shard}, which is not there",
                hint="the checkpoint is incomplete: download it again, with every shard its index lists",
            )
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


def _missing_shard(folder: Path) -> str | None:
    """The first (by name) shard file that ``folder``'s safetensors index lists and the folder lacks; None without
    a usable index. Only plain file names count: a name with a path in it is the worker's to judge."""
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [str(file) for file in weight_map.values()]
    except (ValueError, KeyError, TypeError, AttributeError):  # not an index: the plain message stands
        return None
    plain = [file for file in sorted(set(files)) if file not in {"", ".."} and file == PurePosixPath(file).name]
    return next((file for file in plain if "\\" not in file and not (folder / file).is_file()), None)


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
    _check_lengths(raw, what)
    if not roots:
        raise PathNotAllowedError(
            f"this server reads no local paths ({what} {raw!r})",
            hint="upload the files (POST /v1/uploads), use a hub id, or ask the operator to set "
            "SECATEURS_ALLOWED_ROOTS",
        )
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a loop: RuntimeError before 3.13; NUL: ValueError
        code = errno.errorcode.get(getattr(exc, "errno", None) or 0, "")
        raise _error_for(what)(
            f"{what} path {raw!r} cannot be resolved ({code or type(exc).__name__}: {exc})",
            hint="send the real path; a symlink loop or an unreadable folder stops the lookup",
        ) from None
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    shown = ", ".join(str(root) for root in roots)
    escape = " (it is a symlink that leads outside them)" if resolved != path else ""
    raise PathNotAllowedError(
        f"{what} path {raw!r} is not under the server's allowed roots ({shown}){escape}",
        hint="put the files under an allowed root, or upload them with POST /v1/uploads",
    )


def is_upload_id(text: str) -> bool:
    """What ``POST /v1/uploads`` hands out: ``upl_`` and 20 hex digits."""
    return _UPLOAD_ID.fullmatch(text) is not None


def upload_path(raw: str, uploads: Path, kind: str) -> Path:
    """The stored file or folder of ``upload:<id>``."""
    upload_id = raw.removeprefix(UPLOAD_PREFIX)
    target = uploads / upload_id / kind
    if not is_upload_id(upload_id) or not target.exists():
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
    check_text_file(path, what, source.file)
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
        check_model_path(folder, model)
        model = str(folder)
    elif not _HUB_ID.fullmatch(model):
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
