"""Engine and sessions. Only the owner of a session commits; work that must follow a commit
(enqueueing a Celery message) is registered with :func:`after_commit` and runs only once the
commit succeeded, so a job row always exists before its message does."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

_AFTER_COMMIT = "ldmq_after_commit"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()
            # The claim's fair-share decay (shared.scheduler) uses power(), which SQLite has only
            # when built with its math functions.
            dbapi_conn.create_function("power", 2, math.pow, deterministic=True)

        return engine
    # An API session holds its connection from its route to its commit: `api_threads` running
    # routes (8 by default) plus those waiting for a commit thread (a limiter of their own, so they
    # drain first). 40 covers that with room, so a burst queues for threads, not connections.
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20, pool_timeout=10)


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    return make_engine(url)


def get_engine(settings: Settings | None = None) -> Engine:
    return _engine_for((settings or get_settings()).effective_database_url)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False)


def insert_for(session: Session):
    """The ``insert`` of the session's dialect (PostgreSQL or SQLite): both have
    ``on_conflict_do_nothing``, which the generic one lacks."""
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` once the owner of ``session`` has committed (never if it rolls back)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(fn)


def _run_after_commit(session: Session) -> None:
    for fn in session.info.pop(_AFTER_COMMIT, []):
        try:
            fn()
        except Exception:  # the DB already holds the truth; the sweeper re-enqueues
            log.exception("after-commit action failed; the sweeper will retry it")


def new_session(settings: Settings | None = None) -> Session:
    """A session for an owner that ends it with :func:`finish` or :func:`abort`."""
    return session_factory(settings)()


def finish(session: Session) -> None:
    """The owner's end of a unit of work: commit, close, then run the after-commit actions."""
    try:
        session.commit()
    except BaseException:
        abort(session)
        raise
    session.close()
    _run_after_commit(session)


def is_idle(session: Session) -> bool:
    """True when ``session`` began no transaction and holds no after-commit action: ending it
    touches no connection."""
    return not session.in_transaction() and not session.info.get(_AFTER_COMMIT)


def abort(session: Session) -> None:
    """The owner's end of a failed unit of work: roll back, drop the after-commit actions, close."""
    try:
        session.rollback()
    finally:
        session.info.pop(_AFTER_COMMIT, None)
        session.close()


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """The one place that owns a session: commit on success, roll back on error."""
    session = new_session(settings)
    try:
        yield session
    except BaseException:
        abort(session)
        raise
    finish(session)
