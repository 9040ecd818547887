"""Fault tests: real ``ldmq api`` / ``ldmq worker`` / ``ldmq sweeper`` processes (each in its own
process group, driven with signals through ``Proc``), real PostgreSQL, Redis and an S3 server.

Leases are short here (``LDMQ_LEASE_SECONDS=3``, heartbeat 0.5 s, a sweep every 0.5 s), so that
a dead worker's job is taken over within seconds. Nothing waits on a fixed sleep: every wait
polls a condition with a deadline (``wait_until``).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proc, cancel_unfinished_jobs, free_port, settings_env, wait_until

FAULT_REDIS_URL = os.environ.get("LDMQ_TEST_FAULTS_REDIS", "redis://127.0.0.1:6379/12")
LEASE_S = 3
FINAL = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The fault tests flush (FLUSHALL) and inspect their broker: a Redis server of their own on a
    free loopback port, so that no other process can take their messages or lose its own (or, where
    ``redis-server`` is not installed, a database of the shared server)."""
    import shutil

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        r = redis.Redis.from_url(FAULT_REDIS_URL)
        r.flushdb()
        yield FAULT_REDIS_URL
        r.flushdb()
        return
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"

    def up():
        try:
            return redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        except redis.RedisError:
            if proc.poll() is not None:
                raise RuntimeError("redis-server exited") from None
            return False

    try:
        wait_until(up, 30, "the private Redis server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def settings(settings):
    """The suite's settings (tests/conftest.py) with the short timings the fault tests wait on."""
    return settings.model_copy(update=dict(
        lease_seconds=LEASE_S,
        sweep_interval_s=0.5,
        orphan_grace_s=2,
        stop_grace_s=10,
        storage_retry_s=10,
        sample_batch_size=1,
    ))


@pytest.fixture(autouse=True)
def _isolated(redis_url, migrated_pg):
    """Each fault test starts with an empty broker, and with no unfinished job of an earlier test
    in the session's database (a sweeper would rightly re-send those to this test's workers)."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    cancel_unfinished_jobs(migrated_pg)
    yield


def fault_env(settings) -> dict[str, str]:
    env = settings_env(settings)
    env.update({
        "LDMQ_SWEEP_INTERVAL_S": str(settings.sweep_interval_s),
        "LDMQ_ORPHAN_GRACE_S": str(settings.orphan_grace_s),
        "LDMQ_STOP_GRACE_S": str(settings.stop_grace_s),
        "LDMQ_STORAGE_RETRY_S": str(settings.storage_retry_s),
        "LDMQ_SAMPLE_BATCH_SIZE": str(settings.sample_batch_size),
        "LDMQ_SAMPLE_TIME_LIMIT_S": str(settings.sample_time_limit_s),
        "LDMQ_TRAIN_TIME_LIMIT_S": str(settings.train_time_limit_s),
        "LDMQ_WORKER_DEVICE": "cpu",
    })
    return env


class Worker(Proc):
    def __init__(self, args, env, log_path):
        super().__init__(args, env, log_path)
        self.name = log_path.stem

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait_exit(self, timeout: float) -> int:
        return self.p.wait(timeout)

    def executor_pid(self) -> int | None:
        """The pid of the worker's spawned executor child (the last one started), if alive."""
        pids = re.findall(r"executor: started process (\d+)", self.output())
        if not pids:
            return None
        pid = int(pids[-1])
        return pid if _alive(pid) else None

    def wait_ready(self, timeout: float = 90) -> None:
        """Until Celery consumes and the executor child has imported torch & co."""
        def ready():
            if not self.alive():
                raise RuntimeError(f"worker {self.name} exited:\n{self.output()[-4000:]}")
            out = self.output()
            return " ready." in out and out.count("executor ready") >= 1
        wait_until(ready, timeout, f"worker {self.name} to be ready")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class FaultStack:
    """Processes of one test, plus the client-side helpers the tests share."""

    def __init__(self, settings, tmp_path: Path, tenant_key: str, model_id: str):
        self.settings = settings
        self.env = fault_env(settings)
        self.tmp_path = tmp_path
        self.key = tenant_key
        self.model_id = model_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {tenant_key}"}, timeout=30)

    # -- processes ------------------------------------------------------------------------------
    def start_api(self, extra_env=None) -> Proc:
        p = Proc(["api", "--port", str(self.port), "--log-level", "warning"], {**self.env, **(extra_env or {})},
                 self.tmp_path / f"api-{len(self.procs)}.log")
        self.procs.append(p)

        def up():
            if p.p.poll() is not None:
                raise RuntimeError("api exited:\n" + p.output())
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "the API to answer /healthz")
        return p

    def start_worker(self, name: str, extra_env=None, ready: bool = True, queues: str = "sample,train",
                     concurrency: int = 1) -> Worker:
        w = Worker(["worker", "--queues", queues, "--name", f"{name}@%h", "--log-level", "info",
                    "--concurrency", str(concurrency)],
                   {**self.env, **(extra_env or {})}, self.tmp_path / f"worker-{name}.log")
        self.procs.append(w)
        if ready:
            w.wait_ready()
        return w

    def start_sweeper(self, extra_env=None) -> Proc:
        p = Proc(["sweeper"], {**self.env, **(extra_env or {})}, self.tmp_path / f"sweeper-{len(self.procs)}.log")
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        """Teardown: graceful shutdown is tested where it matters; here, be quick."""
        import signal

        for p in reversed(self.procs):
            try:
                if isinstance(p, Worker) and p.alive():
                    p.signal(signal.SIGKILL)
                    p.p.wait(10)
                p.stop()
            except Exception:
                pass
        self.http.close()

    def owner_of(self, job_id: str) -> "Worker":
        """The worker process whose run holds the job's lease."""
        owner = self.job(job_id).lease_owner or ""
        pid = int(owner.split(":")[1]) if owner.count(":") >= 2 else -1
        for p in self.procs:  # the worker process itself, or its executor child (a co-batched job)
            if isinstance(p, Worker) and (p.p.pid == pid or pid in process_children(p.p.pid)):
                return p
        raise AssertionError(f"no worker of this test holds job {job_id} (owner {owner!r})")

    # -- jobs -----------------------------------------------------------------------------------
    def submit_sample(self, n_rows: int, *, steps: int = 4, images: int = 1, key: str | None = None,
                      headers: dict | None = None, **extra) -> str:
        body = {"model": self.model_id, "steps": steps, "scheduler": "ddim",
                "prompts": [{"prompt": f"prompt {i}", "seed": 1000 + 7 * i, "num_images": images}
                            for i in range(n_rows)], **extra}
        h = {"Idempotency-Key": key} if key else {}
        r = self.http.post("/v1/jobs/sample", json=body, headers={**h, **(headers or {})})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def submit_train(self, **params) -> str:
        r = self.http.post("/v1/jobs/train", json={"dataset": "builtin:digits", **params})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def job(self, job_id: str):
        from shared.db import session_scope
        from shared.models import Job

        with session_scope(self.settings) as s:
            return s.get(Job, job_id)

    def events(self, job_id: str) -> list[tuple[str, dict]]:
        from shared.db import session_scope
        from shared.models import JobEvent

        with session_scope(self.settings) as s:
            return [(e.type, e.data) for e in s.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.id)]

    def outputs(self, job_id: str) -> list:
        from shared.db import session_scope
        from shared.models import JobOutput

        with session_scope(self.settings) as s:
            return list(s.query(JobOutput).filter_by(job_id=job_id).order_by(JobOutput.row, JobOutput.index))

    def wait_final(self, job_id: str, timeout: float = 120):
        def final():
            j = self.job(job_id)
            return j if j.status in FINAL else None
        return wait_until(final, timeout, f"job {job_id} to reach a final state", interval=0.1)

    def wait_status(self, job_id: str, pred, timeout: float, what: str, interval: float = 0.05):
        def ok():
            j = self.job(job_id)
            return j if pred(j) else None
        return wait_until(ok, timeout, what, interval=interval)

    def assert_outputs_exactly_once(self, job_id: str, expected: int) -> None:
        """Every (row, index) once, the job's count agrees, and each PNG in S3 matches its checksum."""
        from shared.storage import get_storage

        outs = self.outputs(job_id)
        pairs = [(o.row, o.index) for o in outs]
        assert len(pairs) == len(set(pairs)) == expected, pairs
        assert self.job(job_id).outputs_count == expected
        st = get_storage(self.settings)
        job = self.job(job_id)
        keys = [k for k in st.list(f"{job.tenant_id}/jobs/{job_id}/rows/")]
        assert sorted(keys) == sorted(o.key for o in outs)
        for o in outs:
            assert st.checksum(o.key) == o.sha256
        row_done = [d["row"] for t, d in self.events(job_id) if t == "row_done"]
        assert sorted(row_done) == sorted({r for r, _ in pairs})  # each row completed once


