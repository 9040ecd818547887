import urllib.request

import pytest

from shared.storage import ChecksumMismatch, FileStorage, ObjectExists, ObjectNotFound, S3Storage


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path, s3_endpoint, s3_bucket):
    if request.param == "file":
        return FileStorage(tmp_path / "objects")
    return S3Storage(s3_bucket, f"st-{tmp_path.name}", endpoint_url=s3_endpoint)


def test_round_trip_list_delete(storage, tmp_path):
    digest = storage.put_bytes("a/b/one.bin", b"hello")
    storage.put_bytes("a/two.bin", b"world")
    assert storage.get_bytes("a/b/one.bin") == b"hello"
    assert len(digest) == 64
    assert storage.list("a/") == ["a/b/one.bin", "a/two.bin"]
    assert storage.exists("a/two.bin")
    storage.delete("a/two.bin")
    assert not storage.exists("a/two.bin")
    with pytest.raises(ObjectNotFound):
        storage.get_bytes("a/two.bin")


def test_dir_upload_download(storage, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.txt").write_text("y")
    storage.upload_dir(src, "d")
    out = storage.download_dir("d", tmp_path / "out")
    assert (out / "x.txt").read_text() == "x" and (out / "sub" / "y.txt").read_text() == "y"


def test_presigned_url_serves_the_object(storage):
    storage.put_bytes("p/img.png", b"\x89PNG-bytes")
    url = storage.presigned_url("p/img.png", 60)
    with urllib.request.urlopen(url) as resp:
        assert resp.read() == b"\x89PNG-bytes"


def test_presigned_urls_are_signed_for_the_public_endpoint(s3_endpoint, s3_bucket, tmp_path):
    """Workers reach S3 by an in-network name; clients get URLs signed for the public host."""
    from urllib.parse import urlsplit

    inner = urlsplit(s3_endpoint)
    public = f"http://localhost:{inner.port}"
    st = S3Storage(s3_bucket, f"pub-{tmp_path.name}", endpoint_url=s3_endpoint, public_endpoint_url=public)
    st.put_bytes("o.png", b"png")  # through the in-network endpoint
    url = st.presigned_url("o.png", 60)
    assert url.startswith(public + "/") and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url) as resp:
        assert resp.read() == b"png"
    plain = S3Storage(s3_bucket, f"pub-{tmp_path.name}", endpoint_url=s3_endpoint)
    assert urlsplit(plain.presigned_url("o.png", 60)).netloc == inner.netloc


def test_file_checksum_is_verified(tmp_path):
    st = FileStorage(tmp_path / "o")
    st.put_bytes("k", b"good")
    (tmp_path / "o" / "k").write_bytes(b"evil")
    with pytest.raises(ChecksumMismatch):
        st.get_bytes("k")


def test_s3_checksum_is_verified(s3_endpoint, s3_bucket):
    st = S3Storage(s3_bucket, "cks", endpoint_url=s3_endpoint)
    st.put_bytes("k", b"good")
    # Overwrite the body behind ldmq's back, keeping the old checksum metadata.
    st.client.put_object(Bucket=s3_bucket, Key="cks/k", Body=b"evil", Metadata={"sha256": "0" * 64})
    with pytest.raises(ChecksumMismatch):
        st.get_bytes("k")


def test_s3_puts_carry_the_bodys_sha256_for_the_server_to_check(s3_endpoint, s3_bucket):
    """The server verifies x-amz-checksum-sha256 (S3, MinIO; moto does not): a body damaged on the
    way is refused, not stored. Watch the real requests on the wire."""
    import base64
    import hashlib

    st = S3Storage(s3_bucket, "sums", endpoint_url=s3_endpoint)
    sent = []
    st.client.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(request))
    body = b"pixels" * 100
    digest = st.put_bytes("k", body)
    assert digest == hashlib.sha256(body).hexdigest()
    (req,) = sent
    assert req.headers["x-amz-checksum-sha256"].decode() == base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert "aws-chunked" not in req.headers.get("Content-Encoding", b"").decode()  # sent as is, no trailer
    assert st.get_bytes("k") == body


def test_file_conditional_write_never_clobbers(tmp_path):
    st = FileStorage(tmp_path / "o")
    st.put_bytes("k", b"first", if_none_match=True)
    with pytest.raises(ObjectExists):
        st.put_bytes("k", b"second", if_none_match=True)
    assert st.get_bytes("k") == b"first"


def test_file_keys_cannot_escape_root(tmp_path):
    st = FileStorage(tmp_path / "o")
    with pytest.raises(Exception):
        st.put_bytes("../escape", b"x")


def test_prefix_sha256_is_the_content_hash_of_the_files(storage, tmp_path):
    """A model's content hash: the same files give the same hash wherever they are stored, and it
    can be computed from a local copy alone (sorted (relative path, sha256) pairs)."""
    import hashlib

    from shared.storage import content_sha256

    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "w.bin").write_bytes(b"weights")
    storage.upload_dir(src, "m/one")
    storage.upload_dir(src, "m/two")
    local = content_sha256((p.relative_to(src).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
                           for p in src.rglob("*") if p.is_file())
    assert storage.prefix_sha256("m/one") == storage.prefix_sha256("m/two/") == local
    storage.put_bytes("m/two/unet/w.bin", b"other weights")
    assert storage.prefix_sha256("m/two") != local
    with pytest.raises(ObjectNotFound):
        storage.prefix_sha256("m/none")
