"""The packed model users run: a causal LM whose pruned linears are
:class:`~secateurs.kernels.sparse.packing.PackedLinear`, built from a packed folder (``OUT_DIR/packed/``,
:mod:`secateurs.workers.packed`) without a dense copy of any pruned weight.

How memory stays at the packed size:

* the architecture is built on the ``meta`` device (no parameter storage; buffers such as RoPE frequencies are
  computed as usual), then every pruned linear is swapped for a ``PackedLinear`` holding the file's ``values`` and
  ``indices`` and every other tensor is assigned in place (``load_state_dict(assign=True)``: no second copy);
* tensors are read one by one into process memory (:class:`~secateurs.workers.tensorfile.TensorFile`), not through a
  memory map whose touched pages would stay resident until the file closes;
* the manifest's checks run on the packed form: shapes and dtypes against the manifest, the 2-bit positions in
  range and increasing, and each tensor's sha256 (recorded for the *dense* tensor) computed over the dense bytes
  produced a few rows (or, for a transposed GPT-2 ``Conv1D`` weight, a few columns) at a time, so at most one
  small slice of a dense weight exists at once;
* a dtype conversion (e.g. bfloat16 from a float32 checkpoint) converts the kept values, never a dense weight.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.app.errors import ModelSourceError
from secateurs.kernels.sparse.packing import (
    PackedWeight,
    PackingError,
    index_bits,
    packed_shapes,
    positions,
    replace_with_packed_,
    unpack_nm,
)
from secateurs.workers.allocator import trim_heap
from secateurs.workers.packed import INDICES, VALUES, read_manifest
from secateurs.workers.tensorfile import TensorFile

log = logging.getLogger(__name__)

_DAMAGED = "the packed folder is damaged: prune again, or download it again"
_SLICE_BYTES = 1 << 20  # dense bytes rebuilt at once while checking a packed weight (small: transients)


@dataclass(frozen=True)
class PackedSource:
    """Where a packed model came from; ``secateurs.load`` sets it as ``model.secateurs_source``."""

    folder: Path
    format: str
    pattern: str
    packed_layers: int
    checkpoint_dtype: str
    dtype: str
    verified: bool  # every tensor's sha256 was checked against the manifest


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelSourceError(f"{where}: the manifest names an unknown dtype {name!r}", hint=_DAMAGED)
    return dtype


def _field(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    try:
        return mapping[key]
    except (KeyError, TypeError):
        raise ModelSourceError(f"{where}: the manifest has no {key!r}", hint=_DAMAGED) from None


def _slices(packed: PackedWeight, transposed: bool) -> Iterator[PackedWeight]:
    """The packed weight cut into pieces of about ``_SLICE_BYTES`` dense bytes, in the order the checkpoint stores
    the dense tensor: row blocks of [out, in], or, when it stores the transpose [in, out], column blocks of
    [out, in] (cut where a column block's positions start on a whole byte)."""
    out, inp = packed.shape
    size = packed.values.element_size()
    if not transposed:
        rows = max(1, _SLICE_BYTES // max(inp * size, 1))
        for start in range(0, out, rows):
            stop = min(out, start + rows)
            yield PackedWeight(
                packed.values[start:stop], packed.indices[start:stop], (stop - start, inp), packed.n, packed.m
            )
        return
    per_byte = 8 // packed.bits
    step = packed.m * (per_byte // math.gcd(packed.n, per_byte))  # columns whose positions start on a byte
    columns = max(step, _SLICE_BYTES // max(out * size, 1) // step * step)
    for start in range(0, inp, columns):
        stop = min(inp, start + columns)
        first, last = start // packed.m * packed.n, stop // packed.m * packed.n  # kept values of these columns
        yield PackedWeight(
            packed.values[:, first:last],
            packed.indices[:, first // per_byte : -(-last // per_byte)],
            (out, stop - start),
            packed.n,
            packed.m,
        )


def _check_positions(packed: PackedWeight, transposed: bool) -> None:
    """Every stored position in range and increasing (:class:`PackingError` otherwise), a slice at a time."""
    for part in _slices(packed, transposed):
        positions(part)


def _dense_sha256(packed: PackedWeight, transposed: bool) -> str:
    """sha256 of the dense tensor as the checkpoint stored it, rebuilt a slice at a time (positions checked)."""
    digest = hashlib.sha256()
    for part in _slices(packed, transposed):
        dense = unpack_nm(part)  # [rows, in], or [out, columns] when transposed
        raw = (dense.T if transposed else dense).contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().data)
    return digest.hexdigest()


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest()


def _read_packed(file: TensorFile, name: str, record: Mapping[str, Any], n: int, m: int) -> PackedWeight:
    """One pruned weight in packed form ([out, in] as ``shape``), its tensors' shapes and dtypes checked against
    the manifest record (the contents are checked by :func:`_check_packed`)."""
    shape = [int(d) for d in _field(record, "shape", name)]
    transposed = bool(record.get("transposed", False))
    dtype = _torch_dtype(_field(record, "dtype", name), name)
    if len(shape) != 2:
        raise ModelSourceError(f"packed tensor {name}: the manifest records shape {shape}, not 2-D", hint=_DAMAGED)
    out, inp = shape[::-1] if transposed else shape
    if inp % m:
        raise ModelSourceError(
            f"packed tensor {name}: {inp} inputs is not a multiple of M={m} (manifest shape {shape})", hint=_DAMAGED
        )
    want = dict(zip((VALUES, INDICES), packed_shapes((out, inp), n, m), strict=True))
    for suffix, kind in ((VALUES, dtype), (INDICES, torch.uint8)):
        if name + suffix not in file:
            raise ModelSourceError(f"packed tensor {name}: the packed file has no {name + suffix}", hint=_DAMAGED)
        found_dtype, found_shape = file.describe(name + suffix)
        if found_dtype != kind or found_shape != want[suffix]:
            raise ModelSourceError(
                f"packed tensor {name}{suffix} is {_dtype_name(found_dtype)} {list(found_shape)}; a "
                f"{_dtype_name(dtype)} {shape} weight packed {n}:{m} needs {_dtype_name(kind)} {list(want[suffix])}",
                hint=_DAMAGED,
            )
    return PackedWeight(file.get(name + VALUES), file.get(name + INDICES), (out, inp), n, m)


def _check_packed(name: str, record: Mapping[str, Any], packed: PackedWeight, *, verify: bool) -> None:
    """Positions in range and increasing; with ``verify``, the dense tensor's sha256 (rebuilt a slice at a time)."""
    transposed = bool(record.get("transposed", False))
    try:
        digest = _dense_sha256(packed, transposed) if verify else None
        if not verify:
            _check_positions(packed, transposed)
    except PackingError as exc:
        raise ModelSourceError(f"packed tensor {name}: {exc}", hint=_DAMAGED) from None
    if digest is not None and digest != _field(record, "sha256", name):
        raise ModelSourceError(f"packed tensor {name} does not match the sha256 recorded for it", hint=_DAMAGED)


def _read_dense(file: TensorFile, name: str, record: Mapping[str, Any], *, verify: bool) -> torch.Tensor:
    """A tensor stored as it is (embeddings, norms, biases, layers left dense), checked against its record."""
    if name not in file:
        raise ModelSourceError(f"tensor {name}: the packed file has no such tensor", hint=_DAMAGED)
    dtype, shape = file.describe(name)
    recorded = [int(d) for d in _field(record, "shape", name)]
    if _dtype_name(dtype) != _field(record, "dtype", name) or list(shape) != recorded:
        raise ModelSourceError(
            f"tensor {name} is {_dtype_name(dtype)} {list(shape)} in the packed file, the manifest records "
            f"{record['dtype']} {recorded}",
            hint=_DAMAGED,
        )
    tensor = file.get(name)
    if verify and _sha256(tensor) != _field(record, "sha256", name):
        raise ModelSourceError(f"tensor {name} does not match the sha256 recorded for it", hint=_DAMAGED)
    return tensor


def _empty_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The folder's architecture in ``dtype`` with every parameter on ``meta`` (no storage); buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with init_empty_weights(include_buffers=False), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(
            f"{folder}: transformers cannot build the model of its config.json: {first}",
            hint="the packed folder must hold the config.json of a causal LM (secateurs prune copies it)",
        ) from None
    assert isinstance(model, nn.Module)
    return model


def _converted(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def _generation_config(model: nn.Module, folder: Path) -> None:
    """The folder's generation_config.json, as ``from_pretrained`` would set it."""
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    generating: Any = model  # a transformers model: generate() reads this attribute
    try:
        generating.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        log.warning("ignored %s/generation_config.json: %s", folder, exc)


@dataclass(frozen=True)
class _Layout:
    """What the manifest says, checked: the pattern and every tensor's record."""

    n: int
    m: int
    records: Mapping[str, Mapping[str, Any]]
    checkpoint_dtype: torch.dtype
    packed_file: str


def _layout(folder: Path, manifest: Mapping[str, Any]) -> _Layout:
    where = str(folder / "manifest.json")
    n, m = int(_field(manifest, "n", where)), int(_field(manifest, "m", where))
    try:
        bits = index_bits(m)
    except PackingError as exc:
        raise ModelSourceError(f"{where}: {exc}", hint=_DAMAGED) from None
    if int(manifest.get("index_bits", bits)) != bits or not 0 < n < m:
        raise ModelSourceError(
            f"{where}: pattern {n}:{m} with {manifest.get('index_bits')}-bit positions", hint=_DAMAGED
        )
    records: Mapping[str, Mapping[str, Any]] = _field(manifest, "tensors", where)
    if not isinstance(records, Mapping) or not records:
        raise ModelSourceError(f"{where}: the manifest lists no tensors", hint=_DAMAGED)
    dtypes = manifest.get("dtype") or [_field(next(iter(records.values())), "dtype", where)]
    return _Layout(n, m, records, _torch_dtype(dtypes[0], where), str(_field(manifest, "packed_file", where)))


def _read_tensors(
    folder: Path, layout: _Layout, dtype: torch.dtype, *, verify: bool
) -> tuple[dict[str, PackedWeight], dict[str, torch.Tensor]]:
    """(module name -> packed weight, tensor name -> dense tensor), checked, converted to ``dtype``.

    Three passes, so that the checks' transient slices sit above every tensor kept and leave no holes between
    them (interleaved, they grew SmolLM2's peak by ~35 MB): read everything, check everything, convert.
    """
    packed: dict[str, PackedWeight] = {}
    dense: dict[str, torch.Tensor] = {}
    with TensorFile(folder / layout.packed_file) as file:
        expected = {
            key
            for name, record in layout.records.items()
            for key in ((name + VALUES, name + INDICES) if record.get("packed") else (name,))
        }
        extra = sorted(set(file.keys()) - expected)
        if extra:
            raise ModelSourceError(
                f"{file.path} holds {extra[0]}, which the manifest does not list"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
                hint=_DAMAGED,
            )
        for name, record in layout.records.items():
            if record.get("packed"):
                packed[name] = _read_packed(file, name, record, layout.n, layout.m)
            else:
                dense[name] = _read_dense(file, name, record, verify=verify)
    for name, weight in packed.items():
        _check_packed(name, layout.records[name], weight, verify=verify)
    modules = {
        name.removesuffix(".weight"): PackedWeight(_converted(w.values, dtype), w.indices, w.shape, w.n, w.m)
        for name, w in packed.items()
    }  # values [out, in·n/m] in ``dtype``
    return modules, {name: _converted(tensor, dtype) for name, tensor in dense.items()}


def _assemble(
    model: nn.Module, folder: Path, packed: Mapping[str, PackedWeight], dense: Mapping[str, torch.Tensor]
) -> None:
    """Swap the packed linears in, assign every other tensor in place, tie, and check that nothing is left empty."""
    mismatch = "the packed folder's config.json does not match its weights"
    try:
        replace_with_packed_(model, packed, check=False)  # positions checked while reading
    except PackingError as exc:
        raise ModelSourceError(f"{folder}: {exc}", hint=mismatch) from None
    result = model.load_state_dict(dict(dense), strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelSourceError(
            f"{folder}: tensor {result.unexpected_keys[0]} has no place in {type(model).__name__}", hint=mismatch
        )
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    empty = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if empty:
        raise ModelSourceError(
            f"{folder}: the packed checkpoint has no tensor for {empty[0]}"
            + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""),
            hint=mismatch,
        )


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread for the duration: the checks run many small element-wise ops, and on small shared VMs
    waking a second thread for each costs far more than it saves (GUIDE §6; loading SmolLM2's packed form on the
    2-core Xeon VM, load average ~7 from other work: 1.2-2.1 s with one thread, 10-27 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_packed_model(
    folder: Path, *, dtype: torch.dtype | None = None, verify: bool = True
) -> tuple[nn.Module, PackedSource]:
    """The model of a packed folder on CPU, in eval mode, its pruned linears ``PackedLinear`` (module docstring).

    ``dtype`` (default: the checkpoint's) converts the kept values and every floating tensor; ``verify`` checks
    each tensor's sha256 against the manifest (shapes, dtypes and positions are always checked). Every problem
    with the folder is a :class:`ModelSourceError` naming the tensor.
    """
    manifest = read_manifest(folder)
    layout = _layout(folder, manifest)
    target = dtype or layout.checkpoint_dtype
    model = _empty_model(folder, target)
    with _one_thread():
        packed, dense = _read_tensors(folder, layout, target, verify=verify)
    _assemble(model, folder, packed, dense)
    trim_heap()  # the checks' slices leave holes between the tensors kept: give them back
    _generation_config(model, folder)
    model.eval()
    source = PackedSource(
        folder=folder,
        format=str(manifest["format"]),
        pattern=f"{layout.n}:{layout.m}",
        packed_layers=len(packed),
        checkpoint_dtype=_dtype_name(layout.checkpoint_dtype),
        dtype=_dtype_name(target),
        verified=verify,
    )
    return model, source
