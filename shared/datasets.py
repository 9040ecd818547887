"""Uploaded image-caption datasets: read and validate an archive without torch (stdlib + Pillow).

An upload is a ``.zip``, ``.tar``, ``.tar.gz`` or ``.tgz`` archive holding images and exactly one
``metadata.csv`` or ``metadata.jsonl`` whose rows have the columns ``file_name`` (the image's path,
relative to the metadata file's folder) and ``text`` (its caption) — the layout of Hugging Face's
``imagefolder``. The API calls :func:`inspect_archive` before storing anything; the worker reads the
same archive with :func:`read_records`. Every problem found is reported, not only the first, as
``{"file": <path in the archive or the archive's name>, "message": <for a person>}``.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
REQUIRED_COLUMNS = ("file_name", "text")

DEFAULT_MAX_IMAGES = 50_000
DEFAULT_MAX_IMAGE_SIDE = 1024
DEFAULT_MAX_CAPTION_CHARS = 1000
DEFAULT_MAX_UNCOMPRESSED_BYTES = 2 * 1024**3
MAX_REPORTED_PROBLEMS = 100
MAX_METADATA_BYTES = 64 * 1024**2  # metadata.csv/jsonl, counted as it is read
MAX_IMAGE_BYTES = 64 * 1024**2  # one image file, counted as it is read
MAX_EXTRA_MEMBERS = 1000  # archive entries beyond the images (metadata, readmes, skipped files)


class DatasetValidationError(ValueError):
    """The archive is not a usable dataset. ``problems`` lists every problem found (up to a cap)."""

    def __init__(self, problems: list[dict]):
        self.problems = problems
        head = "; ".join(f"{p['file']}: {p['message']}" for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        super().__init__(f"invalid dataset archive: {head}{more}")


@dataclass
class DatasetInfo:
    """What an upload holds, as stored next to it and returned by ``POST /v1/datasets``."""

    num_images: int
    archive_format: str  # "zip" | "tar" | "tar.gz"
    metadata_file: str  # path of metadata.csv / metadata.jsonl inside the archive
    image_sizes: dict[str, int]  # "WxH" -> number of images
    min_width: int
    min_height: int
    max_width: int
    max_height: int
    image_formats: dict[str, int]  # Pillow format ("PNG", "JPEG", …) -> count
    num_distinct_captions: int
    max_caption_chars: int
    unlisted_files: list[str] = field(default_factory=list)  # files in the archive no row refers to

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Record:
    """One row of the metadata, with its image's bytes."""

    file_name: str
    text: str
    data: bytes


def archive_format(filename: str) -> str:
    """``zip``, ``tar`` or ``tar.gz`` from the file name; ValueError listing the valid suffixes."""
    name = filename.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(".tar.gz") or name.endswith(".tgz"):
        return "tar.gz"
    if name.endswith(".tar"):
        return "tar"
    raise ValueError(f"unsupported archive {filename!r}; valid suffixes: {', '.join(ARCHIVE_SUFFIXES)}")


