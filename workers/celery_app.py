"""The worker's Celery app: ``celery -A workers.celery_app worker -Q gpu`` (or ``secateurs worker``).

Configured by :func:`app.queue.celery_config` (GUIDE §3). The parent process never imports torch, so no
CUDA context exists before a job's child is forked; each child runs one job and exits.
"""

from __future__ import annotations

from app.queue import make_celery
from app.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]
