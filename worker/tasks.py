"""Celery tasks: thin. A message names a job, but only wakes a worker of its queue: the worker claims
the best ready job of that type by the scheduling policy (``shared.scheduler``), runs it in its
spawned executor process and records the outcome (see ``worker.runtime.executor``)."""

from __future__ import annotations

import logging

from celery import shared_task, signals
from celery.exceptions import Reject

from shared.queue import TASK_SAMPLE, TASK_TRAIN
from shared.settings import get_settings
from worker.runtime.executor import close_executors, execute_job, get_executors
from worker.runtime.shutdown import request_shutdown, shutdown_requested

log = logging.getLogger(__name__)


def _execute(job_id: str, job_type: str) -> str:
    if shutdown_requested():
        # A worker on its way out takes no new job (with --concurrency N an idle task thread would
        # otherwise claim the very job another thread just gave back, and give it back again):
        # the message goes back to the broker for another worker.
        raise Reject("worker shutting down", requeue=True)
    return execute_job(get_settings(), job_id, job_type)


@shared_task(name=TASK_SAMPLE, acks_late=True, ignore_result=True)
def sample(job_id: str) -> str:
    return _execute(job_id, "sample")


@shared_task(name=TASK_TRAIN, acks_late=True, ignore_result=True)
def train(job_id: str) -> str:
    return _execute(job_id, "train")


@signals.worker_shutting_down.connect
def _on_shutting_down(**_kwargs) -> None:
    # Runs inside Celery's SIGTERM/SIGINT handler: only set a flag. The running job sees it within
    # a step, checkpoints, releases its lease and is requeued at once.
    request_shutdown()


@signals.worker_ready.connect
def _prewarm(sender=None, **_kwargs) -> None:
    # Tasks run in this process (solo pool, or threads with --concurrency N): start one executor
    # per job that can run at once, now (torch imports take seconds).
    pool = getattr(sender, "pool", None)
    get_executors(get_settings()).prewarm(max(1, int(getattr(pool, "limit", 1) or 1)))


@signals.worker_shutdown.connect
def _on_shutdown(**_kwargs) -> None:
    close_executors()
