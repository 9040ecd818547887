"""S3 storage (boto3; AWS, MinIO, SeaweedFS), with bounded retries. boto3 is imported when a client
is made, not with this module."""

from __future__ import annotations

import base64
import hashlib
import logging
import time

from shared.storage.base import (
    ChecksumMismatch,
    ObjectExists,
    ObjectNotFound,
    Storage,
    ObjectTooLarge,
    StorageError,
    StorageUnavailable,
    sha256_hex,
)

CHECKSUM_META = "sha256"
log = logging.getLogger(__name__)

_RETRY_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                "Throttling", "ThrottlingException", "RequestLimitExceeded"}
# Not retried: a clock off by more than the server allows stays off; retrying it for the whole
# budget would end as "unreachable" and hide the cause.


def _retryable(exc: Exception) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError)):
        return True
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return err.get("Code", "") in _RETRY_CODES or status >= 500
    return False


class S3Storage(Storage):
    """S3 with bounded retries: connection errors, timeouts, 5xx and throttling are retried with
    exponential backoff and jitter for up to ``retry_s`` seconds; then ``StorageUnavailable``."""

    scheme = "s3"
    BACKOFF_START_S = 0.2
    BACKOFF_MAX_S = 5.0

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str = "us-east-1",
                 retry_s: float = 30.0, public_endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retry_s = retry_s
        cfg = Config(
            region_name=region,
            # One try per call: the retry loop below owns retries, their backoff and their budget.
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=3,
            read_timeout=30,
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            # Integrity is ours end to end: every PUT carries the body's SHA-256 (which the server
            # checks, MinIO and S3 alike) and every read is verified against it. botocore's default
            # CRC32 on top of that cost ~0.4 ms of client and ~0.5 ms of server CPU per small PUT.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=cfg)
        # Presigning is local computation (no request): a client for the public host signs for it.
        self.presign_client = (
            boto3.client("s3", endpoint_url=public_endpoint_url, config=cfg)
            if public_endpoint_url and public_endpoint_url != endpoint_url else self.client
        )

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _wrap(self, exc: Exception, key: str) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, StorageError):  # ours already (a budget passed while streaming)
            return exc
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(key)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return ObjectExists(key)
            if code == "RequestTimeTooSkewed":
                return StorageError("object storage refused the request: this machine's clock is off by more than "
                                    "the server allows (RequestTimeTooSkewed); fix the clock (NTP)")
        return StorageError(f"S3 {type(exc).__name__} on {key!r}: {exc}")

    def _call(self, op: str, key: str, fn, *, retry: bool = True):
        """Run ``fn()`` (one S3 request), retrying transient failures within the budget."""
        import random

        deadline = time.monotonic() + (self.retry_s if retry else 0.0)
        delay = self.BACKOFF_START_S
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:
                if not _retryable(exc):
                    raise self._wrap(exc, key) from exc
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("storage: %s %r failed %d time(s) over %.0f s; giving up: %s", op, key, attempt,
                              self.retry_s, exc)
                    raise StorageUnavailable(
                        f"object storage unreachable: {op} {key!r} failed {attempt} time(s) over "
                        f"{self.retry_s:.0f} s of retries ({type(exc).__name__}: {exc})", retry_s=self.retry_s) from exc
                sleep = min(left, delay * (0.5 + random.random() / 2))
                log.warning("storage: %s %r failed (%s); retry %d in %.2f s", op, key, type(exc).__name__,
                            attempt, sleep)
                time.sleep(sleep)
                delay = min(self.BACKOFF_MAX_S, delay * 2)

    def put_bytes(self, key, data, *, content_type="application/octet-stream", if_none_match=False):
        raw = hashlib.sha256(data).digest()
        digest = raw.hex()
        kwargs = dict(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type,
                      Metadata={CHECKSUM_META: digest}, ChecksumSHA256=base64.b64encode(raw).decode())
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        self._call("put", key, lambda: self.client.put_object(**kwargs))
        return digest

    def put_file(self, key, path, content_type="application/octet-stream"):
        with open(path, "rb") as f:
            return self.put_fileobj(key, f, content_type)

    def put_fileobj(self, key, f, content_type="application/octet-stream", *, if_none_match=False):
        """Streamed from the file (one PUT; S3 takes up to 5 GiB in one): a first pass hashes it,
        the second sends it with its SHA-256 for the server to check."""
        h = hashlib.sha256()
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        raw = h.digest()
        size = f.tell()

        extra = {"IfNoneMatch": "*"} if if_none_match else {}

        def put():
            f.seek(0)
            return self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=f, ContentLength=size,
                                          ContentType=content_type, Metadata={CHECKSUM_META: raw.hex()},
                                          ChecksumSHA256=base64.b64encode(raw).decode(), **extra)

        self._call("put", key, put)
        return raw.hex()

    def read_into(self, key, out, *, max_bytes=None):
        start = out.tell()

        def get():
            out.seek(start)
            out.truncate()
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            n = 0
            for chunk in body.iter_chunks(1 << 20):
                n += len(chunk)
                if max_bytes is not None and n > max_bytes:
                    body.close()
                    raise ObjectTooLarge(f"{key!r} is larger than the {max_bytes} bytes left in the budget")
                out.write(chunk)
            return n

        return self._call("get", key, get)

    def open_stream(self, key, chunk_size=1 << 20):
        """One GET (retried until the body starts); its body read ``chunk_size`` at a time, hashed as
        it passes and checked against the object's SHA-256 at its end."""
        obj = self._call("get", key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key)))
        size, expected, body = int(obj["ContentLength"]), obj.get("Metadata", {}).get(CHECKSUM_META), obj["Body"]

        def chunks():
            h, n = hashlib.sha256(), 0
            try:
                for chunk in body.iter_chunks(chunk_size):
                    n += len(chunk)
                    h.update(chunk)
                    yield chunk
            except StorageError:
                raise
            except Exception as exc:  # the connection broke mid-body: not retried (bytes went out)
                raise self._wrap(exc, key) from exc
            finally:
                body.close()
            if n != size:
                raise StorageError(f"S3 GET {key!r}: {n} bytes read, {size} announced")
            if expected and expected != h.hexdigest():
                raise ChecksumMismatch(key)

        return size, chunks()

    def full_key(self, key: str) -> str:
        """``key`` as the bucket names it (with this storage's prefix)."""
        return self._key(key)

    def get_bytes(self, key, *, verify=True):
        def get():
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj, obj["Body"].read()

        obj, data = self._call("get", key, get)
        expected = obj.get("Metadata", {}).get(CHECKSUM_META)
        if verify and expected and expected != sha256_hex(data):
            raise ChecksumMismatch(key)
        return data

    def checksum(self, key):
        head = self._call("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        return head.get("Metadata", {}).get(CHECKSUM_META)

    def exists(self, key):
        try:
            self.checksum(key)
            return True
        except ObjectNotFound:
            return False

    def list(self, prefix):
        def pages():
            out = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                out.extend(self._rel(o["Key"]) for o in page.get("Contents", []))
            return out

        return sorted(self._call("list", prefix, pages))

    def delete(self, key):
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def presigned_url(self, key, expires_s):
        return self.presign_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=int(expires_s)
        )

    def uri(self, key=""):
        return f"s3://{self.bucket}/{self._key(key)}"

    def check(self):
        # Readiness answers now: no retries.
        self._call("head_bucket", "", lambda: self.client.head_bucket(Bucket=self.bucket), retry=False)
