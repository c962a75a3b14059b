"""The job store on SQLite and on PostgreSQL: compare-and-set claims, ownership, reaping, idempotency, paging."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from secateurs.app.db import JobRow
from secateurs.app.errors import IdempotencyConflictError, JobNotFoundError, JobStateError
from secateurs.app.migrate import upgrade
from secateurs.app.schemas import JobError, JobProgress, JobResult, JobSpec, JobState
from secateurs.app.store import JobStore
from tests.service import postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        upgrade(url)
        store = JobStore(url)
        yield store
        store.engine.dispose()
    else:
        with postgres_database() as url:
            upgrade(url)
            store = JobStore(url)
            yield store
            store.engine.dispose()


def spec(**changes: object) -> JobSpec:
    return JobSpec.model_validate({"model": "/models/m", "method": "magnitude", **changes})


def test_create_is_idempotent_per_key(store: JobStore) -> None:
    first, created = store.create(spec(), max_attempts=3, idempotency_key="k1")
    again, created_again = store.create(spec(), max_attempts=3, idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    other, _ = store.create(spec(), max_attempts=3)
    assert other.id != first.id
    with pytest.raises(IdempotencyConflictError, match="different request body"):
        store.create(spec(pattern="4:8"), max_attempts=3, idempotency_key="k1")
    with pytest.raises(JobNotFoundError):
        store.get("job_nope")


def test_claim_is_a_compare_and_set(store: JobStore) -> None:
    job, _ = store.create(spec(), max_attempts=3)
    winners: list[int | None] = []
    threads = [threading.Thread(target=lambda i=i: winners.append(store.claim(job.id, f"w{i}"))) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(w for w in winners if w is not None) == [1], winners
    running = store.get(job.id)
    assert running.state is JobState.RUNNING and running.attempts == 1 and running.heartbeat_at is not None
    assert store.claim(job.id, "late") is None


def test_only_the_owning_attempt_writes(store: JobStore) -> None:
    job, _ = store.create(spec(), max_attempts=3)
    attempt = store.claim(job.id, "w1")
    assert attempt == 1
    assert store.progress(job.id, 1, JobProgress(message="block 1/4", block=1, blocks=4))
    assert store.heartbeat(job.id, 1)
    assert not store.heartbeat(job.id, 2)
    assert store.finish(job.id, 1, JobState.SUCCEEDED, result=_result())
    assert not store.finish(job.id, 1, JobState.FAILED, error=JobError(type="x", message="twice"))
    assert not store.progress(job.id, 1, JobProgress(message="late"))
    done = store.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result is not None and done.error is None


def _result() -> JobResult:
    return JobResult(
        perplexity_dense=10.0,
        perplexity_pruned=12.0,
        sparsity_verified=True,
        pruned_fraction=0.5,
        prune_seconds=1.0,
        total_seconds=2.0,
        device="cpu",
    )


def _age_heartbeat(store: JobStore, job_id: str) -> None:
    with store.engine.begin() as connection:
        connection.execute(update(JobRow).where(JobRow.id == job_id).values(heartbeat_at=JobRow.created_at))


def test_reaper_requeues_then_fails_after_the_last_attempt(store: JobStore) -> None:
    job, _ = store.create(spec(), max_attempts=2)
    store.mark_enqueued(job.id)
    assert store.reap(60.0) == []  # nothing stale, nothing unsent
    assert store.claim(job.id, "w1") == 1
    _age_heartbeat(store, job.id)
    assert store.reap(3600.0) == []  # within the timeout
    assert store.reap(0.0) == [job.id]
    requeued = store.get(job.id)
    assert requeued.state is JobState.QUEUED and requeued.attempts == 1
    assert not store.heartbeat(job.id, 1)  # the first attempt lost the job
    assert store.claim(job.id, "w2") == 2
    _age_heartbeat(store, job.id)
    assert store.reap(0.0) == []
    failed = store.get(job.id)
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error.type == "worker_lost" and "no attempts left" in failed.error.message
    assert failed.error.hint


def test_reaper_sends_queued_jobs_the_broker_never_got(store: JobStore) -> None:
    job, _ = store.create(spec(), max_attempts=3)  # never marked enqueued: the broker was down
    assert store.reap(600.0) == [job.id]
    store.mark_enqueued(job.id)
    assert store.reap(600.0) == []


def test_cancel(store: JobStore) -> None:
    queued, _ = store.create(spec(), max_attempts=3)
    assert store.request_cancel(queued.id).state is JobState.CANCELLED
    assert store.claim(queued.id, "w") is None
    with pytest.raises(JobStateError, match="already cancelled"):
        store.request_cancel(queued.id)
    running, _ = store.create(spec(), max_attempts=3)
    store.claim(running.id, "w")
    flagged = store.request_cancel(running.id)
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested and store.cancel_requested(running.id)


def test_pages_cover_every_job_once_newest_first(store: JobStore) -> None:
    ids = [store.create(spec(seed=i), max_attempts=3)[0].id for i in range(5)]
    store.claim(ids[1], "w")
    seen: list[str] = []
    after = None
    while True:
        page, more = store.page(after=after, limit=2)
        seen += [job.id for job in page]
        if not more:
            break
        after = page[-1].id
    assert seen == sorted(ids, reverse=True)
    running, more = store.page(state=JobState.RUNNING)
    assert [job.id for job in running] == [ids[1]] and not more


def test_events_are_numbered_in_order(store: JobStore) -> None:
    job, _ = store.create(spec(), max_attempts=3)
    store.claim(job.id, "w")
    store.progress(job.id, 1, JobProgress(message="block 1/2", block=1, blocks=2))
    store.finish(job.id, 1, JobState.FAILED, error=JobError(type="invalid_data", message="empty", hint="fix"))
    events = store.events(job.id)
    assert [e.id for e in events] == [1, 2, 3, 4]
    assert [(e.type, e.state.value) for e in events] == [
        ("state", "queued"),
        ("state", "running"),
        ("progress", "running"),
        ("state", "failed"),
    ]
    assert events[-1].error is not None and events[-1].error.hint == "fix"
    assert [e.id for e in store.events(job.id, after=2)] == [3, 4]
