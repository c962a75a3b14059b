"""The runtime users run: a pruned output folder loaded for inference (``secateurs.load``).

With a packed copy (``OUT_DIR/packed/``, written for every N:M job) the model's pruned linears are
:class:`~secateurs.kernels.sparse.packing.PackedLinear` modules built straight from the packed tensors
(:mod:`secateurs.workers.packed_model`): each call runs the first registered kernel that takes it (device, dtype,
token count), else the reference (decompress, then ``F.linear``). Without one (unstructured patterns, or a download
that left it out) the plain HF folder loads, dense with zeros, and a log line says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from secateurs.app.errors import DeviceError, InvalidSpecError, ModelSourceError
from secateurs.kernels.sparse.packing import REFERENCE_PATH, describe_packed_kernels, iter_packed_linears
from secateurs.workers.cpu_kernel import configure_cpu_kernel
from secateurs.workers.packed import MANIFEST_NAME, PACKED_DIR
from secateurs.workers.packed_model import PackedSource, build_packed_model
from secateurs.workers.pipeline import resolve_device

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_HINT = f"pass dtype as one of {', '.join(DTYPES)} (or a torch dtype of these), or None for the checkpoint's"


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype option (a torch dtype or its name) checked against what the runtime runs; None keeps the checkpoint's."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise InvalidSpecError(f"dtype {value} is not supported", hint=_DTYPE_HINT)
        return value
    try:
        return DTYPES[str(value).removeprefix("torch.")]
    except KeyError:
        raise InvalidSpecError(f"dtype {value!r} is not supported", hint=_DTYPE_HINT) from None


def parse_device(name: str) -> torch.device:
    """A device option ('auto', 'cpu', 'cuda', 'cuda:N', 'mps') that exists on this machine, or
    :class:`DeviceError` saying what does."""
    try:
        return resolve_device(name)
    except RuntimeError:  # torch.device() of a name it does not know
        raise DeviceError(f"device {name!r} is not a device name", hint="use auto, cpu, cuda or cuda:N") from None


def packed_folder(folder: Path) -> Path | None:
    """The packed copy belonging to ``folder`` (``folder/packed/``, or ``folder`` itself when it is one), or None."""
    if (folder / MANIFEST_NAME).is_file():
        return folder
    if (folder / PACKED_DIR / MANIFEST_NAME).is_file():
        return folder / PACKED_DIR
    return None


def load_dense(folder: Path, *, device: torch.device, dtype: torch.dtype | None) -> PreTrainedModel:
    """The plain HF folder at ``folder`` (dense with zeros) as a causal LM in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"{folder} has no config.json: not an HF folder (and no packed copy)",
            hint="pass the folder `secateurs prune --output` or `secateurs download --output` wrote",
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or "auto", trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(
            f"transformers could not load {folder}: {first}",
            hint="check that the folder is a complete secateurs output (config.json and *.safetensors)",
        ) from None
    module: nn.Module = model  # transformers' typed `to` does not take a device
    module.to(device)
    model.eval()
    return model


def load_packed(
    folder: Path, *, device: torch.device, dtype: torch.dtype | None, verify: bool = True
) -> tuple[nn.Module, PackedSource]:
    """The packed folder ``folder`` as a causal LM of ``PackedLinear`` modules, in eval mode on ``device``. The CPU
    kernel takes its build folder and instruction set from the settings first (``SECATEURS_KERNEL_DIR``,
    ``SECATEURS_CPU_ISA``), as a job's does: a forced instruction set this CPU lacks fails here with
    :class:`DeviceError`."""
    configure_cpu_kernel()
    model, source = build_packed_model(folder, dtype=dtype, verify=verify)
    model.to(device)
    described: Any = model  # an attribute of the transformers model, for users and reports
    described.secateurs_source = source
    path = probe_path(model)
    if path == REFERENCE_PATH:
        kernels = "; ".join(f"{d.name}: {d.detail}" for d in describe_packed_kernels()) or "none registered"
        log.warning(
            "no packed kernel takes a 1-token %s product on %s (kernels: %s): PackedLinear runs the reference path "
            "(decompress, then dense), which is slower than the dense model; choose another dtype or device to get a "
            "kernel",
            source.dtype,
            device,
            kernels,
        )
    log.info(
        "loaded %s: %d packed %s layers (%s, %s), 1-token products run %s",
        folder,
        source.packed_layers,
        source.pattern,
        source.dtype,
        device,
        path,
    )
    return model, source


@torch.no_grad()
def probe_path(model: nn.Module) -> str | None:
    """The path the first ``PackedLinear`` takes for one token (a real call on zeros), or None without one.

    The call also builds a kernel that builds on first use, so that the first generated token does not pay for it.
    """
    for _name, layer in iter_packed_linears(model):
        before = layer.last_path
        layer(torch.zeros(1, layer.in_features, dtype=layer.values.dtype, device=layer.values.device))
        path, layer.last_path = layer.last_path, before
        return path
    return None


def paths_that_ran(model: nn.Module) -> dict[str, int]:
    """For each path (a kernel's name or ``"reference"``): how many ``PackedLinear`` layers ran it on their latest
    call. Layers never called are counted under ``"not run"``."""
    counts = Counter(layer.last_path or "not run" for _name, layer in iter_packed_linears(model))
    return dict(counts.most_common())


def load_pruned(
    folder: Path,
    *,
    device: str = "auto",
    dtype: torch.dtype | str | None = None,
    packed: bool | None = None,
    verify: bool = True,
) -> nn.Module:
    """``folder``'s packed copy when it has one (``packed=None``), else its HF folder (see the module docstring).

    ``packed=True`` requires the packed copy, ``packed=False`` loads the dense-with-zeros HF folder.
    """
    target = parse_device(device)
    chosen = parse_dtype(dtype)
    found = packed_folder(folder) if packed is not False else None
    if found is not None:
        return load_packed(found, device=target, dtype=chosen, verify=verify)[0]
    if packed:
        raise ModelSourceError(
            f"{folder} has no packed copy ({PACKED_DIR}/{MANIFEST_NAME})",
            hint="N:M jobs write one; load the dense folder with packed=False, or download the packed/ folder too",
        )
    if packed is None:
        log.warning(
            "%s has no packed copy (%s/): loading the dense-with-zeros HF folder, so every linear stays nn.Linear and "
            "runs at dense speed",
            folder,
            PACKED_DIR,
        )
    return load_dense(folder, device=target, dtype=chosen)
