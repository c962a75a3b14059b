"""Folders that appear whole or not at all: shared by the worker's artifacts and the CLI's downloads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(tmp: Path, target: Path, prefix: str) -> None:
    """Rename the finished folder ``tmp`` to ``target`` in one step.

    An existing non-empty ``target`` is first moved aside (into a ``prefix``-named sibling) and deleted only once
    the new folder is in place, so at every instant ``target`` is either the old folder or the new one.
    """
    old: Path | None = None
    if target.is_dir():
        if any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f"{prefix}{target.name}-old-", dir=target.parent))
            os.replace(target, old / "previous")
        else:
            target.rmdir()
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
