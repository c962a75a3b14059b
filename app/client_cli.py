"""The batch CLI: ``secateurs submit / status / list / wait / cancel / download / batch``.

These commands talk only to a secateurs server's REST API (:mod:`secateurs.app.client`); they never import torch, so
they run on any machine with Python, far from the GPUs. Registered on :data:`secateurs.app.cli.cli`.

Exit codes: 0 success; 1 a job failed or was cancelled (``wait``, ``batch``); 2 the request itself was wrong or
the server could not be reached (message and hint on stderr).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from secateurs.app.artifacts import PARTS
from secateurs.app.cli import cli, err_console, fail, spec_from_options, spec_options, user_errors
from secateurs.app.client import SecateursClient, idempotency_key_for
from secateurs.app.errors import InvalidSpecError, SecateursError
from secateurs.app.schemas import ArtifactList, Job, JobEvent, JobSpec, JobState, describe_validation_error
from secateurs.app.settings import get_settings

EXIT_JOB_FAILED = 1


def out_console() -> Console:
    """stdout, for a command's result; wide when piped, so that tables in logs and scripts do not wrap."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


# --- Shared options and helpers ---------------------------------------------------------------------------


def server_options(func: Any) -> Any:
    """``--server`` and ``--api-key``: defaults from ``SECATEURS_SERVER`` / ``SECATEURS_API_KEY`` (via Settings)."""
    func = click.option(
        "--api-key",
        metavar="KEY",
        default=None,
        help="Sent as 'Authorization: Bearer KEY' [default: $SECATEURS_API_KEY].",
    )(func)
    func = click.option(
        "--server",
        metavar="URL",
        default=None,
        help="The secateurs REST API [default: $SECATEURS_SERVER, else http://127.0.0.1:8000].",
    )(func)
    return func


def open_client(server: str | None, api_key: str | None) -> SecateursClient:
    """A client for ``--server``/``--api-key``, falling back to the settings (the only reader of the environment)."""
    settings = get_settings()
    if api_key is None and settings.api_key is not None:
        api_key = settings.api_key.get_secret_value()
    return SecateursClient(server or settings.server_url, api_key)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _ppl(job: Job) -> str:
    result = job.result
    if result is None or result.perplexity_pruned is None:
        return "–"
    dense = f"{result.perplexity_dense:.2f}" if result.perplexity_dense is not None else "?"
    cached = " (cached)" if result.perplexity_dense_cached_from else ""  # `secateurs status` says from where
    return f"{dense}{cached} → {result.perplexity_pruned:.2f}"


def _state(state: JobState) -> str:
    color = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}.get(state.value, "")
    return f"[{color}]{state.value}[/]" if color else state.value


def _where(job: Job) -> str:
    """Where a job is: its stage and block, for tables."""
    progress = job.progress
    if job.state.terminal or progress is None:
        return ""
    if progress.block is not None and progress.blocks:
        return f"{progress.stage or ''} {progress.block}/{progress.blocks}".strip()
    return progress.stage.value if progress.stage else progress.message


def _absolute(value: str | None, base: Path | None = None) -> str | None:
    """A path that exists locally (relative to ``base`` or the current folder) as an absolute path, else as is."""
    if value is None or value.startswith("upload:"):
        return value
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return os.path.abspath(path) if path.exists() else value


# --- Live progress from the event stream ----------------------------------------------------------------------


