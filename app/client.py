"""A small typed client of the secateurs REST API (sync, httpx): what the batch CLI and scripts build on.

Every method returns the API's own pydantic schemas (:mod:`secateurs.app.schemas`). Every failure a person can
act on is an :class:`~secateurs.app.errors.ApiError`: :class:`~secateurs.app.errors.ClientError` when the server
refused the request (4xx; its ``ErrorBody`` message and hint are kept), :class:`~secateurs.app.errors.ServerError`
when it failed (5xx),
answered something that is not the API, or could not be reached.

Three things need more than one request and are done here once:

* :meth:`SecateursClient.events` follows ``GET /v1/jobs/{id}/events`` (Server-Sent Events) to the job's
  terminal state, reconnecting after a dropped connection with ``Last-Event-ID`` so no event is lost or seen
  twice;
* :meth:`SecateursClient.download` streams the job's ``artifacts.tar`` into a temporary sibling of the target
  folder, refusing unsafe members (absolute paths, ``..``, links, devices), checks it against the artifact
  listing, and only then renames it into place: a failed download leaves nothing behind;
* :meth:`SecateursClient.upload` streams a local model folder (as a tar) or text file to ``POST /v1/uploads``.

Never imports torch: this is the light side of the project.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from secateurs.app.errors import ClientError, OutputExistsError, ServerError
from secateurs.app.files import replace_dir
from secateurs.app.schemas import ArtifactList, ErrorBody, Job, JobEvent, JobPage, JobSpec, JobState, Upload

log = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

DOWNLOAD_PREFIX = ".secateurs-download-"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
# An event stream may stay silent while a job waits in the queue: a long read timeout, then a reconnect.
STREAM_TIMEOUT = httpx.Timeout(30.0, connect=10.0, read=300.0)
START_HINT = (
    "start one with `secateurs serve` (embedded mode: API and worker on this machine), "
    "or pass --server URL / set SECATEURS_SERVER to where one runs"
)


# --- Server-Sent Events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SseMessage:
    """One dispatched Server-Sent Event (WHATWG HTML §9.2.6): its fields as sent, ``data`` lines joined."""

    event: str
    data: str
    id: str | None
    retry: int | None


def parse_sse(lines: Iterable[str]) -> Iterator[SseMessage]:
    """Server-Sent Events from a stream's lines (line terminators already removed).

    A blank line dispatches the event gathered so far; ``:`` starts a comment (keep-alives); one space after the
    field's colon is dropped; several ``data:`` lines are joined with newlines; an event with no data is not
    dispatched (as in browsers). An unterminated last event is dropped: the connection ended in its middle.
    """
    event, data, event_id, retry = "", list[str](), None, None
    for line in lines:
        if not line:
            if data:
                yield SseMessage(event=event or "message", data="\n".join(data), id=event_id, retry=retry)
            event, data, event_id, retry = "", [], None, None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id" and "\0" not in value:
            event_id = value
        elif field == "retry" and value.isdigit():
            retry = int(value)


# --- Safe extraction of a streamed tar --------------------------------------------------------------------


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks, so :mod:`tarfile` can read a response as it arrives."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = chunk
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def _unsafe(name: str, why: str) -> ServerError:
    return ServerError(
        f"the server's archive holds an unsafe member {name!r} ({why}); nothing was written",
        hint="an archive of a job's output only holds plain files under the folder: report this server",
        error_type="unsafe_archive",
    )


def safe_member_path(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's path relative to the archive root, or None for the root itself; raises on anything unsafe.

    Refused: absolute paths (POSIX or Windows), ``..`` anywhere, NUL bytes, and every member that is not a plain
    file or a folder (symbolic and hard links, devices, FIFOs): an archive of a job's output has none of these.
    """
    name = member.name
    if "\0" in name or "\\" in name:
        raise _unsafe(name, "odd characters in its name")
    if name.startswith("/") or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        raise _unsafe(name, "absolute path")
    parts = [part for part in PurePosixPath(name).parts if part != "."]
    if ".." in parts:
        raise _unsafe(name, "'..' in its path")
    if member.issym() or member.islnk():
        raise _unsafe(name, f"a link to {member.linkname!r}")
    if not (member.isfile() or member.isdir()):
        raise _unsafe(name, "not a plain file or folder")
    return PurePosixPath(*parts) if parts else None


