"""A succeeded job's output folder, served file by file or as one streamed tar (no temporary archive)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from secateurs.app.errors import JobNotFoundError
from secateurs.app.schemas import Artifact

_CHUNK = 1 << 20


def list_artifacts(folder: Path) -> list[Artifact]:
    return [
        Artifact(path=path.relative_to(folder).as_posix(), size=path.stat().st_size)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def artifact_file(folder: Path, relative: str) -> Path:
    """The file ``relative`` inside ``folder``; never anything outside it."""
    base = folder.resolve()
    missing = JobNotFoundError(f"no artifact {relative!r}", hint="list them with GET /v1/jobs/{id}/artifacts")
    try:
        path = (base / relative).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise missing
    except (OSError, ValueError, RuntimeError):  # a NUL, a name too long, a symlink loop: no such artifact
        raise missing from None
    return path


def tar_stream(folder: Path) -> Iterator[bytes]:
    """The folder as a POSIX tar, produced while it is sent: a header, the file in chunks, padding; per file."""
    for artifact in list_artifacts(folder):
        path = folder / artifact.path
        info = tarfile.TarInfo(artifact.path)
        stat = path.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as src:
            while chunk := src.read(_CHUNK):
                yield chunk
        if remainder := info.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - remainder)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)
