"""Perplexity with the convention of the pruning papers (SparseGPT §4, Wanda §4; GUIDE §3).

The evaluation text is tokenized once as a whole; the token stream is cut into non-overlapping windows of
``seqlen`` tokens, the incomplete tail dropped; perplexity = exp(mean next-token NLL) over every predicted
token. With ``bos_token_id`` set, every window is prefixed by BOS and all ``seqlen`` of its tokens are
predicted; without, the first token of each window is context only (``seqlen − 1`` predictions). This is
*not* Hugging Face's strided sliding-window perplexity, which gives different numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.kernels.matmul import fast_linears
from secateurs.kernels.pruning.driver import logits_by_block


@dataclass(frozen=True)
class Perplexity:
    value: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    seqlen: int
    predicted_tokens: int
    bos: bool


def eval_windows(tokens: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """First ``windows`` (all if None) non-overlapping windows of a 1-D token stream: [windows, seqlen]."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    available = tokens.numel() // seqlen
    if available == 0:
        raise ValueError(f"{tokens.numel()} tokens do not fill one window of {seqlen}")
    count = available if windows is None else min(windows, available)
    return tokens[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    bos_token_id: int | None = None,
    device: torch.device | str | None = None,
    by_block: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on ``windows`` [count, seqlen] (see module docstring for the convention).

    By default the model must already sit on ``device`` (default: where its parameters are). With
    ``by_block`` it stays where it is and only one decoder block at a time visits ``device``
    (:func:`secateurs.kernels.pruning.driver.logits_by_block`): the same numbers, for models larger than the device.
    ``on_batch(done, total)`` reports progress in windows.
    """
    target = torch.device(device) if device is not None else next(model.parameters()).device
    count, seqlen = windows.shape
    batches = []  # (inputs, labels) per batch
    for start in range(0, count, batch_size):
        batch = windows[start : start + batch_size]  # [b, seqlen]
        if bos_token_id is not None:
            bos = torch.full((batch.shape[0], 1), bos_token_id, dtype=batch.dtype)
            batches.append((torch.cat([bos, batch], dim=1), batch))  # [b, 1 + seqlen]: every token predicted
        else:
            batches.append((batch, batch[:, 1:]))
    total_nll = 0.0
    predicted = 0
    was_training = model.training
    model.eval()
    inputs = [ids for ids, _labels in batches]
    all_logits = logits_by_block(model, inputs, target) if by_block else _whole_model_logits(model, inputs, target)
    try:
        done = 0
        for (_inputs, batch_labels), batch_logits in zip(batches, all_logits, strict=True):  # [b, len, vocab]
            logits = batch_logits[:, -batch_labels.shape[1] - 1 : -1]  # positions that predict the labels
            labels = batch_labels.to(logits.device)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
            total_nll += float(nll)
            predicted += labels.numel()
            done += labels.shape[0]
            if on_batch:
                on_batch(done, count)
    finally:
        all_logits.close()  # leave the generator's context now (it restores the model), also on an error
        model.train(was_training)
    mean = total_nll / predicted
    return Perplexity(math.exp(mean), mean, count, seqlen, predicted, bos_token_id is not None)


def _whole_model_logits(
    model: nn.Module, inputs: list[torch.Tensor], device: torch.device
) -> Generator[torch.Tensor, None, None]:
    with fast_linears(model):  # oneDNN for CPU fp32 products (secateurs.kernels.matmul)
        for ids in inputs:
            yield model(input_ids=ids.to(device), use_cache=False).logits
