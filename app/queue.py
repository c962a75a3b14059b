"""The Celery configuration of GUIDE §3, shared by the API (which only *sends* by task name) and the workers.

Long GPU jobs: one task at a time per worker process (prefetch 1, concurrency 1), acknowledged only after it
ran (``acks_late``) and requeued if the child dies (``reject_on_worker_lost``), a fresh child per job (no CUDA
context survives), JSON only, one ``gpu`` queue, and a visibility timeout above the hard time limit in the
broker *and* result-backend options so Redis never redelivers a job that is still running (celery#5935, #7651).
Results are not stored in Celery at all: the job row is the truth.

Embedded mode (no ``SECATEURS_BROKER_URL``) uses Kombu's filesystem transport in ``data_dir/broker``: the same
task path as production, with no server.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from secateurs.app.settings import QUEUE, TASK_NAME, Settings

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if settings.embedded:
        folder = settings.data_dir / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport |= {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    else:
        # Fail fast when Redis is down, instead of hanging an API request.
        transport |= {"socket_connect_timeout": 5, "socket_timeout": 30, "max_retries": 2}
    return {
        # The filesystem transport ignores the host; naming one keeps Kombu from warning "No hostname was supplied".
        "broker_url": settings.broker_url or "filesystem://localhost//",
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        "worker_concurrency": 1,
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE}},
        "task_time_limit": settings.job_time_limit,
        "task_soft_time_limit": max(settings.job_time_limit - 60, 30),
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def make_celery(settings: Settings) -> Celery:
    celery = Celery("secateurs")
    celery.conf.update(celery_config(settings))
    return celery


def send_job(celery: Celery, job_id: str) -> bool:
    """Queue ``job_id`` for a worker; False (logged) when the broker is unreachable: the reaper sends it later."""
    try:
        celery.send_task(
            TASK_NAME,
            args=[job_id],
            queue=QUEUE,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        )
    except Exception as exc:  # kombu raises transport-specific types (redis, OSError, OperationalError)
        log.warning("could not queue %s (%s: %s); the reaper will send it again", job_id, type(exc).__name__, exc)
        return False
    return True


def broker_reachable(celery: Celery) -> bool:
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # any transport error means "not ready"
        log.info("broker unreachable: %s: %s", type(exc).__name__, exc)
        return False
    return True
