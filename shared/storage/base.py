"""The ``Storage`` interface, its errors and what every backend shares (the directory copies);
the backends are ``file.py`` and ``s3.py``."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from shared.paths import UnsafePath, path_within, plain_relative_path


class StorageError(Exception):
    """The storage backend failed or is unreachable (the API answers 503).

    ``str(exc)`` is for the logs (it may name keys); :attr:`public` is what a tenant may read (a
    job's ``error``): no key, no path, no server text."""

    public = "object storage failed a request"


class ObjectNotFound(StorageError):
    pass


class ChecksumMismatch(StorageError):
    pass


class ObjectExists(StorageError):
    """A conditional write (If-None-Match: *) found the key already written."""


class UnsafeKey(StorageError):
    """A key that is not a plain relative path, or a local path built from one that would leave its
    folder (see ``shared.paths``): refused before anything is read or written."""


class ObjectTooLarge(StorageError):
    """A copy passed the byte budget it was given; what it had written is removed."""


class StorageUnavailable(StorageError):
    """The backend did not answer (connection refused, timeouts, 5xx) for the whole retry budget."""

    def __init__(self, message: str, retry_s: float | None = None, public: str | None = None):
        super().__init__(message)
        budget = f" after {retry_s:.0f} s of retries" if retry_s is not None else ""
        self.public = public or f"object storage unreachable{budget}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_sha256(files) -> str:
    """One SHA-256 for a set of files (a model's): over its (relative path, file SHA-256) pairs,
    sorted by path, each written as ``path NUL sha256 LF``. The same files give the same hash
    wherever they are stored, so a downloaded copy can be checked with the files alone."""
    h = hashlib.sha256()
    for rel, digest in sorted(files):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


class Storage(ABC):
    scheme: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream",
                  if_none_match: bool = False) -> str:
        """Store ``data`` at ``key``; return its sha256. ``if_none_match`` never overwrites."""

    @abstractmethod
    def get_bytes(self, key: str, *, verify: bool = True) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (relative to the root), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int) -> str: ...

    @abstractmethod
    def uri(self, key: str = "") -> str: ...

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the backend answers."""

    def checksum(self, key: str) -> str | None:
        """The stored SHA-256 of ``key`` (ObjectNotFound if absent; None if it carries none)."""
        return sha256_hex(self.get_bytes(key, verify=False))

    def prefix_sha256(self, prefix: str) -> str:
        """``content_sha256`` of every object under ``prefix``, from the checksums they carry (one
        HEAD each; an object without one is read and hashed). ObjectNotFound if there are none."""
        prefix = prefix.rstrip("/") + "/"
        keys = self.list(prefix)
        if not keys:
            raise ObjectNotFound(f"nothing stored under {self.uri(prefix)}")
        return content_sha256((k[len(prefix):], self.checksum(k) or sha256_hex(self.get_bytes(k, verify=False)))
                              for k in keys)

    def put_bytes_once(self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
                       ) -> tuple[str, bool]:
        """Create ``key`` only if absent (S3 ``If-None-Match: *``); returns (sha256 stored, created).

        A run that repeats an earlier attempt's write, or a stale run that lost its lease, keeps
        the object that is there: a final write can never clobber the winner's."""
        try:
            return self.put_bytes(key, data, content_type=content_type, if_none_match=True), True
        except ObjectExists:
            return self.checksum(key) or sha256_hex(self.get_bytes(key, verify=False)), False

    def delete_prefix(self, prefix: str, *, keep: frozenset[str] | set[str] = frozenset()) -> int:
        """Delete every object under ``prefix`` (which must end in "/") except the keys in ``keep``;
        return how many were deleted. Deleting what is already gone is not an error."""
        if not prefix.endswith("/") or prefix == "/":
            raise UnsafeKey(f"refusing to delete under {prefix!r}: a prefix must be a folder ending in '/'")
        n = 0
        for key in self.list(prefix):
            if key not in keep:
                self.delete(key)
                n += 1
        return n

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> str:
        return self.put_bytes(key, Path(path).read_bytes(), content_type=content_type)

    def put_fileobj(self, key: str, f, content_type: str = "application/octet-stream", *,
                    if_none_match: bool = False) -> str:
        """Store what the seekable binary file ``f`` holds from its start; return its sha256.
        ``if_none_match`` never overwrites (ObjectExists)."""
        f.seek(0)
        return self.put_bytes(key, f.read(), content_type=content_type, if_none_match=if_none_match)

    def put_fileobj_once(self, key: str, f, *, content_type: str = "application/octet-stream") -> tuple[str, bool]:
        """:meth:`put_bytes_once` for a file (streamed by the backends: a WebDataset shard)."""
        try:
            return self.put_fileobj(key, f, content_type, if_none_match=True), True
        except ObjectExists:
            return self.checksum(key) or sha256_hex(self.get_bytes(key, verify=False)), False

    def open_stream(self, key: str, chunk_size: int = 1 << 20) -> tuple[int, Iterator[bytes]]:
        """(size in bytes, the object's bytes in chunks of at most ``chunk_size``) for a reader that
        must not hold a whole object (``GET /v1/jobs/{id}/archive``). The backends stream; the
        chunks are checked against the stored SHA-256 as they pass, and a mismatch (or a size that
        differs) raises at the end of the object, before anything after it is read."""
        data = self.get_bytes(key)
        return len(data), (data[i:i + chunk_size] for i in range(0, len(data), chunk_size))

    def read_into(self, key: str, out, *, max_bytes: int | None = None) -> int:
        """Write the object's bytes to the binary file ``out`` and return how many there were;
        ObjectTooLarge once more than ``max_bytes`` arrive (backends stream: memory stays small)."""
        data = self.get_bytes(key, verify=False)
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"{key!r} is larger than the {max_bytes} bytes left in the budget")
        out.write(data)
        return len(data)

    def upload_dir(self, local_dir: Path, prefix: str) -> list[str]:
        keys = []
        local_dir = Path(local_dir)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
            self.put_file(key, path)
            keys.append(key)
        return keys

    def download_dir(self, prefix: str, local_dir: Path) -> Path:
        """Copy every object under ``prefix`` into ``local_dir`` (written atomically, verified)."""
        prefix = prefix.rstrip("/") + "/"
        keys = self.list(prefix)
        if not keys:
            raise ObjectNotFound(f"nothing stored under {self.uri(prefix)}")
        local_dir = Path(local_dir)
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=local_dir.parent if local_dir.parent.exists() else None))
        try:
            for key in keys:
                try:  # the key is tenant input: it must not write outside the folder
                    dest = path_within(tmp, key[len(prefix):])
                except UnsafePath as exc:
                    raise UnsafeKey(f"refusing to download {key!r}: {exc}") from None
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self.get_bytes(key))
            if local_dir.exists():
                shutil.rmtree(local_dir)
            local_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, local_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return local_dir

    def copy_prefix(self, src: Storage, src_prefix: str, dest_prefix: str, *, max_bytes: int | None = None,
                    keys: list[str] | None = None, spool_dir: Path | None = None) -> list[str]:
        """Copy every object under ``src_prefix`` of ``src`` (or the given ``keys`` of it) to the
        same relative keys under ``dest_prefix``, one at a time through a temporary file (never a
        whole object in memory), at most ``max_bytes`` in all (counted as the bytes arrive, not
        from declared sizes). On any failure the objects already copied are deleted: nothing is
        left half stored."""
        src_prefix = src_prefix.rstrip("/") + "/"
        keys = src.list(src_prefix) if keys is None else keys
        for key in keys:  # every key is checked before a byte is copied
            if why := plain_relative_path(key[len(src_prefix):]):
                raise UnsafeKey(f"refusing to copy {key!r}: {why}")
        out: list[str] = []
        left = max_bytes
        try:
            for key in keys:
                dest = f"{dest_prefix.rstrip('/')}/{key[len(src_prefix):]}"
                with tempfile.NamedTemporaryFile(dir=spool_dir, prefix=".copy-") as spool:
                    n = src.read_into(key, spool, max_bytes=left)
                    spool.flush()
                    out.append(dest)
                    self.put_file(dest, Path(spool.name))
                if left is not None:
                    left -= n
        except BaseException:
            for dest in out:
                try:
                    self.delete(dest)
                except Exception:  # the caller's error matters more; a leftover is logged by the backend
                    pass
            raise
        return out
