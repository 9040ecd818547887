"""Sample jobs with image-to-image and inpainting rows, end to end (API → worker → storage): one job
mixes text, image-to-image and inpainting; input images are fetched once per run; an image's pixels
depend only on its row (seed, prompt, inputs, strength), not on what it was batched with; the PNG
and the manifest record the inputs and strength."""

import io
import json

import numpy as np
from PIL import Image

from ldmq.client import png_parameters
from shared.storage import get_storage, manifest_key
from tests.worker.test_sampling import outputs, run, submit
from worker.jobs import inputs


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def upload(client, key, img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    r = client.post("/v1/images", headers=auth(key), files={"file": ("i.png", buf.getvalue(), "image/png")})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def decoded(settings, key):
    return np.asarray(Image.open(io.BytesIO(get_storage(settings).get_bytes(key))))


def test_a_job_mixing_text_img2img_and_inpainting(client, settings, tiny_model, monkeypatch):
    tid, key, model_id = tiny_model
    gradient = np.linspace(0, 255, 48 * 48 * 3).reshape(48, 48, 3).astype(np.uint8)
    init = upload(client, key, Image.fromarray(gradient))  # resized to the job's 32 × 32
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    mask = upload(client, key, Image.fromarray(mask))
    fetched = []
    real_fetch = inputs.InputImages._fetch
    monkeypatch.setattr(inputs.InputImages, "_fetch", lambda self, t, i: fetched.append(i) or real_fetch(self, t, i))

    prompts = [{"prompt": "a cat", "seed": 3},
               {"prompt": "a cat", "seed": 3, "init_image": init, "strength": 0.5, "num_images": 2},
               {"prompt": "a cat", "seed": 3, "init_image": init, "mask_image": mask},
               {"prompt": "a dog", "seed": 7, "init_image": init},
               {"prompt": "a bird", "seed": 9, "init_image": init, "strength": 0.8}]
    job = submit(client, key, model_id, prompts, steps=4)
    assert run(settings, job) == "succeeded"
    outs = outputs(settings, job)
    assert [(r, i) for r, i, *_ in outs] == [(1, 0), (2, 0), (2, 1), (3, 0), (4, 0), (5, 0)]
    assert sorted(fetched) == sorted([init, mask])  # each input once for the whole run
    px = {(r, i): decoded(settings, k) for r, i, _, k, _ in outs}
    # The same seed and prompt: text, image-to-image and inpainting are three different images.
    assert not np.array_equal(px[1, 0], px[2, 0]) and not np.array_equal(px[2, 0], px[3, 0])

    # What each image records, in its PNG and in the manifest.
    st = get_storage(settings)
    by_row = {r: png_parameters(st.get_bytes(k)) for r, i, _, k, _ in outs if i == 0}
    assert "init_image" not in by_row[1]
    assert (by_row[2]["init_image"], by_row[2]["strength"], by_row[2]["mask_image"]) == (init, 0.5, None)
    assert (by_row[3]["init_image"], by_row[3]["strength"], by_row[3]["mask_image"]) == (init, 0.8, mask)
    assert "Denoising strength: 0.8" in Image.open(io.BytesIO(st.get_bytes(outs[3][3]))).text["parameters"]
    manifest = json.loads(st.get_bytes(manifest_key(tid, job)))["outputs"]
    assert [(e["row"], e.get("init_image"), e.get("strength"), e.get("mask_image")) for e in manifest] == [
        (1, None, None, None), (2, init, 0.5, None), (2, init, 0.5, None), (3, init, 0.8, mask), (4, init, 0.8, None),
        (5, init, 0.8, None)]
    listed = client.get(f"/v1/jobs/{job}/outputs", headers=auth(key)).json()["items"]
    assert [(o["row"], o["init_image"], o["strength"], o["mask_image"]) for o in listed] == [
        (e["row"], e.get("init_image"), e.get("strength"), e.get("mask_image")) for e in manifest]
    csv_header = st.get_bytes(manifest_key(tid, job).replace(".json", ".csv")).decode().splitlines()[0]
    assert "init_image,strength,mask_image" in csv_header

    # Each image alone, in a job of its own (image i of a row has seed + i): the same pixels, though
    # in the mixed job (2, 1) shared its batch with (2, 0), and (4, 0) with row 5 (the
    # same strength, stated or by default).
    for row, index in ((1, 0), (2, 1), (3, 0), (4, 0)):
        p = dict(prompts[row - 1], seed=prompts[row - 1]["seed"] + index, num_images=1)
        alone = submit(client, key, model_id, [p], steps=4)
        assert run(settings, alone) == "succeeded"
        [(_, _, _, k, _)] = outputs(settings, alone)
        assert np.array_equal(decoded(settings, k), px[row, index]), (row, index)


def test_an_input_image_of_another_tenant_never_reaches_a_job(client, settings, tiny_model, make_tenant):
    """The submit refuses it; and were a row to name one anyway, the run fails the job with a clear
    error instead of reading another tenant's image."""
    from shared.db import session_scope
    from shared.models import Job, JobRow

    _, key, model_id = tiny_model
    _, other_key = make_tenant()
    theirs = upload(client, other_key, Image.new("RGB", (32, 32), "red"))
    mine = upload(client, key, Image.new("RGB", (32, 32), "blue"))
    job = submit(client, key, model_id, [{"prompt": "x", "init_image": mine}], steps=4)
    with session_scope(settings) as s:  # as if the row had been written some other way
        s.query(JobRow).filter_by(job_id=job).update({"init_image": theirs})
    assert run(settings, job) == "failed"
    with session_scope(settings) as s:
        j = s.get(Job, job)
        assert "input_image_not_found" in json.dumps(j.error) and theirs in json.dumps(j.error)


def test_a_retry_makes_only_the_missing_img2img_images_and_the_same_pixels(client, settings, tiny_model):
    """Exactly once: rows an earlier attempt recorded are skipped; the rest come out as a fresh job's."""
    from datetime import timedelta

    from shared import jobstate
    from shared.db import session_scope
    from shared.models import Job, utcnow

    _, key, model_id = tiny_model
    init = upload(client, key, Image.new("RGB", (32, 32), "purple"))
    prompts = [{"prompt": f"p{i}", "seed": i, "init_image": init, "strength": 0.5} for i in range(3)]
    fresh = submit(client, key, model_id, prompts, steps=4)
    assert run(settings, fresh) == "succeeded"
    retried = submit(client, key, model_id, prompts, steps=4)
    with session_scope(settings) as s:
        c = jobstate.claim(s, retried, "dead-worker", 1)
        jobstate.record_output(s, retried, c.attempt, row=2, index=0, seed=1, key="x", width=32, height=32,
                               sha256="0" * 64)
        s.get(Job, retried).lease_expires_at = utcnow() - timedelta(seconds=5)
    assert run(settings, retried) == "succeeded"
    got = {(r, i): k for r, i, _, k, _ in outputs(settings, retried)}
    assert sorted(got) == [(1, 0), (2, 0), (3, 0)] and got[2, 0] == "x"  # row 2 not made again
    want = {(r, i): k for r, i, _, k, _ in outputs(settings, fresh)}
    for row in (1, 3):
        assert np.array_equal(decoded(settings, got[row, 0]), decoded(settings, want[row, 0]))
