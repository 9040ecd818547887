"""ldmq.client against the real app (FastAPI's TestClient is an httpx.Client), Postgres, Redis and
the S3 server; and `ldmq jobs` in-process with that client."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from ldmq import cli
from tests.ldmq.conftest import run_cli
from ldmq.client import ApiError, Client, Job
from shared import jobstate
from shared.catalog import SCHEDULERS
from shared.db import session_scope
from shared.models import JobStatus
from shared.storage import get_storage, manifest_key, output_key


@pytest.fixture
def api(client, tiny_model):
    _, key, model_id = tiny_model
    c = Client(key=key, http=client)
    c.model_id = model_id
    return c


def finish_with_outputs(settings, tenant_id, job_id, rows):
    """Play the worker: store one PNG-ish object per row, record it, write the manifest, succeed."""
    storage = get_storage(settings)
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "w", 30)
    entries = []
    for row in range(1, rows + 1):
        data = f"image {row}".encode()
        key = output_key(tenant_id, job_id, row, 0)
        storage.put_bytes(key, data, content_type="image/png")
        with session_scope(settings) as s:
            jobstate.record_output(s, job_id, claim.attempt, row=row, index=0, seed=row, key=key, width=8, height=8,
                                   sha256=hashlib.sha256(data).hexdigest())
        entries.append({"row": row, "index": 0, "key": key, "sha256": hashlib.sha256(data).hexdigest()})
    storage.put_bytes(manifest_key(tenant_id, job_id), json.dumps({"job_id": job_id, "outputs": entries}).encode())
    with session_scope(settings) as s:
        jobstate.finish(s, job_id, claim.attempt, JobStatus.succeeded)
    return entries


def test_submit_get_list_cancel_events(api, settings):
    job = api.submit_csv(b"prompt,seed\na,1\nb,2\n", model=api.model_id, steps=3, scheduler="ddim",
                         webhook_url="http://127.0.0.1:9/h", webhook_events=["succeeded"])
    assert isinstance(job, Job) and job.status == "queued" and job.total_items == 2 and not job.is_final
    assert job.params["steps"] == 3 and job.webhook == {"url": "http://127.0.0.1:9/h", "events": ["succeeded"]}
    assert api.get(job.id) == job
    other = api.submit_sample(api.model_id, ["x", {"prompt": "y", "num_images": 2}], steps=2)
    assert other.total_items == 3
    trained = api.train("builtin:digits", steps=5, webhook={"url": "http://127.0.0.1:9/t"})
    assert trained.type == "train" and trained.webhook["events"] == ["started", "succeeded", "failed", "canceled"]
    assert [j.id for j in api.list(page_size=1)] == [trained.id, other.id, job.id]  # three pages of one
    assert [j.id for j in api.list(type="sample", max_items=1)] == [other.id]
    canceled = api.cancel(job.id)
    assert canceled.status == "canceled" and canceled.is_final
    ev = api.events(job.id)
    assert [e.type for e in ev.items] == ["canceled"] and ev.next_after_id == ev.items[0].id and not ev.has_more
    assert api.events(job.id, after_id=ev.next_after_id).items == []
    # follow() on a final job yields it once and stops.
    assert [j.status for j in api.follow(job.id)] == ["canceled"]
    for j in (other, trained):  # no worker here: leave nothing for a later test's worker to run
        api.cancel(j.id)


def test_estimate_and_errors(api):
    est = api.estimate_csv(b"prompt,num_images\na,2\n", model=api.model_id, steps=5)
    assert est["valid"] and est["images"] == 2 and est["denoising_steps"] == 10
    assert api.estimate_sample(api.model_id, ["a", "b"], steps=3)["denoising_steps"] == 6
    assert api.estimate_sample(api.model_id, ["a", "b"], steps=3, scheduler="langevin-pc")["network_evaluations"] == 10
    assert [s["name"] for s in api.schedulers()] == list(SCHEDULERS)
    with pytest.raises(ApiError) as e:
        api.submit_csv(b"prompt,seed\n,x\n", model=api.model_id)
    assert e.value.status == 422 and e.value.code == "invalid_csv"
    assert {(d["row"], d["column"]) for d in e.value.details} == {(1, "prompt"), (1, "seed")}
    assert "row=1, column=seed" in str(e.value)
    with pytest.raises(ApiError) as e:
        api.get("nope")
    assert e.value.status == 404 and e.value.code == "not_found"


def test_client_needs_url_and_key(monkeypatch):
    monkeypatch.delenv("LDMQ_API_URL", raising=False)
    monkeypatch.delenv("LDMQ_API_KEY", raising=False)
    with pytest.raises(ValueError, match="LDMQ_API_URL"):
        Client(key="k")
    with pytest.raises(ValueError, match="LDMQ_API_KEY"):
        Client("http://x")
    monkeypatch.setenv("LDMQ_API_URL", "http://env:1")
    monkeypatch.setenv("LDMQ_API_KEY", "envkey")
    with Client() as c:
        assert c.url == "http://env:1"


def test_download_verifies_checksums_and_resumes(api, settings, tiny_model, tmp_path, monkeypatch):
    tid = tiny_model[0]
    job = api.submit_csv(b"prompt\na\nb\n", model=api.model_id)
    entries = finish_with_outputs(settings, tid, job.id, rows=2)
    assert api.get(job.id).status == "succeeded"
    paths = api.download(job.id, tmp_path / "out")
    assert [p.name for p in paths] == ["000001-000.png", "000002-000.png"]
    assert [p.read_bytes() for p in paths] == [b"image 1", b"image 2"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["outputs"] == entries

    # A second run keeps the verified files: only the manifest is fetched again.
    fetched = []
    real = Client._fetch
    monkeypatch.setattr(Client, "_fetch", lambda self, url: fetched.append(url) or real(self, url))
    api.download(job.id, tmp_path / "out")
    assert len(fetched) == 1 and "manifest.json" in fetched[0]

    # Bytes that do not match the manifest are refused, not written.
    get_storage(settings).put_bytes(entries[0]["key"], b"tampered")
    with pytest.raises(ApiError, match="do not match the manifest"):
        api.download(job.id, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "000001-000.png").exists()


def test_cli_jobs_commands(api, settings, tiny_model, tmp_path, monkeypatch, capsys, keep_root_logging):
    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes(b"prompt,num_images\na,2\n")
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "estimate", str(csv_path), "--model", api.model_id,
                           "--steps", "4")
    assert rc == 0 and json.loads(out)["denoising_steps"] == 8

    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "submit", str(csv_path), "--model", api.model_id,
                           "--webhook-url", "http://127.0.0.1:9/h", "--webhook-events", "started,succeeded")
    assert rc == 0
    job_id = out.strip().splitlines()[-1]  # the id alone on the last line
    assert api.get(job_id).webhook["events"] == ["started", "succeeded"]

    finish_with_outputs(settings, tiny_model[0], job_id, rows=1)
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "follow", job_id)
    assert rc == 0 and json.loads(out)["status"] == "succeeded"
    assert "100.0% succeeded" in err and "1/2 images" in err
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "download", job_id, str(tmp_path / "dl"))
    assert rc == 0 and (tmp_path / "dl" / "000001-000.png").read_bytes() == b"image 1"

    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "list", "--limit", "1")
    assert rc == 0 and out.startswith(job_id)

    # A failed job: follow exits 1; an API error exits 1 with the details on stderr.
    other = api.submit_csv(b"prompt\nz\n", model=api.model_id)
    api.cancel(other.id)
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "follow", other.id)
    assert rc == 1 and json.loads(out)["status"] == "canceled"
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"prompt,colour\na,red\n")
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "submit", str(bad), "--model", api.model_id)
    assert rc == 1 and "invalid_csv" in err and "column=colour" in err
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "submit", str(tmp_path / "missing.csv"), "--model", api.model_id)
    assert rc == 2 and "FileNotFoundError" in err


def test_cli_without_key_says_how_to_give_one(monkeypatch, capsys, keep_root_logging):
    monkeypatch.delenv("LDMQ_API_KEY", raising=False)
    rc = cli.main(["jobs", "get", "x", "--url", "http://127.0.0.1:1"])
    assert rc == 2 and "LDMQ_API_KEY" in capsys.readouterr().err


def test_progress_bar_lines():
    from ldmq.cli import _ProgressBar

    buf = io.StringIO()
    bar = _ProgressBar(buf, width=10)
    base = dict(created_at="", started_at=None, finished_at=None, error=None, params={}, model_id=None, attempts=1)
    bar.update(Job(id="abcdef123456", type="train", status="running", progress=0.5, outputs_count=0,
                   progress_detail={"step": 50, "total_steps": 100, "loss": 0.1234567}, **base))
    bar.update(Job(id="abcdef123456", type="sample", status="succeeded", progress=1.0, outputs_count=4,
                   total_items=4, **base))
    assert buf.getvalue().splitlines() == [
        "abcdef12 [#####.....]  50.0% running step 50/100 loss 0.1235",
        "abcdef12 [##########] 100.0% succeeded 4/4 images",
    ]


def test_client_and_cli_delete(api, settings, tiny_model, monkeypatch, capsys, keep_root_logging):
    tid, _, model_id = tiny_model
    storage = get_storage(settings)
    job = api.submit_csv(b"prompt\na\n", model=model_id)
    with pytest.raises(ApiError) as exc:  # not final yet
        api.delete(job.id)
    assert exc.value.status == 409 and exc.value.code == "job_not_final"
    rc, out, err = run_cli(monkeypatch, capsys, api, "models", "delete", model_id)
    assert rc == 1 and "model_in_use" in err and job.id in err
    finish_with_outputs(settings, tid, job.id, rows=1)
    assert api.delete(job.id) is None
    assert storage.list(f"{tid}/jobs/{job.id}/") == []
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "delete", job.id)
    assert rc == 1 and "not_found" in err
    rc, out, err = run_cli(monkeypatch, capsys, api, "models", "delete", model_id)
    assert rc == 0 and f"deleted model {model_id}" in err
    rc, out, err = run_cli(monkeypatch, capsys, api, "datasets", "delete", "nope")
    assert rc == 1 and "not_found" in err


def test_reproduce_a_generated_png_makes_the_same_pixels(api, settings, tmp_path, monkeypatch, capsys,
                                                         keep_root_logging):
    """`ldmq jobs reproduce PNG` reads the PNG's own parameters and submits them as a one-image job;
    on the same worker that job makes the same pixels."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    from ldmq.client import png_parameters
    from worker.jobs.sample import run_sample
    from worker.runtime.run import run_job

    def make(job_id, dest):
        assert run_job(settings, job_id, "sample", lambda r: run_sample(settings, r)) == "succeeded"
        return api.download(job_id, tmp_path / dest)

    def pixels(path):
        return np.asarray(Image.open(path))

    job = api.submit_sample(api.model_id, [{"prompt": "a red cat", "negative_prompt": "blurry", "seed": 41,
                                            "num_images": 2}], steps=2, scheduler="ddim", guidance_scale=3.0)
    original = make(job.id, "orig")[1]  # the second image: seed 42
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "reproduce", str(original))
    assert rc == 0, err
    again = api.get(out.strip().splitlines()[-1])
    assert again.total_items == 1 and again.model_id == api.model_id
    assert {k: again.params[k] for k in ("scheduler", "steps", "guidance_scale", "width", "height")} == {
        "scheduler": "ddim", "steps": 2, "guidance_scale": 3.0, "width": 32, "height": 32}
    [copy] = make(again.id, "again")
    assert (pixels(copy) == pixels(original)).all()
    made = png_parameters(copy)
    assert (made["job_id"], made["row"], made["index"], made["seed"], made["negative_prompt"]) == (
        again.id, 1, 0, 42, "blurry")

    # A PNG without ldmq's chunk, or not a PNG at all: a clear error, nothing submitted.
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "reproduce", str(plain))
    assert rc == 2 and "no 'ldmq' text chunk" in err and "cannot be reproduced" in err
    (tmp_path / "notes.png").write_text("hello")
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "reproduce", str(tmp_path / "notes.png"))
    assert rc == 2 and "is not a PNG image" in err
    # Parameters naming other weights than the model's: refused.
    params = {**png_parameters(original), "model_sha256": "0" * 64}
    info = PngImagePlugin.PngInfo()
    info.add_text("ldmq", json.dumps(params))
    Image.open(original).save(tmp_path / "other.png", pnginfo=info)
    with pytest.raises(ValueError, match="not the one that made this image"):
        api.reproduce(tmp_path / "other.png")
    assert [j.id for j in api.list(max_items=1)] == [again.id]


