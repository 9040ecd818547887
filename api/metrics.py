"""Prometheus metrics of the API: requests (counted as they happen), and job, queue and webhook
gauges (read from the database and the broker at scrape time).

``ldmq api --workers N`` runs N processes. They share their request metrics through
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``ldmq api`` before
the workers start), so whichever process answers a scrape reports all of them. The scrape-time
gauges are not samples of any process: a collector reads them afresh each scrape.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from shared.db import session_scope
from shared.models import Job, Tenant, WebhookDelivery, utcnow
from shared.queue import QUEUE_FOR_TYPE

log = logging.getLogger(__name__)
REGISTRY = CollectorRegistry()  # this process's request metrics

REQUESTS = Counter("ldmq_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("ldmq_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class StateCollector:
    """Jobs by type and state, broker queue depths, webhook deliveries: read when scraped."""

    def __init__(self, settings):
        self.settings = settings

    def collect(self):
        jobs = GaugeMetricFamily("ldmq_jobs", "Jobs by type and state", labels=["type", "status"])
        try:
            with session_scope(self.settings) as s:
                for type_, status, n in s.execute(select(Job.type, Job.status, func.count())
                                                  .where(Job.parent_id.is_(None))  # pieces are not jobs
                                                  .group_by(Job.type, Job.status)).all():
                    jobs.add_metric([type_, status], n)
        except Exception as exc:
            log.warning("metrics: cannot read jobs: %s", exc)
        yield jobs
        yield from self._queue()

        deliveries = GaugeMetricFamily("ldmq_webhook_deliveries", "Webhook deliveries by state", labels=["status"])
        oldest_due = GaugeMetricFamily("ldmq_webhook_oldest_due_seconds",
                                       "How long the oldest due pending webhook delivery has waited (0: none)")
        try:
            now = utcnow()
            with session_scope(self.settings) as s:
                counts = s.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all()
                oldest = s.scalar(select(func.min(WebhookDelivery.next_attempt_at))
                                  .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now))
            for status, n in counts:
                deliveries.add_metric([status], n)
            oldest_due.add_metric([], max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0)
        except Exception as exc:
            log.warning("metrics: cannot read webhook deliveries: %s", exc)
        yield deliveries
        yield oldest_due

        depth = GaugeMetricFamily("ldmq_queue_depth", "Messages waiting in a broker queue", labels=["queue"])
        if self.settings.effective_broker_url.startswith("redis"):
            try:
                import redis

                r = redis.Redis.from_url(self.settings.effective_broker_url, socket_timeout=1)
                for q in QUEUE_FOR_TYPE.values():
                    depth.add_metric([q], r.llen(q))
            except Exception as exc:
                log.warning("metrics: cannot read queue depth: %s", exc)
        yield depth


    def _queue(self):
        """Queued jobs and the oldest one's wait, by type, tenant (name) and priority: what the
        scheduler is holding back and for how long (the worker's ``ldmq_queue_wait_seconds``
        histogram has the waits of jobs once claimed)."""
        queued = GaugeMetricFamily("ldmq_jobs_queued", "Queued jobs by type, tenant and priority",
                                   labels=["type", "tenant", "priority"])
        oldest = GaugeMetricFamily("ldmq_queue_oldest_wait_seconds",
                                   "How long the oldest queued job has waited, by type, tenant and priority",
                                   labels=["type", "tenant", "priority"])
        try:
            now = utcnow()
            with session_scope(self.settings) as s:
                rows = s.execute(select(Job.type, Tenant.name, Job.priority, func.count(), func.min(Job.created_at))
                                 .join(Tenant, Tenant.id == Job.tenant_id)
                                 .where(Job.status == "queued", Job.parent_id.is_(None))
                                 .group_by(Job.type, Tenant.name, Job.priority)).all()
            for type_, tenant, priority, n, first in rows:
                labels = [type_, tenant, str(priority)]
                queued.add_metric(labels, n)
                oldest.add_metric(labels, max(0.0, (now - first).total_seconds()) if first else 0.0)
        except Exception as exc:
            log.warning("metrics: cannot read the queue: %s", exc)
        yield queued
        yield oldest


def scrape_registry(settings) -> CollectorRegistry:
    """What ``/metrics`` serves: every API process's request metrics (multiprocess mode) or this
    process's, plus the state gauges."""
    registry = CollectorRegistry()
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        multiprocess.MultiProcessCollector(registry, path=path)
    else:
        registry.register(_Forward(REGISTRY))
    registry.register(StateCollector(settings))
    return registry


class _Forward:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()
