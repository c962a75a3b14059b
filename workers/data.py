"""Calibration and evaluation text: exact reading, whole-text tokenization, window sampling.

Text files are read as exact bytes decoded as UTF-8, with no newline translation (WikiText-2's CRLF stays).
Calibration windows follow the SparseGPT reference protocol: the text is tokenized as a whole, and with
``rng = random.Random(seed)`` window k starts at ``rng.randint(0, n_tokens - seqlen - 1)``, drawn in order.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secateurs.app.errors import DataSourceError
from secateurs.app.schemas import TextSource


@dataclass(frozen=True)
class LoadedText:
    text: str
    sha256: str  # of the exact UTF-8 bytes
    source: str


def read_text(source: TextSource) -> LoadedText:
    """The text of a file (exact bytes) or of a Hugging Face dataset split (rows joined by blank lines).

    A dataset's rows are joined as SparseGPT's and GPTQ's ``datautils.get_wikitext2`` join WikiText-2's test
    split (``"\\n\\n".join(testdata["text"])``): every row, the empty ones included, so that the string, and the
    perplexity on it, are the papers'.
    """
    if source.file is not None:
        path = Path(source.file)
        if path.is_dir():
            raise DataSourceError(f"text path {path} is a folder, not a text file", hint="pass the text file itself")
        if not path.is_file():
            raise DataSourceError(f"text file {path} does not exist", hint="pass the path of a UTF-8 text file")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataSourceError(
                f"{path} is not UTF-8 text (byte {exc.start})", hint="convert it to UTF-8 first"
            ) from None
    else:
        text = _dataset_text(source)
        data = text.encode("utf-8")
    if not text.strip():
        raise DataSourceError(f"text source {source.describe()} is empty", hint="give a file with real text in it")
    return LoadedText(text, hashlib.sha256(data).hexdigest(), source.describe())


def _dataset_text(source: TextSource) -> str:
    try:
        import datasets
    except ImportError:
        raise DataSourceError(
            f"dataset {source.dataset!r} needs the 'datasets' package",
            hint="pip install 'secateurs[hub]', or pass a local text file instead",
        ) from None
    try:
        table = datasets.load_dataset(source.dataset, source.dataset_config, split=source.split)
    except Exception as exc:  # the hub client raises many unrelated types
        raise DataSourceError(
            f"could not load dataset {source.describe()}: {exc}",
            hint="check the dataset name, config and split, and that the Hugging Face hub is reachable",
        ) from None
    if source.text_field not in table.column_names:
        raise DataSourceError(
            f"dataset {source.describe()} has no column {source.text_field!r}",
            hint=f"choose one of {table.column_names}",
        )
    return "\n\n".join(row or "" for row in table[source.text_field])


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, with no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(
    tokens: torch.Tensor,
    samples: int,
    seqlen: int,
    seed: int,
    *,
    bos_token_id: int | None = None,
    what: str = "",
) -> torch.Tensor:
    """``samples`` random windows [samples, seqlen] of a 1-D token stream (reference protocol, see module doc).

    With ``bos_token_id`` each window is BOS followed by ``seqlen - 1`` text tokens.
    """
    body = seqlen - 1 if bos_token_id is not None else seqlen
    if tokens.numel() < body + 1:
        raise DataSourceError(
            f"calibration text{what} has {tokens.numel()} tokens, but a window of {seqlen} needs at least {body + 1}",
            hint="use a longer calibration text or a smaller calibration sequence length",
        )
    rng = random.Random(seed)
    rows = []
    for _ in range(samples):
        start = rng.randint(0, tokens.numel() - body - 1)
        rows.append(tokens[start : start + body])
    windows = torch.stack(rows)  # [samples, body]
    if bos_token_id is not None:
        windows = torch.cat([torch.full((samples, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)
    return windows
