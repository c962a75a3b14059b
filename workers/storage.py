"""Artifacts appear whole or not at all: written into a temporary sibling folder, then renamed into place."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from secateurs.app.errors import OutputExistsError
from secateurs.app.files import replace_dir

log = logging.getLogger(__name__)

TMP_PREFIX = ".secateurs-tmp-"


def check_output_dir(path: Path, *, overwrite: bool) -> None:
    """Refuse early (before any work) when ``path`` already holds something and ``overwrite`` is off."""
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a folder", hint="choose another --output path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {path} is not empty",
            hint="choose another --output, or pass --overwrite to replace it",
        )


def _readable(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and some writers make files 0600: give them the usual modes (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_output_dir(path: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it becomes ``path`` in one rename.

    On any exception the temporary folder is removed and ``path`` is untouched. With ``overwrite``, an existing
    ``path`` is moved aside first and deleted only after the new folder is in place.
    """
    check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent))
    try:
        yield tmp
        _readable(tmp)
        replace_dir(tmp, path, TMP_PREFIX)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
