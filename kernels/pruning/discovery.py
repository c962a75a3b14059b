"""Generic discovery of decoder blocks and their prunable linear layers, with no per-architecture code.

Decoder blocks are the ``nn.ModuleList`` whose members are the model's ``_no_split_modules`` (the unit
Hugging Face itself never splits across devices); prunable layers are the ``nn.Linear`` and GPT-2-style
``Conv1D`` modules inside a block. Embeddings and ``lm_head`` sit outside the blocks and are never pruned.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2-style projections store weights transposed: [in, out]


@dataclass(frozen=True)
class PrunableLayer:
    """One linear map y = W x inside a decoder block, whatever its storage layout."""

    name: str
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def parameter(self) -> torch.Tensor:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def in_features(self) -> int:
        return int(self.parameter.shape[0 if self.transposed else 1])

    @property
    def out_features(self) -> int:
        return int(self.parameter.shape[1 if self.transposed else 0])

    def weight(self) -> torch.Tensor:
        """The weight as [out, in] (a view; transposed for ``Conv1D``)."""
        return self.parameter.T if self.transposed else self.parameter

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor) -> None:
        """Write an [out, in] matrix back in the module's own layout and dtype."""
        self.weight().copy_(weight)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and list of the model's decoder blocks.

    The ``ModuleList`` whose members are all of a class named in ``model._no_split_modules``; failing that,
    the ``ModuleList`` of identical modules holding the most parameters. Raises ``ValueError`` if none exists.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[int, str, nn.ModuleList] | None = None
    fallback: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if next(iter(classes)).__name__ in no_split and (best is None or size > best[0]):
            best = (size, name, module)
        if fallback is None or size > fallback[0]:
            fallback = (size, name, module)
    chosen = best or fallback
    if chosen is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks (nn.ModuleList) to prune")
    return chosen[1], chosen[2]


def prunable_layers(block: nn.Module, prefix: str, exclude: tuple[str, ...] = ()) -> list[PrunableLayer]:
    """Linear layers of ``block`` in registration order, named ``prefix.<path>``, minus ``exclude`` patterns."""
    layers = []
    for path, module in block.named_modules():
        if not _is_linear(module):
            continue
        name = f"{prefix}.{path}" if prefix else path
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        layers.append(PrunableLayer(name, module))
    return layers