def extract_tar_stream(chunks: Iterable[bytes], root: Path) -> list[PurePosixPath]:
    """Extract a (possibly gzipped) tar read from ``chunks`` into the existing empty folder ``root``.

    Members are checked by :func:`safe_member_path` before anything of theirs is written; files are created
    exclusively (a duplicate member is an error, never an overwrite) with the process's default modes.
    Returns the files written, relative to ``root``. On error the caller removes ``root``.
    """
    written: list[PurePosixPath] = []
    try:
        with tarfile.open(fileobj=_ChunkReader(chunks), mode="r|*") as archive:
            for member in archive:
                relative = safe_member_path(member)
                if relative is None:
                    continue
                target = root.joinpath(*relative.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members always have data
                    raise _unsafe(member.name, "no data")
                with source, open(target, "xb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                written.append(relative)
    except (tarfile.TarError, EOFError) as exc:
        raise ServerError(
            f"the server's archive is damaged or incomplete ({exc}); nothing was written",
            hint="run the same command again",
        ) from None
    except FileExistsError as exc:
        raise _unsafe(str(exc.filename), "a second member with the same path") from None
    return written


def _default_modes(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give the downloaded tree the usual modes (umask) before it is renamed."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _check_output(output: Path, *, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a folder", hint="choose another --output path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {output} is not empty",
            hint="choose another --output, or pass --overwrite to replace it",
        )


# --- The client -----------------------------------------------------------------------------------------


def idempotency_key_for(*parts: str) -> str:
    """A stable idempotency key from ``parts`` (e.g. a batch file's path, the entry's index and spec hash)."""
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return f"secateurs-{digest[:40]}"


class SecateursClient:
    """The REST API of one secateurs server.

    >>> client = SecateursClient("http://127.0.0.1:8000")            # doctest: +SKIP
    >>> job = client.submit(JobSpec(model="/models/llama", method="magnitude"))  # doctest: +SKIP
    >>> client.wait(job.id).state                                     # doctest: +SKIP
    <JobState.SUCCEEDED: 'succeeded'>

    ``transport`` replaces the network (tests pass an ``httpx.MockTransport``). ``reconnect_for`` bounds how long
    an event stream keeps trying to reconnect while the server cannot be reached.
    """

    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        reconnect_delay: float = 1.0,
        reconnect_for: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.server = server.rstrip("/")
        if not self.server.startswith(("http://", "https://")):
            raise ClientError(
                f"server URL {server!r} does not start with http:// or https://",
                hint="e.g. --server http://127.0.0.1:8000",
            )
        headers = {"User-Agent": "secateurs-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, transport=transport)
        self.reconnect_delay = reconnect_delay
        self.reconnect_for = reconnect_for
        self._sleep = sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SecateursClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------------------

    def _unreachable(self, exc: httpx.TransportError, what: str) -> ServerError:
        if isinstance(exc, httpx.ConnectError):
            return ServerError(f"cannot connect to the secateurs server at {self.server} ({exc})", hint=START_HINT)
        if isinstance(exc, httpx.TimeoutException):
            return ServerError(
                f"the secateurs server at {self.server} did not answer {what} in time ({type(exc).__name__})",
                hint="check that the server is healthy (GET /readyz) and try again",
            )
        return ServerError(
            f"the connection to the secateurs server at {self.server} failed during {what} ({exc!r})",
            hint="check the server's logs and try again",
        )

    def _raise_for_error(self, response: httpx.Response) -> None:
        """Turn a 4xx/5xx answer into a ClientError/ServerError carrying the server's message and hint."""
        if response.status_code < 400:
            return
        response.read()
        what = f"{response.request.method} {response.request.url.path}"
        status = response.status_code
        message, hint, error_type = None, None, None
        try:
            body = ErrorBody.model_validate_json(response.content)
            message, hint, error_type = body.error.message, body.error.hint, body.error.type
        except ValidationError:
            try:
                detail = response.json().get("detail")
            except (ValueError, AttributeError):
                detail = None
            if detail is not None:
                message = str(detail)
        if message is None:
            text = response.text.strip()[:200] or response.reason_phrase
            message = f"{what} answered HTTP {status}: {text}"
        if hint is None:
            if status in (401, 403):
                hint = "pass --api-key KEY or set SECATEURS_API_KEY to a key the server accepts"
            elif status == 404 and "/v1/jobs/" in what:
                hint = "check the job id: `secateurs list` shows the server's jobs"
            elif status >= 500:
                hint = "the server failed: its logs say why; try again"
        cls = ClientError if status < 500 else ServerError
        raise cls(message, hint, http_status=status, error_type=error_type)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc, f"{method} {path}") from None
        self._raise_for_error(response)
        return response

    def _parse(self, model: type[ModelT], response: httpx.Response) -> ModelT:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ServerError(
                f"{response.request.method} {response.request.url.path} answered something that is not a "
                f"{model.__name__} ({exc.error_count()} problems, first: {exc.errors()[0]['msg']})",
                hint=f"is {self.server} a secateurs server of the same version as this client?",
            ) from None

    @staticmethod
    def _job_path(job_id: str) -> str:
        return f"/v1/jobs/{quote(job_id, safe='')}"

    # --- the API ------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the API process answers."""
        result: dict[str, Any] = self._request("GET", "/healthz").json()
        return result

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: broker and job store reachable (raises ServerError with the reason otherwise)."""
        result: dict[str, Any] = self._request("GET", "/readyz").json()
        return result

    def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> Job:
        """``POST /v1/jobs``. With a key, a repeat of the same request returns the first job (no new job)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = spec.model_dump(mode="json")
        attempts = 3 if idempotency_key else 1  # only a keyed POST is safe to send again after a network error
        for attempt in range(1, attempts + 1):
            try:
                response = self._http.post("/v1/jobs", json=body, headers=headers)
                break
            except httpx.TransportError as exc:
                if attempt == attempts or isinstance(exc, httpx.ConnectError):
                    raise self._unreachable(exc, "POST /v1/jobs") from None
                log.warning("POST /v1/jobs failed (%r); sending it again with the same idempotency key", exc)
                self._sleep(self.reconnect_delay)
        self._raise_for_error(response)
        return self._parse(Job, response)

    def job(self, job_id: str) -> Job:
        """``GET /v1/jobs/{id}``."""
        return self._parse(Job, self._request("GET", self._job_path(job_id)))

    def jobs(self, *, after: str | None = None, limit: int = 20, state: JobState | str | None = None) -> JobPage:
        """``GET /v1/jobs``: one page, newest first; pass ``page.next_after`` as ``after`` for the next."""
        params: dict[str, str | int] = {"limit": limit}
        if after:
            params["after"] = after
        if state:
            params["state"] = JobState(state).value
        return self._parse(JobPage, self._request("GET", "/v1/jobs", params=params))

    def iter_jobs(self, *, state: JobState | str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job, newest first, following the cursor."""
        after: str | None = None
        while True:
            page = self.jobs(after=after, limit=page_size, state=state)
            yield from page.data
            if not page.has_more or not page.next_after:
                return
            after = page.next_after

    def cancel(self, job_id: str) -> Job:
        """``POST /v1/jobs/{id}/cancel``: a queued job is cancelled at once, a running one at its next block."""
        return self._parse(Job, self._request("POST", f"{self._job_path(job_id)}/cancel"))

    def report(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}/report``: the job's ``report.json`` (once it succeeded)."""
        result: dict[str, Any] = self._request("GET", f"{self._job_path(job_id)}/report").json()
        return result

    def artifacts(self, job_id: str, parts: Collection[str] | None = None) -> ArtifactList:
        """``GET /v1/jobs/{id}/artifacts``: the files of a succeeded job's output folder (or of its ``parts``:
        ``dense``, ``packed``, ``report``)."""
        params = {"part": list(parts)} if parts else None
        return self._parse(ArtifactList, self._request("GET", f"{self._job_path(job_id)}/artifacts", params=params))

    def upload(self, source: Path, kind: Literal["model", "text"]) -> Upload:
        """``POST /v1/uploads``: stream a text file, or a model folder packed as a tar (files at its root).

        Use ``f"upload:{upload.id}"`` as a job's ``model`` or a text source's ``file``.
        """
        with tempfile.TemporaryFile() as packed:
            if source.is_dir():
                if kind != "model":
                    raise ClientError(f"{source} is a folder", hint="only a model is uploaded as a folder")
                with tarfile.open(fileobj=packed, mode="w") as archive:
                    for path in sorted(source.iterdir()):
                        archive.add(path, arcname=path.name)
                packed.seek(0)
                body: Any = packed
            else:
                body = open(source, "rb")  # noqa: SIM115 - closed below
            try:
                response = self._request(
                    "POST",
                    "/v1/uploads",
                    params={"kind": kind},
                    content=body,
                    headers={"Content-Type": "application/octet-stream"},
                    timeout=httpx.Timeout(30.0, connect=10.0, write=600.0),
                )
            finally:
                if body is not packed:
                    body.close()
        return self._parse(Upload, response)

    # --- the event stream -------------------------------------------------------------------------------------

    def events(self, job_id: str, *, last_event_id: int | None = None) -> Iterator[JobEvent]:
        """The job's events, from after ``last_event_id`` (or the first) to its terminal state, then stops.

        A dropped connection (or a 5xx while the server restarts) is retried every ``reconnect_delay`` seconds
        with ``Last-Event-ID`` set to the last event seen, for up to ``reconnect_for`` seconds without a
        successful connection; events already seen are never yielded twice. If a stream ends without a terminal
        event, the job itself is asked: a job already over ends the iteration (its final state is
        :meth:`job`'s), otherwise the stream is opened again.
        """
        path = f"{self._job_path(job_id)}/events"
        last = last_event_id
        delay = self.reconnect_delay
        failing_since: float | None = None
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            problem: ServerError | None = None
            try:
                with self._http.stream("GET", path, headers=headers, timeout=STREAM_TIMEOUT) as response:
                    self._raise_for_error(response)
                    content_type = response.headers.get("content-type", "")
                    if not content_type.startswith("text/event-stream"):
                        raise ServerError(
                            f"GET {path} answered {content_type or 'no content type'}, not text/event-stream",
                            hint=f"is {self.server} a secateurs server?",
                        )
                    failing_since = None
                    for message in parse_sse(response.iter_lines()):
                        if message.retry is not None:
                            delay = message.retry / 1000
                        event = self._event(message, path)
                        if last is not None and event.id <= last:
                            continue
                        last = event.id
                        yield event
                        if event.type == "state" and event.state.terminal:
                            return
            except httpx.TransportError as exc:
                problem = self._unreachable(exc, f"GET {path}")
                log.info("event stream of %s dropped (%r); reconnecting after event %s", job_id, exc, last)
            except ServerError as exc:
                if exc.http_status is None:  # not the API talking: reconnecting would not help
                    raise
                problem = exc
                log.info("event stream of %s: HTTP %s; reconnecting", job_id, exc.http_status)
            if problem is None:  # the stream ended cleanly without a terminal event
                if self.job(job_id).state.terminal:
                    return
            else:
                failing_since = failing_since if failing_since is not None else time.monotonic()
                if time.monotonic() - failing_since > self.reconnect_for:
                    raise problem
            self._sleep(delay)

    @staticmethod
    def _event(message: SseMessage, path: str) -> JobEvent:
        try:
            return JobEvent.model_validate_json(message.data)
        except ValidationError as exc:
            raise ServerError(
                f"GET {path} sent an event that is not a JobEvent: {exc.errors()[0]['msg']} in {message.data[:200]!r}",
                hint="are the client and the server the same version of secateurs?",
            ) from None

    def wait(self, job_id: str, on_event: Callable[[JobEvent], None] | None = None) -> Job:
        """Follow the job's events (``on_event`` sees each) until it is over; return the final :class:`Job`."""
        for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
        return self.job(job_id)

    # --- downloads ----------------------------------------------------------------------------------------

    def download(
        self,
        job_id: str,
        output: Path,
        *,
        overwrite: bool = False,
        parts: Collection[str] | None = None,
        announce: Callable[[ArtifactList], None] | None = None,
    ) -> ArtifactList:
        """Stream the job's output folder (``artifacts.tar``), or only its ``parts``, into ``output``, whole or not
        at all.

        ``parts``: any of ``dense`` (the Hugging Face checkpoint), ``packed`` (``packed/``) and ``report``
        (``report.json``); None takes everything. ``announce`` sees the listing (files, total size) before the
        first byte is fetched. ``output`` must be absent or empty unless ``overwrite``. The archive goes into a
        temporary sibling folder, is checked member by member (:func:`safe_member_path`) and against the artifact
        listing (names and sizes), and is renamed into place only then; on any error the temporary folder is
        removed.
        """
        output = Path(os.path.abspath(output))
        _check_output(output, overwrite=overwrite)
        listing = self.artifacts(job_id, parts)
        if not listing.data:
            raise ClientError(
                f"job {job_id} has no {' or '.join(parts or ['output'])} files to download",
                hint="a packed copy exists only for N:M patterns (report.json 'packed' says why not); "
                "`secateurs download --only dense` takes the Hugging Face checkpoint",
            )
        if announce is not None:
            announce(listing)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{DOWNLOAD_PREFIX}{output.name}-", dir=output.parent))
        path = f"{self._job_path(job_id)}/artifacts.tar"
        params = {"part": list(parts)} if parts else None
        try:
            try:
                with self._http.stream("GET", path, params=params, timeout=STREAM_TIMEOUT) as response:
                    self._raise_for_error(response)
                    extract_tar_stream(response.iter_bytes(), tmp)
            except httpx.TransportError as exc:
                raise ServerError(
                    f"the download of {job_id} from {self.server} broke off ({exc!r}); nothing was written",
                    hint="run the same command again",
                ) from None
            _verify(tmp, listing, job_id)
            _default_modes(tmp)
            replace_dir(tmp, output, DOWNLOAD_PREFIX)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return listing

    def download_file(self, job_id: str, artifact: str, dest: Path) -> Path:
        """``GET /v1/jobs/{id}/artifacts/{path}`` into ``dest`` (written beside it, then renamed)."""
        path = f"{self._job_path(job_id)}/artifacts/{quote(artifact, safe='/')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{DOWNLOAD_PREFIX}{dest.name}-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with self._http.stream("GET", path, timeout=STREAM_TIMEOUT) as response:
                        self._raise_for_error(response)
                        for chunk in response.iter_bytes():
                            out.write(chunk)
                except httpx.TransportError as exc:
                    raise self._unreachable(exc, f"GET {path}") from None
            os.replace(name, dest)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return dest


def _verify(root: Path, listing: ArtifactList, job_id: str) -> None:
    """The extracted tree must hold exactly the listed files, with the listed sizes."""
    expected = {artifact.path: artifact.size for artifact in listing.data}
    found = {path.relative_to(root).as_posix(): path.stat().st_size for path in root.rglob("*") if path.is_file()}
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    wrong = sorted(name for name in expected.keys() & found.keys() if expected[name] != found[name])
    if missing or extra or wrong:
        problems = [
            f"{label}: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}"
            for label, names in (("missing", missing), ("not listed", extra), ("wrong size", wrong))
            if names
        ]
        raise ServerError(
            f"the archive of {job_id} does not match its artifact listing ({'; '.join(problems)}); nothing was written",
            hint="run the same command again; if it persists, the job's artifacts changed or are damaged",
        )
