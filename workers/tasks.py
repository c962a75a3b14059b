"""Thin Celery tasks: they receive a job id and call a plain function."""

from __future__ import annotations

import os
from functools import lru_cache

from secateurs.app.settings import TASK_NAME, get_settings
from secateurs.app.store import JobStore
from secateurs.workers.celery_app import app
from secateurs.workers.jobs import execute_job


@lru_cache(maxsize=1)
def _store() -> JobStore:
    return JobStore(get_settings().store_url)  # in the child: connections are never shared across fork


@app.task(name=TASK_NAME)
def run_job_task(job_id: str) -> str | None:
    settings = get_settings()
    os.nice(settings.worker_nice)  # this child runs one job and exits: the parent keeps its priority
    state = execute_job(job_id, _store(), settings)
    return state.value if state else None
