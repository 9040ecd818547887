"""Engine and sessions. Only the owner of a session commits; work that must follow a commit
(enqueueing a Celery message) is registered with :func:`after_commit` and runs only once the
commit succeeded, so a job row always exists before its message does."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import create_engine, event
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

        return engine
    # The API's threadpool runs up to 40 sync routes at once; size the pool to match so a burst
    # queues on threads rather than timing out on connections.
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20, pool_timeout=10)


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    return make_engine(url)


def get_engine(settings: Settings | None = None) -> Engine:
    return _engine_for((settings or get_settings()).effective_database_url)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False)


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` once the owner of ``session`` has committed (never if it rolls back)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(fn)


def _run_after_commit(session: Session) -> None:
    for fn in session.info.pop(_AFTER_COMMIT, []):
        try:
            fn()
        except Exception:  # the DB already holds the truth; the sweeper re-enqueues
            log.exception("after-commit action failed; the sweeper will retry it")


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """The one place that owns a session: commit on success, roll back on error."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        session.info.pop(_AFTER_COMMIT, None)
        raise
    finally:
        session.close()
    _run_after_commit(session)
