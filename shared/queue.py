"""Celery configuration and enqueueing by task name. Nothing here imports the worker's tasks.

Celery on Redis redelivers a message once its visibility timeout passes and a killed worker acks
nothing, so a message is only a wake-up call: the worker claims the job in the database, and a
second delivery of the same message finds the job taken and does nothing.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from shared.settings import Settings, get_settings

TASK_SAMPLE = "ldmq.sample"
TASK_TRAIN = "ldmq.train"
QUEUE_FOR_TYPE = {"sample": "sample", "train": "train"}
TASK_FOR_TYPE = {"sample": TASK_SAMPLE, "train": TASK_TRAIN}


def celery_config(settings: Settings) -> dict:
    conf: dict = {
        "broker_url": settings.effective_broker_url,
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        # The DB, not the broker, decides whether a job runs again (see shared.jobstate).
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "sample",
        "task_routes": {TASK_SAMPLE: {"queue": "sample"}, TASK_TRAIN: {"queue": "train"}},
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if conf["broker_url"].startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("queue", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
        }
    elif conf["broker_url"].startswith("redis"):
        conf["broker_transport_options"] = {"visibility_timeout": 3600, "socket_timeout": 5, "socket_connect_timeout": 3}
    return conf


def make_celery(settings: Settings | None = None, name: str = "ldmq") -> Celery:
    settings = settings or get_settings()
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


@lru_cache(maxsize=4)
def _producer_app(broker_url: str, settings_json: str) -> Celery:
    return make_celery(Settings.model_validate_json(settings_json))


def producer(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    return _producer_app(settings.effective_broker_url, settings.model_dump_json())


def enqueue(job_id: str, job_type: str, settings: Settings | None = None) -> None:
    """Send the wake-up message for a job, by task name (the API never imports worker code)."""
    app = producer(settings)
    app.send_task(TASK_FOR_TYPE[job_type], args=[job_id], queue=QUEUE_FOR_TYPE[job_type],
                  retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
