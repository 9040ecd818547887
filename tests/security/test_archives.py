"""Hostile dataset archives: zip and tar bombs (members, ratio, metadata), damaged, encrypted,
truncated and link-carrying archives, oversized CSV fields. Each is a 422 with what is wrong, never
a 500; nothing is stored; the API's memory stays bounded while it reads them."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
import zipfile

import pytest
from PIL import Image

from shared.datasets import DatasetValidationError, inspect_archive
from shared.storage import get_storage


def png(side=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def zip_of(files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def tar_of(files: dict[str, bytes], mode="w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def problems(data: bytes, filename: str, **limits) -> str:
    with pytest.raises(DatasetValidationError) as info:
        inspect_archive(data, filename, **limits)
    return " | ".join(f"{p['file']}: {p['message']}" for p in info.value.problems)


GOOD = {"metadata.csv": b"file_name,text\na.png,a red square\n", "a.png": png()}


def test_a_zip_bomb_is_stopped_by_what_is_read_not_what_is_declared():
    """A 100 MB member of zeros in a ~100 KB zip, with the budget at 10 MB."""
    bomb = zip_of({**GOOD, "padding.bin": b"\0" * (100 << 20)})
    assert len(bomb) < 200_000
    assert "exceeds 10485760" in problems(bomb, "d.zip", max_uncompressed_bytes=10 << 20)


def test_a_tar_gz_bomb_is_stopped_while_reading():
    data = tar_of({"metadata.jsonl": b'{"file_name": "a.png", "text": "x"}\n' * 1, "a.png": b"\0" * (60 << 20)})
    assert len(data) < 200_000
    text = problems(data, "d.tar.gz", max_uncompressed_bytes=20 << 20)
    assert "more than 20971520 bytes" in text or "larger than" in text


def test_a_flood_of_members_is_refused_at_the_cap():
    many = {f"x/{i}.txt": b"" for i in range(3000)}
    for data, name in ((zip_of({**GOOD, **many}, zipfile.ZIP_STORED), "d.zip"), (tar_of({**GOOD, **many}), "d.tar.gz")):
        text = problems(data, name, max_images=10)
        assert "entries" in text, text


def test_a_metadata_bomb_is_refused_by_its_byte_cap(monkeypatch):
    from shared import datasets

    monkeypatch.setattr(datasets, "MAX_METADATA_BYTES", 1 << 20)
    meta = b"file_name,text\n" + b"a.png," + b"a red square " * 300_000 + b"\n"  # 3.9 MB, compresses to KBs
    text = problems(zip_of({"metadata.csv": meta, "a.png": png()}), "d.zip")
    assert "metadata.csv: larger than 1048576 bytes" in text


def test_too_many_rows_stops_parsing():
    meta = b"file_name,text\n" + b"".join(b"%d.png,x\n" % i for i in range(5000))
    assert "more than 100 rows" in problems(zip_of({"metadata.csv": meta}), "d.zip", max_images=100)


def test_an_oversized_csv_field_is_a_problem_not_a_crash():
    meta = b'file_name,text\na.png,"' + b"x" * 200_000 + b'"\n'
    assert "malformed CSV" in problems(zip_of({"metadata.csv": meta, "a.png": png()}), "d.zip")


def test_a_bad_crc_is_a_problem():
    meta = b"file_name,text\na.png,a\nb.png,b\n"
    good = zip_of({"metadata.csv": meta, "a.png": png(), "b.png": png()}, zipfile.ZIP_STORED)
    bad = bytearray(good)
    j = bad.rfind(b"IHDR")  # damage b.png's stored bytes (not a header): only its CRC tells
    bad[j + 10] ^= 0xFF
    assert "damaged" in problems(bytes(bad), "d.zip")


def test_encrypted_entries_are_refused():
    data = bytearray(zip_of(GOOD, zipfile.ZIP_STORED))
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # set the "encrypted" flag in every header
        at = 0
        while (at := data.find(sig, at)) != -1:
            flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
            data[flag_at] |= 0x1
            at += 4
    assert "encrypted entries are not allowed" in problems(bytes(data), "d.zip")


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_a_truncated_archive_is_a_problem(cut):
    files = {"metadata.csv": b"file_name,text\na.png,a\nb.png,b\n", "a.png": png(), "b.png": png(64)}
    for data, name in ((zip_of(files), "d.zip"), (tar_of(files), "d.tar.gz")):
        with pytest.raises(DatasetValidationError):
            inspect_archive(data[: int(len(data) * cut)], name)


def test_links_and_traversal_in_a_tar_are_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in GOOD.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
        up = tarfile.TarInfo("../../escape.txt")
        up.size = 1
        t.addfile(up, io.BytesIO(b"x"))
    text = problems(buf.getvalue(), "d.tar")
    assert "links and special files are not allowed" in text and "'..' are not allowed" in text


def test_deeply_nested_jsonl_is_a_problem():
    meta = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    assert "invalid JSON" in problems(zip_of({"metadata.jsonl": meta, "a.png": png()}), "d.zip")


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_the_api_answers_422_stores_nothing_and_stays_small(client, settings, make_tenant):
    """A 300 KB archive that inflates to 300 MB costs the API a few MB, not 300."""
    tid, key = make_tenant()
    bomb = zip_of({**GOOD, "padding.bin": b"\0" * (300 << 20)})
    assert len(bomb) < 400_000
    tracemalloc.start()
    try:
        settings.dataset_max_uncompressed_bytes = 100 << 20
        r = client.post("/v1/datasets", headers=auth(key), files={"file": ("d.zip", bomb, "application/zip")})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_dataset"
    assert peak < 40 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert get_storage(settings).list(f"{tid}/datasets/") == []
    for data, name in ((b"PK\x03\x04garbage", "d.zip"), (b"\x1f\x8b\x08garbage", "d.tar.gz"), (b"", "d.tar")):
        r = client.post("/v1/datasets", headers=auth(key), files={"file": (name, data, "application/octet-stream")})
        assert r.status_code == 422, (name, r.status_code, r.text)


def test_a_dataset_larger_than_the_body_limit_uploads(client, settings, make_tenant):
    """Dataset uploads have their own limit (spooled to disk, stored streamed)."""
    _, key = make_tenant()
    noise = bytes(range(256)) * (settings.max_body_bytes // 256 + 4096)  # incompressible-ish, > the body limit
    data = zip_of({**GOOD, "notes.bin": noise}, zipfile.ZIP_STORED)
    assert len(data) > settings.max_body_bytes
    r = client.post("/v1/datasets", headers=auth(key), files={"file": ("d.zip", data, "application/zip")})
    assert r.status_code == 201, r.text
    assert json.loads(json.dumps(r.json()["info"]))["num_images"] == 1