@pytest.fixture
def fstack(settings, tmp_path, tiny_model):
    _, key, model_id = tiny_model
    st = FaultStack(settings, tmp_path, key, model_id)
    try:
        yield st
    finally:
        st.stop_all()


def redis_client(settings):
    import redis

    return redis.Redis.from_url(settings.broker_url)


def process_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def wait_dead(pid: int, timeout: float = 10) -> None:
    wait_until(lambda: not _alive(pid), timeout, f"process {pid} to die")


def elapsed(t0: float) -> float:
    return time.monotonic() - t0


# -- training jobs small enough for a test: ~90 global steps, a checkpoint every 10 --------------------
TRAIN = dict(steps=80, autoencoder_steps=10, batch_size=8, resolution=16, autoencoder_channels=[8, 16, 16],
             unet_channels=[16, 32], checkpoint_every=10, keep_checkpoints=2, eval_at_checkpoints=False,
             eval_num_samples=10, eval_steps=2, vlb_timesteps=2, validation_prompts=["a handwritten digit one"],
             warmup_steps=2, autoencoder_warmup_steps=1)


def checkpoint_step(key: str | None) -> int:
    return int(re.search(r"step-(\d+)-a\d+$", key).group(1)) if key else 0


def steps_of_attempt(events, attempt: int) -> list[int]:
    """Training steps reported (progress events) by the given attempt."""
    out, current = [], 0
    for t, d in events:
        if t == "started":
            current = d["attempt"]
        elif t == "progress" and current == attempt and "step" in d:
            out.append(d["step"])
    return out
