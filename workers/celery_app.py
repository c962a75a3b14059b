"""The worker's Celery app: ``celery -A secateurs.workers.celery_app worker -Q gpu`` (or ``secateurs worker``).

Configured by :func:`secateurs.app.queue.celery_config` (GUIDE §3). The parent process never imports torch, so no
CUDA context exists before a job's child is forked; each child runs one job and exits.
"""

from __future__ import annotations

from secateurs.app.queue import make_celery
from secateurs.app.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["secateurs.workers.tasks"]
