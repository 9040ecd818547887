"""shared.logctx (job context on every line, JSON lines) and worker.runtime.metrics (the worker's own
Prometheus endpoint)."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading

import httpx
import pytest

from shared.logctx import ContextFilter, JsonFormatter, configure_logging, current_job, job_context, log_format


def capture(fmt: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(ContextFilter())
    handler.setFormatter(fmt)
    logger = logging.getLogger(f"test.logctx.{id(buf)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, buf


def test_json_lines_carry_the_job_context():
    logger, buf = capture(JsonFormatter())
    logger.info("outside")
    with job_context("job-1", "tenant-a"):
        logger.info("inside %s", "a job")
        with job_context("job-2", "tenant-b"):
            logger.warning("nested")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    logger.info("after")
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(r["message"], r["job_id"], r["tenant_id"]) for r in recs] == [
        ("outside", None, None), ("inside a job", "job-1", "tenant-a"), ("nested", "job-2", "tenant-b"),
        ("failed", "job-1", "tenant-a"), ("after", None, None)]
    assert recs[2]["level"] == "WARNING" and recs[0]["logger"].startswith("test.logctx")
    assert "RuntimeError: boom" in recs[3]["exc_info"] and recs[0]["ts"].endswith("+00:00")


def test_context_is_per_thread_and_explicit_fields_win():
    logger, buf = capture(JsonFormatter())
    seen = {}

    def other():
        seen["other"] = current_job()
        logger.info("from another thread")

    with job_context("job-1", "t"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        logger.info("explicit", extra={"job_id": "job-9"})
    assert seen["other"] == {"job_id": None, "tenant_id": None}
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert recs[0]["job_id"] is None and recs[1]["job_id"] == "job-9" and recs[1]["tenant_id"] == "t"


def test_log_format_setting(monkeypatch):
    monkeypatch.delenv("LDMQ_LOG_FORMAT", raising=False)
    assert log_format() == "text"
    monkeypatch.setenv("LDMQ_LOG_FORMAT", "JSON")
    assert log_format() == "json"
    with pytest.raises(ValueError, match="valid: text, json"):
        log_format("yaml")


def test_configure_logging_installs_one_handler(capsys):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert configure_logging(logging.INFO, "json") == "json"
        assert len(root.handlers) == 1
        with job_context("j", "t"):
            logging.getLogger("ldmq.test").info("hello")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["job_id"] == "j"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not in the scrape")


def test_worker_metrics_server(monkeypatch):
    from worker.runtime import metrics as wm

    assert wm.configured_port("") is None and wm.configured_port("0") is None
    assert wm.configured_port("9101") == 9101
    with pytest.raises(ValueError, match="LDMQ_WORKER_METRICS_PORT"):
        wm.configured_port("http")
    monkeypatch.delenv(wm.PORT_ENV, raising=False)
    monkeypatch.setattr(wm, "_server_port", None)
    assert wm.start_server() is None  # off by default

    port = free_port()
    assert wm.start_server(port, addr="127.0.0.1") == port
    assert wm.start_server(port + 1, addr="127.0.0.1") == port  # one server per process
    before = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    imgs0 = metric(before, "ldmq_worker_images_total")
    wm.job_finished("sample", "succeeded", 12.5)
    with pytest.raises(RuntimeError):
        with wm.job_timer("train") as t:
            raise RuntimeError("crash")  # counts as failed
    with wm.job_timer("train") as t:
        t["status"] = "canceled"
    for s in (0.02, 0.03):
        wm.observe_step("sample", s)
    wm.images_made(8, 2.0)
    wm.sample_gpu_memory("cpu")  # a no-op off CUDA
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(text, "ldmq_worker_jobs_total", type="sample", status="succeeded") >= 1
    assert metric(text, "ldmq_worker_jobs_total", type="train", status="failed") >= 1
    assert metric(text, "ldmq_worker_jobs_total", type="train", status="canceled") >= 1
    assert metric(text, "ldmq_worker_job_seconds_sum", type="sample", status="succeeded") >= 12.5
    assert metric(text, "ldmq_worker_step_seconds_count", type="sample") >= 2
    assert metric(text, "ldmq_worker_images_total") == imgs0 + 8
    assert metric(text, "ldmq_worker_images_per_second") == 4.0
    with pytest.raises(AssertionError):  # nothing recorded without CUDA
        metric(text, "ldmq_worker_gpu_memory_bytes", device="cpu", kind="allocated")
