"""A real ``ldmq worker`` exports the samples of all its processes and logs JSON with job context.

The model runs in the worker's spawned executor child, the claim and the outcome in the worker
process: the metrics endpoint must aggregate both (prometheus_client multiprocess mode), and
every JSON line either process writes while a job runs must name that job and its tenant.
"""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_worker_metrics_and_json_logs_cover_the_executor(stack, tiny_pipeline_dir, wait_until, tmp_path):
    port = free_port()
    stack.start_api()
    worker = stack.start_worker(extra_env={"LDMQ_WORKER_METRICS_PORT": str(port), "LDMQ_LOG_FORMAT": "json"})
    key = stack.cli("keys", "create", "--tenant", "obs").strip().splitlines()[-1]
    model_id = stack.cli("models", "import", str(tiny_pipeline_dir), "--tenant", "obs", "--name", "tiny").strip().splitlines()[-1]
    api = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    metrics_url = f"http://127.0.0.1:{port}/metrics"

    def serving():
        try:
            return scrape(metrics_url)
        except httpx.HTTPError:
            assert worker.p.poll() is None, "the worker exited:\n" + worker.output()
            return None

    before = wait_until(serving, 60, "the worker's metrics endpoint")
    assert before.get(("ldmq_worker_images_total", ()), 0.0) == 0.0

    r = api.post("/v1/jobs/sample", json={"model": model_id, "steps": 3, "scheduler": "ddim",
                                          "prompts": [{"prompt": "a red square", "seed": 1, "num_images": 3},
                                                      {"prompt": "a blue circle", "seed": 9}]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    def finished():
        j = api.get(f"/v1/jobs/{job_id}").json()
        return j if j["status"] in ("succeeded", "failed", "canceled") else None

    assert wait_until(finished, 180, "the sample job")["status"] == "succeeded"
    m = scrape(metrics_url)
    # Made in the executor child, served by the worker process:
    assert m[("ldmq_worker_images_total", ())] == 4.0
    assert m[("ldmq_worker_step_seconds_count", (("type", "sample"),))] >= 3
    assert m[("ldmq_worker_images_per_second", ())] > 0
    # Made in the worker process:
    assert m[("ldmq_worker_jobs_total", (("status", "succeeded"), ("type", "sample")))] == 1.0
    assert m[("ldmq_worker_job_seconds_count", (("status", "succeeded"), ("type", "sample")))] == 1.0
    assert m[("ldmq_worker_busy", ())] == 0.0
    # Observed at the claim: the job's queue wait, by type, tenant and priority.
    waits = {labels: v for (name, labels), v in m.items() if name == "ldmq_queue_wait_seconds_count"}
    assert len(waits) == 1 and list(waits.values()) == [1.0], waits
    labels = dict(next(iter(waits)))
    assert labels["type"] == "sample" and labels["priority"] == "0" and len(labels["tenant"]) == 32

    worker.stop()
    # Every line is one JSON object: no banner, no library handlers of their own. The one exception
    # is the line Celery prints straight to sys.__stderr__ from its signal handler on shutdown.
    lines = [ln for ln in worker.log_path.read_text().splitlines()
             if ln.strip() and not ln.startswith("worker: Warm shutdown")]
    records = [json.loads(ln) for ln in lines]
    mine = [r for r in records if r["job_id"] == job_id]
    assert {"job_id", "tenant_id", "level", "logger", "message", "process"} <= set(records[0])
    processes = {r["process"] for r in mine}
    assert len(processes) >= 2, f"expected lines from the worker and its executor, got {mine}"
    tenants = {r["tenant_id"] for r in mine}
    assert len(tenants) == 1 and None not in tenants
    executor_lines = [r for r in mine if r["logger"].startswith("worker.runtime.executor.child")]
    assert executor_lines and executor_lines[0]["process"] != worker.p.pid
