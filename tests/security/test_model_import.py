"""Hostile model imports: foreign prefixes, traversal keys, code, floods of files and bytes.

Each is a clear 4xx, nothing is stored, and the API's memory stays bounded while it copies.
"""

from __future__ import annotations

import io
import shutil
import tracemalloc

import boto3
import pytest

from shared.storage import FileStorage, ObjectTooLarge, Storage, UnsafeKey, get_storage
from tests.conftest import put_dir


def auth(key):
    return {"Authorization": f"Bearer {key}"}



def stored_models(settings, tenant_id) -> list[str]:
    return get_storage(settings).list(f"{tenant_id}/models/")


def test_foreign_locations_all_answer_the_same_not_found(client, settings, s3_endpoint, s3_bucket, tiny_model,
                                                         make_tenant, tiny_pipeline_dir):
    owner, _, model_id = tiny_model
    _, key = make_tenant()
    st = get_storage(settings)
    put_dir(s3_endpoint, s3_bucket, "elsewhere/full", tiny_pipeline_dir)  # a full pipeline, not listed
    sources = [
        st.uri(f"{owner}/models/{model_id}"),  # another tenant's model: full
        st.uri(f"{owner}/models/none-such"),  # another tenant's prefix: empty
        f"s3://{s3_bucket}/elsewhere/full",  # the bucket, outside any listed source: full
        f"s3://{s3_bucket}/elsewhere/empty",  # the same, empty
        "s3://some-other-bucket/models/x",  # a bucket nobody listed
        f"s3://{s3_bucket}/incoming/../elsewhere/full",  # a listed source, climbed out of
    ]
    answers = set()
    for src in sources:
        r = client.post("/v1/models", headers=auth(key), json={"source": src})
        assert r.status_code == 404, (src, r.text)
        answers.add(r.json()["error"]["message"].replace(src, "<source>"))
    assert len(answers) == 1


def test_a_pipeline_with_code_or_a_custom_class_is_refused_and_nothing_is_stored(client, settings, s3_endpoint,
                                                                                  s3_bucket, make_tenant,
                                                                                  tiny_pipeline_dir, tmp_path):
    tid, key = make_tenant()
    evil = shutil.copytree(tiny_pipeline_dir, tmp_path / "evil")
    (evil / "unet" / "evil_unet.py").write_text("import os\nos.system('id > /tmp/ldmq-pwned')\n")
    index = (evil / "model_index.json").read_text().replace('"UNet2DConditionModel"', '"EvilUNet"')
    (evil / "model_index.json").write_text(index.replace('"diffusers",\n    "EvilUNet"', '"evil_unet",\n    "EvilUNet"'))
    put_dir(s3_endpoint, s3_bucket, "incoming/evil-code", evil)
    r = client.post("/v1/models", headers=auth(key), json={"source": f"s3://{s3_bucket}/incoming/evil-code"})
    assert r.status_code == 422, r.text
    text = r.text
    assert "code files are refused" in text and "EvilUNet" in text
    assert stored_models(settings, tid) == []


def test_too_many_files_is_refused_before_copying(client, settings, s3_endpoint, s3_bucket, make_tenant,
                                                  tiny_pipeline_dir):
    tid, key = make_tenant()
    put_dir(s3_endpoint, s3_bucket, "incoming/many", tiny_pipeline_dir)
    c = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for i in range(12):
        c.put_object(Bucket=s3_bucket, Key=f"incoming/many/tokenizer/extra-{i}.json", Body=b"{}")
    settings.model_import_max_files = 15
    r = client.post("/v1/models", headers=auth(key), json={"source": f"s3://{s3_bucket}/incoming/many"})
    assert r.status_code == 422 and "at most 15" in r.text
    assert stored_models(settings, tid) == []


def test_too_many_bytes_stops_the_copy_and_removes_what_was_copied(client, settings, s3_endpoint, s3_bucket,
                                                                   make_tenant, tiny_pipeline_dir):
    tid, key = make_tenant()
    put_dir(s3_endpoint, s3_bucket, "incoming/big", tiny_pipeline_dir)
    total = sum(p.stat().st_size for p in tiny_pipeline_dir.rglob("*") if p.is_file())
    settings.model_import_max_bytes = total // 2
    r = client.post("/v1/models", headers=auth(key), json={"source": f"s3://{s3_bucket}/incoming/big"})
    assert r.status_code == 422 and "the most an import may copy" in r.text
    assert stored_models(settings, tid) == []


