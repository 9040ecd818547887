"""Storage against a local folder and a real S3 server (SeaweedFS with generated credentials, see
tests/s3server.py). The S3 tests here assert what a real server enforces and moto does not: SigV4
signatures, presigned-URL expiry, If-None-Match create-only writes, x-amz-checksum-sha256, keys."""

import calendar
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest

from shared.storage import (ChecksumMismatch, FileStorage, ObjectExists, ObjectNotFound, S3Storage, StorageError,
                            StorageUnavailable)


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


def test_conditional_write_never_clobbers(storage):
    storage.put_bytes("k", b"first", if_none_match=True)
    with pytest.raises(ObjectExists):
        storage.put_bytes("k", b"second", if_none_match=True)
    assert storage.get_bytes("k") == b"first"
    digest, created = storage.put_bytes_once("k", b"third")
    assert not created and digest == storage.checksum("k")
    assert storage.get_bytes("k") == b"first"


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


def test_create_only_writes_racing_leave_exactly_one_winner(storage):
    """Eight writers race for each key at once: one creates it, seven find it there, and the
    object is the winner's (the server's If-None-Match is atomic, not check-then-write)."""
    for round_ in range(3):
        key = f"race/{round_}"
        barrier = threading.Barrier(8)
        results: dict[int, tuple[str, bool]] = {}

        def write(i: int) -> None:
            barrier.wait()
            results[i] = storage.put_bytes_once(key, f"writer {i}".encode())

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [i for i, (_, created) in results.items() if created]
        assert len(results) == 8 and len(winners) == 1, results
        body = storage.get_bytes(key)
        assert body == f"writer {winners[0]}".encode()
        assert {digest for digest, _ in results.values()} == {storage.checksum(key)}


@pytest.mark.parametrize("key", ["../escape", "a/../../escape"])
def test_keys_cannot_escape_root(storage, key):
    """FileStorage refuses a key that resolves outside its folder; an S3 server that checks keys
    (SeaweedFS, MinIO; moto and AWS store such keys literally) refuses ``..`` segments."""
    with pytest.raises(StorageError) as err:
        storage.put_bytes(key, b"x")
    if isinstance(storage, S3Storage):
        assert _s3_code(err.value) == "InvalidRequest"
    assert "escape" not in " ".join(storage.list(""))


# ------------------------------------------------------------------------------------------------
# What a real S3 server checks and moto does not (each test below fails against moto 5: checked)
# ------------------------------------------------------------------------------------------------

def _s3_code(exc: BaseException) -> str:
    """The S3 error code behind a StorageError (its cause is botocore's ClientError)."""
    cause = exc.__cause__
    return getattr(cause, "response", {}).get("Error", {}).get("Code", "")


def _count_requests(st: S3Storage, op: str) -> list:
    sent: list = []
    st.client.meta.events.register(f"before-send.s3.{op}", lambda request, **_: sent.append(request))
    return sent


def _fresh_boto3_session(monkeypatch) -> None:
    """boto3's default session keeps the credentials it first resolved: start a new one, so that a
    storage made after ``monkeypatch.setenv("AWS_...")`` signs with the patched credentials."""
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


def test_s3_refuses_a_wrong_secret_and_an_unknown_key(s3, s3_bucket, monkeypatch, tmp_path):
    prefix = f"auth-{tmp_path.name}"
    good = S3Storage(s3_bucket, prefix, endpoint_url=s3.endpoint, retry_s=5)
    good.put_bytes("mine", b"secret bytes")

    _fresh_boto3_session(monkeypatch)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key[:-4] + "XXXX")
    wrong = S3Storage(s3_bucket, prefix, endpoint_url=s3.endpoint, retry_s=5)
    sent = _count_requests(wrong, "PutObject")
    with pytest.raises(StorageError) as err:
        wrong.put_bytes("theirs", b"x")
    assert not isinstance(err.value, StorageUnavailable)  # refused at once, not retried for 5 s
    assert _s3_code(err.value) == "SignatureDoesNotMatch" and len(sent) == 1
    with pytest.raises(StorageError) as err:
        wrong.get_bytes("mine")
    assert _s3_code(err.value) == "SignatureDoesNotMatch"
    with pytest.raises(StorageError):
        wrong.check()  # readiness fails too

    _fresh_boto3_session(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKNOSUCHKEY000000000")
    unknown = S3Storage(s3_bucket, prefix, endpoint_url=s3.endpoint, retry_s=5)
    with pytest.raises(StorageError) as err:
        unknown.list("")
    assert _s3_code(err.value) == "InvalidAccessKeyId"

    assert good.list("") == ["mine"]  # nothing was written with the wrong credentials
    assert good.get_bytes("mine") == b"secret bytes"


def test_s3_a_missing_bucket_is_an_error_not_created(s3, tmp_path):
    """A storage URL naming a bucket that does not exist fails loudly: readiness fails and a write
    is NoSuchBucket, not a bucket created on the fly (SeaweedFS's default for admin identities;
    tests/s3server.py turns it off, as S3 and MinIO behave)."""
    name = f"ldmq-nosuch-{tmp_path.name[-8:].lower().replace('_', '-')}"
    st = S3Storage(name, "p", endpoint_url=s3.endpoint, retry_s=5)
    with pytest.raises(StorageError):
        st.check()
    with pytest.raises(StorageError) as err:
        st.put_bytes("k", b"x")
    assert _s3_code(err.value) == "NoSuchBucket" and not isinstance(err.value, StorageUnavailable)
    assert name not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}


