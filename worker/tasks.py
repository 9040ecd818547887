"""Celery tasks: thin. Each takes a job id, and the runner claims, works and records."""

from __future__ import annotations

import logging

from celery import shared_task

from shared.queue import TASK_SAMPLE, TASK_TRAIN
from shared.settings import get_settings
from worker.runner import run_job

log = logging.getLogger(__name__)


@shared_task(name=TASK_SAMPLE, acks_late=True, ignore_result=True)
def sample(job_id: str) -> str:
    from worker.sampling import run_sample

    settings = get_settings()
    return run_job(settings, job_id, "sample", lambda run: run_sample(settings, run))


@shared_task(name=TASK_TRAIN, acks_late=True, ignore_result=True)
def train(job_id: str) -> str:
    from worker.train_job import run_train

    settings = get_settings()
    return run_job(settings, job_id, "train", lambda run: run_train(settings, run))
