"""Dependencies go away: PostgreSQL (a private server of this test, stopped and started) and the S3
server (a dedicated SeaweedFS, killed and started again on the same ports and data). The API
answers 503 with Retry-After, never 500; work resumes when they are back; a long storage outage
fails the job with a clear error."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until
from tests.faults.conftest import LEASE_S, FaultStack

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------
# A private PostgreSQL server: stopping the shared one would break every other test using it.
# ------------------------------------------------------------------------------------------------

class PrivatePostgres:
    def __init__(self):
        candidates = [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
        if shutil.which("initdb"):
            candidates.append(Path(shutil.which("initdb")).parent)
        found = [d for d in candidates if all((d / t).exists() for t in ("initdb", "pg_ctl", "pg_isready"))]
        if not found:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, pg_isready) are not installed")
        self.bin = found[0]
        self.dir = Path(tempfile.mkdtemp(prefix="ldmq-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        r = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                           timeout=timeout, cwd=self.dir)
        assert r.returncode == 0, f"{tool} failed: {r.stdout}\n{r.stderr}"

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c full_page_writes=off -c synchronous_commit=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def ready(self) -> bool:
        return subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]).returncode == 0

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg():
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


def seed(settings, pipeline_dir) -> tuple[str, str]:
    """A tenant, its key and the tiny model, in ``settings``' database and storage."""
    from shared.db import session_scope
    from shared.registry import register_pipeline_dir, tenant_by_name
    from shared.security import create_key
    from shared.storage import get_storage

    name = f"t-{uuid.uuid4().hex[:8]}"
    with session_scope(settings) as s:
        key = create_key(s, name)
        tid = tenant_by_name(s, name).id
        model = register_pipeline_dir(s, get_storage(settings), tid, pipeline_dir, name="tiny")
    return key, model.id


def test_9_postgres_down_api_answers_503_then_work_resumes(settings, private_pg, tiny_pipeline_dir, tmp_path):
    from migrations import upgrade

    s9 = settings.model_copy(update={"database_url": private_pg.url})
    upgrade(s9.database_url)
    key, model_id = seed(s9, tiny_pipeline_dir)
    st = FaultStack(s9, tmp_path, key, model_id)
    try:
        st.start_api()
        st.start_sweeper()
        w = st.start_worker("w1")
        job_id = st.submit_sample(60, steps=8)
        st.wait_status(job_id, lambda j: j.outputs_count >= 3, 60, "outputs")

        private_pg.stop()
        seen: list[int] = []
        body = {"model": model_id, "prompts": [{"prompt": "during the outage"}]}
        calls = [lambda: st.http.get("/v1/jobs"), lambda: st.http.get(f"/v1/jobs/{job_id}"),
                 lambda: st.http.post("/v1/jobs/sample", json=body),
                 lambda: st.http.get(f"/v1/jobs/{job_id}/outputs"),
                 lambda: st.http.post(f"/v1/jobs/{job_id}/cancel"), lambda: st.http.get("/readyz")]
        down_since = time.monotonic()
        # The outage outlasts the worker's lease; the API answers 503 all along.
        while time.monotonic() - down_since < LEASE_S + 1 or len(seen) < 3 * len(calls):
            for call in calls:
                r = call()
                seen.append(r.status_code)
                assert r.status_code == 503, (r.status_code, r.text)
                assert int(r.headers["Retry-After"]) > 0
                assert "error" in r.json()
        assert st.http.get("/healthz").status_code == 200  # alive, just not ready
        # The worker notices too: its writes fail and it holds on to the job until the database is back.
        wait_until(lambda: "database unreachable" in w.output() or "heartbeat failed" in w.output(), 30,
                   "the worker to notice the outage")
        private_pg.start()
        wait_until(private_pg.ready, 30, "PostgreSQL to accept connections")

        job = st.wait_final(job_id, 120)
        assert job.status == "succeeded", job.error
        st.assert_outputs_exactly_once(job_id, 60)
        after = st.submit_sample(2, steps=2)
        assert st.wait_final(after, 60).status == "succeeded"
        assert 500 not in seen and "internal_error" not in (tmp_path / "api-0.log").read_text()
    finally:
        st.stop_all()
        from shared.db import _engine_for

        _engine_for(private_pg.url).dispose()


# ------------------------------------------------------------------------------------------------
# A dedicated S3 server that the test takes away and brings back: SeaweedFS (tests/s3server.py)
# accepting the suite's credentials. kill() SIGKILLs what serves S3 (connections refused at once);
# start() brings it back on the same ports and data folder in ~2.5 s, everything stored still there.
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def stoppable_s3(s3, tmp_path):
    from tests.s3server import SeaweedS3

    server = SeaweedS3(tmp_path / "s3", access_key=s3.access_key, secret_key=s3.secret_key)
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_10_s3_down_briefly_is_retried_down_long_fails_the_job_clearly(settings, stoppable_s3, tiny_pipeline_dir,
                                                                      tmp_path):
    bucket = f"ldmq-outage-{uuid.uuid4().hex[:8]}"
    stoppable_s3.client().create_bucket(Bucket=bucket)
    budget = 10  # seconds of retries; a restart of the S3 side takes ~2.5 s of them
    s10 = settings.model_copy(update={"s3_endpoint_url": stoppable_s3.endpoint, "storage_url": f"s3://{bucket}/t",
                                      "storage_retry_s": budget})
    key, model_id = seed(s10, tiny_pipeline_dir)
    st = FaultStack(s10, tmp_path, key, model_id)
    try:
        st.start_api()
        w = st.start_worker("w1")
        # Down for a while: retried with backoff, the job carries on.
        job_id = st.submit_sample(60, steps=8)
        st.wait_status(job_id, lambda j: j.outputs_count >= 2, 60, "outputs")
        stoppable_s3.kill()
        try:
            wait_until(lambda: "retry 3 in" in w.output(), 30, "the worker to retry its uploads")
        finally:
            stoppable_s3.start()  # ~2.5 s: well within the worker's retry budget
        job = st.wait_final(job_id, 90)
        assert job.status == "succeeded", job.error
        st.assert_outputs_exactly_once(job_id, 60)

        # Down for long: the job fails with a clear error once the retry budget is spent.
        stoppable_s3.kill()
        try:
            t0 = time.monotonic()
            failing = st.submit_sample(2, steps=2)
            job = st.wait_final(failing, 60)
            assert job.status == "failed" and job.error["code"] == "storage_unavailable", job.error
            assert "unreachable" in job.error["message"] and f"{budget} s of retries" in job.error["message"]
            assert time.monotonic() - t0 >= budget
        finally:
            stoppable_s3.start()
        ok = st.submit_sample(1, steps=2)
        assert st.wait_final(ok, 60).status == "succeeded"
        assert w.alive()
    finally:
        st.stop_all()
