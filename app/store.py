"""The job store: every change of a job's state is one compare-and-set on its row.

The row, not the broker, is the truth (GUIDE §3, celery#5935): a worker *claims* a queued job by moving it to
``running`` and bumping ``attempts`` in one conditional UPDATE, so a message delivered twice runs once; every
later write of that worker names the attempt it owns, so a worker whose job was reaped and re-claimed
elsewhere can no longer touch it. Each change also appends a :class:`JobEvent` (its ``id`` a per-job sequence
number), which the event stream replays.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import CursorResult, Engine, Executable, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from secateurs.app.db import EventRow, JobRow, make_engine, utcnow
from secateurs.app.errors import IdempotencyConflictError, JobNotFoundError, JobStateError
from secateurs.app.schemas import Job, JobError, JobEvent, JobProgress, JobResult, JobSpec, JobState

JOB_ID = re.compile(r"job_[0-9a-f]{20}")
"""What :func:`new_job_id` makes; anything else is no job, answered before the database sees it."""


def new_job_id() -> str:
    """``job_`` + 12 hex digits of milliseconds + 8 random: unique, and sorted by creation time."""
    return f"job_{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def request_hash(spec: JobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _changed(session: Session, statement: Executable) -> int:
    """Rows an UPDATE changed: the compare-and-set succeeded when this is 1."""
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return result.rowcount


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"


def to_job(row: JobRow) -> Job:
    return Job(
        id=row.id,
        state=JobState(row.state),
        spec=JobSpec.model_validate(row.spec),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        worker=row.worker,
        cancel_requested=row.cancel_requested,
        progress=JobProgress.model_validate(row.progress) if row.progress else None,
        result=JobResult.model_validate(row.result) if row.result else None,
        error=JobError.model_validate(row.error) if row.error else None,
        idempotency_key=row.idempotency_key,
        created_at=_iso(row.created_at) or "",
        started_at=_iso(row.started_at),
        finished_at=_iso(row.finished_at),
        heartbeat_at=_iso(row.heartbeat_at),
    )


class JobStore:
    """Jobs and their events in a SQL database (SQLite file or PostgreSQL), through SQLAlchemy."""

    def __init__(self, url: str | Engine) -> None:
        self.engine = url if isinstance(url, Engine) else make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def ping(self) -> None:
        with self._session() as session:
            session.execute(select(1))

    # --- events ------------------------------------------------------------------------------------------

    def _event(
        self,
        session: Session,
        job_id: str,
        type_: str,
        state: JobState,
        *,
        progress: JobProgress | None = None,
        error: JobError | None = None,
    ) -> None:
        seq = session.execute(
            update(JobRow).where(JobRow.id == job_id).values(event_seq=JobRow.event_seq + 1).returning(JobRow.event_seq)
        ).scalar_one()
        now = utcnow()
        event = JobEvent(
            id=seq,
            job_id=job_id,
            type="state" if type_ == "state" else "progress",
            state=state,
            progress=progress,
            error=error,
            created_at=_iso(now) or "",
        )
        session.add(EventRow(job_id=job_id, seq=seq, type=type_, data=event.model_dump(mode="json"), created_at=now))

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[JobEvent]:
        with self._session() as session:
            rows = session.scalars(
                select(EventRow)
                .where(EventRow.job_id == job_id, EventRow.seq > after)
                .order_by(EventRow.seq)
                .limit(limit)
            ).all()
            return [JobEvent.model_validate(row.data) for row in rows]

    # --- the API's side ----------------------------------------------------------------------------------

    def create(self, spec: JobSpec, *, max_attempts: int, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """A new ``queued`` job, or the existing one for a reused ``idempotency_key`` (then ``created`` is False).

        Raises :class:`IdempotencyConflictError` when the key was used for a different spec.
        """
        digest = request_hash(spec)
        if idempotency_key is not None:
            existing = self._by_key(idempotency_key, digest)
            if existing is not None:
                return existing, False
        row = JobRow(
            id=new_job_id(),
            state=JobState.QUEUED.value,
            spec=spec.model_dump(mode="json"),
            attempts=0,
            max_attempts=max_attempts,
            cancel_requested=False,
            idempotency_key=idempotency_key,
            request_hash=digest,
            event_seq=0,
            created_at=utcnow(),
        )
        try:
            with self._session() as session:
                session.add(row)
                session.flush()
                self._event(session, row.id, "state", JobState.QUEUED)
        except IntegrityError:
            # Two requests with the same new key raced; the other one created the job.
            existing = self._by_key(idempotency_key or "", digest)
            if existing is None:
                raise
            return existing, False
        return self.get(row.id), True

    def _by_key(self, key: str, digest: str) -> Job | None:
        with self._session() as session:
            row = session.scalars(select(JobRow).where(JobRow.idempotency_key == key)).one_or_none()
            if row is None:
                return None
            if row.request_hash != digest:
                raise IdempotencyConflictError(
                    f"Idempotency-Key {key!r} was already used for job {row.id} with a different request body",
                    hint="send the same body to get that job back, or use a new key for a new job",
                )
            return to_job(row)

    def mark_enqueued(self, job_id: str) -> None:
        with self._session() as session:
            session.execute(update(JobRow).where(JobRow.id == job_id).values(enqueued_at=utcnow()))

    def get(self, job_id: str) -> Job:
        with self._session() as session:
            # A malformed id (a NUL, say, which PostgreSQL refuses in text) never reaches the database.
            row = session.get(JobRow, job_id) if JOB_ID.fullmatch(job_id) else None
            if row is None:
                raise JobNotFoundError(f"no job {job_id!r}", hint="list jobs with GET /v1/jobs")
            return to_job(row)

    def page(
        self, *, after: str | None = None, limit: int = 20, state: JobState | None = None
    ) -> tuple[list[Job], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        query = select(JobRow).order_by(JobRow.id.desc()).limit(limit + 1)
        if after is not None:
            query = query.where(JobRow.id < after)
        if state is not None:
            query = query.where(JobRow.state == state.value)
        with self._session() as session:
            rows = session.scalars(query).all()
            return [to_job(row) for row in rows[:limit]], len(rows) > limit

    def request_cancel(self, job_id: str) -> Job:
        """Queued: cancelled at once. Running: flagged; the worker stops at the next block boundary."""
        job = self.get(job_id)
        if job.state.terminal:
            raise JobStateError(f"job {job_id} already {job.state.value}", hint="only queued or running jobs cancel")
        with self._session() as session:
            done = _changed(
                session,
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == JobState.QUEUED.value)
                .values(state=JobState.CANCELLED.value, cancel_requested=True, finished_at=utcnow()),
            )
            if done:
                self._event(session, job_id, "state", JobState.CANCELLED)
            else:
                session.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.state == JobState.RUNNING.value)
                    .values(cancel_requested=True)
                )
        return self.get(job_id)

    # --- the worker's side: every write names the attempt it owns ----------------------------------------

    def claim(self, job_id: str, worker: str) -> int | None:
        """Move a queued job to running for ``worker``; its attempt number, or None if it is not ours to run."""
        now = utcnow()
        with self._session() as session:
            attempt = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == JobState.QUEUED.value, JobRow.cancel_requested.is_(False))
                .values(
                    state=JobState.RUNNING.value,
                    attempts=JobRow.attempts + 1,
                    worker=worker,
                    started_at=now,
                    heartbeat_at=now,
                    progress=None,
                )
                .returning(JobRow.attempts)
            ).scalar_one_or_none()
            if attempt is not None:
                self._event(session, job_id, "state", JobState.RUNNING)
            return attempt

    def _owned(self, job_id: str, attempt: int) -> Any:
        return (JobRow.id == job_id) & (JobRow.state == JobState.RUNNING.value) & (JobRow.attempts == attempt)

    def heartbeat(self, job_id: str, attempt: int) -> bool:
        """Refresh the heartbeat; False when the attempt no longer owns the job (reaped, or finished)."""
        with self._session() as session:
            owned = _changed(session, update(JobRow).where(self._owned(job_id, attempt)).values(heartbeat_at=utcnow()))
            return bool(owned)

    def progress(self, job_id: str, attempt: int, progress: JobProgress) -> bool:
        with self._session() as session:
            owned = _changed(
                session,
                update(JobRow)
                .where(self._owned(job_id, attempt))
                .values(heartbeat_at=utcnow(), progress=progress.model_dump(mode="json")),
            )
            if owned:
                self._event(session, job_id, "progress", JobState.RUNNING, progress=progress)
            return bool(owned)

    def cancel_requested(self, job_id: str) -> bool:
        with self._session() as session:
            return bool(session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))

    def finish(
        self,
        job_id: str,
        attempt: int,
        state: JobState,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
    ) -> bool:
        """Record the end of the attempt; False (and nothing written) if the attempt lost the job meanwhile."""
        assert state.terminal
        with self._session() as session:
            owned = _changed(
                session,
                update(JobRow)
                .where(self._owned(job_id, attempt))
                .values(
                    state=state.value,
                    finished_at=utcnow(),
                    result=result.model_dump(mode="json") if result else None,
                    error=error.model_dump(mode="json") if error else None,
                ),
            )
            if owned:
                self._event(session, job_id, "state", state, error=error)
            return bool(owned)

    # --- the reaper ----------------------------------------------------------------------------------------

    def reap(self, heartbeat_timeout: float) -> list[str]:
        """Jobs whose worker stopped heartbeating go back to ``queued`` (or ``failed`` after the last attempt).

        Returns the ids to send to the broker again: the requeued ones, and queued jobs whose message never
        reached the broker (``enqueued_at`` unset, e.g. the broker was down when they were created).
        """
        cutoff = utcnow() - dt.timedelta(seconds=heartbeat_timeout)
        requeue: list[str] = []
        with self._session() as session:
            stale = session.scalars(
                select(JobRow).where(JobRow.state == JobState.RUNNING.value, JobRow.heartbeat_at < cutoff)
            ).all()
            for row in stale:
                last = row.attempts >= row.max_attempts
                cancelled = row.cancel_requested
                new_state = JobState.CANCELLED if cancelled else JobState.FAILED if last else JobState.QUEUED
                error = None
                if new_state is JobState.FAILED:
                    error = JobError(
                        type="worker_lost",
                        message=f"the worker running this job stopped responding {row.attempts} time(s) "
                        f"(last: {row.worker}); no attempts left",
                        hint="the model may exhaust the worker's memory: try --calibration-batch-size, fewer "
                        "samples, or a larger machine; then submit again",
                    )
                moved = _changed(
                    session,
                    update(JobRow)
                    .where(self._owned(row.id, row.attempts), JobRow.heartbeat_at < cutoff)
                    .values(
                        state=new_state.value,
                        enqueued_at=None,
                        finished_at=None if new_state is JobState.QUEUED else utcnow(),
                        error=error.model_dump(mode="json") if error else None,
                    ),
                )
                if moved:
                    self._event(session, row.id, "state", new_state, error=error)
                    if new_state is JobState.QUEUED:
                        requeue.append(row.id)
            unsent = session.scalars(
                select(JobRow.id).where(JobRow.state == JobState.QUEUED.value, JobRow.enqueued_at.is_(None))
            ).all()
        return sorted(set(requeue) | set(unsent))