def play_training(settings, job_id):
    """What a train worker writes: progress with step and loss, a checkpoint with its evaluation, success."""
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "w", 30)
    for step in (25, 50):
        with session_scope(settings) as s:
            jobstate.set_progress(s, job_id, claim.attempt, step / 100,
                                  {"stage": "unet", "step": step, "total_steps": 100, "loss": 1 / step})
    with session_scope(settings) as s:
        jobstate.set_checkpoint(s, job_id, claim.attempt, "k/step-50-a1",
                                {"step": 50, "metrics": {"step": 50, "heldout_bits_per_dim": 1.2345}})
    with session_scope(settings) as s:
        jobstate.finish(s, job_id, claim.attempt, JobStatus.succeeded)


def test_stream_follow_and_cli_follow_of_a_train_job(api, settings, monkeypatch, capsys, keep_root_logging):
    job = api.train("builtin:digits", steps=5)
    play_training(settings, job.id)
    evs = list(api.stream(job.id))
    assert [e.type for e in evs] == ["job", "started", "progress", "progress", "checkpoint", "succeeded", "end"]
    assert evs[0].job.id == job.id and evs[0].id is None and evs[-1].data == {"reason": "final", "status": "succeeded"}
    listed = api.events(job.id).items
    assert [e.id for e in evs[1:-1]] == [e.id for e in listed] and [e.data for e in evs[1:-1]] == [e.data for e in listed]
    assert evs[4].data["metrics"]["heldout_bits_per_dim"] == 1.2345 and evs[2].created_at
    # Resumed after the checkpoint: the final event, then end.
    assert [e.type for e in api.stream(job.id, last_event_id=evs[4].id)] == ["job", "succeeded", "end"]
    assert [j.status for j in api.follow(job.id)] == ["succeeded"]  # ended already: its final record only

    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "follow", job.id, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [x["event"] for x in lines] == [e.type for e in evs] and lines[-1]["data"]["status"] == "succeeded"
    assert [x["id"] for x in lines] == [e.id for e in evs] and err == ""


