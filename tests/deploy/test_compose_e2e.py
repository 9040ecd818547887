"""The whole stack under Docker Compose, end to end: the spine test's path (tests/test_e2e.py)
against the real images, Postgres, Redis and MinIO, plus presigned URL expiry (which moto does
not enforce) and conditional writes (which moto 5 does enforce, and tests/shared and
tests/worker check there too) against a real MinIO.

Needs a Docker engine: skipped, with the reason, where `docker info` fails (the dev machine and CI
have no engine; CI runs the same path against SeaweedFS in tests/test_e2e.py, and checks expiry
and conditional writes there too, in tests/shared/test_storage.py). Run it with
`make compose-test`. It builds the images (minutes the first time), brings up its own project
(`ldmq-e2e-<random>`, free host ports, nothing shared with a `make compose-up` stack) and always
removes it and its volumes at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.compose

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
BUILD_TIMEOUT_S = 3600  # torch wheels for two images on a cold cache
UP_TIMEOUT_S = 300
JOB_TIMEOUT_S = 300
FINAL = ("succeeded", "failed", "canceled")
DEFAULT_SERVICES = {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker-cpu", "sweeper", "webhooks",
                    "flower"}
ONE_SHOTS = {"minio-init", "migrate"}


def docker_engine_problem() -> str | None:
    if not shutil.which("docker"):
        return "no `docker` CLI on PATH"
    try:
        out = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                             text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out: no Docker engine answers"
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers (`docker info` failed: {why})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    cli: list[str]
    project: str
    env: dict[str, str]
    config: dict = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*self.cli, "--project-directory", str(REPO), "--env-file", "/dev/null", "-f", str(COMPOSE_FILE),
               "-p", self.project, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and out.returncode != 0:
            raise AssertionError(f"`{' '.join(cmd)}` exited {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n"
                                 f"--- stderr\n{out.stderr[-4000:]}\n--- logs\n{self.logs()}")
        return out

    def logs(self) -> str:
        try:
            out = subprocess.run([*self.cli, "--project-directory", str(REPO), "--env-file", "/dev/null",
                                  "-f", str(COMPOSE_FILE), "-p", self.project, "logs", "--no-color", "--tail", "80"],
                                 capture_output=True, text=True, timeout=120, env=self.env)
            return out.stdout[-12000:]
        except Exception as exc:  # diagnostics only
            return f"(could not read logs: {exc})"

    def exec(self, service: str, *cmd: str, timeout: float = 600) -> str:
        """Run a command in a running service container (no TTY); return its stdout."""
        return self.compose("exec", "-T", service, *cmd, timeout=timeout).stdout

    def host_port(self, service: str, port: int) -> int:
        out = self.compose("port", service, str(port), timeout=60).stdout.strip()
        return int(out.rsplit(":", 1)[1])

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.host_port('api', 8000)}"

    @property
    def minio_port(self) -> int:
        return self.host_port("minio", 9000)

    def fetch_presigned(self, url: str) -> tuple[int, bytes]:
        """GET a presigned URL as a client outside the compose network would: it must be signed
        for MinIO's published address (LDMQ_S3_PUBLIC_ENDPOINT_URL), not the in-network name."""
        parts = urlsplit(url)
        assert parts.hostname == "localhost" and parts.port == self.minio_port, url
        r = httpx.get(url, timeout=30)
        return r.status_code, r.content

    def s3(self):
        import boto3
        from botocore.config import Config

        minio_env = self.config["services"]["minio"]["environment"]
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.minio_port}",
                            aws_access_key_id=minio_env["MINIO_ROOT_USER"],
                            aws_secret_access_key=minio_env["MINIO_ROOT_PASSWORD"], region_name="us-east-1",
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))

    @property
    def bucket(self) -> str:
        return urlsplit(self.config["services"]["api"]["environment"]["LDMQ_STORAGE_URL"]).hostname


def ps(stack: Stack) -> dict[str, dict]:
    """Service -> container state, from `docker compose ps -a --format json` (one JSON object per line in
    Compose >= 2.21, a JSON array before)."""
    text = stack.compose("ps", "-a", "--format", "json", timeout=60).stdout.strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    return {r["Service"]: r for r in rows}


@pytest.fixture(scope="module")
def stack(request):
    problem = docker_engine_problem()
    if problem:
        pytest.skip(problem)
    cli = request.getfixturevalue("compose_cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDMQ_", "COMPOSE_"))}
    env.update({
        "LDMQ_HOST_API_PORT": str(free_port()),
        "LDMQ_HOST_MINIO_PORT": str(free_port()),
        "LDMQ_HOST_MINIO_CONSOLE_PORT": str(free_port()),
        "LDMQ_HOST_FLOWER_PORT": str(free_port()),
    })
    st = Stack(cli=cli, project=f"ldmq-e2e-{uuid.uuid4().hex[:8]}", env=env)
    try:
        st.config = json.loads(st.compose("config", "--format", "json", timeout=60).stdout)
        st.compose("build", timeout=BUILD_TIMEOUT_S)
        st.compose("up", "-d", "--wait", "--wait-timeout", str(UP_TIMEOUT_S), timeout=UP_TIMEOUT_S + 120)
        yield st
    finally:
        st.compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=600, check=False)


