"""The ``secateurs`` command group and its shared helpers. Engine commands are added by ``workers.cli``.

This module never imports torch: commands that only talk to a server stay light.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import click
from pydantic import ValidationError
from rich.console import Console

from app.errors import SecateursError

err_console = Console(stderr=True)
EXIT_USER_ERROR = 2


def fail(message: str, hint: str | None = None) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        err_console.print(f"[yellow]  hint:[/] {hint}", highlight=False)
    sys.exit(EXIT_USER_ERROR)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, naming the field as the user wrote it."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(message if not field or message.startswith(field) else f"{field}: {message}")
    return "; ".join(lines)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn every error a user can act on into one clear message and exit code 2, without a traceback."""
    try:
        yield
    except SecateursError as exc:
        fail(exc.message, exc.hint)
    except ValidationError as exc:
        fail(describe_validation_error(exc), "see --help for the accepted values")
    except KeyboardInterrupt:
        fail("interrupted; nothing was written")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """secateurs: one-shot 2:4 (N:M) pruning of Hugging Face causal LMs, with measured perplexity.

    \b
    Quick start (offline assets, then a SparseGPT 2:4 run on SmolLM2-135M):
      secateurs fetch-assets
      secateurs prune MODEL_DIR --calibration-file C4_TXT --eval-file WIKI_TXT --output OUT_DIR
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


Command = Callable[..., None]
