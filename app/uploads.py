"""Uploads: streamed to disk with a size cap counted as bytes arrive; model archives extracted safely.

An upload lands in ``uploads/<id>/`` as ``text`` (a file) or ``model/`` (an extracted HF folder); a job
names it ``upload:<id>``. Archives (.tar, .tar.gz, .zip) may hold the folder itself or one top folder.
Members that are links, absolute, contain ``..`` or would exceed the cap once extracted are refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from fastapi.concurrency import run_in_threadpool

from secateurs.app.errors import DataSourceError, ModelSourceError, UploadTooLargeError
from secateurs.app.schemas import Upload
from secateurs.app.sources import check_model_folder, is_upload_id

Kind = Literal["model", "text"]
_META = "upload.json"


def _too_large(cap: int) -> UploadTooLargeError:
    return UploadTooLargeError(
        f"upload exceeds this server's cap of {cap} bytes",
        hint="upload a smaller archive, use a hub id, or ask the operator to raise SECATEURS_MAX_UPLOAD_BYTES",
    )


def _member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith("\\"):
        raise ModelSourceError(f"archive member {name!r} escapes the folder", hint="archive the model folder itself")
    return path


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:*")
    except tarfile.TarError:
        raise ModelSourceError(
            "the model upload is not a .tar, .tar.gz or .zip archive",
            hint="archive the HF folder, e.g. tar czf model.tgz -C my-model .",
        ) from None


def _extract(archive: Path, dest: Path, cap: int) -> None:
    total = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = dest / _member_path(info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ModelSourceError(f"archive member {info.filename!r} is a link", hint="archive real files")
                total += info.file_size
                if total > cap:
                    raise _too_large(cap)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        return
    with _open_tar(archive) as tf:
        for member in tf:
            target = dest / _member_path(member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise ModelSourceError(
                    f"archive member {member.name!r} is a link or device", hint="archive real files only"
                )
            total += member.size
            if total > cap:
                raise _too_large(cap)
            target.parent.mkdir(parents=True, exist_ok=True)
            member_file: IO[bytes] | None = tf.extractfile(member)
            assert member_file is not None
            with member_file, target.open("wb") as out:
                shutil.copyfileobj(member_file, out, 1 << 20)


def _model_root(folder: Path) -> Path:
    """The folder holding config.json: ``folder`` itself or its single subfolder."""
    if (folder / "config.json").exists():
        return folder
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "config.json").exists():
        return children[0]
    raise ModelSourceError(
        "the archive holds no config.json at its top (or in a single top folder)",
        hint="archive the Hugging Face model folder, e.g. tar czf model.tgz -C my-model .",
    )


def _unpack(raw: Path, kind: Kind, tmp: Path, cap: int) -> None:
    """Check the raw upload and put it in place as ``tmp/text`` or ``tmp/model/``."""
    if kind == "text":
        try:
            raw.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataSourceError(
                f"the uploaded text is not UTF-8 (byte {exc.start})", hint="convert it to UTF-8"
            ) from None
        raw.rename(tmp / "text")
        return
    extracted = tmp / "extracted"
    extracted.mkdir()
    _extract(raw, extracted, cap)
    raw.unlink()
    model_root = _model_root(extracted)
    check_model_folder(model_root)
    model_root.rename(tmp / "model")
    shutil.rmtree(extracted, ignore_errors=True)


async def save_upload(chunks: AsyncIterator[bytes], kind: Kind, root: Path, cap: int) -> Upload:
    """Stream ``chunks`` to ``root/<id>/``, counting bytes; check and unpack; the upload appears whole or not."""
    upload_id = f"upl_{secrets.token_hex(10)}"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{upload_id}-", dir=root))
    try:
        digest = hashlib.sha256()
        size = 0
        raw = tmp / "raw"
        with raw.open("wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > cap:
                    raise _too_large(cap)
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise (DataSourceError if kind == "text" else ModelSourceError)(
                "the upload is empty", hint="send the file as the request body (application/octet-stream)"
            )
        await run_in_threadpool(_unpack, raw, kind, tmp, cap)  # file work off the event loop
        upload = Upload(
            id=upload_id,
            kind=kind,
            size=size,
            sha256=digest.hexdigest(),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        (tmp / _META).write_text(upload.model_dump_json(), encoding="utf-8")
        tmp.rename(root / upload_id)
        return upload
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_upload(root: Path, upload_id: str) -> Upload | None:
    meta = root / upload_id / _META
    if not is_upload_id(upload_id) or not meta.is_file():  # a malformed id never reaches the file system
        return None
    return Upload.model_validate(json.loads(meta.read_text(encoding="utf-8")))
