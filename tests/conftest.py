"""Fixtures that talk to real servers: PostgreSQL and Redis on loopback (started by .ci/run if
down) and an S3-protocol server (moto) on a free loopback port, started per test session."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_ADMIN_URL = os.environ.get("LDMQ_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LDMQ_TEST_REDIS", "redis://127.0.0.1:6379/11")
REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server (moto) on a free loopback port, stopped at the end."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint):
    import boto3

    name = "ldmq-test"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def settings(migrated_pg, redis_url, s3_endpoint, s3_bucket, tmp_path):
    from shared.settings import Settings

    return Settings(
        database_url=migrated_pg,
        broker_url=redis_url,
        storage_url=f"s3://{s3_bucket}/t-{uuid.uuid4().hex[:8]}",
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
    from worker.tiny_pipeline import build_tiny_pipeline

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
