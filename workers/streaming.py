"""Streamed weights: a model whose decoder blocks are read from safetensors only while the driver works on them,
and written out as soon as each is pruned (issue 11, item 1).

The model is built on the meta device (accelerate's empty-weight init; buffers computed as usual, e.g. rotary
frequencies). Each block's tensors are read (:class:`secateurs.workers.tensorfile.TensorFile`, no memory map)
when the driver enters it through :class:`secateurs.kernels.pruning.driver.BlockSource`, converted to the job's
dtype, and dropped back to the meta device when it leaves. What lives outside the blocks (embeddings, final
norm, ``lm_head``; tied weights tied as transformers ties them) is read the same way, only while the driver
needs it: to reach the first block and to leave the last (``BlockSource.outside``), and while it is written
out. So peak memory is about one block and the calibration state, whatever the number of blocks and the size
of the vocabulary (a 49,152-token vocabulary's embeddings and head are 0.8 GB on a 7B-wide model in bf16).

Output: :class:`CheckpointWriter` writes the checkpoint tensor by tensor, the non-block tensors first, each block
as soon as it is pruned (safetensors headers are planned up front from the model's shapes; shards and the
standard ``model.safetensors.index.json`` above a size); :class:`secateurs.workers.packed.PackedStream` appends
the packed N:M copy the same way. Both write inside the job's temporary folder
(:func:`secateurs.workers.storage.atomic_output_dir`), so the output appears complete or not at all.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.app.errors import ModelSourceError
from secateurs.kernels.pruning.discovery import find_decoder_blocks
from secateurs.kernels.pruning.driver import LayerResult
from secateurs.kernels.sparse.packing import PackingError
from secateurs.workers.allocator import mapped_allocations, trim_heap
from secateurs.workers.packed import PackedStream
from secateurs.workers.tensorfile import TensorFile, TensorWriter, storage_error

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt"}  # what transformers' save_pretrained puts in each shard
_CHECKPOINT_HINT = "check that the folder is a complete Hugging Face checkpoint whose weights match config.json"


class CheckpointFiles:
    """The tensors of an HF folder's safetensors checkpoint (one file, or shards listed by the standard index),
    read one at a time. Files are opened on first use and kept open until :meth:`close`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._where: dict[str, str] = {}  # tensor name → file name
        self._open: dict[str, TensorFile] = {}
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self._where = {str(name): str(file) for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelSourceError(f"{index} is not a safetensors index: {exc}", hint=_CHECKPOINT_HINT) from None
            for name, file in self._where.items():
                if not (folder / file).is_file():
                    raise ModelSourceError(
                        f"{index} puts tensor {name} in shard {file}, which is not in {folder}",
                        hint="the checkpoint is incomplete: download or copy the missing shard again",
                    )
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelSourceError(f"{folder} has no *.safetensors weights", hint=_CHECKPOINT_HINT)
            for path in files:
                names = self._file(path.name).keys()
                for name in names:
                    self._where.setdefault(name, path.name)

    def _file(self, name: str) -> TensorFile:
        if name not in self._open:
            self._open[name] = TensorFile(self.folder / name)
        return self._open[name]

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def where(self, name: str) -> Path:
        return self.folder / self._where[name]

    def describe(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        file = self._file(self._where[name])
        if name not in file:
            raise ModelSourceError(
                f"{file.path} has no tensor {name}, though the index puts it there", hint=_CHECKPOINT_HINT
            )
        return file.describe(name)

    def get(self, name: str) -> torch.Tensor:
        self.describe(name)
        return self._file(self._where[name]).get(name)

    def close(self) -> None:
        for file in self._open.values():
            file.close()
        self._open.clear()


def _renamed_keys(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Model tensor name → checkpoint name, through the key renamings transformers applies when it loads this
    architecture (e.g. GPT-NeoX's ``embed_out.`` → ``lm_head.``), with the base model's prefix (e.g. ``model.``)
    added or removed as checkpoints saved from the base model need. Names that need no renaming map to
    themselves; writing under the checkpoint's own names is what ``save_pretrained`` does (it reverses them)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
        renames = [t for t in transforms if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # another transformers version: plain names only
        renames = []
    base = str(getattr(model, "base_model_prefix", "") or "")
    wanted = set(dict(model.state_dict(keep_vars=True)))
    keys: dict[str, str] = {}
    for name in names:
        renamed = name
        for rename in renames:
            renamed, _ = rename.rename_source_key(renamed)
        for candidate in (renamed, f"{base}.{renamed}" if base else renamed, renamed.removeprefix(f"{base}.")):
            if candidate in wanted:
                keys.setdefault(candidate, name)
                break
    return keys


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``model`` by ``tensor`` (a parameter stays a parameter)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _tied(model: nn.Module) -> dict[str, str | None]:
    """Tied parameter → the parameter it is tied to (transformers 5's ``_tied_weights_keys`` mapping; older
    versions list only the tied names)."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return dict(keys) if isinstance(keys, dict) else dict.fromkeys(keys)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, once each (tied parameters under their first name)."""
    return dict(module.state_dict(keep_vars=True))


class StreamedModel:
    """A causal LM built on the meta device whose non-block tensors are loaded, and whose blocks are read from
    ``folder`` on demand (:meth:`weights`): the :class:`~secateurs.kernels.pruning.driver.BlockSource` for dense
    evaluation and, with ``on_pruned``, for pruning."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = folder
        self.dtype = dtype
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with mapped_allocations(), init_empty_weights(include_buffers=False):  # weights pass through the CPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        self.model: nn.Module = model.eval()
        self.prefix, self.blocks = find_decoder_blocks(self.model)
        self.files = CheckpointFiles(folder)
        self._keys = _renamed_keys(self.model, self.files.names())  # model name → checkpoint name
        self._outside_depth = 0  # nesting of :meth:`outside`
        self._outside_head = True  # whether the outermost :meth:`outside` read the head
        try:
            self._check_outside()
            self._check_blocks()
        except BaseException:
            self.files.close()
            raise

    def _read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` from the checkpoint, checked against the model's shape, in the model's dtype."""
        tensor = self.files.get(self._describe(name, like))
        return tensor.to(like.dtype) if tensor.is_floating_point() and like.is_floating_point() else tensor

    def _outside_to_read(self) -> dict[str, torch.Tensor]:
        """The non-block tensors the checkpoint holds (model name → the model's tensor): not the blocks', not a
        buffer computed at construction that the checkpoint does not hold, not a tied copy (transformers saves
        one copy and ties the other to it)."""
        inside = f"{self.prefix}."
        tied = _tied(self.model)
        wanted = {}
        for name, tensor in _tensors(self.model).items():
            if name.startswith(inside) or (tensor.device.type != "meta" and name not in self._keys):
                continue
            if name not in self._keys and name in tied:
                continue
            wanted[name] = tensor
        return wanted

    def _check_outside(self) -> None:
        """Every non-block tensor is in the checkpoint with the right shape, or tied to one that is (headers
        only; the tensors are read by :meth:`outside`)."""
        inside = f"{self.prefix}."
        read = self._outside_to_read()
        for name, tensor in read.items():
            self._describe(name, tensor)
        self._tie()  # on the meta device: a tied copy then *is* its source
        read_ids = {id(tensor) for tensor in read.values()}
        for name, tensor in _tensors(self.model).items():
            if name.startswith(inside) or tensor.device.type != "meta" or id(tensor) in read_ids:
                continue
            raise ModelSourceError(f"{self.folder} has no tensor {name}", hint=_CHECKPOINT_HINT)

    def _tie(self) -> None:
        """Tie the weights the model's config ties (transformers' ``tie_weights``)."""
        tie = getattr(self.model, "tie_weights", None)
        if callable(tie):
            tie()

    @contextmanager
    def outside(self, *, head: bool = True) -> Iterator[None]:
        """The non-block tensors read from the checkpoint (and tied as transformers ties them) for the duration,
        back on the meta device after (re-entrant: only the outermost entry reads and releases). ``head=False``
        leaves an untied output head (``lm_head``) on the meta device: entering the first block does not need it
        (on TinyLlama's shape in fp32 it is 0.4 GB)."""
        if self._outside_depth:
            if head and not self._outside_head:
                raise RuntimeError("outside(head=True) inside outside(head=False): the head was not read")
            self._outside_depth += 1
            try:
                yield
            finally:
                self._outside_depth -= 1
            return
        inside = f"{self.prefix}."
        metas = {n: t for n, t in _tensors(self.model).items() if not n.startswith(inside) and t.device.type == "meta"}
        skipped = set() if head else self._head_names()
        self._outside_depth, self._outside_head = 1, head
        try:
            for name, tensor in self._outside_to_read().items():
                if name not in skipped:
                    _set_tensor(self.model, name, self._read(name, tensor))
            self._tie()
            left = [
                n
                for n, t in _tensors(self.model).items()
                if not n.startswith(inside) and t.device.type == "meta" and n not in skipped
            ]
            if left:
                raise ModelSourceError(f"{self.folder} has no tensor {left[0]}", hint=_CHECKPOINT_HINT)
            yield
        finally:
            self._outside_depth = 0
            for name, meta in metas.items():  # tied copies too: no reference to a read tensor is left
                _set_tensor(self.model, name, torch.empty_like(meta, device="meta"))
            self._tie()  # as built: tied on the meta device

    def _head_names(self) -> set[str]:
        """The tensors of the model's output head (``get_output_embeddings``), by model name."""
        get = getattr(self.model, "get_output_embeddings", None)
        module = get() if callable(get) else None
        if module is None:
            return set()
        for prefix, candidate in self.model.named_modules():
            if candidate is module:
                return {f"{prefix}.{name}" if prefix else name for name in _tensors(module)}
        return set()

    def _check_blocks(self) -> None:
        """Every block tensor is in the checkpoint with the shape config.json implies (headers only: a bad
        checkpoint fails at load, not hours later when the driver reaches its block)."""
        for index, block in enumerate(self.blocks):
            for name, tensor in _tensors(block).items():
                if tensor.device.type == "meta":
                    self._describe(f"{self.prefix}.{index}.{name}", tensor)

    def _describe(self, name: str, like: torch.Tensor) -> str:
        """The checkpoint key of the model's tensor ``name``, checked to exist with ``like``'s shape."""
        key = self._keys.get(name)
        if key is None:
            raise ModelSourceError(f"{self.folder} has no tensor {name}", hint=_CHECKPOINT_HINT)
        _dtype, shape = self.files.describe(key)
        if tuple(shape) != tuple(like.shape):
            raise ModelSourceError(
                f"{self.files.where(key)}: tensor {key} has shape {list(shape)}, config.json implies "
                f"{list(like.shape)}",
                hint="the weights do not belong to this config.json: check that the weights match config.json",
            )
        return key

    def stored_name(self, name: str) -> str:
        """The name the source checkpoint gives the model's tensor ``name`` (what ``save_pretrained`` writes)."""
        return self._keys.get(name, name)

    def block_tensors(self, index: int, block: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """Block ``index``'s (materialized) tensors under their checkpoint names."""
        return [(self.stored_name(f"{self.prefix}.{index}.{n}"), t.detach()) for n, t in _tensors(block).items()]

    def _outside_entries(self) -> list[tuple[str, torch.Tensor]]:
        """(model name, the model's tensor) of every non-block tensor a checkpoint stores: tied copies once,
        under the name kept by transformers (the tie's source)."""
        out: list[tuple[str, torch.Tensor]] = []
        seen: set[int] = set()
        for name, tensor in sorted(_tensors(self.model).items(), key=lambda item: item[0] in _tied(self.model)):
            if name.startswith(f"{self.prefix}.") or id(tensor) in seen:
                continue  # a block's, or a tied copy (its source comes first: the one transformers saves)
            seen.add(id(tensor))
            out.append((name, tensor))
        return out

    def outside_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The non-block tensors as a checkpoint stores them, under their stored names (on the meta device
        outside :meth:`outside`: names, dtypes and shapes, as :func:`plan_checkpoint` needs)."""
        return [(self.stored_name(name), tensor.detach()) for name, tensor in self._outside_entries()]

    def read_outside_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The same tensors as :meth:`outside_tensors`, in the same order, each read from the checkpoint only
        when the consumer asks for it (the writer holds one at a time, not all of them)."""
        for name, tensor in self._outside_entries():
            real = tensor if tensor.device.type != "meta" else self._read(name, tensor)
            yield self.stored_name(name), real.detach()

    @contextmanager
    def weights(self, index: int, block: nn.Module, *, trim: bool = True) -> Iterator[None]:
        """Block ``index``'s tensors read from the checkpoint for the duration; back on the meta device after.

        With ``trim`` the heap's free pages go back to the kernel on the way out: glibc does not reuse the holes
        one block's tensors and activations leave for the next block's (measured on SmolLM2's dense evaluation:
        +28 MB of RSS per block, 0.44 → 1.76 GB over 30 blocks, flat with a trim per block). Pruning trims on
        its own schedule (:class:`PrunedBlocks`, :class:`secateurs.workers.allocator.Heap`)."""
        metas = {name: t for name, t in _tensors(block).items() if t.device.type == "meta"}
        try:
            for name, meta in metas.items():
                _set_tensor(block, name, self._read(f"{self.prefix}.{index}.{name}", meta))
            yield
        finally:
            for name, meta in metas.items():
                _set_tensor(block, name, torch.empty_like(meta, device="meta"))
            if trim:
                trim_heap()

    def pruned(self, index: int, block: nn.Module, layers: tuple[LayerResult, ...]) -> None:
        return None

    def save_config(self, folder: Path) -> None:
        """config.json (and generation_config.json when the model generates), as ``save_pretrained`` writes."""
        model: Any = self.model
        try:
            model.config.save_pretrained(folder)
            generation = getattr(model, "generation_config", None)
            if generation is not None and model.can_generate():
                generation.save_pretrained(folder)
        except OSError as exc:
            raise storage_error(folder, exc) from None

    def read_from(self, folder: Path) -> None:
        """Read blocks from ``folder`` from now on (the pruned checkpoint just written: same names, same shapes;
        the non-block tensors in memory are unchanged by pruning)."""
        self.files.close()
        self.folder = folder
        self.files = CheckpointFiles(folder)
        self._keys = _renamed_keys(self.model, self.files.names())

    def close(self) -> None:
        self.files.close()


class PrunedBlocks:
    """The pruning :class:`~secateurs.kernels.pruning.driver.BlockSource`: blocks read from the source model,
    each checked by ``check`` (its layer results → whether its weights satisfy the pattern), written to
    ``writer`` and appended to ``packed`` as soon as it is pruned."""

    def __init__(
        self,
        source: StreamedModel,
        writer: CheckpointWriter,
        *,
        check: Callable[[tuple[LayerResult, ...]], bool],
        packed: PackedStream | None = None,
    ) -> None:
        self.source = source
        self.writer = writer
        self.check = check
        self.packed = packed
        self.verified = True
        self.packing_failed: str | None = None
        writer.on_file = self._file_done

    def weights(self, index: int, block: nn.Module) -> AbstractContextManager[None]:
        return self.source.weights(index, block, trim=False)  # the job's Heap trims between pruned blocks

    def outside(self, *, head: bool = True) -> AbstractContextManager[None]:
        return self.source.outside(head=head)

    def pruned(self, index: int, block: nn.Module, layers: tuple[LayerResult, ...]) -> None:
        self.verified = self.check(layers) and self.verified
        if self.packed is not None and not self.verified:
            self.stop_packing("the saved weights do not satisfy the pattern (not verified)")
        self.write(self.source.block_tensors(index, block))

    def write(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Tensors to the checkpoint (and the packed copy), in the plan's order."""
        for name, tensor in tensors:
            if self.packed is not None:
                try:
                    self.packed.add(name, tensor, self.writer.file_of(name))
                except PackingError as exc:
                    self.stop_packing(f"packing failed: {exc}")
            self.writer.write(name, tensor)

    def _file_done(self, path: Path, names: list[str]) -> None:
        if self.packed is not None:
            self.packed.file_done(path, dict(SHARD_METADATA), names)

    def stop_packing(self, reason: str) -> None:
        if self.packed is not None:
            self.packed.abort()
        self.packed = None
        self.packing_failed = reason


def plan_checkpoint(streamed: StreamedModel) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Every tensor the output checkpoint will hold, in the order they are written: the non-block tensors,
    then block by block (names as the source checkpoint stores them; shapes and dtypes from the model)."""
    plan = [(name, t.dtype, tuple(t.shape)) for name, t in streamed.outside_tensors()]
    for index, block in enumerate(streamed.blocks):
        for name, tensor in _tensors(block).items():
            plan.append((streamed.stored_name(f"{streamed.prefix}.{index}.{name}"), tensor.dtype, tuple(tensor.shape)))
    return plan


# Shards of at most 5 GB (transformers 4's save_pretrained default, and what most hub checkpoints use; transformers
# 5's default is 50 GB). safetensors memory-maps a whole file when transformers loads it, and a file larger than
# the machine's memory may not map at all: the 13B-shaped run's single 26.4 GB file on the 24 GB VM failed with
# "unable to mmap ... Cannot allocate memory" in from_pretrained, even on the meta device.
MAX_SHARD_BYTES = 5 * 10**9


class CheckpointWriter:
    """An HF safetensors checkpoint written tensor by tensor in the order of ``plan`` (``[(name, dtype, shape)]``):
    ``model.safetensors``, or ``model-0000k-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` (a
    tensor is never split) with the standard ``model.safetensors.index.json``; shard metadata
    ``{"format": "pt"}`` as transformers writes. ``on_file(path, tensors)`` as each file is complete."""

    def __init__(
        self,
        folder: Path,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        max_shard_bytes: int | None = None,
        on_file: Callable[[Path, list[str]], None] | None = None,
    ) -> None:
        self.folder = folder
        self.on_file = on_file
        max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = math.prod(entry[2]) * torch.empty((), dtype=entry[1]).element_size()
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        count = len(groups)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
        )
        self._files = list(zip(names, groups, strict=True))
        self._file_of = {name: file for file, group in self._files for name, _, _ in group}
        self._current: TensorWriter | None = None
        self._done_in_file = 0
        self._next_file = 0
        self.total_size = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, d, s in plan)
        self.parameters = sum(math.prod(s) for _, _, s in plan)
        self.files: list[str] = []  # written so far

    def file_of(self, name: str) -> str:
        return self._file_of[name]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._current is None:
            if self._next_file >= len(self._files):
                raise ValueError(f"{name} is not planned (every planned tensor is written)")
            file, group = self._files[self._next_file]
            self._current = TensorWriter(self.folder / file, group, metadata=dict(SHARD_METADATA))
            self._done_in_file = 0
        try:
            self._current.write(name, tensor)
        except BaseException:
            self.abort()
            raise
        self._done_in_file += 1
        file, group = self._files[self._next_file]
        if self._done_in_file == len(group):
            self._current.close()
            self._current = None
            self._next_file += 1
            self.files.append(file)
            if self.on_file is not None:
                self.on_file(self.folder / file, [n for n, _, _ in group])

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None

    def finish(self) -> None:
        """Check that every planned tensor was written; write the index when there are several shards."""
        if self._next_file != len(self._files):
            raise ValueError(f"{len(self.files)} of {len(self._files)} checkpoint files written")
        if len(self._files) == 1:
            return
        index = {
            "metadata": {"total_size": self.total_size, "total_parameters": self.parameters},
            "weight_map": dict(sorted(self._file_of.items())),
        }
        path = self.folder / INDEX_NAME
        try:
            path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise storage_error(path, exc) from None
