"""Migrations against a real, empty Postgres: upgrade to head, downgrade to base, and the models
match the schema the migrations build (autogenerate finds no difference)."""

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from migrations import downgrade, upgrade
from shared.models import Base

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def empty_db():
    name = f"ldmq_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    from shared.db import _engine_for

    _engine_for.cache_clear()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_upgrade_downgrade_and_no_drift(empty_db):
    upgrade(empty_db)
    engine = create_engine(empty_db)
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        assert {"tenants", "api_keys", "jobs", "job_rows", "job_outputs", "job_events", "models", "datasets"} <= tables
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], diff
    engine.dispose()
    from shared.db import _engine_for

    _engine_for.cache_clear()
    downgrade(empty_db)
    engine = create_engine(empty_db)
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def test_sqlite_upgrade_works(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert "jobs" in inspect(conn).get_table_names()
    engine.dispose()
