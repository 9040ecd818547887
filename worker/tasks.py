"""Celery tasks: thin. Each takes a job id; the executor claims it in the database, runs it in the
worker's spawned executor process and records the outcome (see ``worker.executor``)."""

from __future__ import annotations

import logging
import os

from celery import shared_task, signals

from shared.queue import TASK_SAMPLE, TASK_TRAIN
from shared.settings import get_settings
from worker import metrics
from worker.executor import close_executor, execute_job, get_executor, request_shutdown

log = logging.getLogger(__name__)


@shared_task(name=TASK_SAMPLE, acks_late=True, ignore_result=True)
def sample(job_id: str) -> str:
    return execute_job(get_settings(), job_id, "sample")


@shared_task(name=TASK_TRAIN, acks_late=True, ignore_result=True)
def train(job_id: str) -> str:
    return execute_job(get_settings(), job_id, "train")


@signals.worker_shutting_down.connect
def _on_shutting_down(**_kwargs) -> None:
    # Runs inside Celery's SIGTERM/SIGINT handler: only set a flag. The running job sees it within
    # a step, checkpoints, releases its lease and is requeued at once.
    request_shutdown()


@signals.worker_ready.connect
def _prewarm(sender=None, **_kwargs) -> None:
    # Solo pool: tasks run in this process, so start its executor now (torch imports take seconds).
    pool = getattr(sender, "pool", None)
    if pool is not None and "solo" in type(pool).__module__:
        get_executor(get_settings()).start()


@signals.worker_process_init.connect
def _prewarm_pool_process(**_kwargs) -> None:
    get_executor(get_settings()).start()


@signals.worker_shutdown.connect
def _on_shutdown(**_kwargs) -> None:
    close_executor()


@signals.worker_process_shutdown.connect
def _pool_process_exits(**_kwargs) -> None:
    close_executor()
    metrics.process_exited(os.getpid())  # its live gauges (jobs running) go with it
