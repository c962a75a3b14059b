"""The ``secateurs`` command group and its shared helpers. Engine commands are added by ``secateurs.workers.cli``.

This module never imports torch: commands that only talk to a server stay light.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click
from pydantic import ValidationError
from rich.console import Console

from secateurs.app.errors import SecateursError
from secateurs.app.schemas import JobSpec, Method, TextSource, describe_validation_error

err_console = Console(stderr=True)
EXIT_USER_ERROR = 2


def fail(message: str, hint: str | None = None) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        err_console.print(f"[yellow]  hint:[/] {hint}", highlight=False)
    sys.exit(EXIT_USER_ERROR)


_ENGINE_MODULES = {"torch", "transformers", "accelerate", "safetensors", "gguf", "numpy"}


def _option_for(field: str) -> str | None:
    """The running command's option that sets the spec field ``field`` (``eval_windows`` -> ``--eval-windows``), so
    a validation error names what the user typed; None where no option has that name (a nested field)."""
    context = click.get_current_context(silent=True)
    if context is None:
        return None
    for param in context.command.params:
        if isinstance(param, click.Option) and param.name == field:
            return max(param.opts, key=len)  # the long form
    return None


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn every error a user can act on into one clear message and exit code 2, without a traceback."""
    try:
        yield
    except SecateursError as exc:
        fail(exc.message, exc.hint)
    except ValidationError as exc:
        fail(describe_validation_error(exc, label=_option_for), "see --help for the accepted values")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in _ENGINE_MODULES:
            fail(
                f"this command needs the pruning engine, which is not installed ({exc.name} is missing)",
                "pip install torch first (your CUDA build, or torch==2.13.0 for CPU), then 'secateurs[engine]'",
            )
        raise
    except KeyboardInterrupt:
        fail("interrupted; nothing was written")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """secateurs: one-shot 2:4 (N:M) pruning of Hugging Face causal LMs, with measured perplexity before and
    after and the measured speedup of the packed model.

    \b
    Quick start (SparseGPT 2:4 on SmolLM2-135M through the embedded service; no Redis or database needed):
      secateurs quickstart
    Prune here, in this process:
      secateurs prune MODEL_DIR --calibration-file C4_TXT --eval-file WIKI_TXT --output OUT_DIR
    As a service (REST API, status page at http://HOST:PORT/, Celery workers):
      secateurs serve            then   secateurs submit MODEL … / wait JOB_ID / download JOB_ID
    Use the result:
      secateurs bench OUT_DIR    (packed against dense greedy decode; in Python: secateurs.load(OUT_DIR))
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


# --- The flags that describe a job: shared by `prune` (runs here) and `submit` (queues on a server) ---


def _text_source(options: dict[str, Any], prefix: str) -> TextSource | None:
    """The text source named by the ``--{prefix}-*`` flags of :func:`text_options`, or None if none is given."""
    file, dataset = options[f"{prefix}_file"], options[f"{prefix}_dataset"]
    if file is None and dataset is None:
        return None
    return TextSource(
        file=file, dataset=dataset, dataset_config=options[f"{prefix}_dataset_config"], split=options[f"{prefix}_split"]
    )


def text_options(prefix: str, what: str, default_split: str) -> Any:
    """``--{prefix}-file``, ``--{prefix}-dataset``, ``--{prefix}-dataset-config`` and ``--{prefix}-split``."""

    def decorate(func: Any) -> Any:
        for option in reversed(
            [
                click.option(f"--{prefix}-file", type=click.Path(dir_okay=False), help=f"{what} text file (UTF-8)."),
                click.option(f"--{prefix}-dataset", help=f"{what} Hugging Face dataset name (needs the hub)."),
                click.option(f"--{prefix}-dataset-config", help="Dataset configuration, e.g. wikitext-2-raw-v1."),
                click.option(f"--{prefix}-split", default=default_split, show_default=True, help="Dataset split."),
            ]
        ):
            func = option(func)
        return func

    return decorate


def spec_options(func: Any) -> Any:
    """Every flag that describes a job: shared by ``prune`` here and ``submit`` for the service."""
    options = [
        click.argument("model"),
        click.option("--revision", help="Hub revision (branch, tag or commit) when MODEL is a hub id."),
        click.option(
            "--method",
            type=click.Choice([m.value for m in Method]),
            default="sparsegpt",
            show_default=True,
            help="sparsegpt: Hessian-aware with weight updates; wanda: |W|·||X||; magnitude: |W|.",
        ),
        click.option(
            "--pattern",
            default="2:4",
            show_default=True,
            help="N:M (keep N of every M, e.g. 2:4) or a ratio like 0.5.",
        ),
        text_options("calibration", "Calibration", "train"),
        click.option("--calibration-samples", type=int, default=128, show_default=True, help="Random windows."),
        click.option("--calibration-seqlen", type=int, default=2048, show_default=True, help="Tokens per window."),
        click.option(
            "--calibration-batch-size",
            type=int,
            default=None,
            help="Windows per forward call. Default: all at once (one pass per block, fastest); "
            "set it to bound memory (two passes per block).",
        ),
        click.option(
            "--calibration-precision",
            type=click.Choice(["fp32", "bf16"]),
            default="fp32",
            show_default=True,
            help="Matrix products of the calibration forward: fp32 (strict) or bf16 autocast (faster on "
            "CPUs with bf16 units; Hessians and the solve stay fp32).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration windows."),
        text_options("eval", "Evaluation", "test"),
        click.option("--eval-seqlen", type=int, default=2048, show_default=True, help="Tokens per window."),
        click.option("--eval-windows", type=int, default=None, help="Evaluate the first K windows (default: all)."),
        click.option("--eval-batch-size", type=int, default=8, show_default=True, help="Windows per forward call."),
        click.option(
            "--bos",
            type=click.Choice(["auto", "always", "never"]),
            default="auto",
            show_default=True,
            help="Start every window with BOS ('auto': when the tokenizer adds one, e.g. Gemma).",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
            default="auto",
            show_default=True,
            help="'auto': float32 on CPU, bfloat16 on CUDA.",
        ),
        click.option(
            "--exclude",
            multiple=True,
            help="Leave matching linear layers dense (fnmatch, repeatable): '*.down_proj'.",
        ),
        click.option("--blocksize", type=int, default=128, show_default=True, help="SparseGPT lazy-update block."),
        click.option("--dampening", type=float, default=0.01, show_default=True, help="λ / mean(diag H)."),
        click.option(
            "--refine-iterations",
            type=click.IntRange(0, 1000),
            default=0,
            show_default=True,
            help="Re-solve each layer's kept weights for its mask by N conjugate-gradient steps "
            "(sparsegpt, wanda): lower error, more time. 20 took SmolLM2 from 110.9 to ~100 perplexity.",
        ),
        click.option(
            "--dense-target",
            type=click.FloatRange(0.0, 1.0),
            default=0.0,
            show_default=True,
            help="sparsegpt: before each mask, move the layer this fraction of the way toward reproducing "
            "the dense model's outputs from the pruned model's inputs (0: off; 0.5 measured best). "
            "About 2x prune time, ~0.5 GB more memory.",
        ),
        click.option(
            "--dense-cache/--no-dense-cache",
            default=True,
            show_default=True,
            help="Reuse the dense perplexity an earlier job computed on the same model bytes, evaluation tokens, "
            "dtype and device type, and store this one's; --no-dense-cache always computes it.",
        ),
        click.option(
            "--measure-speed/--no-measure-speed",
            default=None,
            help="Measure dense versus 2:4 sparse speed after pruning (report.json 'decode' and 'speed'; a short "
            "sweep on CPU, about a minute for SmolLM2). Default: on. Off: the report says 'not measured' and why.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def spec_from_options(options: dict[str, Any]) -> JobSpec:
    """A validated :class:`JobSpec` from the flags of :func:`spec_options` (raises ValidationError)."""
    return JobSpec(
        model=options["model"],
        revision=options["revision"],
        method=options["method"],
        pattern=options["pattern"],
        calibration=_text_source(options, "calibration"),
        calibration_samples=options["calibration_samples"],
        calibration_seqlen=options["calibration_seqlen"],
        calibration_batch_size=options["calibration_batch_size"],
        calibration_precision=options["calibration_precision"],
        refine_iterations=options["refine_iterations"],
        dense_target=options["dense_target"],
        seed=options["seed"],
        evaluation=_text_source(options, "eval"),
        eval_seqlen=options["eval_seqlen"],
        eval_windows=options["eval_windows"],
        eval_batch_size=options["eval_batch_size"],
        bos=options["bos"],
        device=options["device"],
        dtype=options["dtype"],
        exclude=tuple(options["exclude"]),
        blocksize=options["blocksize"],
        dampening=options["dampening"],
        measure_speed=options.get("measure_speed"),
        dense_cache=options.get("dense_cache", True),
    )
