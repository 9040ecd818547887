"""``file://`` storage: a local folder, each object beside a ``.<name>.sha256`` sidecar."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from shared.paths import UnsafePath, path_within
from shared.storage.base import (
    ChecksumMismatch,
    ObjectExists,
    ObjectNotFound,
    ObjectTooLarge,
    Storage,
    StorageError,
    UnsafeKey,
    sha256_hex,
)


class FileStorage(Storage):
    scheme = "file"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        """The file of ``key``: a plain relative key whose path (links resolved) stays under the root."""
        try:
            return path_within(self.root, key)
        except UnsafePath as exc:
            raise UnsafeKey(f"key escapes the storage root: {exc}") from None

    def put_bytes(self, key, data, *, content_type="application/octet-stream", if_none_match=False):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = sha256_hex(data)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        Path(tmp + ".sha256").write_text(digest)
        self._place(key, tmp, path, if_none_match)
        return digest

    def put_fileobj(self, key, f, content_type="application/octet-stream", *, if_none_match=False):
        """Copied in 1 MiB chunks to a temporary file beside the target, hashed on the way, then
        renamed (or, create-only, hard-linked) into place."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        f.seek(0)
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        Path(tmp + ".sha256").write_text(h.hexdigest())
        self._place(key, tmp, path, if_none_match)
        return h.hexdigest()

    def _place(self, key: str, tmp: str, path: Path, if_none_match: bool) -> None:
        """Move the written temporary file (and its checksum beside it) to ``path``."""
        if if_none_match:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                os.unlink(tmp)
                os.unlink(tmp + ".sha256")
                raise ObjectExists(key) from None
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        os.replace(tmp + ".sha256", self._sidecar(path))

    def put_file(self, key, path, content_type="application/octet-stream"):
        with open(path, "rb") as f:
            return self.put_fileobj(key, f, content_type)

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.parent / f".{path.name}.sha256"

    def get_bytes(self, key, *, verify=True):
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        side = self._sidecar(path)
        if verify and side.exists() and side.read_text().strip() != sha256_hex(data):
            raise ChecksumMismatch(key)
        return data

    def read_into(self, key, out, *, max_bytes=None):
        path = self._path(key)
        n = 0
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    n += len(chunk)
                    if max_bytes is not None and n > max_bytes:
                        raise ObjectTooLarge(f"{key!r} is larger than the {max_bytes} bytes left in the budget")
                    out.write(chunk)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        return n

    def open_stream(self, key, chunk_size=1 << 20):
        path = self._path(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        size = os.fstat(f.fileno()).st_size
        side = self._sidecar(path)
        expected = side.read_text().strip() if side.exists() else None

        def chunks():
            h, n = hashlib.sha256(), 0
            with f:
                for chunk in iter(lambda: f.read(chunk_size), b""):
                    n += len(chunk)
                    h.update(chunk)
                    yield chunk
            if n != size:
                raise StorageError(f"{key!r}: {n} bytes read, {size} when opened")
            if expected and expected != h.hexdigest():
                raise ChecksumMismatch(key)

        return size, chunks()

    def exists(self, key):
        return self._path(key).is_file()

    def checksum(self, key):
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        side = self._sidecar(path)
        return side.read_text().strip() if side.exists() else sha256_hex(path.read_bytes())

    def list(self, prefix):
        base = self.root
        out = []
        if not base.exists():
            return out
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                rel = p.relative_to(base).as_posix()
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, key):
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._sidecar(path).unlink(missing_ok=True)

    def presigned_url(self, key, expires_s):
        # A local folder has no signing server: the embedded default hands out the file's URI.
        return self._path(key).as_uri()

    def uri(self, key=""):
        return (self.root / key).as_uri() if key else self.root.as_uri() + "/"

    def check(self):
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")
