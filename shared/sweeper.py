"""The sweeper: the database says which jobs should be running; the broker may have lost them.

One pass: fail jobs that used up their attempts (poison jobs), finish abandoned cancels, and
re-enqueue jobs whose lease expired or that sat queued with no recent message.
"""

from __future__ import annotations

import logging
import time

from shared import jobstate
from shared.db import session_scope
from shared.queue import enqueue
from shared.settings import Settings

log = logging.getLogger(__name__)


def sweep_once(settings: Settings) -> dict[str, list[str]]:
    with session_scope(settings) as s:
        failed = jobstate.fail_exhausted(s)
        canceled = jobstate.cancel_abandoned(s)
        due = jobstate.expired_or_orphaned(s, settings.requeue_after_s)
    requeued = []
    for job_id, job_type in due:
        try:
            enqueue(job_id, job_type, settings)
        except Exception as exc:
            log.warning("sweeper: cannot enqueue %s: %s", job_id, exc)
            continue
        requeued.append(job_id)
    with session_scope(settings) as s:
        jobstate.mark_enqueued(s, requeued)
    if failed or canceled or requeued:
        log.info("sweeper: failed=%s canceled=%s requeued=%s", failed, canceled, requeued)
    return {"failed": failed, "canceled": canceled, "requeued": requeued}


def run_forever(settings: Settings, interval_s: float) -> None:
    while True:
        try:
            sweep_once(settings)
        except Exception:
            log.exception("sweeper pass failed; retrying")
        time.sleep(interval_s)
