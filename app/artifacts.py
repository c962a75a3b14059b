"""A succeeded job's output folder, served file by file or as one streamed tar (no temporary archive).

The folder has three parts, which a client may take alone (``?part=``): ``dense``, the plain Hugging Face
checkpoint (config, safetensors, tokenizer); ``packed``, the packed N:M copy in ``packed/``; ``report``,
``report.json``. For SmolLM2-135M in fp32 the first is 538 MB and the second 339 MB: nobody should have to take both.
"""

from __future__ import annotations

import tarfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Literal, get_args

from secateurs.app.errors import JobNotFoundError
from secateurs.app.schemas import Artifact

_CHUNK = 1 << 20

Part = Literal["dense", "packed", "report"]
PARTS: tuple[Part, ...] = get_args(Part)
PACKED_FOLDER = "packed"  # where the worker writes the packed copy (secateurs.workers.packed.PACKED_DIR)
REPORT_FILE = "report.json"


def artifact_part(relative: str) -> Part:
    """Which part of the output folder the file ``relative`` (a POSIX path inside it) belongs to."""
    if relative == REPORT_FILE:
        return "report"
    if relative.split("/", 1)[0] == PACKED_FOLDER:
        return "packed"
    return "dense"


def list_artifacts(folder: Path, parts: Collection[Part] | None = None) -> list[Artifact]:
    """Every file of the folder (or only those of ``parts``), sorted, with its size."""
    found = (
        Artifact(path=path.relative_to(folder).as_posix(), size=path.stat().st_size)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    )
    return [artifact for artifact in found if not parts or artifact_part(artifact.path) in parts]


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


def tar_stream(folder: Path, parts: Collection[Part] | None = None) -> Iterator[bytes]:
    """The folder (or its ``parts``) as a POSIX tar, produced while it is sent: a header, the file in chunks,
    padding; per file."""
    for artifact in list_artifacts(folder, parts):
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
