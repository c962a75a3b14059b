"""The packed N:M checkpoint on disk: writing it beside a plain HF folder, unpacking it, loading it.

A packed folder (``OUT_DIR/packed/``) holds

* ``model.packed.safetensors``: every tensor of the source checkpoint, the pruned linears' weights replaced by
  ``<name>::values`` and ``<name>::indices`` (:mod:`secateurs.kernels.sparse.packing`), everything else unchanged;
* ``manifest.json``: format version, pattern, per-tensor source file, shape, dtype and sha256 of its raw bytes,
  the sha256 and safetensors metadata of every source file, and the bytes before and after;
* copies of the source folder's other files (config, tokenizer), so the folder stands alone.

:func:`unpack_checkpoint` rebuilds the source safetensors files tensor for tensor, checking each rebuilt tensor
against its recorded sha256 (and reporting whether whole files came out byte-identical, which they do when the
same safetensors version writes them). :func:`load_dense_model` builds the exact dense model in memory;
:func:`load_sparse_model` builds it with :class:`secateurs.kernels.sparse.packing.PackedLinear` modules instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from secateurs.app.errors import ModelSourceError
from secateurs.kernels.sparse.packing import (
    PackedWeight,
    PackingError,
    index_bits,
    pack_nm,
    unpack_nm,
)
from secateurs.workers.cpu_kernel import configure_cpu_kernel  # registers the CPU kernel with PackedLinear
from secateurs.workers.storage import atomic_output_dir
from secateurs.workers.tensorfile import TensorWriter

log = logging.getLogger(__name__)

PACKED_DIR = "packed"
PACKED_FILE = "model.packed.safetensors"
MANIFEST_NAME = "manifest.json"
FORMAT = "secateurs.packed/1"
VALUES, INDICES = "::values", "::indices"
_NOT_COPIED = {"report.json"}  # the source's sidecar report describes the job, not the weights
_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes in row-major order (what safetensors stores)."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().data).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PackedLayerSize:
    """Bytes of one packed weight before (dense, zeros stored) and after packing."""

    name: str
    shape: tuple[int, int]  # (out, in)
    dense_bytes: int
    packed_bytes: int

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.dense_bytes


@dataclass(frozen=True)
class PackSummary:
    """What :func:`write_packed` wrote; tensor bytes exclude the safetensors header (``file_bytes`` has it)."""

    folder: Path
    pattern: str
    index_bits: int
    dtypes: tuple[str, ...]
    layers: tuple[PackedLayerSize, ...]
    checkpoint_dense_bytes: int  # every tensor of the source checkpoint
    checkpoint_packed_bytes: int  # every tensor of the packed file
    file_bytes: int
    seconds: float

    @property
    def layers_dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def layers_packed_bytes(self) -> int:
        return sum(layer.packed_bytes for layer in self.layers)


def _source_files(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{checkpoint} has no *.safetensors files to pack", hint="pass a saved HF folder")
    return files


def _pack_layer(
    name: str, tensor: torch.Tensor, transposed: bool, n: int, m: int, *, record: dict[str, Any]
) -> PackedWeight:
    """Pack one pruned weight as stored (GPT-2 ``Conv1D``: [in, out], hence ``transposed``) and complete its
    manifest record with the packed shapes and bytes."""
    packed = pack_nm(tensor.T if transposed else tensor, n, m, name=name)  # [out, in]
    record.update(
        transposed=transposed,
        values_shape=list(packed.values.shape),
        indices_shape=list(packed.indices.shape),
        packed_bytes=packed.nbytes,
    )
    return packed


def write_packed(checkpoint: Path, dest: Path, targets: Mapping[str, bool], n: int, m: int) -> PackSummary:
    """Pack the weights named in ``targets`` (tensor name -> stored transposed, as GPT-2 ``Conv1D``) into ``dest``.

    ``dest`` must not exist yet (the caller writes into a temporary folder). Raises
    :class:`secateurs.kernels.sparse.packing.PackingError` when a weight is not N:M, :class:`ModelSourceError`
    when a named tensor is missing from the checkpoint.
    """
    started = time.perf_counter()
    index_bits(m)  # refuses M outside the format before any work
    dest.mkdir(parents=True)
    out: dict[str, torch.Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    files: list[dict[str, Any]] = []
    layers: list[PackedLayerSize] = []
    dtypes: set[str] = set()
    seen: set[str] = set()
    checkpoint_dense = 0
    for path in _source_files(checkpoint):
        with safe_open(path, framework="pt") as source:
            names = list(source.keys())
            files.append(
                {"name": path.name, "sha256": _sha256_file(path), "metadata": source.metadata(), "tensors": names}
            )
            for name in names:
                tensor = source.get_tensor(name)
                nbytes = tensor.numel() * tensor.element_size()
                checkpoint_dense += nbytes
                record: dict[str, Any] = {
                    "file": path.name,
                    "shape": list(tensor.shape),
                    "dtype": _dtype_name(tensor.dtype),
                    "sha256": tensor_sha256(tensor),
                    "bytes": nbytes,
                    "packed": name in targets,
                }
                if name in targets:
                    seen.add(name)
                    packed = _pack_layer(name, tensor, targets[name], n, m, record=record)
                    out[name + VALUES], out[name + INDICES] = packed.values, packed.indices
                    layers.append(PackedLayerSize(name, packed.shape, packed.dense_nbytes, packed.nbytes))
                    dtypes.add(record["dtype"])
                else:
                    if name.endswith((VALUES, INDICES)):
                        raise ModelSourceError(
                            f"{path.name} has a tensor named {name!r}, reserved by the packed format"
                        )
                    out[name] = tensor
                records[name] = record
    missing = sorted(set(targets) - seen)
    if missing:
        raise ModelSourceError(
            f"{checkpoint} has no tensor named {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint="the names given for packing must be the checkpoint's own tensor names",
        )
    save_file(out, str(dest / PACKED_FILE), metadata={"format": FORMAT})
    extra: dict[str, str] = {}
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name not in _NOT_COPIED:
            shutil.copy2(path, dest / path.name)
            extra[path.name] = _sha256_file(path)
    checkpoint_packed = sum(t.numel() * t.element_size() for t in out.values())
    manifest = _manifest(n, m, dtypes=dtypes, files=files, extra=extra, records=records, layers=layers)
    manifest["totals"].update(checkpoint_dense_bytes=checkpoint_dense, checkpoint_packed_bytes=checkpoint_packed)
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return PackSummary(
        folder=dest,
        pattern=f"{n}:{m}",
        index_bits=index_bits(m),
        dtypes=tuple(sorted(dtypes)),
        layers=tuple(layers),
        checkpoint_dense_bytes=checkpoint_dense,
        checkpoint_packed_bytes=checkpoint_packed,
        file_bytes=(dest / PACKED_FILE).stat().st_size,
        seconds=time.perf_counter() - started,
    )


def packed_shapes(shape: tuple[int, int], n: int, m: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of ``::values`` and ``::indices`` for an [out, in] weight (:func:`pack_nm`'s layout)."""
    out, inp = shape
    kept = inp // m * n
    return (out, kept), (out, -(-kept * index_bits(m) // 8))


class PackedStream:
    """``packed/`` written while the checkpoint is: every tensor of ``plan`` (``[(name, dtype, shape)]``, in the
    order :meth:`add` will deliver them) goes straight into the packed file, the weights named in
    ``targets`` (name → stored transposed) packed on the way; the manifest is written by :meth:`finish`.

    The same folder :func:`write_packed` makes from a finished checkpoint, without ever holding more than the
    tensors of one shard. A weight that turns out not N:M (or a target left dense) raises
    :class:`~secateurs.kernels.sparse.packing.PackingError`; the caller then drops the folder.
    """

    def __init__(
        self,
        dest: Path,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        targets: Mapping[str, bool],
        n: int,
        m: int,
    ) -> None:
        self.started = time.perf_counter()
        index_bits(m)  # refuses M outside the format before any work
        self.dest, self.targets, self.n, self.m = dest, dict(targets), n, m
        packed_plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in plan:
            if name in targets:
                weight_shape = (shape[1], shape[0]) if targets[name] else (shape[0], shape[1])
                values, indices = packed_shapes(weight_shape, n, m)
                packed_plan += [(name + VALUES, dtype, values), (name + INDICES, torch.uint8, indices)]
            elif name.endswith((VALUES, INDICES)):
                raise ModelSourceError(f"the checkpoint has a tensor named {name!r}, reserved by the packed format")
            else:
                packed_plan.append((name, dtype, shape))
        missing = sorted(set(targets) - {name for name, _, _ in plan})
        if missing:
            raise ModelSourceError(f"the checkpoint has no tensor named {missing[0]}")
        dest.mkdir(parents=True)
        self._writer = TensorWriter(dest / PACKED_FILE, packed_plan, metadata={"format": FORMAT})
        self.records: dict[str, dict[str, Any]] = {}
        self.files: list[dict[str, Any]] = []
        self.layers: list[PackedLayerSize] = []
        self.dtypes: set[str] = set()
        self.dense_bytes = 0
        self.packed_bytes = 0

    def add(self, name: str, tensor: torch.Tensor, file: str) -> None:
        """The next tensor of the plan, stored in source file ``file``."""
        nbytes = tensor.numel() * tensor.element_size()
        record: dict[str, Any] = {
            "file": file,
            "shape": list(tensor.shape),
            "dtype": _dtype_name(tensor.dtype),
            "sha256": tensor_sha256(tensor),
            "bytes": nbytes,
            "packed": name in self.targets,
        }
        if name in self.targets:
            packed = _pack_layer(name, tensor, self.targets[name], self.n, self.m, record=record)
            self._writer.write(name + VALUES, packed.values)
            self._writer.write(name + INDICES, packed.indices)
            self.packed_bytes += packed.values.numel() * packed.values.element_size() + packed.indices.numel()
            self.layers.append(PackedLayerSize(name, packed.shape, packed.dense_nbytes, packed.nbytes))
            self.dtypes.add(record["dtype"])
        else:
            self._writer.write(name, tensor)
            self.packed_bytes += nbytes
        self.dense_bytes += nbytes
        self.records[name] = record

    def file_done(self, path: Path, metadata: dict[str, str], names: list[str]) -> None:
        """A source file is complete: its path, safetensors metadata and tensors (listed sorted, as
        :func:`write_packed` lists a file's tensors)."""
        self.files.append(
            {"name": path.name, "sha256": _sha256_file(path), "metadata": metadata, "tensors": sorted(names)}
        )

    def abort(self) -> None:
        self._writer.abort()
        shutil.rmtree(self.dest, ignore_errors=True)

    def finish(self, checkpoint: Path) -> PackSummary:
        """Close the packed file, copy ``checkpoint``'s other files (config, tokenizer), write the manifest."""
        self._writer.close()
        extra: dict[str, str] = {}
        for path in sorted(checkpoint.iterdir()):
            if path.is_file() and path.suffix != ".safetensors" and path.name not in _NOT_COPIED:
                shutil.copy2(path, self.dest / path.name)
                extra[path.name] = _sha256_file(path)
        n, m = self.n, self.m
        manifest = _manifest(
            n, m, dtypes=self.dtypes, files=self.files, extra=extra, records=self.records, layers=self.layers
        )
        manifest["totals"].update(checkpoint_dense_bytes=self.dense_bytes, checkpoint_packed_bytes=self.packed_bytes)
        (self.dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        return PackSummary(
            folder=self.dest,
            pattern=f"{n}:{m}",
            index_bits=index_bits(m),
            dtypes=tuple(sorted(self.dtypes)),
            layers=tuple(self.layers),
            checkpoint_dense_bytes=self.dense_bytes,
            checkpoint_packed_bytes=self.packed_bytes,
            file_bytes=(self.dest / PACKED_FILE).stat().st_size,
            seconds=time.perf_counter() - self.started,
        )


def _manifest(
    n: int,
    m: int,
    *,
    dtypes: set[str],
    files: list[dict[str, Any]],
    extra: dict[str, str],
    records: dict[str, dict[str, Any]],
    layers: list[PackedLayerSize],
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "pattern": f"{n}:{m}",
        "n": n,
        "m": m,
        "index_bits": index_bits(m),
        "dtype": sorted(dtypes),
        "layout": {
            "values": "[out, in*N/M]: the kept weights of each group of M consecutive inputs, ascending position",
            "indices": f"[out, ceil(in*N/M*{index_bits(m)}/8)] uint8: each kept weight's position in its group, "
            f"{8 // index_bits(m)} per byte, the first in the low bits, rows padded to whole bytes",
            "transposed": "the checkpoint stores the weight as [in, out] (GPT-2 Conv1D); values and indices "
            "describe its transpose [out, in]",
        },
        "packed_file": PACKED_FILE,
        "source": {"files": files},
        "extra_files": extra,
        "tensors": records,
        "totals": {
            "packed_layers": len(layers),
            "packed_layers_dense_bytes": sum(s.dense_bytes for s in layers),
            "packed_layers_bytes": sum(s.packed_bytes for s in layers),
        },
    }


# --- Reading ---------------------------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a packed folder, checked for format version; :class:`ModelSourceError` otherwise."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ModelSourceError(
            f"{folder} is not a packed secateurs folder (no {MANIFEST_NAME})",
            hint="pass the packed/ folder inside a `secateurs prune` output",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelSourceError(f"{path} is not valid JSON: {exc}", hint="the packed folder is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ModelSourceError(
            f"{path} has format {found!r}; this secateurs reads {FORMAT!r}",
            hint="unpack it with the secateurs version that wrote it",
        )
    if not (folder / manifest["packed_file"]).is_file():
        raise ModelSourceError(f"{folder} has no {manifest['packed_file']}", hint="the packed folder is incomplete")
    return manifest


def _packed_weight(source: Any, name: str, record: Mapping[str, Any], manifest: Mapping[str, Any]) -> PackedWeight:
    out, inp = record["shape"][::-1] if record["transposed"] else record["shape"]
    return PackedWeight(
        source.get_tensor(name + VALUES), source.get_tensor(name + INDICES), (out, inp), manifest["n"], manifest["m"]
    )


def _rebuilt(source: Any, name: str, record: Mapping[str, Any], manifest: Mapping[str, Any]) -> torch.Tensor:
    """One source tensor, exactly as the checkpoint stored it (sha256-checked)."""
    if record["packed"]:
        try:
            dense = unpack_nm(_packed_weight(source, name, record, manifest))  # [out, in]
        except PackingError as exc:
            raise ModelSourceError(f"packed tensor {name}: {exc}", hint="the packed folder is damaged") from None
        tensor = dense.T.contiguous() if record["transposed"] else dense
    else:
        tensor = source.get_tensor(name)
    if list(tensor.shape) != record["shape"] or _dtype_name(tensor.dtype) != record["dtype"]:
        raise ModelSourceError(
            f"packed tensor {name} rebuilt as {_dtype_name(tensor.dtype)} {list(tensor.shape)}, the manifest "
            f"records {record['dtype']} {record['shape']}",
            hint="the packed folder is damaged",
        )
    if tensor_sha256(tensor) != record["sha256"]:
        raise ModelSourceError(
            f"packed tensor {name} does not match the sha256 recorded for it", hint="the packed folder is damaged"
        )
    return tensor


def rebuild_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the source checkpoint, rebuilt bit for bit (each checked against its sha256)."""
    manifest = read_manifest(folder)
    with safe_open(folder / manifest["packed_file"], framework="pt") as source:
        return {name: _rebuilt(source, name, record, manifest) for name, record in manifest["tensors"].items()}


@dataclass(frozen=True)
class UnpackResult:
    output: Path
    tensors: int
    files: tuple[str, ...]
    identical_files: bool  # every rebuilt safetensors file has the source file's sha256


def unpack_checkpoint(folder: Path, output: Path, *, overwrite: bool = False) -> UnpackResult:
    """Rebuild the source HF folder (safetensors files, config, tokenizer) in ``output``, atomically."""
    manifest = read_manifest(folder)
    records: Mapping[str, Mapping[str, Any]] = manifest["tensors"]
    identical = True
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        with safe_open(folder / manifest["packed_file"], framework="pt") as source:
            for file in manifest["source"]["files"]:
                tensors = {name: _rebuilt(source, name, records[name], manifest) for name in file["tensors"]}
                save_file(tensors, str(tmp / file["name"]), metadata=file["metadata"])
                identical = identical and _sha256_file(tmp / file["name"]) == file["sha256"]
        for name in manifest["extra_files"]:
            shutil.copy2(folder / name, tmp / name)
    if not identical:
        log.warning("unpacked tensors match bit for bit, but the files' bytes differ (another safetensors version?)")
    return UnpackResult(
        output=output,
        tensors=len(records),
        files=tuple(f["name"] for f in manifest["source"]["files"]),
        identical_files=identical,
    )


# --- Loading models --------------------------------------------------------------------------------------------


def _empty_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The folder's architecture with uninitialized weights (filled by the caller), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return model.eval()


def _load(model: nn.Module, state: Mapping[str, torch.Tensor], absent: set[str]) -> None:
    """Copy ``state`` into ``model``; every parameter must be covered, except ``absent`` and tied copies."""
    result = model.load_state_dict(dict(state), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [key for key in result.missing_keys if key not in absent and key not in tied]
    if result.unexpected_keys or missing:
        raise ModelSourceError(
            f"the packed checkpoint does not fit {type(model).__name__}: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}",
            hint="the packed folder's config.json does not match its weights",
        )
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def _main_dtype(manifest: Mapping[str, Any]) -> torch.dtype:
    dtypes = manifest.get("dtype") or ["float32"]
    dtype = getattr(torch, dtypes[0])
    assert isinstance(dtype, torch.dtype)
    return dtype


def load_dense_model(folder: Path) -> nn.Module:
    """The exact dense model (pruned weights as zeros), on CPU, in eval mode."""
    manifest = read_manifest(folder)
    model = _empty_model(folder, _main_dtype(manifest))
    _load(model, rebuild_state_dict(folder), set())
    return model


def load_sparse_model(folder: Path) -> nn.Module:
    """The model with every packed weight held by a :class:`~secateurs.kernels.sparse.packing.PackedLinear`
    (never densified): :func:`secateurs.workers.packed_model.build_packed_model`."""
    from secateurs.workers.packed_model import build_packed_model

    configure_cpu_kernel()
    return build_packed_model(folder)[0]
