"""POST /v1/datasets: archives validated whole before anything is stored; tenant-scoped."""

import io
import zipfile

from PIL import Image


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_upload_list_get_and_train_on_it(client, settings, make_tenant):
    _, key = make_tenant()
    data = make_zip({"metadata.csv": b"file_name,text\na.png,a red square\nb.png,a blue square\n",
                     "a.png": png("red"), "b.png": png("blue")})
    r = client.post("/v1/datasets", headers=auth(key), files={"file": ("squares.zip", data, "application/zip")})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["num_images"] == 2
    assert [d["id"] for d in client.get("/v1/datasets", headers=auth(key)).json()["items"]] == [ds["id"]]
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth(key)).json()["id"] == ds["id"]
    r = client.post("/v1/jobs/train", headers=auth(key), json={"dataset": ds["id"], "steps": 5})
    assert r.status_code == 202, r.text

    _, other = make_tenant()
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth(other)).status_code == 404
    assert client.post("/v1/jobs/train", headers=auth(other), json={"dataset": ds["id"]}).status_code == 404


def test_bad_archives_are_422_and_nothing_is_stored(client, settings, make_tenant):
    from shared.storage import get_storage

    tid, key = make_tenant()
    bad = make_zip({"metadata.csv": b"file_name,text\na.png,\nmissing.png,a thing\nc.png,junk image\n",
                    "a.png": png("red"), "c.png": b"not an image"})
    r = client.post("/v1/datasets", headers=auth(key), files={"file": ("bad.zip", bad, "application/zip")})
    assert r.status_code == 422
    text = r.text
    assert "missing.png" in text and "c.png" in text
    assert len(r.json()["error"]["details"]) >= 3
    r = client.post("/v1/datasets", headers=auth(key), files={"file": ("x.rar", b"xx", "application/octet-stream")})
    assert r.status_code == 422
    assert get_storage(settings).list(f"{tid}/datasets/") == []
    assert client.get("/v1/datasets", headers=auth(key)).json()["items"] == []
