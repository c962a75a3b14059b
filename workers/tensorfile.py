"""Read single tensors out of a safetensors file into plain process memory, one at a time; write one a tensor at
a time (:class:`TensorWriter`).

``safetensors.safe_open`` memory-maps the whole file: every page a read touches stays resident (and counted in
the process's RSS) until the file is closed, so reading a whole checkpoint through it holds the file's bytes
twice at its peak (the mapping plus the copies). :class:`TensorFile` reads each tensor with ``readinto`` into
a fresh tensor instead: memory grows by exactly the tensors kept, which is what ``secateurs.load`` promises for
the packed form. The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
header length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data, offsets relative to its start.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import struct
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch

from secateurs.app.errors import ModelSourceError, StorageError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_HINT = "the file is damaged or incomplete: write it again (secateurs prune) or download it again"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class TensorFile:
    """A safetensors file opened for reading tensors by name (``with TensorFile(path) as f: f.get(name)``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stream: io.BufferedReader = path.open("rb")
        try:
            self._entries, self.metadata, self._data_start = self._read_header()
        except BaseException:
            self._stream.close()
            raise

    def _read_header(self) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
        size_bytes = self._stream.read(8)
        file_size = self.path.stat().st_size
        if len(size_bytes) < 8:
            raise ModelSourceError(f"{self.path} is not a safetensors file (shorter than 8 bytes)", hint=_HINT)
        (length,) = struct.unpack("<Q", size_bytes)
        if length > min(_MAX_HEADER, file_size - 8):
            raise ModelSourceError(f"{self.path} is not a safetensors file (header length {length})", hint=_HINT)
        try:
            header = json.loads(self._stream.read(length))
        except ValueError as exc:
            raise ModelSourceError(
                f"{self.path}: the safetensors header is not valid JSON: {exc}", hint=_HINT
            ) from None
        if not isinstance(header, dict):
            raise ModelSourceError(f"{self.path}: the safetensors header is not a JSON object", hint=_HINT)
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + length
        for name, entry in header.items():
            self._check_entry(name, entry, file_size - data_start)
        return header, metadata, data_start

    def _check_entry(self, name: str, entry: Any, data_bytes: int) -> None:
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelSourceError(
                f"{self.path}: tensor {name} has an unreadable header entry {entry!r}", hint=_HINT
            ) from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or end - begin != expected or not 0 <= begin <= end <= data_bytes:
            raise ModelSourceError(
                f"{self.path}: tensor {name} ({entry['dtype']} {shape}) claims bytes {begin}..{end} of "
                f"{data_bytes}, which does not fit (it needs {expected})",
                hint=_HINT,
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def describe(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor, without reading it."""
        entry = self._entries[name]
        return DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])

    def get(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor holding ``name``'s bytes (KeyError if the file has no such tensor)."""
        entry = self._entries[name]
        dtype, shape = self.describe(name)
        begin, end = (int(o) for o in entry["data_offsets"])
        tensor = torch.empty(shape, dtype=dtype)
        if end == begin:
            return tensor
        target = tensor.view(-1).view(torch.uint8).numpy().data  # the tensor's own bytes
        self._stream.seek(self._data_start + begin)
        done = 0
        while done < end - begin:
            count = self._stream.readinto(target[done:])
            if not count:
                raise ModelSourceError(f"{self.path}: tensor {name} is cut short (the file ends early)", hint=_HINT)
            done += count
        return tensor

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def storage_error(path: Path, exc: OSError) -> StorageError:
    """A :class:`StorageError` naming the file a write failed on, and what to do about it."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "the disk is full" if full else (exc.strerror or type(exc).__name__)
    return StorageError(
        f"could not write {path}: {reason}",
        hint="free disk space where the output goes, or choose another --output"
        if full
        else "check that the output folder is writable",
    )


# The reference writer (safetensors ``serialize``) lays tensors out by descending dtype, then by name; this is its
# dtype order (checked against safetensors 0.8 ``save_file``), so files written here are byte-identical to it.
_LAYOUT_RANK = {
    name: rank
    for rank, name in enumerate(
        ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")
    )
}


class TensorWriter:
    """A safetensors file written one tensor at a time, in any order: ``plan`` (``[(name, dtype, shape)]``) fixes
    the header up front, laid out as the reference writer does (descending dtype, then name; the header padded
    with spaces to 8 bytes), and :meth:`write` puts each tensor at its offset. So the file is byte-identical to
    ``safetensors.torch.save_file`` of the same tensors while memory stays at one tensor.

    Every ``OSError`` becomes a :class:`StorageError` naming the file. :meth:`close` checks that every planned
    tensor was written.
    """

    def __init__(
        self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        layout = sorted(plan, key=lambda entry: (-_LAYOUT_RANK[NAMES[entry[1]]], entry[0]))
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self._slots: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, dtype, shape in layout:
            if name in self._slots:
                raise ValueError(f"{path}: tensor {name} is planned twice")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._slots[name] = (offset, dtype, tuple(shape))
            offset += size
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        try:
            self._stream: io.BufferedWriter = path.open("wb")
        except OSError as exc:
            raise storage_error(path, exc) from None
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self._stream.write(data)
        except OSError as exc:
            self.abort()
            raise storage_error(self.path, exc) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (its dtype and shape must be the plan's)."""
        if name not in self._slots or name in self._written:
            raise ValueError(f"{self.path}: {name} is {'written already' if name in self._written else 'not planned'}")
        offset, dtype, shape = self._slots[name]
        if (dtype, shape) != (tensor.dtype, tuple(tensor.shape)):
            raise ValueError(
                f"{self.path}: {name} is planned as {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        self._written.add(name)
        if tensor.numel():
            try:
                self._stream.seek(self._data_start + offset)
            except OSError as exc:
                self.abort()
                raise storage_error(self.path, exc) from None
            self._write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        """Finish the file (every planned tensor written, else ``ValueError``)."""
        missing = [name for name in self._slots if name not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: closed before {missing[0]} (and {len(missing) - 1} more) was written")
        try:
            self._stream.close()
        except OSError as exc:
            raise storage_error(self.path, exc) from None

    def abort(self) -> None:
        """Close without the completeness check (the caller removes the partial file's folder)."""
        with contextlib.suppress(OSError):
            self._stream.close()


def write_tensors(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file (the layout of ``safetensors.torch.save_file``)."""
    writer = TensorWriter(path, [(name, t.dtype, tuple(t.shape)) for name, t in tensors], metadata)
    try:
        for name, tensor in tensors:
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    writer.close()