class JobDisplay:
    """Progress of jobs from their events: rich bars on a terminal (stderr), one line per change otherwise."""

    def __init__(self, console: Console = err_console, *, live: bool | None = None) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.fields[label]}"),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[blocks]}"),
            TextColumn("{task.fields[eta]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()
        self._last_line: dict[str, str] = {}

    def __enter__(self) -> JobDisplay:
        if self.live:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._progress.stop()

    def add(self, key: str, label: str, description: str, total: float | None = None) -> None:
        with self._lock:
            if self.live:
                self._tasks[key] = self._progress.add_task(description, total=total, label=label, blocks="", eta="")
            elif total is None:  # a job's row; a counting row only shows on a terminal
                self._print(key, f"{label} {description}")

    def advance(self, key: str, description: str) -> None:
        """Move a counting row (the batch's own) one step."""
        with self._lock:
            if self.live and key in self._tasks:
                self._progress.update(self._tasks[key], advance=1, description=description)

    def note(self, line: str) -> None:
        self.console.print(line, highlight=False, soft_wrap=True)

    def remove(self, key: str) -> None:
        with self._lock:
            if key in self._tasks:
                self._progress.remove_task(self._tasks.pop(key))

    def update(self, key: str, label: str, event: JobEvent) -> None:
        progress = event.progress
        description = event.state.value
        if event.state is JobState.RUNNING and progress is not None:
            description = progress.stage.value.replace("_", " ") if progress.stage else progress.message or "running"
        blocks = eta = ""
        fields: dict[str, Any] = {}
        if progress is not None and progress.blocks:
            blocks = f"block {progress.block or 0}/{progress.blocks}"
            fields = {"completed": progress.block or 0, "total": progress.blocks}
            if progress.eta_seconds is not None and not event.state.terminal:
                eta = f"ETA {_duration(progress.eta_seconds)}"
        if event.state is JobState.SUCCEEDED and "total" in fields:
            fields["completed"] = fields["total"]
        with self._lock:
            if self.live and key in self._tasks:
                self._progress.update(self._tasks[key], description=description, blocks=blocks, eta=eta, **fields)
            elif not self.live and not event.state.terminal:  # the end is said once, by the command
                self._print(key, " ".join(part for part in (label, description, blocks, eta) if part))

    def _print(self, key: str, line: str) -> None:
        if self._last_line.get(key) != line:
            self._last_line[key] = line
            self.console.print(line, highlight=False, soft_wrap=True)


def _job_table(job: Job) -> Table:
    table = Table(show_header=False, title=f"{job.id}", title_justify="left")
    spec = job.spec
    table.add_row("state", _state(job.state) + (" (cancel requested)" if job.cancel_requested else ""))
    table.add_row("model", spec.model + (f" @ {spec.revision}" if spec.revision else ""))
    table.add_row("method", f"{spec.method.value} {spec.pattern}")
    if job.progress is not None and not job.state.terminal:
        p = job.progress
        where = " · ".join(
            part
            for part in (
                p.stage.value if p.stage else "",
                f"block {p.block}/{p.blocks}" if p.block is not None and p.blocks else "",
                f"ETA {_duration(p.eta_seconds)}" if p.eta_seconds is not None else "",
                p.message,
            )
            if part
        )
        table.add_row("progress", where)
    worker = f" (worker {job.worker})" if job.worker else ""
    table.add_row("attempts", f"{job.attempts} of {job.max_attempts}{worker}")
    table.add_row("created", job.created_at)
    if job.started_at:
        table.add_row("started", job.started_at)
    if job.finished_at:
        table.add_row("finished", job.finished_at)
    if job.result is not None:
        r = job.result
        if r.decode is not None:
            table.add_row("decode speedup", r.decode.summary())
        table.add_row("perplexity", _ppl(job))
        if r.perplexity_dense_cached_from:
            table.add_row("dense perplexity", f"cached from {r.perplexity_dense_cached_from}")
        verified = "verified" if r.sparsity_verified else "[red]NOT verified[/]"
        table.add_row("sparsity", f"{r.pruned_fraction:.1%} zeros, pattern {verified}")
        table.add_row("time", f"prune {_duration(r.prune_seconds)}, total {_duration(r.total_seconds)} on {r.device}")
    if job.error is not None:
        table.add_row("error", f"[red]{job.error.message}[/] ({job.error.type})")
        if job.error.hint:
            table.add_row("hint", job.error.hint)
    return table


# --- Commands -------------------------------------------------------------------------------------------


@cli.command()
@spec_options
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Send the same KEY again (e.g. after a timeout) and the server returns the first job, not a new one.",
)
@server_options
def submit(idempotency_key: str | None, server: str | None, api_key: str | None, **options: Any) -> None:
    """Queue a job on a secateurs server; print its id (and only that) on stdout.

    Same flags as `secateurs prune`, without --output: the server keeps the result (`secateurs download`).
    MODEL, --calibration-file and --eval-file that exist here are sent as absolute paths (the server must be
    allowed to read them: embedded `secateurs serve` allows the caller's files); anything else is sent as
    written (a hub id, a path on the server, or upload:ID).

    \b
    Example:
      JOB=$(secateurs submit MODEL_DIR --pattern 2:4 --calibration-file c4.utf8 \\
              --calibration-samples 64 --calibration-seqlen 512 --eval-file wiki.test.raw --device cpu)
      secateurs wait "$JOB" && secateurs download "$JOB" --output OUT_DIR
    """
    with user_errors():
        options["model"] = _absolute(options["model"])
        options["calibration_file"] = _absolute(options["calibration_file"])
        options["eval_file"] = _absolute(options["eval_file"])
        spec = spec_from_options(options)
        with open_client(server, api_key) as client:
            job = client.submit(spec, idempotency_key=idempotency_key)
    err_console.print(
        f"{job.id} {job.state.value}: follow it with `secateurs wait {job.id}`", highlight=False, soft_wrap=True
    )
    click.echo(job.id)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON (the API's Job object).")
@server_options
def status(job_id: str, as_json: bool, server: str | None, api_key: str | None) -> None:
    """Show one job: state, progress, result or error.

    \b
    Example:
      secateurs status job_0193f2c4... --json | jq .state
    """
    with user_errors(), open_client(server, api_key) as client:
        job = client.job(job_id)
    if as_json:
        click.echo(job.model_dump_json(indent=2))
    else:
        out_console().print(_job_table(job))


@cli.command("list")
@click.option("--state", type=click.Choice([s.value for s in JobState]), help="Only jobs in this state.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True, help="Jobs to show.")
@click.option("--after", metavar="JOB", help="Start after this job (the cursor printed at the bottom).")
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON (the API's JobPage object).")
@server_options
def list_jobs(
    *, state: str | None, limit: int, after: str | None, as_json: bool, server: str | None, api_key: str | None
) -> None:
    """List jobs, newest first.

    \b
    Examples:
      secateurs list --state running
      secateurs list --limit 100 --json | jq -r '.data[].id'
    """
    with user_errors(), open_client(server, api_key) as client:
        page = client.jobs(after=after, limit=limit, state=state)
    if as_json:
        click.echo(page.model_dump_json(indent=2))
        return
    table = Table("job", "state", "model", "method", "progress", "ppl dense → pruned", "created")
    for job in page.data:
        table.add_row(
            job.id,
            _state(job.state),
            job.spec.model,
            f"{job.spec.method.value} {job.spec.pattern}",
            _where(job),
            _ppl(job),
            job.created_at,
        )
    out_console().print(table)
    if page.has_more and page.next_after:
        err_console.print(f"more: secateurs list --after {page.next_after}", highlight=False)


def _finish(job: Job) -> None:
    """The end of `wait`: a one-line verdict; exit 1 with the job's error and hint unless it succeeded."""
    if job.state is JobState.SUCCEEDED:
        ppl = _ppl(job)
        took = _duration(job.result.total_seconds) if job.result else "–"
        decode = job.result.decode if job.result else None
        speed = f", decode {decode.speedup:.2f}x dense" if decode and decode.measured and decode.speedup else ""
        err_console.print(
            f"[green]{job.id} succeeded[/]" + (f": perplexity {ppl}" if ppl != "–" else "") + speed + f" in {took}",
            highlight=False,
        )
        return
    if job.state is JobState.CANCELLED:
        err_console.print(f"[yellow]{job.id} was cancelled[/]", highlight=False)
    else:
        error = job.error
        message = error.message if error else "no reason recorded"
        err_console.print(f"[bold red]error:[/] {job.id} {job.state.value}: {message}", highlight=False)
        if error and error.hint:
            err_console.print(f"[yellow]  hint:[/] {error.hint}", highlight=False)
    sys.exit(EXIT_JOB_FAILED)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print the final job as JSON on stdout.")
@server_options
def wait(job_id: str, as_json: bool, server: str | None, api_key: str | None) -> None:
    """Follow a job live (stage, block i/N, ETA) until it ends; exit 0 only if it succeeded.

    Reads the job's event stream and reconnects by itself if the connection drops. Exit 1 (with the job's
    error message and hint) if it failed or was cancelled; exit 2 if the server cannot be reached.

    \b
    Example:
      secateurs wait "$JOB" && secateurs download "$JOB" --output OUT_DIR
    """
    with user_errors(), open_client(server, api_key) as client:
        job = client.job(job_id)
        if not job.state.terminal:
            key = job.id
            with JobDisplay() as display:
                display.add(key, key, job.state.value)
                job = client.wait(key, on_event=lambda event: display.update(key, key, event))
    if as_json:
        click.echo(job.model_dump_json(indent=2))
    _finish(job)


@cli.command()
@click.argument("job_id", metavar="JOB")
@server_options
def cancel(job_id: str, server: str | None, api_key: str | None) -> None:
    """Cancel a job: a queued one at once, a running one at its next block boundary (partial output removed).

    \b
    Example:
      secateurs cancel "$JOB" && secateurs wait "$JOB"   # exits 1: cancelled
    """
    with user_errors(), open_client(server, api_key) as client:
        job = client.cancel(job_id)
    if job.state.terminal:
        click.echo(f"{job.id} {job.state.value}")
    else:
        click.echo(f"{job.id} {job.state.value}: cancel requested, it stops at the next block")


def human_size(size: int) -> str:
    """Bytes as people read them (decimal units, as the README's sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def announce_download(job_id: str, output: str) -> Callable[[ArtifactList], None]:
    """What `download` says on stderr before the first byte: how many files, how large, into where."""

    def announce(listing: ArtifactList) -> None:
        parts = f" ({', '.join(listing.parts)})" if listing.parts else ""
        err_console.print(
            f"downloading {job_id}{parts}: {len(listing.data)} files, {human_size(listing.size)}, into {output}",
            highlight=False,
            soft_wrap=True,
        )

    return announce


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option(
    "--output", "-o", type=click.Path(file_okay=False), required=True, help="Folder to write (absent or empty)."
)
@click.option(
    "--only",
    "parts",
    type=click.Choice(PARTS),
    multiple=True,
    help="Take only this part (repeatable): dense (the Hugging Face checkpoint), packed (the packed N:M copy, "
    "packed/), report (report.json). Default: everything.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it holds something (after the download).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@server_options
def download(
    *,
    job_id: str,
    output: str,
    parts: tuple[str, ...],
    overwrite: bool,
    as_json: bool,
    server: str | None,
    api_key: str | None,
) -> None:
    """Download a succeeded job's output folder, as `prune` writes it, or only some of its parts.

    The size is printed (on stderr) before the download starts. Streamed into a temporary folder beside OUTPUT,
    checked (no absolute paths, '..' or links; every listed file with its size), then renamed: OUTPUT appears
    whole or not at all. The result (folder, files, bytes) goes to stdout.

    \b
    Examples:
      secateurs download "$JOB" --output out/llama-2of4                  # everything
      secateurs download "$JOB" --output out/llama-2of4 --only dense --only report
      secateurs download "$JOB" --output out/llama-packed --only packed   # then: secateurs unpack
    """
    with user_errors(), open_client(server, api_key) as client:
        job = client.job(job_id)
        if job.state is not JobState.SUCCEEDED:
            fail(
                f"{job.id} is {job.state.value}: only a succeeded job has artifacts",
                f"`secateurs wait {job.id}` follows it to the end"
                if not job.state.terminal
                else f"`secateurs status {job.id}` says why",
            )
        listing = client.download(
            job.id, Path(output), overwrite=overwrite, parts=parts or None, announce=announce_download(job.id, output)
        )
    if as_json:
        result = {
            "job": job.id,
            "output": os.path.abspath(output),
            "parts": listing.parts or list(PARTS),
            "files": [artifact.model_dump() for artifact in listing.data],
            "size": listing.size,
        }
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{output}: {len(listing.data)} files, {human_size(listing.size)}")


# --- batch ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchEntry:
    index: int  # 0-based position in the file
    spec: JobSpec
    key: str
    name: str | None

    @property
    def label(self) -> str:
        return self.name or f"#{self.index + 1}"


@dataclass
class BatchResult:
    entry: BatchEntry
    job: Job | None = None
    error: SecateursError | None = None
    downloaded: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.job is not None and self.job.state is JobState.SUCCEEDED


def _read_entries(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """The raw entries of a batch file and its defaults: JSONL (one spec per line) or YAML/JSON."""
    text = path.read_text(encoding="utf-8")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    if not jsonl:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            lines = [line for line in text.splitlines() if line.strip()]
            if not (lines and all(line.lstrip().startswith("{") for line in lines)):
                raise InvalidSpecError(
                    f"{path} is not valid YAML: {exc}", hint="write a YAML list of job specs, or JSONL"
                ) from None
            jsonl = True
    if jsonl:
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InvalidSpecError(
                        f"{path} line {number} is not JSON: {exc}", hint="JSONL holds one JSON object per line"
                    ) from None
        return entries, {}
    if isinstance(data, list):
        return data, {}
    if isinstance(data, dict) and isinstance(data.get("jobs"), list):
        unknown = set(data) - {"jobs", "defaults"}
        if unknown:
            raise InvalidSpecError(
                f"{path}: unknown top-level keys {sorted(unknown)}", hint="only 'jobs' and 'defaults' are read"
            )
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise InvalidSpecError(f"{path}: 'defaults' must be a mapping of spec fields")
        return data["jobs"], defaults
    raise InvalidSpecError(
        f"{path} holds no list of jobs",
        hint="write a YAML list of job specs, a mapping with 'jobs:' (and optional 'defaults:'), or JSONL",
    )


def load_batch(path: Path) -> list[BatchEntry]:
    """Validate every entry of a batch file before anything is submitted.

    Each entry is a job spec (the JSON body of ``POST /v1/jobs``) plus optional ``name`` and ``idempotency_key``.
    Local paths are taken relative to the batch file's folder and sent absolute. Without its own key, an entry's
    key is derived from the file's absolute path, the entry's index and the spec's hash: running the same file
    again finds the same jobs instead of submitting new ones.
    """
    path = path.resolve()
    raw_entries, defaults = _read_entries(path)
    base = path.parent
    entries: list[BatchEntry] = []
    keys: dict[str, int] = {}
    for index, raw in enumerate(raw_entries):
        where = f"{path.name} entry {index + 1}"
        if not isinstance(raw, dict):
            raise InvalidSpecError(f"{where} is not a mapping of spec fields", hint="e.g. {model: ..., method: ...}")
        fields = {**defaults, **raw}
        key = fields.pop("idempotency_key", None)
        name = fields.pop("name", None)
        if isinstance(fields.get("model"), str):
            fields["model"] = _absolute(fields["model"], base)
        for text in ("calibration", "evaluation"):
            source = fields.get(text)
            if isinstance(source, dict) and isinstance(source.get("file"), str):
                fields[text] = {**source, "file": _absolute(source["file"], base)}
        try:
            spec = JobSpec.model_validate(fields)
        except ValidationError as exc:
            raise InvalidSpecError(
                f"{where}: {describe_validation_error(exc)}",
                hint="fields are those of POST /v1/jobs (`secateurs submit --help`), plus 'name' and 'idempotency_key'",
            ) from None
        if key is None:
            spec_hash = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
            key = idempotency_key_for(str(path), str(index), spec_hash)
        key = str(key)
        if key in keys:
            raise InvalidSpecError(
                f"{where} has the same idempotency_key as entry {keys[key] + 1}",
                hint="give every entry its own key (or none: one is derived)",
            )
        keys[key] = index
        entries.append(BatchEntry(index=index, spec=spec, key=key, name=None if name is None else str(name)))
    if not entries:
        raise InvalidSpecError(f"{path} holds no jobs", hint="add at least one job spec")
    return entries


def _run_entry(
    client: SecateursClient, entry: BatchEntry, download_dir: Path | None, display: JobDisplay
) -> BatchResult:
    result = BatchResult(entry)
    key = f"entry-{entry.index}"
    try:
        job = client.submit(entry.spec, idempotency_key=entry.key)
        result.job = job
        label = f"{entry.label} {job.id}"
        if not job.state.terminal:
            display.add(key, label, job.state.value)
            try:
                job = client.wait(job.id, on_event=lambda event: display.update(key, label, event))
            finally:
                display.remove(key)
            result.job = job
        if download_dir is not None and job.state is JobState.SUCCEEDED:
            target = download_dir / (entry.name or job.id)
            if not (target.is_dir() and any(target.iterdir())):  # a complete earlier download is kept
                client.download(job.id, target)
            result.downloaded = target
    except SecateursError as exc:
        result.error = exc
    return result


def run_batch(
    client: SecateursClient,
    entries: list[BatchEntry],
    *,
    concurrency: int,
    download_dir: Path | None = None,
    display: JobDisplay | None = None,
    on_result: Callable[[BatchResult], None] | None = None,
) -> list[BatchResult]:
    """Submit, follow and (optionally) download every entry, at most ``concurrency`` at a time, in file order.

    Worker threads are daemons: an interrupted batch leaves its jobs running on the server, and the same batch
    run again finds them by their idempotency keys.
    """
    display = display or JobDisplay(live=False)
    results: list[BatchResult | None] = [None] * len(entries)
    todo: queue.SimpleQueue[BatchEntry] = queue.SimpleQueue()
    for entry in entries:
        todo.put(entry)

    def work() -> None:
        while True:
            try:
                entry = todo.get_nowait()
            except queue.Empty:
                return
            result = _run_entry(client, entry, download_dir, display)
            results[entry.index] = result
            if on_result is not None:
                on_result(result)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(concurrency, len(entries)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # a short join, so Ctrl-C reaches the main thread
            thread.join(0.2)
    return [result for result in results if result is not None]


def _results_table(results: list[BatchResult]) -> Table:
    table = Table("#", "job", "model", "method", "state", "ppl dense → pruned", "time", title="batch results")
    for result in results:
        job, entry = result.job, result.entry
        state = _state(job.state) if job is not None else "[red]not submitted[/]"
        if result.error is not None and job is not None:
            state += " [red](client error)[/]"
        table.add_row(
            str(entry.index + 1) + (f" {entry.name}" if entry.name else ""),
            job.id if job else "–",
            entry.spec.model,
            f"{entry.spec.method.value} {entry.spec.pattern}",
            state,
            _ppl(job) if job else "–",
            _duration(job.result.total_seconds) if job and job.result else "–",
        )
    return table


@contextmanager
def _interrupt_hint() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        fail(
            "interrupted; jobs already submitted keep running on the server",
            "run the same command again: it finds them by their idempotency keys instead of submitting them again",
        )


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--concurrency", "-j", type=click.IntRange(1, 64), default=4, show_default=True, help="Jobs in flight at once."
)
@click.option(
    "--download-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Download each succeeded job's output to DIR/<name or job id> (kept if already there).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON lines instead of a table.")
@server_options
def batch(
    *,
    file: Path,
    concurrency: int,
    download_dir: Path | None,
    as_json: bool,
    server: str | None,
    api_key: str | None,
) -> None:
    """Run every job of FILE (YAML or JSONL job specs); print a results table; exit 1 if any job did not succeed.

    Every entry is validated before anything is submitted. At most --concurrency jobs are in flight at once.
    Each entry is submitted with an idempotency key (its own `idempotency_key`, else one derived from FILE's path,
    the entry's position and its spec), so running the same FILE again, after an interruption or a failure,
    resumes: finished jobs are reported (and downloaded) without being submitted again. Relative paths are
    relative to FILE's folder.

    \b
    FILE (YAML; `defaults` are merged into every job; `name` is optional):
      defaults:
        calibration: {file: data/c4.utf8}
        evaluation: {file: data/wiki.test.raw}
        calibration_samples: 64
        calibration_seqlen: 512
      jobs:
        - {name: sgpt, model: models/smollm2, method: sparsegpt}
        - {name: wanda, model: models/smollm2, method: wanda}
    or JSONL, one spec per line:
      {"model": "/models/smollm2", "method": "magnitude", "idempotency_key": "smol-mag"}

    \b
    Example:
      secateurs batch jobs.yaml --concurrency 2 --download-dir out/
    """
    with user_errors(), _interrupt_hint():
        entries = load_batch(file)
        with open_client(server, api_key) as client:
            client.health()  # an unreachable server is one message, not one per entry
            with JobDisplay() as display:
                total = len(entries)
                display.add("batch", "batch", f"0/{total} done", total=total)
                done = [0]

                def finished(result: BatchResult) -> None:
                    done[0] += 1
                    display.advance("batch", f"{done[0]}/{total} done")
                    job = result.job
                    state = job.state.value if job else "not submitted"
                    reason = result.error.message if result.error else ""
                    if job is not None and job.error is not None:
                        reason = job.error.message
                    display.note(
                        f"{result.entry.label} {job.id if job else ''} {state}".replace("  ", " ")
                        + (f": {reason}" if reason else "")
                    )

                results = run_batch(
                    client,
                    entries,
                    concurrency=concurrency,
                    download_dir=download_dir,
                    display=display,
                    on_result=finished,
                )
    if as_json:
        for result in results:
            click.echo(
                json.dumps(
                    {
                        "index": result.entry.index,
                        "name": result.entry.name,
                        "idempotency_key": result.entry.key,
                        "job": result.job.model_dump(mode="json") if result.job else None,
                        "client_error": result.error.as_dict() if result.error else None,
                        "downloaded": str(result.downloaded) if result.downloaded else None,
                    }
                )
            )
    else:
        out_console().print(_results_table(results))
    failures = [result for result in results if not result.ok]
    for result in failures:
        job = result.job
        problem = result.error or (job.error if job else None)
        if problem is not None:
            hint = f" (hint: {problem.hint})" if problem.hint else ""
            err_console.print(
                f"[red]{result.entry.label}[/] {job.id if job else ''}: {problem.message}{hint}",
                highlight=False,
                soft_wrap=True,
            )
    if failures:
        err_console.print(f"{len(failures)} of {len(results)} jobs did not succeed", highlight=False)
        sys.exit(EXIT_JOB_FAILED)
