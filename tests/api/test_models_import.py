"""POST /v1/models imports a pipeline already in the bucket; pickles are refused unread."""

import pickle

import boto3

from tests.conftest import put_dir


def auth(key):
    return {"Authorization": f"Bearer {key}"}



def test_import_from_s3(client, settings, s3_endpoint, s3_bucket, tiny_pipeline_dir, make_tenant):
    tid, key = make_tenant()
    put_dir(s3_endpoint, s3_bucket, "incoming/tiny-a", tiny_pipeline_dir)
    r = client.post("/v1/models", headers=auth(key), json={"source": f"s3://{s3_bucket}/incoming/tiny-a", "name": "a"})
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["name"] == "a" and m["uri"].startswith(f"s3://{s3_bucket}/")
    from shared.storage import get_storage

    st = get_storage(settings)
    keys = st.list(m["uri"].split(f"s3://{s3_bucket}/", 1)[1].split("/", 1)[1])
    assert any(k.endswith("unet/diffusion_pytorch_model.safetensors") for k in keys)
    # The content hash is kept with the model; the same files registered from disk hash the same.
    from shared.db import session_scope
    from shared.registry import register_pipeline_dir

    with session_scope(settings) as s:
        local = register_pipeline_dir(s, st, tid, tiny_pipeline_dir, name="b")
    assert len(m["config"]["sha256"]) == 64 and m["config"]["sha256"] == local.config["sha256"]


class Marker:
    def __reduce__(self):
        return (open, ("/tmp/ldmq-pickle-was-loaded", "w"))


def test_pickle_weights_are_refused_before_unpickling(client, s3_endpoint, s3_bucket, tiny_pipeline_dir, make_tenant,
                                                      tmp_path):
    import os
    import shutil

    marker = "/tmp/ldmq-pickle-was-loaded"
    if os.path.exists(marker):
        os.remove(marker)
    evil = tmp_path / "evil"
    shutil.copytree(tiny_pipeline_dir, evil)
    (evil / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Marker()))
    _, key = make_tenant()
    put_dir(s3_endpoint, s3_bucket, "incoming/evil", evil)
    r = client.post("/v1/models", headers=auth(key), json={"source": f"s3://{s3_bucket}/incoming/evil"})
    assert r.status_code == 422 and "pickle" in r.text
    assert not os.path.exists(marker)


def test_import_source_must_be_a_pipeline(client, s3_endpoint, s3_bucket, make_tenant):
    _, key = make_tenant()
    c = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    c.put_object(Bucket=s3_bucket, Key="incoming/junk/readme.txt", Body=b"hi")
    r = client.post("/v1/models", headers=auth(key), json={"source": f"s3://{s3_bucket}/incoming/junk"})
    assert r.status_code == 422 and "model_index.json" in r.text
    r = client.post("/v1/models", headers=auth(key), json={"source": "http://example.com/x"})
    assert r.status_code == 422


def test_cannot_import_another_tenants_model(client, settings, tiny_model, make_tenant):
    tid, _, model_id = tiny_model
    _, other = make_tenant()
    from shared.storage import get_storage

    st = get_storage(settings)
    src = st.uri(f"{tid}/models/{model_id}")
    r = client.post("/v1/models", headers=auth(other), json={"source": src})
    assert r.status_code == 404
