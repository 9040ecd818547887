"""POST /v1/images and prompts that name input images: checked from the bytes, nothing stored on a
refusal, another tenant's id as unknown as a made-up one, every bad row and column reported."""

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from api.app import create_app
from shared.catalog import DEFAULT_STRENGTH
from shared.db import session_scope
from shared.models import InputImage, Job, JobRow
from shared.storage import get_storage
from tests.shared.test_input_images import png_declaring


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def png(size=(40, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, format=fmt)
    return buf.getvalue()


def upload(client, key, data: bytes, name="x.png"):
    return client.post("/v1/images", headers=auth(key), files={"file": (name, data, "image/png")})


def stored_images(settings, tenant_id):
    with session_scope(settings) as s:
        n = s.scalar(select(func.count()).select_from(InputImage).where(InputImage.tenant_id == tenant_id))
    return n, list(get_storage(settings).list(f"{tenant_id}/images/"))


def test_upload_png_and_jpeg_stored_once_under_the_tenant(client, settings, make_tenant):
    tid, key = make_tenant()
    r = upload(client, key, png())
    assert r.status_code == 201, r.text
    img = r.json()
    assert (img["width"], img["height"], img["format"]) == (40, 30, "PNG")
    r = upload(client, key, png(fmt="JPEG"), name="photo.png")  # the name says PNG; the bytes say JPEG
    assert r.status_code == 201 and r.json()["format"] == "JPEG"
    n, keys = stored_images(settings, tid)
    assert n == 2 and sorted(keys) == sorted([f"{tid}/images/{img['id']}", f"{tid}/images/{r.json()['id']}"])
    assert get_storage(settings).get_bytes(f"{tid}/images/{img['id']}") == png()
    got = client.get(f"/v1/images/{img['id']}", headers=auth(key)).json()
    assert got["id"] == img["id"] and got["bytes"] == len(png())
    _, other = make_tenant()
    r = client.get(f"/v1/images/{img['id']}", headers=auth(other))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("data,status,code,says", [
    (b"prompt\na cat\n", 422, "invalid_image", "not a PNG or JPEG"),
    (png()[:40], 422, "invalid_image", "could not be decoded"),
    (png_declaring(40_000, 40_000), 413, "payload_too_large", "pixels"),
])
def test_refused_uploads_say_why_and_store_nothing(client, settings, make_tenant, data, status, code, says):
    tid, key = make_tenant()
    r = upload(client, key, data)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and says in r.json()["error"]["message"]
    assert stored_images(settings, tid) == (0, [])


def test_size_and_pixel_caps_are_settings(settings, make_tenant):
    tid, key = make_tenant()
    small = settings.model_copy(update={"input_image_max_bytes": 2048, "input_image_max_pixels": 100 * 100})
    with TestClient(create_app(small)) as c:
        r = upload(c, key, png(size=(101, 100)))
        assert r.status_code == 413 and "limit is 10000" in r.json()["error"]["message"]
        noisy = Image.effect_noise((64, 64), 100).convert("RGB")  # incompressible: over 2048 bytes
        buf = io.BytesIO()
        noisy.save(buf, format="PNG")
        r = upload(c, key, buf.getvalue())
        assert r.status_code == 413 and "2048 bytes" in r.json()["error"]["message"]
        assert upload(c, key, png(size=(100, 100))).status_code == 201
    assert stored_images(settings, tid)[0] == 1


def submit(client, key, model_id, prompts, **kw):
    return client.post("/v1/jobs/sample", headers=auth(key),
                       json={"model": model_id, "prompts": prompts, "steps": 4, "scheduler": "ddim", **kw})


def test_prompts_with_images_record_what_they_use(client, settings, tiny_model):
    tid, key, model_id = tiny_model
    init = upload(client, key, png()).json()["id"]
    mask = upload(client, key, png()).json()["id"]
    r = submit(client, key, model_id, [{"prompt": "a"}, {"prompt": "b", "init_image": init},
                                       {"prompt": "c", "init_image": init, "strength": 0.5, "mask_image": mask}])
    assert r.status_code == 202, r.text
    with session_scope(settings) as s:
        rows = s.scalars(select(JobRow).where(JobRow.job_id == r.json()["id"]).order_by(JobRow.row)).all()
        assert [(x.init_image, x.strength, x.mask_image) for x in rows] == [
            (None, None, None), (init, DEFAULT_STRENGTH, None), (init, 0.5, mask)]


def test_bad_image_fields_are_422_naming_row_and_column(client, settings, tiny_model, make_tenant):
    tid, key, model_id = tiny_model
    mine = upload(client, key, png()).json()["id"]
    _, other_key = make_tenant()
    theirs = upload(client, other_key, png()).json()["id"]
    with session_scope(settings) as s:
        jobs_before = s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tid))
    r = submit(client, key, model_id, [{"prompt": "ok", "init_image": mine},
                                       {"prompt": "x", "init_image": theirs},
                                       {"prompt": "y", "init_image": mine, "mask_image": "nope"},
                                       {"prompt": "z", "init_image": mine, "strength": 0.1}])  # 0.1 x 4 steps: none
    assert r.status_code == 422, r.text
    got = {(d.get("row"), d.get("column")) for d in r.json()["error"]["details"]}
    assert got == {(2, "init_image"), (3, "mask_image"), (4, "strength")}
    assert "is not an image of yours" in str(r.json()["error"]["details"])
    for bad in ({"prompt": "s", "init_image": mine, "strength": 1.5}, {"prompt": "s", "init_image": mine, "strength": 0},
                {"prompt": "m", "mask_image": mine}, {"prompt": "m", "strength": 0.5}):
        r = submit(client, key, model_id, [bad])
        assert r.status_code == 422, (bad, r.text)
    r = submit(client, key, model_id, [{"prompt": "m", "mask_image": mine}])
    assert "mask_image needs init_image" in r.text
    with session_scope(settings) as s:  # nothing stored by any of them
        assert s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tid)) == jobs_before


