"""The workers' Celery app (``celery -A worker.celery_app:app``): queues ``train`` and ``sample``,
prefetch 1, late acks; the tasks live in ``worker.tasks``."""

from __future__ import annotations

from shared.queue import make_celery

app = make_celery(name="ldmq-worker")
app.conf.imports = ("worker.tasks",)

import worker.tasks  # noqa: E402,F401  (register the tasks)