def test_follow_of_a_running_job_shows_steps_loss_and_checkpoints(api, settings, monkeypatch, capsys, keep_root_logging):
    """The CLI's bar from the stream of a job followed from before it started: the server's own
    events, behind the snapshot the stream opened with while the job was queued (the in-process
    client reads a response whole, so a live stream is followed over HTTP in tests/api/test_webhooks.py)."""
    from ldmq.client import Client, StreamEvent

    job = api.train("builtin:digits", steps=5)
    queued = api.get(job.id).raw
    play_training(settings, job.id)
    live = [StreamEvent("job", None, queued)] + list(api.stream(job.id))[1:]
    monkeypatch.setattr(Client, "stream", lambda self, job_id, last_event_id=None, timeout=None: iter(live))
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "follow", job.id)
    assert rc == 0 and json.loads(out)["status"] == "succeeded"
    lines = err.splitlines()
    assert any(line.endswith("25.0% running unet step 25/100 loss 0.0400") for line in lines), lines
    assert any(line.endswith("50.0% running unet step 50/100 loss 0.0200") for line in lines), lines
    assert f"{job.id[:8]} checkpoint at step 50: heldout_bits_per_dim 1.234" in lines
    assert lines[0].endswith("0.0% queued") and lines[-1].endswith("100.0% succeeded unet step 50/100 loss 0.0200")


