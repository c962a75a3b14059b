"""The runtime users run: a pruned output folder loaded for inference (``secateurs.load``)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from secateurs.app.errors import InvalidSpecError, ModelSourceError
from secateurs.workers.pipeline import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(value: torch.dtype | str | None) -> torch.dtype | str:
    if value is None:
        return "auto"  # the checkpoint's own
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise InvalidSpecError(f"dtype {value} is not supported", hint=f"use one of {', '.join(DTYPES)}")
        return value
    try:
        return DTYPES[value.removeprefix("torch.")]
    except KeyError:
        raise InvalidSpecError(f"dtype {value!r} is not supported", hint=f"use one of {', '.join(DTYPES)}") from None


def load_pruned(folder: Path, *, device: str = "auto", dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """The HF folder at ``folder`` as a causal LM in eval mode on ``device`` (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM

    target = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=_dtype(dtype), trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(
            f"transformers could not load {folder}: {first}",
            hint="check that the folder is a complete secateurs output (config.json and *.safetensors)",
        ) from None
    module: torch.nn.Module = model  # transformers' typed `to` does not take a device
    module.to(target)
    model.eval()
    return model
