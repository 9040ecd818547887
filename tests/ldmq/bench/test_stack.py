"""The benchmarks' stack helpers: free ports, process groups stopped whole, readiness against a
deadline (a dead API is reported at once), and ``ldmq bench api`` on a real stack end to end."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from ldmq.bench.stack import free_port, private_redis, stop_all, wait_for_job, wait_healthy
from tests.conftest import PG_ADMIN_URL


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_free_port_can_be_bound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stop_all_stops_the_whole_process_group():
    """What a child spawned (the worker's executor, uvicorn's workers) goes with it."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
         "print(c.pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    stop_all([parent], timeout_s=10)
    assert parent.returncode is not None
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")
def test_private_redis_is_the_benchs_own_and_goes_at_the_end():
    """A test session's FLUSHDB on the shared server cannot drop a bench's messages there."""
    import redis

    with private_redis("redis://unused/0") as url:
        assert not url.endswith(":6379/0")
        r = redis.Redis.from_url(url)
        r.lpush("sample", b"wake")
        assert r.llen("sample") == 1
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


def test_wait_healthy_reports_an_api_that_exited_at_once():
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with status 3"):
        wait_healthy(f"http://127.0.0.1:{free_port()}", timeout_s=60, proc=dead)
    assert time.monotonic() - t0 < 10


def test_wait_healthy_gives_up_at_its_deadline():
    with pytest.raises(RuntimeError, match="did not answer within 0.3 s"):
        wait_healthy(f"http://127.0.0.1:{free_port()}", timeout_s=0.3)


class _Jobs:
    """A client whose job is final at the ``final_at``-th GET."""

    def __init__(self, final_at: int):
        self.gets, self.final_at = 0, final_at

    def get(self, path):
        self.gets += 1
        status = "succeeded" if self.gets >= self.final_at else "running"
        return type("R", (), {"json": lambda _self: {"id": path.rsplit("/", 1)[1], "status": status}})()


def test_wait_for_job_polls_until_final_and_no_longer():
    client = _Jobs(final_at=3)
    assert wait_for_job(client, {"id": "j", "status": "queued"}, interval_s=0.01, timeout_s=5)["status"] == "succeeded"
    assert client.gets == 3
    done = _Jobs(final_at=1)
    assert wait_for_job(done, {"id": "j", "status": "failed"}, interval_s=0.01, timeout_s=5)["status"] == "failed"
    assert done.gets == 0  # the submit's answer was already final


def test_wait_for_job_gives_up_at_its_deadline():
    with pytest.raises(RuntimeError, match="still running"):
        wait_for_job(_Jobs(final_at=10**9), {"id": "j", "status": "running"}, interval_s=0.01, timeout_s=0.1)


def _children() -> set[int]:
    """This process's children that have not exited."""
    me, out = str(os.getpid()), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(pid))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bench_api_runs_on_a_real_stack_and_leaves_nothing_behind(redis_url, capsys, monkeypatch):
    """The Stack end to end: a fresh database, an API with two processes, a worker, jobs; then
    every process it started stopped and its database dropped."""
    from sqlalchemy import create_engine, text

    from ldmq.bench import stack
    from ldmq.bench.api import main

    databases = []
    init = stack.Stack.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        databases.append(self.db)

    monkeypatch.setattr(stack.Stack, "__init__", recording_init)
    children = _children()
    assert main(["--rate", "10", "--seconds", "1", "--dispatch-jobs", "2", "--api-workers", "2",
                 "--pg-admin", PG_ADMIN_URL, "--redis", redis_url]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^submit latency at 10 req/s for 1 s, 2 API process\(es\) \(10 requests, 0 errors\):$", out, re.M)
    assert re.search(r"p50 [\d.]+ ms +p90 [\d.]+ ms +p99 [\d.]+ ms +max [\d.]+ ms", out)
    assert re.search(r"^dispatch \(submit -> running, idle worker, 2 jobs\): p50 [\d.]+ ms", out, re.M)
    assert _children() <= children
    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as c:
            left = c.execute(text("SELECT count(*) FROM pg_database WHERE datname = :d"), {"d": databases[0]})
            assert left.scalar() == 0
    finally:
        engine.dispose()
