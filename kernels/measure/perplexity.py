"""Perplexity with the convention of the pruning papers (SparseGPT §4, Wanda §4; GUIDE §3).

The evaluation text is tokenized once as a whole; the token stream is cut into non-overlapping windows of
``seqlen`` tokens, the incomplete tail dropped; perplexity = exp(mean next-token NLL) over every predicted
token. With ``bos_token_id`` set, every window is prefixed by BOS and all ``seqlen`` of its tokens are
predicted; without, the first token of each window is context only (``seqlen − 1`` predictions). This is
*not* Hugging Face's strided sliding-window perplexity, which gives different numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.kernels.pruning.driver import BlockSource, Head, heads_by_block, heads_whole_model


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


# Bytes of fp32 logits one slice of positions may take, counting the log-softmax temporary (and the logits in
# the model's own dtype before the cast): bounds evaluation memory whatever the vocabulary (Gemma-3: 262,144).
SLICE_BYTES = 256 << 20


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
    slice_bytes: int = SLICE_BYTES,
    source: BlockSource | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on ``windows`` [count, seqlen] (see module docstring for the convention).

    By default the model must already sit on ``device`` (default: where its parameters are). With
    ``by_block`` it stays where it is and only one decoder block at a time visits ``device``
    (:func:`secateurs.kernels.pruning.driver.heads_by_block`): the same numbers, for models larger than the
    device. Either way the logits are never held for a whole batch: the final hidden states are computed once,
    then the head (final norm, ``lm_head``, any logit post-processing) and an fp32 cross-entropy run on slices
    of positions that take at most ~``slice_bytes`` each. ``on_batch(done, total)`` reports progress in windows.
    ``source`` (by block only) materializes each block's weights while it runs (streamed weights).
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
    if source is not None and not by_block:
        raise ValueError("streamed block weights (source) need by_block evaluation")
    heads = (
        heads_by_block(model, inputs, target, source=source) if by_block else heads_whole_model(model, inputs, target)
    )
    try:
        done = 0
        for (ids, labels), head in zip(batches, heads, strict=True):
            total_nll += _sliced_nll(head, ids.shape[1], labels, _vocab_size(model), slice_bytes)
            predicted += labels.numel()
            done += labels.shape[0]
            if on_batch:
                on_batch(done, count)
    finally:
        heads.close()  # leave the generator's context now (it restores the model), also on an error
        model.train(was_training)
    mean = total_nll / predicted
    return Perplexity(math.exp(mean), mean, count, seqlen, predicted, bos_token_id is not None)


def _sliced_nll(head: Head, length: int, labels: torch.Tensor, vocab: int, slice_bytes: int) -> float:
    """Summed next-token NLL of ``labels`` [b, n], the last ``n`` tokens of a chunk of ``length`` tokens:
    label ``j`` is predicted at position ``length − n − 1 + j``. Positions go through ``head`` in slices of
    at most ``slice_bytes`` of logits (fp32 logits + log-softmax temporary + the model-dtype logits)."""
    rows, n = labels.shape
    first = length - n - 1
    per_position = rows * vocab * 12  # bytes: ≤ 4 (model dtype) + 4 (fp32) + 4 (log-softmax) per logit
    step = max(1, slice_bytes // per_position)
    total = 0.0
    for start in range(0, n, step):
        stop = min(n, start + step)
        positions = torch.arange(first + start, first + stop)
        logits = head(positions)  # [b, stop − start, vocab]
        target = labels[:, start:stop].to(logits.device)  # [b, stop − start]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum")
        total += float(nll)
        del logits
    return total


def _vocab_size(model: nn.Module) -> int:
    """Rows of the output embedding (the logits' last dimension), else the config's ``vocab_size``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1 << 18)
