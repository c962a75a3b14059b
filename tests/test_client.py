"""The REST client and the batch CLI against an in-process fake of the API (``httpx.MockTransport``).

The fake keeps the contract the real server keeps (``app/api``): jobs with idempotency keys, Server-Sent Events
with ``Last-Event-ID``, ``ErrorBody`` errors, a streamed tar of the output folder. It can drop an event stream
in the middle and serve hostile archives, which a real server never does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from secateurs.app import client_cli
from secateurs.app.cli import cli
from secateurs.app.client import SecateursClient, extract_tar_stream, parse_sse
from secateurs.app.errors import ClientError, OutputExistsError, ServerError
from secateurs.app.schemas import (
    Artifact,
    ArtifactList,
    ErrorBody,
    Job,
    JobError,
    JobEvent,
    JobPage,
    JobProgress,
    JobResult,
    JobSpec,
    JobState,
    Stage,
)
from secateurs.app.settings import get_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x00" * 3000, "report.json": b"{}"}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _error(status: int, type_: str, message: str, hint: str | None = None) -> httpx.Response:
    return httpx.Response(status, json=ErrorBody(error=JobError(type=type_, message=message, hint=hint)).model_dump())


class DroppingStream(httpx.SyncByteStream):
    """An event stream whose connection breaks after ``chunks``: what a restarting proxy or server does."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        raise httpx.ReadError("connection reset by peer")


