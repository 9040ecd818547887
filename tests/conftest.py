"""Fixtures that talk to real servers: PostgreSQL and Redis on loopback (started by .ci/run if
down) and a real S3 server: SeaweedFS (tests/s3server.py) on free loopback ports with credentials
generated per test session, or the server that LDMQ_TEST_S3_ENDPOINT names (.ci/run starts one)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# No default S3 credentials: the `s3` fixture exports the ones its server checks.
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_ADMIN_URL = os.environ.get("LDMQ_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# A Redis database of its own per test session (two sessions at once must not flush each other).
REDIS_URL = os.environ.get("LDMQ_TEST_REDIS", f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}")
REPO = Path(__file__).resolve().parents[1]

import logging  # noqa: E402

logging.getLogger("werkzeug").setLevel(logging.WARNING)


def race(n: int, call) -> list:
    """``call()`` from ``n`` threads released together by a barrier; their results."""
    import threading

    results: list = []
    barrier = threading.Barrier(n)

    def go():
        barrier.wait()
        results.append(call())

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_url():
    """A fresh database for this test session, dropped at the end."""
    from sqlalchemy import create_engine, text

    name = f"ldmq_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    from shared.db import _engine_for

    _engine_for.cache_clear()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def migrated_pg(pg_url):
    from migrations import upgrade

    upgrade(pg_url)
    return pg_url


@pytest.fixture(scope="session")
def redis_url():
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    yield REDIS_URL
    r.flushdb()


@dataclass(frozen=True)
class S3Server:
    """A real S3 server and the credentials it accepts (``server`` is None when started outside)."""

    endpoint: str
    access_key: str
    secret_key: str
    server: object | None = None

    def client(self, **kw):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=kw.pop("access_key", self.access_key),
                            aws_secret_access_key=kw.pop("secret_key", self.secret_key), **kw)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server that checks signatures, expiry, checksums and conditional writes: the one
    .ci/run started (LDMQ_TEST_S3_ENDPOINT, with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), or
    SeaweedFS on free loopback ports with fresh credentials, stopped at the end. Its credentials
    are exported (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) for this process and its children:
    ldmq's storage uses boto3's default credential chain, as in production."""
    if os.environ.get("LDMQ_TEST_S3_ENDPOINT"):
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]
        if missing:
            raise RuntimeError(f"LDMQ_TEST_S3_ENDPOINT is set but {', '.join(missing)} is not: export the "
                               "credentials that server accepts")
        yield S3Server(os.environ["LDMQ_TEST_S3_ENDPOINT"], os.environ["AWS_ACCESS_KEY_ID"],
                       os.environ["AWS_SECRET_ACCESS_KEY"])
        return
    from tests.s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    saved = {k: os.environ.get(k) for k in server.env()}
    try:
        server.start()
        os.environ.update(server.env())
        yield S3Server(server.endpoint, server.access_key, server.secret_key, server)
    finally:
        server.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint(s3):
    return s3.endpoint


@pytest.fixture(scope="session")
def s3_bucket(s3):
    name = f"ldmq-test-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def settings(migrated_pg, redis_url, s3_endpoint, s3_bucket, tmp_path):
    import redis

    from shared.settings import Settings

    # The API's rate buckets (api.ratelimit) live in this Redis and outlive an app: each test starts
    # with full ones, as it did when every app kept its own.
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(match="ldmq:rl:*", count=1000):
        r.delete(key)
    return Settings(
        database_url=migrated_pg,
        broker_url=redis_url,
        storage_url=f"s3://{s3_bucket}/t-{uuid.uuid4().hex[:8]}",
        model_import_sources=f"s3://{s3_bucket}/incoming/",  # where the import tests put pipelines
        s3_endpoint_url=s3_endpoint,
        var_dir=tmp_path / "var",
        heartbeat_seconds=0.5,
        lease_seconds=10,
    )