def test_csv_columns_and_their_errors(client, settings, tiny_model, make_tenant):
    tid, key, model_id = tiny_model
    mine = upload(client, key, png()).json()["id"]
    _, other_key = make_tenant()
    theirs = upload(client, other_key, png()).json()["id"]

    def post(text: str):
        return client.post("/v1/jobs/sample/csv", headers=auth(key), data={"model": model_id, "steps": "4"},
                           files={"file": ("p.csv", text.encode(), "text/csv")})

    r = post(f"prompt,init_image,strength,mask_image\na,,,\nb,{mine},0.25,\nc,{mine},,{mine}\n")
    assert r.status_code == 202, r.text
    with session_scope(settings) as s:
        rows = s.scalars(select(JobRow).where(JobRow.job_id == r.json()["id"]).order_by(JobRow.row)).all()
        assert [(x.init_image, x.strength, x.mask_image) for x in rows] == [
            (None, None, None), (mine, 0.25, None), (mine, DEFAULT_STRENGTH, mine)]
    r = post(f"prompt,init_image,strength,mask_image\na,{theirs},,\nb,{mine},2,\nc,,0.5,\nd,{mine},,unknown\n")
    assert r.status_code == 422, r.text
    got = {(d.get("row"), d.get("column")) for d in r.json()["error"]["details"]}
    assert got == {(2, "strength"), (3, "strength")}  # the CSV's own problems first, whole
    r = post(f"prompt,init_image,strength,mask_image\na,{theirs},,\nd,{mine},,unknown\n")
    assert r.status_code == 422, r.text
    got = {(d.get("row"), d.get("column")) for d in r.json()["error"]["details"]}
    assert got == {(1, "init_image"), (2, "mask_image")}


def test_estimates_count_the_steps_an_init_image_row_runs(client, settings, tiny_model):
    from api.services.estimates import job_estimated_seconds

    _, key, model_id = tiny_model
    init = upload(client, key, png()).json()["id"]
    prompts = [{"prompt": "t", "num_images": 2}, {"prompt": "i", "init_image": init, "strength": 0.25, "num_images": 3},
               {"prompt": "d", "init_image": init}]  # the default 0.8: ⌊0.8 × 8⌋ = 6
    body = {"model": model_id, "prompts": prompts, "steps": 8, "scheduler": "ddim"}
    r = client.post("/v1/jobs/sample?dry_run=true", headers=auth(key), json=body)
    assert r.status_code == 200, r.text
    assert r.json()["denoising_steps"] == 2 * 8 + 3 * 2 + 6
    job = client.post("/v1/jobs/sample", headers=auth(key), json=body).json()
    text_only = client.post("/v1/jobs/sample", headers=auth(key),
                            json={**body, "prompts": [{"prompt": "t", "num_images": 6}]}).json()
    with session_scope(settings) as s:
        mixed, full = (job_estimated_seconds(s, s.get(Job, j["id"])) for j in (job, text_only))
    assert mixed == pytest.approx(full * (2 * 8 + 3 * 2 + 6) / (6 * 8), rel=1e-6)


def test_an_upload_without_a_key_is_refused_before_its_body(client, settings, make_tenant):
    r = client.post("/v1/images", files={"file": ("x.png", png(), "image/png")})
    assert r.status_code == 401
    r = client.post("/v1/images", headers={"Authorization": "Bearer ldmq_nope"}, files={"file": ("x.png", png(), "image/png")})
    assert r.status_code == 401
    assert not list(get_storage(settings).list(""))  # nothing stored anywhere
