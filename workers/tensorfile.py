"""Read single tensors out of a safetensors file into plain process memory, one at a time.

``safetensors.safe_open`` memory-maps the whole file: every page a read touches stays resident (and counted in
the process's RSS) until the file is closed, so reading a whole checkpoint through it holds the file's bytes
twice at its peak (the mapping plus the copies). :class:`TensorFile` reads each tensor with ``readinto`` into
a fresh tensor instead: memory grows by exactly the tensors kept, which is what ``secateurs.load`` promises for
the packed form. The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
header length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data, offsets relative to its start.
"""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch

from secateurs.app.errors import ModelSourceError

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