def _fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_presigned_url_expires(s3, s3_bucket, tmp_path, wait_until):
    """A presigned URL serves the object until X-Amz-Date + X-Amz-Expires, then answers 403
    "Request has expired" (the server's clock, not the client's, decides)."""
    storage = S3Storage(s3_bucket, f"exp-{tmp_path.name}", endpoint_url=s3.endpoint)
    storage.put_bytes("exp/img.png", b"\x89PNG-soon-gone")
    long_url = storage.presigned_url("exp/img.png", 300)
    url = storage.presigned_url("exp/img.png", 1)
    q = parse_qs(urlsplit(url).query)
    signed_at = calendar.timegm(time.strptime(q["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
    expires_at = signed_at + int(q["X-Amz-Expires"][0])
    seen: list[tuple[float, int]] = []

    def refused():
        t = time.time()
        status, body = _fetch(url)
        seen.append((t, status))
        if status == 200:
            assert body == b"\x89PNG-soon-gone"
            return False
        return status, body

    status, body = wait_until(refused, 15, "the 1 s presigned URL to expire", interval=0.1)
    assert status == 403 and b"expired" in body.lower(), body
    # Served only while valid (0.5 s of slack for clock granularity), refused only after expiry.
    assert all(t <= expires_at + 0.5 for t, st in seen if st == 200), (seen, expires_at)
    assert seen[-1][0] >= expires_at - 0.5, (seen, expires_at)
    assert _fetch(long_url) == (200, b"\x89PNG-soon-gone")


def test_presigned_url_must_carry_a_valid_signature(s3, s3_bucket, tmp_path, monkeypatch):
    st = S3Storage(s3_bucket, f"sig-{tmp_path.name}", endpoint_url=s3.endpoint)
    st.put_bytes("o.png", b"png")
    url = st.presigned_url("o.png", 60)
    assert _fetch(url) == (200, b"png")
    sig = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    forged = url.replace(sig, ("0" if sig[0] != "0" else "1") + sig[1:])
    status, body = _fetch(forged)
    assert status == 403 and b"SignatureDoesNotMatch" in body
    other_key = url.replace("o.png", "p.png")  # the signature covers the key
    assert _fetch(other_key)[0] == 403
    assert _fetch(f"{s3.endpoint}/{s3_bucket}/{st._key('o.png')}")[0] == 403  # no anonymous reads
    _fresh_boto3_session(monkeypatch)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + s3.secret_key)
    wrong = S3Storage(s3_bucket, f"sig-{tmp_path.name}", endpoint_url=s3.endpoint)
    assert _fetch(wrong.presigned_url("o.png", 60))[0] == 403


def test_s3_server_refuses_a_body_that_does_not_match_its_sha256(s3, s3_bucket, tmp_path):
    """x-amz-checksum-sha256 is checked by the server: a wrong checksum is BadDigest and nothing is
    stored. Through S3Storage with the body damaged on the wire after it was hashed, and the
    payload unsigned (as botocore sends it over HTTPS, where the checksum is all that guards it)."""
    import base64
    import hashlib

    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    raw = s3.client()
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    key = f"bad-{tmp_path.name}/raw"
    with pytest.raises(ClientError) as err:
        raw.put_object(Bucket=s3_bucket, Key=key, Body=b"these bytes", ChecksumSHA256=wrong)
    assert err.value.response["Error"]["Code"] == "BadDigest"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError):
        raw.head_object(Bucket=s3_bucket, Key=key)

    st = S3Storage(s3_bucket, f"bad-{tmp_path.name}", endpoint_url=s3.endpoint, retry_s=5)
    st.client = boto3.client("s3", endpoint_url=s3.endpoint, config=st.client.meta.config.merge(
        Config(s3={"addressing_style": "path", "payload_signing_enabled": False})))
    sent = []

    def damage(request, **_):
        sent.append(request)
        body = bytearray(request.body.read() if hasattr(request.body, "read") else request.body)
        body[len(body) // 2] ^= 0x01  # one bit flipped in transit
        request.body = bytes(body)

    st.client.meta.events.register("before-send.s3.PutObject", damage)
    with pytest.raises(StorageError) as err:
        st.put_bytes("damaged", b"pixels" * 1000)
    assert _s3_code(err.value) == "BadDigest" and not isinstance(err.value, StorageUnavailable)
    assert len(sent) == 1 and sent[0].headers["x-amz-content-sha256"] == b"UNSIGNED-PAYLOAD"
    assert not st.exists("damaged")
    st.client.meta.events.unregister("before-send.s3.PutObject", damage)
    st.put_bytes("damaged", b"pixels" * 1000)  # the same write, undamaged, is stored
    assert st.get_bytes("damaged") == b"pixels" * 1000


def test_s3_list_pages_through_many_keys(s3, s3_bucket, tmp_path):
    """list() follows continuation tokens (pages of 3 here) and returns every key once, in byte
    order: SeaweedFS lists a folder's contents before its siblings ('b/x' before 'b-x'), which is
    not S3's order, so list() sorts."""
    st = S3Storage(s3_bucket, f"pages-{tmp_path.name}", endpoint_url=s3.endpoint)

    def small_pages(params, **_):
        params["MaxKeys"] = 3

    st.client.meta.events.register("before-parameter-build.s3.ListObjectsV2", small_pages)
    sent = _count_requests(st, "ListObjectsV2")
    keys = ["l/a", "l/b-x", "l/b.y", "l/b/one", "l/b/two/three", "l/b0", "l/bz", "l/B", "l/c/d/e/f"]
    for k in keys:
        st.put_bytes(k, k.encode())
    assert st.list("l/") == sorted(keys)
    assert len(sent) >= 3  # paged, not one answer
    assert st.list("l/b") == sorted(k for k in keys if k.startswith("l/b"))
    assert st.list("l/b/") == ["l/b/one", "l/b/two/three"]
    st.delete("l/b/two/three")
    assert st.list("l/b/") == ["l/b/one"]  # no folder left behind as a key


def test_a_skewed_clock_is_not_retried_and_says_so():
    """RequestTimeTooSkewed is the machine's fault, not the server's: no retry budget spent, and the
    error names the cause instead of "unreachable"."""
    from botocore.exceptions import ClientError

    from shared.storage import S3Storage, StorageUnavailable
    from shared.storage.s3 import _retryable

    exc = ClientError({"Error": {"Code": "RequestTimeTooSkewed", "Message": "skewed"},
                       "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
    assert not _retryable(exc)
    err = S3Storage("b", endpoint_url="http://127.0.0.1:9")._wrap(exc, "k")
    assert not isinstance(err, StorageUnavailable) and "clock" in str(err)


def test_put_fileobj_once_and_open_stream(storage, tmp_path):
    """A file stored create-only (a WebDataset shard) keeps the first writer's bytes; a stream
    hands an object over in chunks and refuses bytes that do not match the stored checksum."""
    import hashlib
    import io

    from shared.storage import ChecksumMismatch

    first = io.BytesIO(b"x" * 300_000)
    digest, created = storage.put_fileobj_once("s/shard.tar", first)
    assert created and digest == hashlib.sha256(b"x" * 300_000).hexdigest()
    assert storage.put_fileobj_once("s/shard.tar", io.BytesIO(b"other")) == (digest, False)
    size, chunks = storage.open_stream("s/shard.tar", chunk_size=65536)
    parts = list(chunks)
    assert size == 300_000 and b"".join(parts) == b"x" * 300_000 and max(map(len, parts)) <= 65536
    with pytest.raises(ObjectNotFound):
        storage.open_stream("s/missing.tar")
    if storage.scheme == "file":  # bytes changed behind the checksum's back
        (storage.root / "s" / "shard.tar").write_bytes(b"y" * 300_000)
        with pytest.raises(ChecksumMismatch):
            list(storage.open_stream("s/shard.tar")[1])