@pytest.mark.slow
def test_client_stream_reconnects_across_an_api_restart_losing_and_repeating_nothing(stack, settings, make_tenant,
                                                                                    wait_until):
    import signal
    import threading

    stack.env.update(LDMQ_STREAM_POLL_S="0.2")
    api_proc = stack.start_api()
    _, key = make_tenant()
    got, errors = [], []
    with Client(stack.url, key, timeout=10) as c:
        job = c.train("builtin:digits", steps=5)
        with session_scope(settings) as s:
            claim = jobstate.claim(s, job.id, "w", 60)

        def progress(p):
            with session_scope(settings) as s:
                jobstate.set_progress(s, job.id, claim.attempt, p, {"step": int(p * 100), "total_steps": 100})

        def read():
            try:
                got.extend(c.stream(job.id, timeout=120))
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        progress(0.1)
        wait_until(lambda: any(e.type == "progress" for e in got), 30, "the first progress event")
        api_proc.signal(signal.SIGKILL)
        api_proc.p.wait(10)
        progress(0.2)  # while no API runs
        stack.start_api()
        progress(0.3)
        wait_until(lambda: sum(e.type == "progress" for e in got) == 3, 60, "the client to reconnect and read on")
        with session_scope(settings) as s:
            jobstate.finish(s, job.id, claim.attempt, JobStatus.succeeded)
        reader.join(60)
        listed = c.events(job.id).items
    assert not errors and not reader.is_alive(), errors
    ids = [e.id for e in got if e.id is not None]
    assert ids == [e.id for e in listed]  # every event once, in order, across the restart
    assert [e.type for e in got if e.id is None] == ["job", "job", "end"]  # one snapshot per connection
    assert got[-1].type == "end" and got[-1].data["status"] == "succeeded"