@pytest.fixture(scope="module")
def api_key(stack) -> str:
    out = stack.exec("api", "ldmq", "keys", "create", "--tenant", "t1", timeout=120)
    key = out.strip().splitlines()[-1].strip()
    assert key and " " not in key, out
    return key


@pytest.fixture(scope="module")
def model_id(stack, api_key) -> str:
    stack.exec("worker-cpu", "python", "-m", "worker.model.tiny_pipeline", "/tmp/tiny", timeout=600)
    out = stack.exec("worker-cpu", "ldmq", "models", "import", "/tmp/tiny", "--tenant", "t1", "--name", "tiny",
                     timeout=600)
    mid = out.strip().splitlines()[-1].strip()
    assert mid and " " not in mid, out
    return mid


def test_stack_is_up_in_order(stack):
    states = ps(stack)
    assert set(states) == DEFAULT_SERVICES, "the gpu profile must stay off by default"
    for name, row in states.items():
        if name in ONE_SHOTS:
            assert row["State"] == "exited" and row["ExitCode"] == 0, row
        else:
            assert row["State"] == "running", row
            if name in ("postgres", "redis", "minio", "api"):
                assert row["Health"] == "healthy", row


def test_health_ready_and_metrics(stack):
    with httpx.Client(base_url=stack.api_url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        metrics = c.get("/metrics")
        assert metrics.status_code == 200
        assert "# TYPE" in metrics.text


def test_redis_runs_with_the_broker_settings(stack):
    out = stack.exec("redis", "redis-cli", "CONFIG", "GET", "maxmemory-policy", timeout=60).split()
    assert out == ["maxmemory-policy", "noeviction"]
    out = stack.exec("redis", "redis-cli", "CONFIG", "GET", "appendonly", timeout=60).split()
    assert out == ["appendonly", "yes"]


def test_sample_csv_end_to_end(stack, api_key, model_id):
    api = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
    csv_bytes = b"prompt,seed,num_images\na red square,11,2\na blue circle,22,1\n\"a cat, sitting\",33,3\n"
    r = api.post("/v1/jobs/sample/csv", files={"file": ("p.csv", csv_bytes, "text/csv")},
                 data={"model": model_id, "steps": "3", "scheduler": "ddim"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in FINAL:
            break
        assert time.monotonic() < deadline, f"job still {job['status']} after {JOB_TIMEOUT_S}s\n{stack.logs()}"
        time.sleep(1)
    assert job["status"] == "succeeded", f"{job}\n{stack.logs()}"
    assert job["outputs_count"] == 6 and job["progress"] == 1.0

    outs = api.get(f"/v1/jobs/{job_id}/outputs").json()
    items = outs["items"]
    assert [(o["row"], o["index"], o["seed"]) for o in items] == [
        (1, 0, 11), (1, 1, 12), (2, 0, 22), (3, 0, 33), (3, 1, 34), (3, 2, 35)]
    digests = set()
    for o in items:
        status, body = stack.fetch_presigned(o["url"])  # presigned: no API key
        assert status == 200, body[:500]
        assert body.startswith(b"\x89PNG\r\n\x1a\n")
        img = Image.open(io.BytesIO(body))
        img.verify()
        assert img.format == "PNG" and img.size == (o["width"], o["height"])
        digests.add(hashlib.sha256(body).hexdigest())
    assert len(digests) == 6, "different seeds must give different images"
    status, body = stack.fetch_presigned(outs["manifest_url"])
    assert status == 200
    assert len(json.loads(body)["outputs"]) == 6

    # The objects are really in MinIO's bucket, under the keys the API reports.
    s3 = stack.s3()
    for o in items:
        head = s3.head_object(Bucket=stack.bucket, Key=o["key"])
        assert head["ContentLength"] > 0


def test_presigned_url_expiry_is_enforced(stack):
    s3 = stack.s3()
    key = f"e2e/expiry-{uuid.uuid4().hex}.txt"
    s3.put_object(Bucket=stack.bucket, Key=key, Body=b"hello")
    fresh = s3.generate_presigned_url("get_object", Params={"Bucket": stack.bucket, "Key": key}, ExpiresIn=300)
    short = s3.generate_presigned_url("get_object", Params={"Bucket": stack.bucket, "Key": key}, ExpiresIn=1)
    r = httpx.get(fresh, timeout=30)
    assert r.status_code == 200 and r.content == b"hello"
    time.sleep(3)
    r = httpx.get(short, timeout=30)
    assert r.status_code == 403, r.text
    assert "expired" in r.text.lower(), r.text
    assert httpx.get(fresh, timeout=30).status_code == 200


def test_conditional_put_if_none_match(stack):
    from botocore.exceptions import ClientError

    s3 = stack.s3()
    key = f"e2e/cond-{uuid.uuid4().hex}.txt"
    s3.put_object(Bucket=stack.bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == b"first"
