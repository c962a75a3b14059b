"""One job attempt on a worker: claim the row, run ``run_job`` with heartbeats and cancellation, record the end.

The plain function :func:`execute_job` is the whole of it; the Celery task only calls it. Exactly-once
completion comes from the store: :meth:`JobStore.claim` lets one attempt run a queued job, and every later
write (progress, heartbeat, end) names that attempt, so an attempt whose job was reaped (heartbeat lost) and
claimed elsewhere stops at the next block and writes nothing. Artifacts go to ``artifacts/<job id>``
atomically; a killed attempt's temporary folder is removed by the next one.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from secateurs.app.errors import SecateursError
from secateurs.app.schemas import JobError, JobProgress, JobResult, JobState, ProgressEvent, Report, Stage
from secateurs.app.settings import Settings
from secateurs.app.store import JobStore
from secateurs.workers.storage import TMP_PREFIX

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def remove_stale_temps(output: Path) -> None:
    """Temporary folders a killed attempt left beside ``output`` (``.secateurs-tmp-<job id>-…``)."""
    if not output.parent.is_dir():
        return
    for stale in output.parent.glob(f"{TMP_PREFIX}{output.name}-*"):
        log.info("removing %s left by an earlier attempt", stale)
        shutil.rmtree(stale, ignore_errors=True)


def summary(report: Report) -> JobResult:
    cached = report.perplexity.dense_cached
    return JobResult(
        decode=report.decode,
        perplexity_dense=report.perplexity.dense,
        perplexity_pruned=report.perplexity.pruned,
        perplexity_dense_cached_from=cached.source() if cached else None,
        sparsity_verified=report.sparsity.verified,
        pruned_fraction=report.sparsity.pruned_fraction,
        prune_seconds=report.timings.prune_seconds,
        total_seconds=report.timings.total_seconds,
        device=report.environment.device,
        packed_ratio=report.packed.checkpoint_ratio if report.packed and report.packed.written else None,
    )


class _Attempt:
    """Progress → store, a heartbeat thread, and the stop condition polled between blocks."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, interval: float) -> None:
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.lost = threading.Event()  # the store says this attempt no longer owns the job
        self._done = threading.Event()
        self._pace: list[float] = []
        self._thread = threading.Thread(target=self._beat, args=(interval,), name="heartbeat", daemon=True)

    def __enter__(self) -> _Attempt:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _beat(self, interval: float) -> None:
        while not self._done.wait(interval):
            try:
                if not self.store.heartbeat(self.job_id, self.attempt):
                    self.lost.set()
                    return
            except Exception:  # a database hiccup: try again at the next beat
                log.exception("heartbeat of %s failed", self.job_id)

    def on_progress(self, event: ProgressEvent) -> None:
        eta = None
        if event.stage is Stage.PRUNE and event.block is not None and event.blocks and event.seconds is not None:
            self._pace.append(event.seconds)
            eta = sum(self._pace) / len(self._pace) * (event.blocks - event.block)
        layers = event.layers or []
        progress = JobProgress(
            stage=event.stage,
            message=event.message,
            block=event.block,
            blocks=event.blocks,
            layers=[layer.name for layer in layers],
            worst_layer_error=max((layer.error for layer in layers if layer.error is not None), default=None),
            eta_seconds=eta,
        )
        if not self.store.progress(self.job_id, self.attempt, progress):
            self.lost.set()

    def should_stop(self) -> bool:
        return self.lost.is_set() or self.store.cancel_requested(self.job_id)


def execute_job(job_id: str, store: JobStore, settings: Settings, worker: str | None = None) -> JobState | None:
    """Run job ``job_id`` if it is queued; the state this attempt recorded, or None if it recorded nothing."""
    from secateurs.workers.pipeline import (  # torch arrives here, in the job's process
        JobCancelled,
        quiet_libraries,
        run_job,
    )

    quiet_libraries()

    worker = worker or worker_name()
    attempt = store.claim(job_id, worker)
    if attempt is None:
        log.info("job %s is not queued (already claimed, finished or cancelled); nothing to do", job_id)
        return None
    job = store.get(job_id)
    output = settings.artifacts_dir / job_id
    remove_stale_temps(output)
    log.info("job %s: attempt %d on %s", job_id, attempt, worker)
    started = time.perf_counter()
    state, result, error = JobState.SUCCEEDED, None, None
    with _Attempt(store, job_id, attempt, settings.heartbeat_interval) as run:
        try:
            report = run_job(
                job.spec,
                run.on_progress,
                output_dir=output,
                overwrite=True,
                should_stop=run.should_stop,
                dense_cache=settings.service_dense_cache_dir,
                job_id=job_id,
            )
            result = summary(report)
        except JobCancelled as exc:
            state, error = JobState.CANCELLED, JobError(type="cancelled", message=str(exc))
        except SecateursError as exc:
            state, error = JobState.FAILED, JobError(type=exc.code, message=exc.message, hint=exc.hint)
        except Exception as exc:  # a bug: record it for the user, keep the traceback in the worker's log
            log.exception("job %s failed unexpectedly", job_id)
            state, error = (
                JobState.FAILED,
                JobError(
                    type="internal",
                    message=f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    hint="this is a bug in secateurs; report it with the job id and the worker's log",
                ),
            )
    # Recorded only if this attempt still owns the job: a reaped attempt (lost heartbeat) writes nothing.
    if not store.finish(job_id, attempt, state, result=result, error=error):
        log.warning("job %s: attempt %d lost the job before it ended (%s); nothing recorded", job_id, attempt, state)
        return None
    log.info("job %s %s after %.1f s (attempt %d)", job_id, state.value, time.perf_counter() - started, attempt)
    return state
