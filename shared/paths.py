"""Keys and relative paths from tenants, made safe to turn into local paths.

An object key or a file name inside an uploaded folder is tenant input. Before one becomes a local
path it must be a *plain relative path* (:func:`plain_relative_path`), and the path built from it
must be proven to lie inside its folder (:func:`path_within`, which also resolves links): a key
like ``../other-tenant/models/x/unet/weights.safetensors`` must never write outside the folder a
download was meant for.
"""

from __future__ import annotations

from pathlib import Path

MAX_PATH_CHARS = 512


class UnsafePath(ValueError):
    """A key or relative path that is not plain, or that would leave its folder."""


def plain_relative_path(path: str) -> str | None:
    """Why ``path`` is not a plain relative path (POSIX separators, no ``..`` or ``.`` part, no
    empty part, no leading ``/``, no drive, no backslash or control character), or None when it is one."""
    if not path:
        return "empty path"
    if len(path) > MAX_PATH_CHARS:
        return f"path longer than {MAX_PATH_CHARS} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "control character in path"
    if "\\" in path:
        return "backslash in path"
    if path.startswith("/") or ":" in path.split("/", 1)[0]:
        return "absolute path"
    if any(p in ("", ".", "..") for p in path.split("/")):
        return "'.', '..' or empty part in path"
    return None


def path_within(root: Path, rel: str) -> Path:
    """``root / rel``, after proving ``rel`` is plain and the result (links resolved) stays under
    ``root``; raises :class:`UnsafePath` otherwise."""
    why = plain_relative_path(rel)
    if why:
        raise UnsafePath(f"{rel[:100]!r}: {why}")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if path == base or base not in path.parents:
        raise UnsafePath(f"{rel[:100]!r} leaves its folder")
    return path
