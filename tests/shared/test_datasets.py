"""Archive validation in shared/datasets.py: every error case, and what a good archive reports."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import zipfile

import pytest
from PIL import Image

from shared.datasets import DatasetValidationError, inspect_archive, read_records


def png(size=(12, 10), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(files: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def csv_bytes(rows, header="file_name,text") -> bytes:
    return ("\n".join([header] + [",".join(r) for r in rows]) + "\n").encode()


def good_files() -> dict[str, bytes]:
    return {
        "a.png": png(),
        "b.png": png((16, 16), (0, 0, 255)),
        "metadata.csv": csv_bytes([("a.png", "a red square"), ("b.png", "a blue square")]),
    }


def problems_of(data: bytes, filename: str) -> list[dict]:
    with pytest.raises(DatasetValidationError) as exc:
        inspect_archive(data, filename)
    problems = exc.value.problems
    assert problems and all(set(p) == {"file", "message"} for p in problems)
    return problems


def test_good_zip_is_described():
    info = inspect_archive(make_zip(good_files()), "upload.zip")
    assert info.num_images == 2
    assert info.archive_format == "zip"
    assert info.metadata_file == "metadata.csv"
    assert info.image_sizes == {"12x10": 1, "16x16": 1}
    assert (info.min_width, info.min_height, info.max_width, info.max_height) == (12, 10, 16, 16)
    assert info.image_formats == {"PNG": 2}
    assert info.num_distinct_captions == 2
    assert info.unlisted_files == []
    json.dumps(info.to_dict())  # JSON-able for the API


@pytest.mark.parametrize("gz,name", [(False, "d.tar"), (True, "d.tar.gz"), (True, "d.tgz")])
def test_good_tar_with_jsonl_in_a_folder(gz, name):
    jsonl = "\n".join(json.dumps({"file_name": f, "text": t}) for f, t in [("img/a.png", "red"), ("img/b.png", "blue")])
    files = {"data/img/a.png": png(), "data/img/b.png": png(), "data/metadata.jsonl": jsonl.encode(), "data/notes.txt": b"x"}
    info = inspect_archive(make_tar(files, gz=gz), name)
    assert info.num_images == 2 and info.metadata_file == "data/metadata.jsonl"
    assert info.unlisted_files == ["data/notes.txt"]
    _, records = read_records(make_tar(files, gz=gz), name)
    assert [r.text for r in records] == ["red", "blue"] and records[0].data == files["data/img/a.png"]


def test_unsupported_suffix_lists_the_valid_ones():
    (p,) = problems_of(b"whatever", "upload.rar")
    assert ".zip" in p["message"] and ".tar.gz" in p["message"]


def test_corrupt_archives():
    assert "not a valid zip" in problems_of(b"PK\x03\x04garbage", "x.zip")[0]["message"]
    assert "not a valid tar.gz" in problems_of(b"\x1f\x8bnot really gzip", "x.tar.gz")[0]["message"]


def test_missing_metadata():
    files = good_files()
    del files["metadata.csv"]
    (p,) = problems_of(make_zip(files), "x.zip")
    assert "no metadata file" in p["message"] and "metadata.jsonl" in p["message"]


def test_two_metadata_files():
    files = good_files()
    files["sub/metadata.jsonl"] = b'{"file_name": "a.png", "text": "x"}\n'
    problems = problems_of(make_zip(files), "x.zip")
    assert {p["file"] for p in problems} == {"metadata.csv", "sub/metadata.jsonl"}


def test_missing_and_unknown_columns():
    files = good_files()
    files["metadata.csv"] = csv_bytes([("a.png", "x")], header="file,caption")
    msgs = " | ".join(p["message"] for p in problems_of(make_zip(files), "x.zip"))
    assert "missing column(s) file_name, text" in msgs and "unknown column(s) file, caption" in msgs


def test_jsonl_bad_lines_are_each_reported():
    files = good_files()
    del files["metadata.csv"]
    files["metadata.jsonl"] = b'{"file_name": "a.png", "text": "ok"}\n{not json}\n["a list"]\n{"file_name": "b.png"}\n'
    msgs = [p["message"] for p in problems_of(make_zip(files), "x.zip")]
    assert any(m.startswith("line 2: invalid JSON") for m in msgs)
    assert any(m.startswith("line 3: expected a JSON object") for m in msgs)
    assert any(m.startswith("line 4: missing column(s) text") for m in msgs)


def test_listed_file_missing_from_archive():
    files = good_files()
    del files["b.png"]
    (p,) = problems_of(make_zip(files), "x.zip")
    assert p["file"] == "b.png" and "not in the archive" in p["message"]


def test_undecodable_and_truncated_images():
    files = good_files()
    files["a.png"] = b"this is not an image"
    files["b.png"] = png((64, 64))[:60]
    problems = problems_of(make_zip(files), "x.zip")
    by_file = {p["file"]: p["message"] for p in problems}
    assert "not a decodable image" in by_file["a.png"]
    assert "b.png" in by_file


def test_empty_caption():
    files = good_files()
    files["metadata.csv"] = csv_bytes([("a.png", "a red square"), ("b.png", "  ")])
    (p,) = problems_of(make_zip(files), "x.zip")
    assert p["file"] == "metadata.csv" and "row 2: empty caption" in p["message"]


def test_path_traversal_and_duplicates():
    files = good_files()
    files["metadata.csv"] = csv_bytes([("a.png", "x"), ("../etc/passwd", "y"), ("a.png", "z"), ("b.png", "w")])
    msgs = [p["message"] for p in problems_of(make_zip(files), "x.zip")]
    assert any("bad file_name '../etc/passwd'" in m for m in msgs)
    assert any("listed twice" in m for m in msgs)


def test_oversized_image():
    files = good_files()
    files["b.png"] = png((300, 20))
    with pytest.raises(DatasetValidationError) as exc:
        inspect_archive(make_zip(files), "x.zip", max_image_side=256)
    assert "largest side allowed is 256" in exc.value.problems[0]["message"]


def test_too_many_images():
    with pytest.raises(DatasetValidationError) as exc:
        inspect_archive(make_zip(good_files()), "x.zip", max_images=1)
    assert "at most 1 images" in exc.value.problems[0]["message"]


def test_every_problem_is_reported_not_only_the_first():
    files = {
        "a.png": b"junk",
        "metadata.csv": csv_bytes([("a.png", "x"), ("gone.png", "y"), ("c.png", "")]),
        "c.png": png(),
    }
    problems = problems_of(make_zip(files), "x.zip")
    assert len(problems) == 3
    assert str(DatasetValidationError(problems)).count(":") >= 3


def test_read_records_rejects_unknown_limits():
    with pytest.raises(TypeError, match="valid: max_images"):
        read_records(make_zip(good_files()), "x.zip", max_pictures=3)


def test_shared_never_imports_torch():
    code = "import sys, shared.datasets, shared.train_schema; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
