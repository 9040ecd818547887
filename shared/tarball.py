"""Tar members that depend on their name and size only (no clock, owner or umask): the WebDataset
shards the worker writes and the archive the API streams use them, so the same objects give the
same bytes. The format is the standard library's ``tarfile`` (POSIX pax; a plain ustar header for
the short ASCII names ldmq writes)."""

from __future__ import annotations

import tarfile

BLOCK = 512
END = b"\0" * (2 * BLOCK)  # end-of-archive: two zero blocks


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) of a regular-file member; its data follows, padded by :func:`tar_padding`."""
    return tar_member(name, size).tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def tar_padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)