class _Archive:
    """Regular files of a zip or tar archive by normalised path (directories and links skipped),
    read from a seekable binary file (an upload spooled to disk: never whole in memory).

    Bombs are bounded by what is *read*, not by what the archive declares: at most ``max_members``
    entries are looked at, and :meth:`read` counts the bytes that come out of decompression
    against ``max_uncompressed_bytes`` (a zip's declared sizes are also checked first, to refuse
    early). A damaged, truncated or encrypted archive is a :class:`DatasetValidationError`."""

    def __init__(self, source, filename: str, max_uncompressed_bytes: int, max_members: int):
        self.format = archive_format(filename)
        self.filename = filename
        self.max_bytes = max_uncompressed_bytes
        self.read_bytes = 0
        self._files: dict[str, object] = {}
        self.problems: list[dict] = []
        fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        if self.format == "zip":
            self._open_zip(fileobj, max_members)
        else:
            self._open_tar(fileobj, max_members)

    def _refuse(self, message: str):
        raise DatasetValidationError([{"file": self.filename, "message": message}])

    def _open_zip(self, fileobj, max_members: int) -> None:
        try:
            self._zip = zipfile.ZipFile(fileobj)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError):
            self._refuse("not a valid zip archive")
        if len(infos) > max_members:
            self._refuse(f"{len(infos)} entries; at most {max_members} allowed")
        declared = 0
        for info in infos:
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                self.problems.append({"file": info.filename, "message": "encrypted entries are not allowed"})
                continue
            declared += info.file_size
            self._add(info.filename, info)
        if declared > self.max_bytes:
            self._refuse(f"uncompressed size {declared} bytes exceeds {self.max_bytes}")

    def _open_tar(self, fileobj, max_members: int) -> None:
        try:
            self._tar = tarfile.open(fileobj=fileobj, mode="r:gz" if self.format == "tar.gz" else "r:")
            # Member by member (getmembers() would read them all first): stop at the cap.
            count = 0
            while (info := self._tar.next()) is not None:
                count += 1
                if count > max_members:
                    self._refuse(f"more than {max_members} entries")
                if info.isdir():
                    continue
                if not info.isfile():
                    self.problems.append({"file": info.name, "message": "links and special files are not allowed"})
                    continue
                self._add(info.name, info)
            if self.format == "tar.gz":
                self._drain_gzip()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            self._refuse(f"not a valid {self.format} archive ({type(exc).__name__})")

    def _drain_gzip(self) -> None:
        """Read the gzip stream to its end (its trailer proves it is whole: a truncated upload is
        refused even when the cut falls after the last member); what comes out counts against the
        budget, so zeros after the end of the tar are no bomb either."""
        gz, pos = self._tar.fileobj, self._tar.fileobj.tell()
        extra = 0
        while chunk := gz.read(1 << 20):
            extra += len(chunk)
            if extra > self.max_bytes:
                self._refuse(f"more than {self.max_bytes} bytes once uncompressed")
        gz.seek(pos)

    def _add(self, raw_name: str, info) -> None:
        name = _normalise(raw_name)
        if name is None:
            self.problems.append({"file": raw_name[:200], "message": "absolute paths and '..' are not allowed"})
            return
        if _ignored(name):
            return
        if name in self._files:
            self.problems.append({"file": name, "message": "appears more than once in the archive"})
            return
        self._files[name] = info

    def names(self) -> list[str]:
        return list(self._files)

    def open(self, name: str, limit: int | None = None):
        """A file object of member ``name`` whose reads count against the uncompressed budget (and
        against ``limit``, this member's own)."""
        info = self._files[name]
        try:
            fh = self._zip.open(info) if self.format == "zip" else self._tar.extractfile(info)
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error):
            raise DatasetValidationError([{"file": name, "message": "cannot be read from the archive (damaged)"}])
        return _Counted(fh, self, name, limit)

    def read(self, name: str, limit: int | None = None) -> bytes:
        """Member ``name`` whole (an image), at most ``limit`` bytes."""
        with self.open(name, limit) as fh:
            return fh.read()