def test_download_archive_and_cli_archive(api, settings, tiny_model, tmp_path, monkeypatch, capsys, keep_root_logging):
    import tarfile

    tid = tiny_model[0]
    job = api.submit_csv(b"prompt\na\nb\n", model=api.model_id)
    entries = finish_with_outputs(settings, tid, job.id, rows=2)
    path = api.download_archive(job.id, tmp_path / "job.tar")
    with tarfile.open(path) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar}
    assert got[f"{job.id}/rows/000001/000.png"] == b"image 1" and got[f"{job.id}/rows/000002/000.png"] == b"image 2"
    assert json.loads(got[f"{job.id}/manifest.json"])["outputs"] == entries
    assert not list(tmp_path.glob(".*.part"))
    with pytest.raises(ApiError) as err:
        api.download_archive("0" * 32, tmp_path / "none.tar")
    assert err.value.status == 404 and not (tmp_path / "none.tar").exists()
    assert not list(tmp_path.glob(".*.part"))

    # An object lost midway cuts the stream: no file is left that looks like a whole archive.
    get_storage(settings).delete(entries[1]["key"])
    with pytest.raises(Exception):
        api.download_archive(job.id, tmp_path / "cut.tar")
    assert not (tmp_path / "cut.tar").exists() and not list(tmp_path.glob(".*.part"))
    get_storage(settings).put_bytes(entries[1]["key"], b"image 2")

    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "archive", job.id, "-o", str(tmp_path / "cli.tar"))
    assert rc == 0 and out.strip() == str(tmp_path / "cli.tar")
    assert (tmp_path / "cli.tar").read_bytes() == path.read_bytes()
    with pytest.raises(SystemExit):
        cli.main(["jobs", "archive", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "ldmq jobs archive 3f2a... -o job.tar" in help_text


def test_cli_submits_webdataset_and_download_fetches_its_shards(api, settings, tiny_model, tmp_path, monkeypatch,
                                                                 capsys, keep_root_logging):
    from shared.storage import shard_key

    tid = tiny_model[0]
    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes(b"prompt\na\n")
    rc, out, _ = run_cli(monkeypatch, capsys, api, "jobs", "submit", str(csv_path), "--model", api.model_id,
                         "--output-format", "webdataset")
    assert rc == 0
    job_id = out.strip().splitlines()[-1]
    assert api.get(job_id).params["output_format"] == "webdataset"
    storage = get_storage(settings)
    key, data = shard_key(tid, job_id, 0), b"a tar"
    digest = storage.put_bytes(key, data)
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "w", 30)
        jobstate.record_shard(s, job_id, claim.attempt, shard=0, key=key, sha256=digest, size=len(data),
                              records=[dict(row=1, index=0, seed=1, key=key, width=8, height=8, sha256="0" * 64)])
    paths = api.download(job_id, tmp_path / "dl")
    assert [p.name for p in paths] == ["000000.tar"] and paths[0].read_bytes() == data
    outs = api.outputs(job_id)
    assert outs.output_format == "webdataset" and outs.items[0].raw["member"] == "000001-000.png"
    storage.delete(key)
    storage.put_bytes(key, b"tampered")
    with pytest.raises(ApiError, match="do not match"):
        api.download(job_id, tmp_path / "dl2")


def test_images_upload_and_reproducing_an_inpainted_png(api, settings, tmp_path, monkeypatch, capsys,
                                                        keep_root_logging):
    """`ldmq images upload FILE` prints the id; an image made from it (inpainting) records its inputs
    and strength, and `ldmq jobs reproduce` submits them again: the same pixels."""
    import numpy as np
    from PIL import Image

    from ldmq.client import png_parameters
    from worker.jobs.sample import run_sample
    from worker.runtime.run import run_job

    Image.new("RGB", (32, 32), "orange").save(tmp_path / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.jpg", format="JPEG")
    rc, out, err = run_cli(monkeypatch, capsys, api, "images", "upload", str(tmp_path / "init.png"))
    assert rc == 0, err
    init = out.strip().splitlines()[-1]
    assert api.image(init)["width"] == 32 and "32x32 PNG" in err
    rc, out, err = run_cli(monkeypatch, capsys, api, "images", "upload", str(tmp_path / "mask.jpg"), "--json")
    assert rc == 0, err
    mask_id = json.loads(out)["id"]
    (tmp_path / "notes.png").write_text("not an image")
    rc, out, err = run_cli(monkeypatch, capsys, api, "images", "upload", str(tmp_path / "notes.png"))
    assert rc == 1 and "invalid_image" in err

    def make(job_id, dest):
        assert run_job(settings, job_id, "sample", lambda r: run_sample(settings, r)) == "succeeded"
        return api.download(job_id, tmp_path / dest)

    job = api.submit_sample(api.model_id, [{"prompt": "a cat", "seed": 5, "init_image": init, "strength": 0.75,
                                            "mask_image": mask_id}], steps=4, scheduler="ddim")
    [original] = make(job.id, "orig")
    p = png_parameters(original)
    assert (p["init_image"], p["strength"], p["mask_image"]) == (init, 0.75, mask_id)
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "reproduce", str(original))
    assert rc == 0, err
    [copy] = make(out.strip().splitlines()[-1], "again")
    assert (np.asarray(Image.open(copy)) == np.asarray(Image.open(original))).all()
    assert png_parameters(copy)["mask_image"] == mask_id