def tar_bytes(files: dict[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(archive)
    return buffer.getvalue()


class FakeServer:
    """Just enough of the secateurs API. A job finishes the moment it is created: its events are all stored.

    A model whose name contains ``fail`` fails in its second block; every other job succeeds.
    """

    def __init__(self, blocks: int = 3) -> None:
        self.blocks = blocks
        self.jobs: dict[str, Job] = {}
        self.events: dict[str, list[JobEvent]] = {}
        self.keys: dict[str, tuple[Any, str]] = {}
        self.created = 0
        self.requests: list[httpx.Request] = []
        self.drop_after: int | None = None  # drop the first event stream after this many events
        self.archive: bytes | None = None  # replaces the well-formed artifacts.tar
        self.transport = httpx.MockTransport(self.handle)

    def client(self, api_key: str | None = None) -> SecateursClient:
        return SecateursClient("http://fake", api_key, transport=self.transport, sleep=lambda _: None)

    # --- the jobs' lives ------------------------------------------------------------------------------

    def _event(self, job: Job, type_: str, state: JobState, **fields: Any) -> None:
        events = self.events.setdefault(job.id, [])
        events.append(JobEvent(id=len(events) + 1, job_id=job.id, type=type_, state=state, created_at=_now(), **fields))

    def create(self, spec: JobSpec, key: str | None) -> Job:
        self.created += 1
        job = Job(
            id=f"job_{self.created:04d}",
            state=JobState.QUEUED,
            spec=spec,
            attempts=0,
            max_attempts=3,
            worker=None,
            cancel_requested=False,
            progress=None,
            result=None,
            error=None,
            idempotency_key=key,
            created_at=_now(),
            started_at=None,
            finished_at=None,
            heartbeat_at=None,
        )
        self._event(job, "state", JobState.QUEUED)
        self._event(job, "state", JobState.RUNNING)
        fails = "fail" in spec.model
        for block in range(1, self.blocks + 1):
            if fails and block == 2:
                error = JobError(type="pruning_failed", message="Cholesky failed in layer 7", hint="raise --dampening")
                self._event(job, "state", JobState.FAILED, error=error)
                self.jobs[job.id] = job.model_copy(update={"state": JobState.FAILED, "error": error, "attempts": 1})
                return self.jobs[job.id]
            progress = JobProgress(
                stage=Stage.PRUNE, message="pruning", block=block, blocks=self.blocks, eta_seconds=2.0 * (3 - block)
            )
            self._event(job, "progress", JobState.RUNNING, progress=progress)
        self._event(job, "state", JobState.SUCCEEDED)
        result = JobResult(
            perplexity_dense=29.37,
            perplexity_pruned=110.7,
            sparsity_verified=True,
            pruned_fraction=0.5,
            prune_seconds=1.0,
            total_seconds=3.0,
            device="cpu",
        )
        self.jobs[job.id] = job.model_copy(update={"state": JobState.SUCCEEDED, "result": result, "attempts": 1})
        return self.jobs[job.id]

    # --- HTTP --------------------------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:  # noqa: PLR0911 - a router
        self.requests.append(request)
        path, method = request.url.path, request.method
        if path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/v1/jobs" and method == "POST":
            return self._create(request)
        if path == "/v1/jobs":
            return self._list(request)
        parts = path.split("/")  # "", "v1", "jobs", id, ...
        job = self.jobs.get(parts[3]) if len(parts) > 3 else None
        if job is None:
            return _error(404, "job_not_found", f"no job {parts[3] if len(parts) > 3 else ''!r}")
        tail = "/".join(parts[4:])
        if tail == "" and method == "GET":
            return httpx.Response(200, json=job.model_dump(mode="json"))
        if tail == "cancel" and method == "POST":
            return httpx.Response(200, json=job.model_dump(mode="json"))
        if tail == "events":
            return self._events(request, job)
        if tail in {"artifacts", "artifacts.tar"}:
            if job.state is not JobState.SUCCEEDED:
                return _error(409, "job_state", f"job {job.id} is {job.state.value}", "wait until it succeeded")
            if tail == "artifacts.tar":
                body = self.archive if self.archive is not None else tar_bytes(FILES)
                return httpx.Response(200, content=body, headers={"content-type": "application/x-tar"})
            listing = ArtifactList(
                data=[Artifact(path=name, size=len(data)) for name, data in FILES.items()],
                archive=f"/v1/jobs/{job.id}/artifacts.tar",
            )
            return httpx.Response(200, json=listing.model_dump(mode="json"))
        return _error(404, "not_found", f"no route {method} {path}")

    def _create(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        try:
            spec = JobSpec.model_validate(body)
        except ValueError as exc:
            return _error(422, "invalid_spec", str(exc))
        key = request.headers.get("idempotency-key")
        if key is not None and key in self.keys:
            first_body, job_id = self.keys[key]
            if first_body != body:
                return _error(409, "idempotency_conflict", "key reused with another body", "use a new key")
            return httpx.Response(200, json=self.jobs[job_id].model_dump(mode="json"))
        job = self.create(spec, key)
        if key is not None:
            self.keys[key] = (body, job.id)
        return httpx.Response(201, json=job.model_dump(mode="json"))

    def _list(self, request: httpx.Request) -> httpx.Response:
        state = request.url.params.get("state")
        limit = int(request.url.params.get("limit", "20"))
        jobs = [job for job in reversed(self.jobs.values()) if state is None or job.state.value == state]
        more = len(jobs) > limit
        page = JobPage(data=jobs[:limit], has_more=more, next_after=jobs[limit - 1].id if more else None)
        return httpx.Response(200, json=page.model_dump(mode="json"))

    def _events(self, request: httpx.Request, job: Job) -> httpx.Response:
        after = int(request.headers.get("last-event-id", "0"))
        chunks = [
            f"id: {e.id}\nevent: {e.type}\ndata: {e.model_dump_json()}\n\n".encode()
            for e in self.events[job.id]
            if e.id > after
        ]
        chunks.insert(0, b": keep-alive\n\n")
        headers = {"content-type": "text/event-stream"}
        if self.drop_after is not None:
            cut, self.drop_after = self.drop_after + 1, None
            return httpx.Response(200, headers=headers, stream=DroppingStream(chunks[:cut]))
        return httpx.Response(200, headers=headers, content=b"".join(chunks))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    """A fake server that the CLI commands talk to."""
    server = FakeServer()
    monkeypatch.setattr(
        client_cli,
        "open_client",
        lambda url, key: SecateursClient(url or "http://fake", key, transport=server.transport, sleep=lambda _: None),
    )
    return server


def magnitude_spec(model: str = "/models/tiny") -> JobSpec:
    return JobSpec(model=model, method="magnitude")


# --- Server-Sent Events -----------------------------------------------------------------------------------


def test_parse_sse_follows_the_event_stream_format() -> None:
    lines = [": keep-alive", "", "id: 1", "event: state", "data: {", "data:  }", "retry: 250", "", "data: x", ""]
    lines += ["id: 3", "data: unterminated"]  # the connection ended inside this event: not dispatched
    messages = list(parse_sse(lines))
    assert [(m.id, m.event, m.data, m.retry) for m in messages] == [
        ("1", "state", "{\n }", 250),
        (None, "message", "x", None),
    ]


def test_events_resume_after_a_dropped_connection_with_last_event_id() -> None:
    server = FakeServer(blocks=4)
    job = server.create(magnitude_spec(), None)
    server.drop_after = 3  # queued, running, block 1 … then the connection resets
    with server.client() as client:
        events = list(client.events(job.id))
    assert [event.id for event in events] == list(range(1, len(server.events[job.id]) + 1))  # each exactly once
    assert events[-1].state is JobState.SUCCEEDED
    streams = [r for r in server.requests if r.url.path.endswith("/events")]
    assert [r.headers.get("last-event-id") for r in streams] == [None, "3"]


def test_events_end_when_the_stream_closes_on_a_finished_job() -> None:
    server = FakeServer()
    job = server.create(magnitude_spec(), None)
    server.events[job.id] = server.events[job.id][:2]  # the stream ends cleanly without the terminal event
    with server.client() as client:
        assert [event.id for event in client.events(job.id)] == [1, 2]
        assert client.wait(job.id).state is JobState.SUCCEEDED


def test_events_give_up_after_reconnect_for_seconds() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    clock = iter(range(0, 1000, 10))
    client = SecateursClient(
        "http://fake", transport=httpx.MockTransport(refuse), reconnect_for=30, sleep=lambda _: None
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("secateurs.app.client.time.monotonic", lambda: float(next(clock)))
        with pytest.raises(ServerError, match="cannot connect") as info:
            list(client.events("job_1"))
    assert "secateurs serve" in (info.value.hint or "")


# --- Errors -------------------------------------------------------------------------------------------


def test_error_bodies_become_client_and_server_errors_with_message_and_hint() -> None:
    replies = {
        "/v1/jobs/gone": _error(404, "job_not_found", "no job 'gone'", "list them with GET /v1/jobs"),
        "/v1/jobs/locked": httpx.Response(401, json={"detail": "Not authenticated"}),
        "/v1/jobs/broken": httpx.Response(500, text="Internal Server Error"),
        "/v1/jobs/weird": httpx.Response(200, json={"id": "x"}),
    }
    transport = httpx.MockTransport(lambda request: replies[request.url.path])
    client = SecateursClient("http://fake", transport=transport)
    with pytest.raises(ClientError) as gone:
        client.job("gone")
    assert (gone.value.message, gone.value.hint) == ("no job 'gone'", "list them with GET /v1/jobs")
    assert (gone.value.http_status, gone.value.error_type) == (404, "job_not_found")
    with pytest.raises(ClientError, match="Not authenticated") as locked:
        client.job("locked")
    assert "--api-key" in (locked.value.hint or "")
    with pytest.raises(ServerError, match="HTTP 500") as broken:
        client.job("broken")
    assert broken.value.http_status == 500
    with pytest.raises(ServerError, match="not a Job"):
        client.job("weird")


def test_connection_refused_names_the_server_and_how_to_start_one() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = CliRunner().invoke(cli, ["status", "job_1", "--server", url])
    assert result.exit_code == 2
    assert url in result.stderr and "secateurs serve" in result.stderr
    assert "Traceback" not in result.output


def test_api_key_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return _error(404, "job_not_found", "no job")

    monkeypatch.setenv("SECATEURS_API_KEY", "s3cret")
    monkeypatch.setenv("SECATEURS_SERVER", "http://from-env:9")
    get_settings.cache_clear()
    try:
        client = client_cli.open_client(None, None)
        assert client.server == "http://from-env:9"
        client._http = httpx.Client(
            base_url=client.server, headers=client._http.headers, transport=httpx.MockTransport(handler)
        )
        with pytest.raises(ClientError):
            client.job("job_1")
    finally:
        get_settings.cache_clear()
    assert seen == ["Bearer s3cret"]
    assert "s3cret" not in repr(get_settings())


# --- Commands -------------------------------------------------------------------------------------------


def test_submit_prints_only_the_job_id_and_sends_absolute_paths(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    (work / "c.txt").write_text("text")
    (work / "m").symlink_to(work / "model")  # kept as named: the server resolves and checks it
    monkeypatch.chdir(work)
    args = ["submit", "m", "--pattern", "2:4", "--calibration-file", "c.txt", "--calibration-samples", "8"]
    result = CliRunner().invoke(cli, [*args, "--eval-dataset", "wikitext", "--idempotency-key", "k1"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "job_0001\n"
    post = next(r for r in fake.requests if r.method == "POST")
    body = json.loads(post.content)
    assert body["model"] == str(work / "m")
    assert body["calibration"]["file"] == str(work / "c.txt")
    assert body["evaluation"]["dataset"] == "wikitext"  # not a path: sent as written
    assert post.headers["idempotency-key"] == "k1"


def test_submit_refuses_a_bad_spec_before_sending_anything(fake: FakeServer) -> None:
    result = CliRunner().invoke(cli, ["submit", "gpt2", "--pattern", "5:4", "--method", "magnitude"])
    assert result.exit_code == 2
    assert "5:4" in result.stderr and result.stdout == ""
    assert fake.requests == []


def test_wait_exits_zero_only_when_the_job_succeeded(fake: FakeServer) -> None:
    ok = fake.create(magnitude_spec(), None)
    bad = fake.create(magnitude_spec("/models/fail"), None)
    runner = CliRunner()
    done = runner.invoke(cli, ["wait", ok.id])
    assert done.exit_code == 0, done.output
    assert "succeeded" in done.stderr and "110.70" in done.stderr
    failed = runner.invoke(cli, ["wait", bad.id])
    assert failed.exit_code == 1
    assert "Cholesky failed in layer 7" in failed.stderr and "raise --dampening" in failed.stderr
    missing = runner.invoke(cli, ["wait", "job_9999"])
    assert missing.exit_code == 2 and "no job" in missing.stderr


def test_wait_follows_a_running_job_through_its_events(fake: FakeServer) -> None:
    job = fake.create(magnitude_spec(), None)
    fake.jobs[job.id] = job.model_copy(update={"state": JobState.RUNNING})  # GET says running; events go on
    final = job.model_copy(update={"state": JobState.SUCCEEDED})
    original = fake.handle

    def handle(request: httpx.Request) -> httpx.Response:
        response = original(request)
        if request.url.path.endswith("/events"):
            fake.jobs[job.id] = final  # the job is over once its stream has been read
        return response

    fake.transport.handler = handle
    result = CliRunner().invoke(cli, ["wait", job.id, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "succeeded"
    assert f"{job.id} prune block 3/3 ETA 0s" in result.stderr  # not a terminal: one line per change
    assert any(r.url.path.endswith("/events") for r in fake.requests)


def test_status_list_and_cancel(fake: FakeServer) -> None:
    job = fake.create(magnitude_spec(), None)
    runner = CliRunner()
    status = runner.invoke(cli, ["status", job.id, "--json"])
    assert status.exit_code == 0 and Job.model_validate_json(status.stdout).id == job.id
    table = runner.invoke(cli, ["status", job.id])
    assert "succeeded" in table.stdout and "/models/tiny" in table.stdout
    listing = runner.invoke(cli, ["list", "--state", "succeeded", "--limit", "5"])
    assert listing.exit_code == 0 and job.id in listing.stdout
    query = fake.requests[-1].url.params
    assert (query["state"], query["limit"]) == ("succeeded", "5")
    cancel = runner.invoke(cli, ["cancel", job.id])
    assert cancel.exit_code == 0 and job.id in cancel.stdout


# --- Downloads ----------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_download_writes_exactly_the_output_folder(fake: FakeServer, tmp_path: Path) -> None:
    job = fake.create(magnitude_spec(), None)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["download", job.id, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == FILES
    assert _leftovers(tmp_path) == ["out"]
    again = CliRunner().invoke(cli, ["download", job.id, "--output", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_download_of_an_unfinished_job_says_to_wait(fake: FakeServer, tmp_path: Path) -> None:
    job = fake.create(magnitude_spec(), None)
    fake.jobs[job.id] = job.model_copy(update={"state": JobState.RUNNING})
    result = CliRunner().invoke(cli, ["download", job.id, "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "secateurs wait" in result.stderr
    assert _leftovers(tmp_path) == []


def _symlink(archive: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("escape")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive.addfile(info)


def _duplicate(archive: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("config.json")
    info.size = 5
    archive.addfile(info, io.BytesIO(b"again"))


def _hardlink(archive: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("hard")
    info.type, info.linkname = tarfile.LNKTYPE, "config.json"
    archive.addfile(info)


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (tar_bytes({**FILES, "../evil.txt": b"x"}), "'..'"),
        (tar_bytes({"sub/../../evil.txt": b"x", **FILES}), "'..'"),
        (tar_bytes({**FILES, "/tmp/evil.txt": b"x"}), "absolute"),
        (tar_bytes(FILES, _symlink), "link"),
        (tar_bytes(FILES, _hardlink), "link"),
        (tar_bytes(FILES, _duplicate), "same path"),
        (tar_bytes({"config.json": FILES["config.json"]}), "does not match"),
        (tar_bytes(FILES)[:2048], "damaged or incomplete"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "duplicate", "missing-files", "truncated"],
)
def test_download_refuses_unsafe_or_broken_archives_and_leaves_nothing(
    archive: bytes, message: str, tmp_path: Path
) -> None:
    server = FakeServer()
    job = server.create(magnitude_spec(), None)
    server.archive = archive
    with server.client() as client, pytest.raises(ServerError, match=message):
        client.download(job.id, tmp_path / "out")
    assert _leftovers(tmp_path) == []  # no output, no temporary sibling
    assert not (tmp_path.parent / "evil.txt").exists()


def test_download_broken_off_midway_leaves_nothing(tmp_path: Path) -> None:
    server = FakeServer()
    job = server.create(magnitude_spec(), None)
    original = server.handle

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("artifacts.tar"):
            return httpx.Response(200, stream=DroppingStream([tar_bytes(FILES)[:1536]]))
        return original(request)

    client = SecateursClient("http://fake", transport=httpx.MockTransport(handle))
    with pytest.raises(ServerError, match="broke off"):
        client.download(job.id, tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_download_overwrite_replaces_only_after_success(tmp_path: Path) -> None:
    server = FakeServer()
    job = server.create(magnitude_spec(), None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with server.client() as client:
        with pytest.raises(OutputExistsError):
            client.download(job.id, out)
        server.archive = tar_bytes({"../x": b""})
        with pytest.raises(ServerError):
            client.download(job.id, out, overwrite=True)
        assert _leftovers(out) == ["old.txt"]
        server.archive = None
        client.download(job.id, out, overwrite=True)
    assert sorted(_leftovers(out)) == sorted(FILES)
    assert _leftovers(tmp_path) == ["out"]


def test_extract_accepts_gzip_and_nested_folders(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in ("./a/b.txt", "c.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            archive.addfile(info, io.BytesIO(b"z"))
    data = buffer.getvalue()
    written = extract_tar_stream((data[i : i + 7] for i in range(0, len(data), 7)), tmp_path)
    assert [p.as_posix() for p in written] == ["a/b.txt", "c.txt"]
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"z"


# --- batch ----------------------------------------------------------------------------------------------


def _batch_file(tmp_path: Path) -> Path:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "c4.txt").write_text("calibration text")
    path = tmp_path / "jobs.yaml"
    path.write_text(
        "defaults:\n"
        "  calibration: {file: c4.txt}\n"
        "  calibration_samples: 4\n"
        "jobs:\n"
        "  - {name: sgpt, model: models/tiny, method: sparsegpt}\n"
        "  - {model: models/fail, method: magnitude}\n"
        "  - {name: wanda, model: models/tiny, method: wanda, idempotency_key: my-wanda}\n"
    )
    return path


def test_batch_runs_every_entry_reports_failures_and_resumes_without_resubmitting(
    fake: FakeServer, tmp_path: Path
) -> None:
    path = _batch_file(tmp_path)
    downloads = tmp_path / "dl"
    runner = CliRunner()
    first = runner.invoke(cli, ["batch", str(path), "--concurrency", "2", "--download-dir", str(downloads)])
    assert first.exit_code == 1, first.output  # one job failed
    assert fake.created == 3
    assert "Cholesky failed in layer 7" in first.stderr and "1 of 3 jobs did not succeed" in first.stderr
    for column in ("sparsegpt 2:4", "failed", "succeeded", "29.37 → 110.70"):
        assert column in first.stdout
    bodies = [json.loads(r.content) for r in fake.requests if r.method == "POST"]
    assert bodies[0]["model"] == str(tmp_path / "models" / "tiny")  # relative to the batch file's folder
    assert bodies[0]["calibration"]["file"] == str(tmp_path / "c4.txt")
    assert bodies[1]["model"] == "models/fail"  # does not exist here: sent as written
    assert sorted(_leftovers(downloads)) == ["sgpt", "wanda"]
    keys = {r.headers["idempotency-key"] for r in fake.requests if r.method == "POST"}
    assert "my-wanda" in keys and len(keys) == 3

    second = runner.invoke(cli, ["batch", str(path), "--json"])
    assert second.exit_code == 1
    assert fake.created == 3  # every entry found again by its key
    lines = [json.loads(line) for line in second.stdout.splitlines()]
    assert [line["job"]["id"] for line in lines] == ["job_0001", "job_0002", "job_0003"]


def test_batch_resumes_an_interrupted_run(fake: FakeServer, tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps({"model": f"/m/{i}", "method": "magnitude"}) for i in range(4)) + "\n")
    entries = client_cli.load_batch(path)
    with fake.client() as client:  # the run that was interrupted got two jobs in
        for entry in entries[:2]:
            client.submit(entry.spec, idempotency_key=entry.key)
    assert fake.created == 2
    result = CliRunner().invoke(cli, ["batch", str(path), "-j", "3"])
    assert result.exit_code == 0, result.output
    assert fake.created == 4
    assert [entry.key for entry in client_cli.load_batch(path)] == [entry.key for entry in entries]  # stable


def test_batch_validates_every_entry_before_submitting(fake: FakeServer, tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"model": "a", "method": "magnitude"}\n\n{"model": "b", "method": "magnitude", "patern": "2:4"}\n')
    result = CliRunner().invoke(cli, ["batch", str(path)])
    assert result.exit_code == 2
    assert "entry 2" in result.stderr and "patern" in result.stderr
    assert fake.requests == []
    path.write_text(
        "- {model: a, method: magnitude, idempotency_key: k}\n- {model: b, method: magnitude, idempotency_key: k}\n"
    )
    path = path.rename(tmp_path / "jobs.yaml")
    result = CliRunner().invoke(cli, ["batch", str(path)])
    assert result.exit_code == 2 and "same idempotency_key" in result.stderr


def test_client_commands_do_not_import_torch() -> None:
    code = "import sys, secateurs.app.client_cli, secateurs.app.client; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# --- End to end: the three-command contract against a real embedded server ---------------------------------


def test_three_command_contract_against_embedded_serve(tiny_dir: Any, tmp_path: Path) -> None:
    """`secateurs serve --port PORT`, then `submit`, `wait`, `download` through the console script, as documented.

    The downloaded folder holds exactly what `secateurs prune` writes for the same flags.
    """
    from tests.service import service_env, start_api

    model = tiny_dir("llama")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog while calibration text flows onward " * 200)
    flags = [
        "--method", "sparsegpt", "--pattern", "2:4",
        "--calibration-file", str(text), "--calibration-samples", "4", "--calibration-seqlen", "32", "--seed", "0",
        "--eval-file", str(text), "--eval-seqlen", "32", "--eval-windows", "3", "--device", "cpu",
        "--no-measure-speed",
    ]  # fmt: skip
    secateurs = str(Path(sys.executable).parent / "secateurs")
    env = service_env(tmp_path / "data")
    api, url = start_api(env, tmp_path / "serve.log")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([secateurs, *args], env=env, capture_output=True, text=True, check=False, timeout=300)

    try:
        submit = run("submit", str(model), "--server", url, *flags)
        assert submit.returncode == 0, submit.stderr
        job_id = submit.stdout.strip()
        assert submit.stdout == f"{job_id}\n" and job_id.startswith("job_")
        wait = run("wait", job_id, "--server", url)
        assert wait.returncode == 0, wait.stderr + api.output()[-3000:]
        assert "succeeded" in wait.stderr
        out = tmp_path / "out"
        download = run("download", job_id, "--server", url, "--output", str(out))
        assert download.returncode == 0, download.stderr
        again = run("submit", str(model), "--server", url, *flags, "--idempotency-key", "k")
        same = run("submit", str(model), "--server", url, *flags, "--idempotency-key", "k")
        assert again.stdout == same.stdout  # the key found the first job
    finally:
        api.stop()
        with contextlib.suppress(ProcessLookupError):  # a worker `serve` restarted while stopping (its own group)
            os.killpg(api.process.pid, signal.SIGKILL)
    local = tmp_path / "local"
    prune = run("prune", str(model), *flags, "--output", str(local))
    assert prune.returncode == 0, prune.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local.iterdir())
    served, pruned = (json.loads((folder / "report.json").read_text()) for folder in (out, local))
    assert served["sparsity"] == pruned["sparsity"] and served["sparsity"]["verified"]
    assert served["perplexity"]["pruned"] == pytest.approx(pruned["perplexity"]["pruned"], rel=1e-3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".secateurs")] == []