def settings_env(settings) -> dict[str, str]:
    """Environment for a child process (worker, API) with the same settings."""
    env = dict(os.environ)
    env.update({
        "LDMQ_DATABASE_URL": settings.database_url,
        "LDMQ_BROKER_URL": settings.broker_url,
        "LDMQ_STORAGE_URL": settings.storage_url,
        "LDMQ_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "LDMQ_VAR_DIR": str(settings.var_dir),
        "LDMQ_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
        "LDMQ_LEASE_SECONDS": str(settings.lease_seconds),
        "LDMQ_WORKER_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture
def db_session(settings):
    from shared.db import session_scope

    with session_scope(settings) as s:
        yield s


@pytest.fixture
def make_tenant(settings):
    """Create a tenant with a key; returns (tenant_id, key)."""
    from shared.db import session_scope
    from shared.registry import tenant_by_name
    from shared.security import create_key

    def _make(name: str | None = None) -> tuple[str, str]:
        name = name or f"tenant-{uuid.uuid4().hex[:8]}"
        with session_scope(settings) as s:
            key = create_key(s, name)
            tid = tenant_by_name(s, name).id
        return tid, key

    return _make


@pytest.fixture
def client(settings):
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    from worker.model.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture
def tiny_model(settings, tiny_pipeline_dir, make_tenant):
    """A tenant, its key and a registered tiny model: (tenant_id, key, model_id)."""
    from shared.db import session_scope
    from shared.registry import register_pipeline_dir
    from shared.storage import get_storage

    tid, key = make_tenant()
    with session_scope(settings) as s:
        model = register_pipeline_dir(s, get_storage(settings), tid, tiny_pipeline_dir, name="tiny")
    return tid, key, model.id


class Proc:
    """A child process in its own process group (so a test can SIGKILL/SIGSTOP the whole tree)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        import subprocess
        import sys

        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen([sys.executable, "-m", "ldmq.cli", *args], env=env, cwd=REPO,
                                  stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def signal(self, sig) -> None:
        import os

        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15) -> None:
        import signal
        import subprocess

        if self.p.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.p.wait(10)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_until(pred, timeout: float, what: str, interval: float = 0.2):
    """Poll ``pred`` until it returns a truthy value (bounded): readiness, not a fixed sleep."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def cancel_unfinished_jobs(database_url: str) -> None:
    """End every queued or running job in the test session's database (jobs of earlier tests)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.begin() as c:
            c.execute(text("UPDATE jobs SET status = 'canceled', finished_at = now(), lease_owner = NULL, "
                           "lease_expires_at = NULL WHERE status IN ('queued', 'running')"))
    finally:
        engine.dispose()


@pytest.fixture
def stack(settings, tmp_path):
    """Start real processes: ``ldmq api`` on a free port and ``ldmq worker``s on demand.

    The broker's database is emptied first, so a worker started here never picks up messages
    that earlier tests left queued; and so are the queue's earlier jobs (canceled): a woken worker
    takes the best ready job of any tenant (shared.scheduler), which would otherwise be one an
    earlier test left behind."""
    import httpx
    import redis

    redis.Redis.from_url(settings.broker_url).flushdb()
    cancel_unfinished_jobs(settings.database_url)
    procs: list[Proc] = []
    env = settings_env(settings)

    class Stack:
        def __init__(self):
            self.env = env
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"

        def start_api(self):
            p = Proc(["api", "--port", str(self.port), "--log-level", "warning"], env, tmp_path / "api.log")
            procs.append(p)

            def up():
                if p.p.poll() is not None:
                    raise RuntimeError("api exited:\n" + p.output())
                try:
                    return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(up, 60, "the API to answer /healthz")
            return p

        def start_worker(self, name="w1", queues="sample,train", extra_env=None):
            e = {**env, **(extra_env or {})}
            p = Proc(["worker", "--queues", queues, "--name", f"{name}@%h", "--log-level", "info"], e,
                     tmp_path / f"worker-{name}.log")
            procs.append(p)
            return p

        def cli(self, *args) -> str:
            import subprocess
            import sys

            r = subprocess.run([sys.executable, "-m", "ldmq.cli", *args], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
            return r.stdout

    try:
        yield Stack()
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors and models: intra-op threads only add synchronisation (several times slower on
    a busy machine). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    return wait_until


def put_dir(s3_endpoint: str, bucket: str, prefix: str, local: Path) -> None:
    """Upload a local folder under ``prefix`` with a plain boto3 client (as an operator would)."""
    import boto3

    c = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for p in local.rglob("*"):
        if p.is_file():
            c.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(local).as_posix()}", Body=p.read_bytes())
