"""The web dashboard: its files and headers (fast), and the page in a real browser (slow): Debian's
chromium driven by Playwright against a real `ldmq api` process and a real worker."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
FINAL = ("succeeded", "failed", "canceled")


def test_dashboard_files_and_headers(client):
    r = client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/app.js"></script>' in r.text and 'id="upload-form"' in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    js = client.get("/dashboard/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text  # everything is built with DOM calls
    assert client.get("/dashboard/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/dashboard/../api/app.py").status_code == 404
    assert client.get("/dashboard/secrets.py").status_code == 404
    assert "/dashboard" not in client.get("/openapi.json").json()["paths"]


def drain_broker(broker_url: str) -> None:
    """Drop wake-up messages left by earlier tests that ran no worker (their jobs are not this
    test's), so that the worker started here runs only this test's jobs."""
    import redis

    from shared.queue import QUEUE_FOR_TYPE

    r = redis.Redis.from_url(broker_url)
    for q in QUEUE_FOR_TYPE.values():
        for k in list(r.scan_iter(match=f"{q}*")):
            r.delete(k)


def play_progress(settings, job_id: str):
    """What a train worker writes first, without training: loss reports of two stages."""
    from shared import jobstate
    from shared.db import session_scope

    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "dashboard-test", 60)
    for step in range(2, 42, 2):
        stage = "autoencoder" if step <= 10 else "unet"
        loss = (0.9 if stage == "autoencoder" else 0.5) * (0.93 ** step) + 0.02
        with session_scope(settings) as s:
            jobstate.set_progress(s, job_id, claim.attempt, step / 50,
                                  {"stage": stage, "step": step, "total_steps": 50, "loss": loss, "eta_s": 50 - step})
    return claim


def play_checkpoint(settings, tenant_id: str, job_id: str, claim, step: int, grid_png: bytes, curve_png: bytes) -> None:
    """A checkpoint as the worker stores it: its evaluation files, then the pointer and its event."""
    import json

    from shared import jobstate
    from shared.db import session_scope
    from shared.storage import checkpoint_prefix, get_storage

    storage = get_storage(settings)
    prefix = f"{checkpoint_prefix(tenant_id, job_id, step)}-a{claim.attempt}"
    metrics = {"step": step, "heldout_bits_per_dim": 1.5}
    storage.put_bytes(f"{prefix}/samples.png", grid_png, content_type="image/png")
    storage.put_bytes(f"{prefix}/loss_curve.png", curve_png, content_type="image/png")
    storage.put_bytes(f"{prefix}/metrics.json", json.dumps(metrics).encode(), content_type="application/json")
    with session_scope(settings) as s:
        jobstate.set_checkpoint(s, job_id, claim.attempt, prefix, {"step": step, "metrics": metrics})


def play_finish(settings, tenant_id: str, job_id: str, claim, model_id: str, grid_png: bytes) -> None:
    """The end of the training: an evaluation grid in storage named by the model's metrics, and success."""
    from shared import jobstate
    from shared.db import session_scope
    from shared.models import JobStatus, Model
    from shared.storage import get_storage, job_prefix

    key = f"{job_prefix(tenant_id, job_id)}/eval/samples.png"
    get_storage(settings).put_bytes(key, grid_png, content_type="image/png")
    with session_scope(settings) as s:
        s.get(Model, model_id).metrics = {"final_loss_unet": 0.031, "heldout_bits_per_dim": 1.23,
                                          "artifacts": {"samples.png": key}}
    with session_scope(settings) as s:
        jobstate.finish(s, job_id, claim.attempt, JobStatus.succeeded, model_id=model_id)


def contact_sheet(images: list[bytes], scale: int = 4) -> bytes:
    from PIL import Image

    tiles = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * len(tiles), h), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, (i * w, 0))
    sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_dashboard_in_a_real_browser(stack, settings, tiny_pipeline_dir, wait_until, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing (it is in the project's `test` extra)")
    from shared.db import session_scope
    from shared.registry import tenant_by_name

    shots = Path(os.environ.get("LDMQ_TEST_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    drain_broker(stack.env["LDMQ_BROKER_URL"])
    stack.start_api()
    stack.start_worker(queues="sample")  # train jobs are played by the test (play_progress, …)
    key = stack.cli("keys", "create", "--tenant", "dash").strip().splitlines()[-1]
    model_id = stack.cli("models", "import", str(tiny_pipeline_dir), "--tenant", "dash", "--name", "tiny").strip().splitlines()[-1]
    with session_scope(settings) as s:
        tenant_id = tenant_by_name(s, "dash").id
    stack.cli("tenants", "set", "--tenant", "dash", "--weight", "2", "--max-queued-images", "500")
    api = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    r = api.post("/v1/jobs/sample/csv", data={"model": model_id, "steps": "2", "scheduler": "ddim"},
                 files={"file": ("p.csv", b"prompt,seed,num_images\na red square,1,2\na blue circle,2,1\na cat,3,1\n", "text/csv")})
    assert r.status_code == 202, r.text
    sample_id = r.json()["id"]
    job = wait_until(lambda: (j := api.get(f"/v1/jobs/{sample_id}").json())["status"] in FINAL and j, 180,
                     "the sample job to finish")
    assert job["status"] == "succeeded", job
    pngs = [httpx.get(o["url"]).content for o in api.get(f"/v1/jobs/{sample_id}/outputs").json()["items"]]
    r = api.post("/v1/jobs/train", json={"dataset": "builtin:digits", "steps": 30})
    assert r.status_code == 202, r.text
    train_id = r.json()["id"]
    claim = play_progress(settings, train_id)  # running: the rest is written while the page shows it

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            # A 4xx answer is logged by the browser as a failed resource; the app's own errors are not.
            page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
                    and problems.append(f"console: {m.text}"))
            page.goto(stack.url + "/dashboard")
            expect(page.locator("#conn-status")).to_have_text("enter an API key to start")
            page.fill("#api-key", key)
            page.click("#save-key")

            # The tenant's usage and quotas (GET /v1/usage), with what the operator set.
            expect(page.locator("#usage-panel")).to_be_visible(timeout=15_000)
            expect(page.locator('#usage-facts dd[data-field="tenant"]')).to_have_text("dash")
            expect(page.locator('#usage-facts dd[data-field="weight"]')).to_have_text("2")
            expect(page.locator('#usage-facts dd[data-field="queued"]')).to_contain_text("max 500 images")
            expect(page.locator('#usage-facts dd[data-field="gpu"]')).to_have_text(re.compile(r"^\d+\.\d$"))

            # The finished sample job, and its thumbnails (presigned URLs) loaded by the browser.
            row = page.locator(f'tr[data-job-id="{sample_id}"]')
            expect(row.locator("td.status")).to_have_text("succeeded", timeout=15_000)
            expect(row).to_contain_text("4/4")
            row.click()
            page.wait_for_function("""() => {
                const imgs = [...document.querySelectorAll('#thumbs img')];
                return imgs.length === 4 && imgs.every(i => i.complete && i.naturalWidth > 0);
            }""", timeout=15_000)
            assert page.eval_on_selector_all("#thumbs img", "imgs => imgs.map(i => i.naturalWidth)") == [32] * 4
            page.screenshot(path=str(shots / "dashboard-sample.png"), full_page=True)

            # The running train job, live from its event stream: a loss curve per stage from the
            # progress events; then a checkpoint stored while the page is open appears by itself
            # (its sample grid and loss curve, step and metrics); then the job ends.
            page.locator(f'tr[data-job-id="{train_id}"]').click()
            page.wait_for_function("""() => [...document.querySelectorAll('#loss-chart polyline')]
                .map(l => l.dataset.stage + ':' + l.getAttribute('points').split(' ').length).sort().join()
                === 'autoencoder:5,unet:15'""", timeout=15_000)
            expect(page.locator("#detail-facts")).to_contain_text("40/50 · loss")
            expect(page.locator("#checkpoints")).to_contain_text("No checkpoint stored yet.")
            play_checkpoint(settings, tenant_id, train_id, claim, 40, contact_sheet(pngs), contact_sheet(pngs[:2], scale=2))
            page.wait_for_function("""() => {
                const g = document.querySelector('#checkpoints figure[data-step="40"] img.ckpt-grid');
                const c = document.querySelector('#checkpoints figure[data-step="40"] img.ckpt-loss');
                return g && c && g.complete && g.naturalWidth > 0 && c.complete && c.naturalWidth > 0;
            }""", timeout=15_000)
            assert page.eval_on_selector("#checkpoints img.ckpt-grid", "g => g.naturalWidth") == 32 * 4 * 4
            assert page.eval_on_selector("#checkpoints img.ckpt-loss", "g => g.naturalWidth") == 32 * 2 * 2
            expect(page.locator("#checkpoints figcaption")).to_have_text("step 40 · latest")
            expect(page.locator("#checkpoints")).to_contain_text("heldout_bits_per_dim")
            expect(page.locator("#detail")).to_have_attribute("data-status", "running")
            page.screenshot(path=str(shots / "dashboard-train-running.png"), full_page=True)

            play_finish(settings, tenant_id, train_id, claim, model_id, contact_sheet(pngs))
            expect(page.locator("#detail")).to_have_attribute("data-status", "succeeded", timeout=15_000)
            page.wait_for_function("() => { const g = document.getElementById('grid-img');"
                                   " return !document.getElementById('grid-block').hidden && g.complete && g.naturalWidth > 0; }",
                                   timeout=15_000)
            assert page.eval_on_selector("#grid-img", "g => g.naturalWidth") == 32 * 4 * 4
            expect(page.locator("#model-metrics")).to_contain_text("heldout_bits_per_dim")
            page.screenshot(path=str(shots / "dashboard-train.png"), full_page=True)

            # Upload a CSV through the form: estimate, submit, and the new job appears and runs.
            page.set_input_files("#csv-file", files=[{"name": "new.csv", "mimeType": "text/csv",
                                                      "buffer": b"prompt,seed,num_images\na new prompt,5,2\n"}])
            page.select_option("#model-select", model_id)
            page.fill("#steps", "2")
            page.click("#estimate-btn")
            expect(page.locator("#upload-result")).to_contain_text("1 row(s), 2 image(s), 4 steps")
            page.click("#submit-btn")
            page.wait_for_function("() => document.getElementById('upload-result').dataset.jobId", timeout=15_000)
            new_id = page.eval_on_selector("#upload-result", "e => e.dataset.jobId")
            assert new_id not in (sample_id, train_id)
            assert api.get(f"/v1/jobs/{new_id}").json()["params"]["steps"] == 2
            new_row = page.locator(f'tr[data-job-id="{new_id}"]')
            expect(new_row).to_be_visible()
            expect(new_row.locator("td.status")).to_have_text("succeeded", timeout=120_000)  # auto-refresh
            page.wait_for_function("() => [...document.querySelectorAll('#thumbs img')].filter("
                                   "i => i.complete && i.naturalWidth > 0).length === 2", timeout=15_000)

            # A bad CSV: the error cells are listed and no job is made.
            before = len(api.get("/v1/jobs").json()["items"])
            page.set_input_files("#csv-file", files=[{"name": "bad.csv", "mimeType": "text/csv",
                                                      "buffer": b"prompt,colour\na,red\n"}])
            page.click("#submit-btn")
            expect(page.locator("#upload-result .error")).to_contain_text("column colour")
            assert len(api.get("/v1/jobs").json()["items"]) == before
            page.screenshot(path=str(shots / "dashboard-upload.png"), full_page=True)

            # The key is kept: a reload lists the jobs without typing it again.
            page.reload()
            expect(page.locator(f'tr[data-job-id="{new_id}"]')).to_be_visible(timeout=15_000)
            assert not problems, problems
        finally:
            browser.close()
