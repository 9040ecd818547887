"""Prometheus metrics of the API: requests, and job/queue gauges read at scrape time."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import func, select

from shared.db import session_scope
from shared.models import Job, WebhookDelivery, utcnow
from shared.queue import QUEUE_FOR_TYPE

log = logging.getLogger(__name__)
REGISTRY = CollectorRegistry()

REQUESTS = Counter("ldmq_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("ldmq_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
JOBS = Gauge("ldmq_jobs", "Jobs by type and state", ["type", "status"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("ldmq_queue_depth", "Messages waiting in a broker queue", ["queue"], registry=REGISTRY)
WEBHOOK_DELIVERIES = Gauge("ldmq_webhook_deliveries", "Webhook deliveries by state", ["status"], registry=REGISTRY)
WEBHOOK_OLDEST_DUE = Gauge("ldmq_webhook_oldest_due_seconds",
                           "How long the oldest due pending webhook delivery has waited (0: none)", registry=REGISTRY)


def refresh(settings) -> None:
    try:
        with session_scope(settings) as s:
            counts = s.execute(select(Job.type, Job.status, func.count()).group_by(Job.type, Job.status)).all()
        JOBS.clear()
        for type_, status, n in counts:
            JOBS.labels(type_, status).set(n)
    except Exception as exc:
        log.warning("metrics: cannot read jobs: %s", exc)
    try:
        now = utcnow()
        with session_scope(settings) as s:
            counts = s.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all()
            oldest = s.scalar(select(func.min(WebhookDelivery.next_attempt_at))
                              .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now))
        WEBHOOK_DELIVERIES.clear()
        for status, n in counts:
            WEBHOOK_DELIVERIES.labels(status).set(n)
        WEBHOOK_OLDEST_DUE.set(max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0)
    except Exception as exc:
        log.warning("metrics: cannot read webhook deliveries: %s", exc)
    if settings.effective_broker_url.startswith("redis"):
        try:
            import redis

            r = redis.Redis.from_url(settings.effective_broker_url, socket_timeout=1)
            for q in QUEUE_FOR_TYPE.values():
                QUEUE_DEPTH.labels(q).set(r.llen(q))
        except Exception as exc:
            log.warning("metrics: cannot read queue depth: %s", exc)