class _Counted(io.RawIOBase):
    """Reads of one archive member, counted against the archive's uncompressed budget; damage
    found while decompressing (bad CRC, truncation) becomes a DatasetValidationError."""

    def __init__(self, fh, archive: _Archive, name: str, limit: int | None = None):
        self.fh, self.archive, self.name, self.limit, self.count = fh, archive, name, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        try:
            data = self.fh.read(len(buf))
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, RuntimeError, zlib.error) as exc:
            raise DatasetValidationError(
                [{"file": self.name, "message": f"damaged in the archive ({type(exc).__name__})"}]) from None
        self.archive.read_bytes += len(data)
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise DatasetValidationError([{"file": self.name, "message": f"larger than {self.limit} bytes"}])
        if self.archive.read_bytes > self.archive.max_bytes:
            raise DatasetValidationError([{"file": self.archive.filename, "message": (
                f"more than {self.archive.max_bytes} bytes once uncompressed")}])
        buf[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := super().read(1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        return super().read(size)

    def close(self) -> None:
        self.fh.close()
        super().close()


def _normalise(name: str) -> str | None:
    """Archive path -> normalised relative POSIX path; None for an absolute or escaping one."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../"):
        return None
    return norm.removeprefix("./")


def _ignored(name: str) -> bool:
    """macOS resource forks and hidden files that archivers add."""
    parts = name.split("/")
    return "__MACOSX" in parts or any(p.startswith(".") for p in parts)


def _parse_metadata(stream, metadata_file: str, max_rows: int) -> tuple[list[tuple[int, dict]], list[dict]]:
    """Rows ``(line/row number, {"file_name", "text"})`` of metadata.csv or .jsonl, and problems.

    ``stream`` is the member's binary file object, read as it is parsed (its byte cap and the
    archive's budget are enforced by the stream); a bad byte, an oversized CSV field or a line
    that is not JSON is a problem, never a crash. Parsing stops past ``max_rows`` rows."""
    problems: list[dict] = []
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    try:
        rows = (_csv_rows if metadata_file.endswith(".csv") else _jsonl_rows)(text, metadata_file, problems, max_rows)
    except UnicodeDecodeError as exc:
        return [], problems + [{"file": metadata_file, "message": f"not UTF-8 text ({exc.reason})"}]
    if not rows and not problems:
        problems.append({"file": metadata_file, "message": "has no rows"})
    return rows, problems


def _csv_rows(text, metadata_file: str, problems: list[dict], max_rows: int) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    reader = csv.DictReader(text)
    i = 0
    try:
        columns = reader.fieldnames or []
        if not _check_columns(columns, metadata_file, problems):
            return []
        for i, row in enumerate(reader, start=1):
            if None in row:
                problems.append({"file": metadata_file, "message": f"row {i}: more cells than columns"})
                continue
            rows.append((i, {"file_name": row["file_name"], "text": row["text"]}))
            if len(rows) > max_rows:
                break
    except csv.Error as exc:  # an unclosed quote, a field over csv's size limit
        problems.append({"file": metadata_file, "message": f"row {i + 1}: malformed CSV ({exc})"})
    return rows


def _jsonl_rows(text, metadata_file: str, problems: list[dict], max_rows: int) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    reported: set[frozenset] = set()
    for i, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            problems.append({"file": metadata_file, "message": f"line {i}: invalid JSON ({getattr(exc, 'msg', 'too deep')})"})
            continue
        if not isinstance(obj, dict):
            problems.append({"file": metadata_file, "message": f"line {i}: expected a JSON object"})
            continue
        if frozenset(obj) != frozenset(REQUIRED_COLUMNS):
            if frozenset(obj) not in reported:  # once per distinct set of keys, not once per line
                reported.add(frozenset(obj))
                _check_columns(list(obj), metadata_file, problems, where=f"line {i}: ")
            continue
        if any(not isinstance(obj.get(c), str) for c in REQUIRED_COLUMNS):
            problems.append({"file": metadata_file, "message": f"line {i}: file_name and text must be strings"})
            continue
        rows.append((i, {"file_name": obj["file_name"], "text": obj["text"]}))
        if len(problems) >= MAX_REPORTED_PROBLEMS or len(rows) > max_rows:
            break
    return rows


def _check_columns(columns, metadata_file: str, problems: list[dict], where: str = "") -> bool:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS]
    if missing:
        problems.append(
            {"file": metadata_file, "message": f"{where}missing column(s) {', '.join(missing)}; "
             f"required: {', '.join(REQUIRED_COLUMNS)}"}
        )
    if unknown:
        problems.append(
            {"file": metadata_file, "message": f"{where}unknown column(s) {', '.join(map(str, unknown))}; "
             f"valid: {', '.join(REQUIRED_COLUMNS)}"}
        )
    return not missing and not unknown


def _open_image(data: bytes, max_side: int) -> tuple[tuple[int, int], str]:
    """(size, format) of an image that Pillow fully decodes; ValueError with the reason otherwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                size, fmt = img.size, img.format
                if max(size) > max_side:
                    raise ValueError(f"image is {size[0]}x{size[1]}; the largest side allowed is {max_side}")
                img.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"not a decodable image ({type(exc).__name__})") from None
        except (OSError, SyntaxError, EOFError) as exc:
            raise ValueError(f"image data is corrupt ({exc})") from None
    return size, fmt or "unknown"


def _validate(
    source,
    filename: str,
    *,
    max_images: int,
    max_image_side: int,
    max_caption_chars: int,
    max_uncompressed_bytes: int,
    keep_bytes: bool,
) -> tuple[DatasetInfo, list[Record]]:
    """Read the archive (bytes or a seekable binary file) and check it: its description and its
    rows (with their image bytes when ``keep_bytes``), or DatasetValidationError listing every
    problem found (up to a cap)."""
    archive = _Archive(source, filename, max_uncompressed_bytes, max_members=max_images + MAX_EXTRA_MEMBERS)
    problems = list(archive.problems)
    metadata_file = _metadata_file(archive.names(), filename, problems)
    with archive.open(metadata_file, limit=MAX_METADATA_BYTES) as stream:
        rows, meta_problems = _parse_metadata(stream, metadata_file, max_rows=max_images)
    problems += meta_problems
    if len(rows) > max_images:
        raise DatasetValidationError(
            problems + [{"file": metadata_file, "message": f"more than {max_images} rows; at most {max_images} "
                                                          "images allowed"}]
        )
    tally = _read_rows(archive, metadata_file, rows, problems, max_image_side=max_image_side,
                       max_caption_chars=max_caption_chars, keep_bytes=keep_bytes)
    if problems:
        raise DatasetValidationError(problems[:MAX_REPORTED_PROBLEMS])
    return _describe(archive, metadata_file, tally), tally.records


def _metadata_file(names: list[str], filename: str, problems: list[dict]) -> str:
    """The archive's one metadata file; none or more than one ends the check (with ``problems``)."""
    meta = [n for n in names if posixpath.basename(n) in METADATA_NAMES]
    if not meta:
        raise DatasetValidationError(
            problems + [{"file": filename, "message": f"no metadata file; expected one of {', '.join(METADATA_NAMES)}"}]
        )
    if len(meta) > 1:
        raise DatasetValidationError(
            problems + [{"file": m, "message": "more than one metadata file in the archive"} for m in meta]
        )
    return meta[0]


@dataclass
class _Tally:
    """What the good rows read so far add up to."""

    records: list[Record] = field(default_factory=list)
    listed: set[str] = field(default_factory=set)  # archive paths the rows named (good or not)
    sizes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    captions: set[str] = field(default_factory=set)
    max_chars: int = 0

    def add(self, record: Record, size: tuple[int, int], fmt: str) -> None:
        self.records.append(record)
        self.sizes[f"{size[0]}x{size[1]}"] += 1
        self.formats[fmt] += 1
        self.captions.add(record.text)
        self.max_chars = max(self.max_chars, len(record.text))


def _read_rows(archive: _Archive, metadata_file: str, rows: list[tuple[int, dict]], problems: list[dict], *,
               max_image_side: int, max_caption_chars: int, keep_bytes: bool) -> _Tally:
    """Check each row's caption, file name and image, adding to ``problems``; the good rows are
    tallied. Reading stops after a good row once the problems reach the reporting cap."""
    tally = _Tally()
    root = posixpath.dirname(metadata_file)
    names = set(archive.names())
    for line, row in rows:
        where = f"row {line}" if metadata_file.endswith(".csv") else f"line {line}"
        problems += _caption_problems(row, where, metadata_file, max_caption_chars)
        path = _listed_path(row["file_name"], root, where, metadata_file, tally.listed, names, problems)
        if path is None:
            continue
        try:
            blob = archive.read(path, limit=MAX_IMAGE_BYTES)
        except DatasetValidationError as exc:
            problems += exc.problems
            continue
        try:
            size, fmt = _open_image(blob, max_image_side)
        except ValueError as exc:
            problems.append({"file": path, "message": str(exc)})
            continue
        tally.add(Record(row["file_name"], row["text"], blob if keep_bytes else b""), size, fmt)
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            break
    return tally


def _caption_problems(row: dict, where: str, metadata_file: str, max_caption_chars: int) -> list[dict]:
    """An empty caption, or one longer than ``max_caption_chars``."""
    text = row["text"]
    if not text.strip():
        return [{"file": metadata_file, "message": f"{where}: empty caption for {row['file_name']!r}"}]
    if len(text) > max_caption_chars:
        return [{"file": metadata_file,
                 "message": f"{where}: caption has {len(text)} characters; at most {max_caption_chars}"}]
    return []


def _listed_path(file_name: str, root: str, where: str, metadata_file: str, listed: set[str], names: set[str],
                 problems: list[dict]) -> str | None:
    """The archive path a row's ``file_name`` names (relative to the metadata file's folder), noted
    in ``listed``; None, with the problem added, when it is bad, listed twice or not in the archive."""
    rel = _normalise(file_name.strip())
    if not file_name.strip() or rel is None:
        problems.append({"file": metadata_file, "message": f"{where}: bad file_name {file_name!r}"})
        return None
    path = posixpath.join(root, rel) if root else rel
    if path in listed:
        problems.append({"file": metadata_file, "message": f"{where}: {file_name!r} is listed twice"})
        return None
    listed.add(path)
    if path not in names:
        problems.append({"file": path, "message": f"listed in {metadata_file} ({where}) but not in the archive"})
        return None
    return path


def _describe(archive: _Archive, metadata_file: str, tally: _Tally) -> DatasetInfo:
    """The DatasetInfo of a dataset whose every row was good."""
    widths = [int(k.split("x")[0]) for k in tally.sizes]
    heights = [int(k.split("x")[1]) for k in tally.sizes]
    return DatasetInfo(
        num_images=len(tally.records),
        archive_format=archive.format,
        metadata_file=metadata_file,
        image_sizes=dict(tally.sizes),
        min_width=min(widths),
        min_height=min(heights),
        max_width=max(widths),
        max_height=max(heights),
        image_formats=dict(tally.formats),
        num_distinct_captions=len(tally.captions),
        max_caption_chars=tally.max_chars,
        unlisted_files=sorted(n for n in archive.names() if n not in tally.listed and n != metadata_file),
    )


def inspect_archive(
    data,
    filename: str,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
) -> DatasetInfo:
    """Validate an uploaded archive and describe it; raises :class:`DatasetValidationError` listing
    every problem (unsupported archive, missing or duplicate metadata, bad columns, bad JSON lines,
    empty captions, listed files missing from the archive, undecodable or oversized images).

    ``data`` is the archive's bytes or a seekable binary file (an upload spooled to disk);
    ``filename`` (the upload's name) chooses the archive format by its suffix.
    """
    try:
        archive_format(filename)
    except ValueError as exc:
        raise DatasetValidationError([{"file": filename, "message": str(exc)}]) from None
    info, _ = _validate(
        data,
        filename,
        max_images=max_images,
        max_image_side=max_image_side,
        max_caption_chars=max_caption_chars,
        max_uncompressed_bytes=max_uncompressed_bytes,
        keep_bytes=False,
    )
    return info


def read_records(data, filename: str, **limits) -> tuple[DatasetInfo, list[Record]]:
    """Validate as :func:`inspect_archive` does and return the rows with their image bytes, in
    metadata order (the worker decodes them)."""
    try:
        archive_format(filename)
    except ValueError as exc:
        raise DatasetValidationError([{"file": filename, "message": str(exc)}]) from None
    kwargs = dict(
        max_images=DEFAULT_MAX_IMAGES,
        max_image_side=DEFAULT_MAX_IMAGE_SIDE,
        max_caption_chars=DEFAULT_MAX_CAPTION_CHARS,
        max_uncompressed_bytes=DEFAULT_MAX_UNCOMPRESSED_BYTES,
    )
    unknown = set(limits) - set(kwargs)
    if unknown:
        raise TypeError(f"unknown limit(s) {', '.join(sorted(unknown))}; valid: {', '.join(kwargs)}")
    kwargs.update(limits)
    return _validate(data, filename, keep_bytes=True, **kwargs)
