"""Start-up of the worker's spawned helper processes (the executor, its output writer), and the
database tuning every worker connection gets."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from shared.settings import Settings


def start_child(role: str, parent_pid: int) -> None:
    """What a spawned helper process (the executor, its output writer) does first: log in the
    worker's format (LDMQ_LOG_FORMAT, inherited; JSON lines carry the job id and tenant of the job
    running) tagged with its role, leave SIGINT to its parent, and exit at once if the parent dies
    without telling it (even by SIGKILL)."""
    from shared.logctx import configure_logging

    configure_logging(logging.INFO, text_format=f"%(asctime)s %(levelname)s %(name)s [{role} %(process)d]: %(message)s")
    for noisy in ("httpx", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def orphan_watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(0.5)

    threading.Thread(target=orphan_watch, name="orphan-watch", daemon=True).start()


_TUNED: set[int] = set()


def tune_engine(settings: Settings) -> None:
    """Worker connections: a session left idle inside a transaction (a frozen or stopped process
    holding a row lock) is ended by the server, so it cannot block the run that takes over."""
    from sqlalchemy import event

    from shared.db import get_engine

    engine = get_engine(settings)
    if engine.dialect.name != "postgresql" or id(engine) in _TUNED:
        return
    _TUNED.add(id(engine))
    timeout_ms = int(max(5.0, float(settings.lease_seconds)) * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        cur.execute(f"SET idle_in_transaction_session_timeout = {timeout_ms}")
        cur.close()
        dbapi_conn.commit()

    engine.dispose()  # connections made before the listener get replaced
