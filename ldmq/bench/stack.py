"""ldmq on loopback for the benchmarks that need a running system (``ldmq bench sample`` and ``api``).

:class:`Stack` is a fresh Postgres database (dropped at the end), a Redis database as the broker,
storage at a URL the bench chooses, and ``ldmq api`` / ``ldmq worker`` processes run from this
interpreter (``python -m ldmq.cli``, so they import the same checkout). Each process starts in a
process group of its own: stopping it stops what it spawned too (the worker's executor and output
writer, uvicorn's workers), and a Ctrl-C at the terminal reaches only the bench, whose ``with``
block then stops them. Nothing waits by sleeping a guessed time: the API is polled on ``/healthz``
and jobs on their status, each against a deadline, and a process that dies early is reported then.
:func:`s3_server` adds an S3-protocol server (moto) in this process for a bench that stores in S3.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def add_arguments(parser, redis_db: int) -> None:
    """``--pg-admin`` and ``--redis``: the servers a bench's :class:`Stack` uses (environment
    ``LDMQ_BENCH_PG`` / ``LDMQ_BENCH_REDIS``). Each bench has a Redis database of its own."""
    parser.add_argument("--pg-admin", default=os.environ.get("LDMQ_BENCH_PG", PG_ADMIN))
    parser.add_argument("--redis", default=os.environ.get("LDMQ_BENCH_REDIS", f"redis://127.0.0.1:6379/{redis_db}"))


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python -m ldmq.cli ARGS`` in a process group of its own, stdout and stderr into ``log``."""
    with open(log, "ab") as out:  # the child holds its own descriptor
        return subprocess.Popen([sys.executable, "-m", "ldmq.cli", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def stop_all(procs: list[subprocess.Popen], timeout_s: float = 20) -> None:
    """SIGTERM to each process's group, then SIGKILL to the groups whose leader is still running
    at the deadline."""
    for p in procs:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def wait_healthy(url: str, timeout_s: float = 60, proc: subprocess.Popen | None = None) -> None:
    """Poll the API's ``/healthz`` until it answers 200; raise at the deadline, or as soon as
    ``proc`` (the API's process) has exited."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the API exited with status {proc.returncode} before answering")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API did not answer within {timeout_s:g} s")
        time.sleep(0.1)


def wait_for_job(client, job: dict, *, interval_s: float, timeout_s: float) -> dict:
    """Poll ``GET /v1/jobs/{id}`` every ``interval_s`` from ``job`` (as the submit answered it)
    until the job is final; its last state. ``client``: an ``httpx.Client`` on the API with a key."""
    from shared.models import FINAL_STATUSES

    final = {s.value for s in FINAL_STATUSES}
    deadline = time.monotonic() + timeout_s
    while job["status"] not in final:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job['id']} still {job['status']} after {timeout_s:g} s")
        time.sleep(interval_s)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    return job


@contextmanager
def private_redis(fallback: str) -> Iterator[str]:
    """A ``redis-server`` of this bench's own on a free loopback port (no persistence), stopped at
    the end; ``fallback`` (a database of a shared server) where ``redis-server`` is not installed.
    Why: test sessions on the same machine FLUSHDB a database of the shared server picked by their
    pid (1-15), which silently drops a bench's wake-up messages and stalls its jobs."""
    import shutil

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        yield fallback
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ldmq-bench-redis-") as folder:
        proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                                 "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if redis.Redis.from_url(url, socket_connect_timeout=1).ping():
                        break
                except redis.RedisError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the bench's redis-server did not start") from None
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def s3_server(bucket: str) -> Iterator[str]:
    """moto's S3 server on a free loopback port in this process, with ``bucket``; yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


class Stack:
    """A fresh database, migrated; then :meth:`start_api` and :meth:`start_worker` as the bench
    needs them. Settings reach the processes as ``LDMQ_*`` environment variables (``env`` adds
    to them). Logs: ``workdir/api.log``, ``workdir/worker.log``."""

    def __init__(self, workdir: Path, *, pg_admin: str, redis_url: str, storage_url: str,
                 env: dict[str, str] | None = None):
        self.workdir, self.pg_admin, self.redis_url = workdir, pg_admin, redis_url
        self.db = f"ldmq_bench_{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "LDMQ_DATABASE_URL": pg_admin.rsplit("/", 1)[0] + f"/{self.db}",
                    "LDMQ_BROKER_URL": redis_url, "LDMQ_STORAGE_URL": storage_url,
                    "LDMQ_VAR_DIR": str(workdir / "var"), **(env or {})}
        self.procs: list[subprocess.Popen] = []
        self.url: str | None = None

    def __enter__(self) -> Stack:
        from sqlalchemy import create_engine, text

        self.admin = create_engine(self.pg_admin, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.db}"'))
        try:
            self.cli("migrate")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc) -> None:
        from sqlalchemy import text

        stop_all(self.procs)
        with self.admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))
        self.admin.dispose()

    def cli(self, *args: str) -> str:
        """Run ``ldmq ARGS`` to the end against this stack; the last line it printed."""
        r = subprocess.run([sys.executable, "-m", "ldmq.cli", *args], env=self.env, capture_output=True,
                           text=True, check=True)
        return r.stdout.strip().splitlines()[-1]

    def tenant_with_model(self, tenant: str, pipeline_dir: Path) -> tuple[str, str]:
        """An API key of a new tenant and the id of ``pipeline_dir`` imported as its model."""
        key = self.cli("keys", "create", "--tenant", tenant)
        return key, self.cli("models", "import", str(pipeline_dir), "--tenant", tenant)

    def flush_broker(self) -> None:
        """Drop every message queued on the broker's database."""
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()

    def start_api(self, *flags: str, timeout_s: float = 60) -> subprocess.Popen:
        """``ldmq api`` on a free port (quiet: warnings only, no access log), returned once it
        answers ``/healthz``; its URL is ``self.url``."""
        port = free_port()
        p = self._start(["api", "--port", str(port), "--log-level", "warning", "--no-access-log", *flags], "api")
        self.url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(self.url, timeout_s, proc=p)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; see {self.workdir / 'api.log'}") from None
        return p

    def start_worker(self, queues: str = "sample") -> subprocess.Popen:
        """``ldmq worker`` on ``queues`` (warnings only)."""
        return self._start(["worker", "--queues", queues, "--log-level", "warning"], "worker")

    def client(self, key: str, timeout_s: float):
        """An ``httpx.Client`` on the API, with ``key``."""
        import httpx

        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s)

    def _start(self, args: list[str], role: str) -> subprocess.Popen:
        p = spawn(args, self.env, self.workdir / f"{role}.log")
        self.procs.append(p)
        return p