def test_an_import_copies_without_holding_objects_in_memory(client, settings, s3_endpoint, s3_bucket, make_tenant,
                                                            tiny_pipeline_dir, tmp_path):
    """A 32 MiB weight file is copied through a temporary file: the API's Python heap grows by a few
    MiB (chunks), not by the object."""
    _, key = make_tenant()
    big = shutil.copytree(tiny_pipeline_dir, tmp_path / "big")
    (big / "unet" / "extra.safetensors").write_bytes(b"\0" * (32 << 20))
    put_dir(s3_endpoint, s3_bucket, "incoming/big-file", big)
    tracemalloc.start()
    try:
        r = client.post("/v1/models", headers=auth(key), json={"source": f"s3://{s3_bucket}/incoming/big-file"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 201, r.text
    assert peak < 12 << 20, f"peak Python allocation {peak / 2**20:.1f} MiB"


class _Listed(Storage):
    """A store (of our own interface) whose listing holds hostile keys, as a permissive S3-compatible
    server could: real servers refuse to store them, so no server-backed test can make one."""

    scheme = "mem"

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects

    def put_bytes(self, key, data, *, content_type="application/octet-stream", if_none_match=False):
        self.objects[key] = data
        return ""

    def get_bytes(self, key, *, verify=True):
        return self.objects[key]

    def exists(self, key):
        return key in self.objects

    def list(self, prefix):
        return sorted(k for k in self.objects if k.startswith(prefix))

    def delete(self, key):
        self.objects.pop(key, None)

    def presigned_url(self, key, expires_s):
        return ""

    def uri(self, key=""):
        return f"mem://{key}"

    def check(self):
        pass


@pytest.mark.parametrize("hostile", ["../victim/unet/w.safetensors", "a/../../victim", "/abs/path", "a\\..\\b",
                                     "a//b"])
def test_a_download_never_writes_outside_its_folder(tmp_path, hostile):
    src = _Listed({"models/m/model_index.json": b"{}", f"models/m/{hostile}": b"owned"})
    target = tmp_path / "cache" / "m"
    with pytest.raises(UnsafeKey):
        src.download_dir("models/m", target)
    assert not (tmp_path / "victim").exists() and not target.exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("hostile", ["../victim/x", "x/../../y", "/etc/x"])
def test_a_copy_refuses_hostile_keys_before_writing_anything(tmp_path, hostile):
    src = _Listed({"in/ok.json": b"{}", f"in/{hostile}": b"owned"})
    dest = FileStorage(tmp_path / "store")
    with pytest.raises(UnsafeKey):
        dest.copy_prefix(src, "in", "tenant/models/m")
    assert dest.list("") == []


@pytest.mark.parametrize("hostile", ["../x", "a/../../x", "/etc/passwd", "a\\b"])
def test_the_file_backend_refuses_keys_that_are_not_plain(tmp_path, hostile):
    st = FileStorage(tmp_path / "store")
    with pytest.raises(UnsafeKey):
        st.put_bytes(hostile, b"x")
    with pytest.raises(UnsafeKey):
        st.get_bytes(hostile)


def test_the_file_backend_refuses_a_link_out_of_its_root(tmp_path):
    root = tmp_path / "store"
    (root / "t").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "t" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafeKey):
        FileStorage(root).put_bytes("t/link/x", b"x")
    assert list((tmp_path / "outside").iterdir()) == []


def test_a_copy_budget_is_counted_on_the_bytes_that_arrive(tmp_path):
    src = FileStorage(tmp_path / "src")
    src.put_bytes("in/a", b"a" * 600)
    src.put_bytes("in/b", b"b" * 600)
    dest = FileStorage(tmp_path / "dest")
    with pytest.raises(ObjectTooLarge):
        dest.copy_prefix(src, "in", "out", max_bytes=1000)
    assert dest.list("") == []
    out = io.BytesIO()
    assert src.read_into("in/a", out, max_bytes=600) == 600 and out.getvalue() == b"a" * 600
