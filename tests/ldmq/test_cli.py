"""The command line over the REST API: train, datasets, models, --json everywhere, and an example
in every command's --help. Against the real app (FastAPI's TestClient), Postgres and the S3 server;
the streamed upload against a real `ldmq api` process."""

from __future__ import annotations

import argparse
import io
import json
import re
import zipfile

import pytest
from PIL import Image

from ldmq import cli
from tests.ldmq.conftest import run_cli
from ldmq.client import ApiError, Client, Job
from shared import jobstate
from shared.db import session_scope
from shared.models import JobStatus
from shared.storage import get_storage


@pytest.fixture
def api(client, tiny_model):
    tid, key, model_id = tiny_model
    c = Client(key=key, http=client)
    c.model_id, c.tenant_id = model_id, tid
    return c


def leaves(parser: argparse.ArgumentParser, path=("ldmq",)):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaves(child, (*path, name))


def test_every_command_has_an_example_in_its_help():
    found = list(leaves(cli.build_parser()))
    names = {" ".join(p) for p, _ in found}
    assert {"ldmq train submit", "ldmq datasets upload", "ldmq models download", "ldmq jobs follow",
            "ldmq keys create", "ldmq bench"} <= names and len(found) >= 25
    missing = []
    for path, parser in found:
        text = parser.format_help()
        # "example(s):" and then a line that runs this very command (maybe after VAR=value settings)
        ok = re.search(r"^examples?:$", text, re.M) and re.search(
            rf"^  (\S+=\S+ )*(\S+=\$\()?{re.escape(' '.join(path))}\b", text, re.M)
        if not ok:
            missing.append(" ".join(path))
    assert missing == []


def test_render_follow_draws_steps_and_loss_or_streams_json(capsys):
    base = dict(type="train", created_at="", started_at=None, finished_at=None, error=None, params={}, model_id=None,
                outputs_count=0, attempts=1)
    snaps = [Job(id="abcdef123456", status="running", progress=p, raw={"id": "abcdef123456", "progress": p},
                 progress_detail={"stage": "unet", "step": s, "total_steps": 10, "loss": loss}, **base)
             for p, s, loss in ((0.2, 2, 0.5), (1.0, 10, 0.25))]
    buf = io.StringIO()
    last = cli.render_follow(iter(snaps), bar=cli._ProgressBar(buf, width=10))
    assert last is snaps[-1]
    assert buf.getvalue().splitlines() == [
        "abcdef12 [##........]  20.0% running unet step 2/10 loss 0.5000",
        "abcdef12 [##########] 100.0% running unet step 10/10 loss 0.2500"]
    cli.render_follow(iter(snaps), json_lines=True)
    assert [json.loads(line)["progress"] for line in capsys.readouterr().out.splitlines()] == [0.2, 1.0]


def test_train_submit_estimate_and_follow(api, settings, monkeypatch, capsys, keep_root_logging, tmp_path):
    rc, out, err = run_cli(monkeypatch, capsys, api, "train", "estimate", "--dataset", "builtin:digits", "--steps", "5",
                           "--set", "autoencoder_steps=3", "--set", "checkpoint_every=4", "--json")
    assert rc == 0, err
    est = json.loads(out)
    assert est["dry_run"] and est["total_steps"] == 8 and est["estimated_gpu_seconds"] > 0
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"dataset": "builtin:digits", "steps": 5, "autoencoder_steps": 3}))
    rc, out, err = run_cli(monkeypatch, capsys, api, "train", "submit", str(params), "--batch-size", "8",
                           "--set", "unet_channels=[16,32]", "--json")
    assert rc == 0, err
    job = json.loads(out)  # one document, nothing else on stdout
    assert job["type"] == "train" and job["params"]["batch_size"] == 8 and job["params"]["unet_channels"] == [16, 32]
    assert job["estimated_seconds"] > 0

    # Play the worker: two progress reports with loss, then success; --follow shows them.
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job["id"], "w", 30)
    for step, loss in ((4, 0.9), (8, 0.3)):
        with session_scope(settings) as s:
            jobstate.set_progress(s, job["id"], claim.attempt, step / 8,
                                  {"stage": "unet", "step": step, "total_steps": 8, "loss": loss})
    with session_scope(settings) as s:
        jobstate.finish(s, job["id"], claim.attempt, JobStatus.succeeded)
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "follow", job["id"])
    assert rc == 0 and "100.0% succeeded unet step 8/8 loss 0.3000" in err.splitlines()[-1], err
    rc, out, err = run_cli(monkeypatch, capsys, api, "jobs", "follow", job["id"], "--json")
    events = [json.loads(line) for line in out.splitlines()]  # the job's event stream, one a line
    assert rc == 0 and events[-1]["event"] == "end" and events[-1]["data"]["status"] == "succeeded"

    # A field the schema does not have: refused before any request, the valid ones listed.
    rc, out, err = run_cli(monkeypatch, capsys, api, "train", "submit", "--dataset", "builtin:digits", "--set", "stepz=3")
    assert rc == 2 and "unknown train parameter(s) stepz" in err and "autoencoder_steps" in err
    rc, out, err = run_cli(monkeypatch, capsys, api, "train", "submit", "--steps", "3")
    assert rc == 2 and "no dataset" in err
    # The server's bounds: the API's 422, exit 1.
    rc, out, err = run_cli(monkeypatch, capsys, api, "train", "submit", "--dataset", "builtin:digits", "--steps", "999999")
    assert rc == 1 and "invalid_request" in err and "field=steps" in err


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def dataset_zip(path, padding_bytes: int = 0):
    """A valid dataset archive; ``padding_bytes`` of incompressible filler (a skipped member)
    written in 1 MiB pieces, so the archive itself is never whole in this process's memory."""
    import os

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("metadata.csv", "file_name,text\na.png,a red square\nb.png,a blue square\n")
        z.writestr("a.png", png("red"))
        z.writestr("b.png", png("blue"))
        if padding_bytes:
            with z.open("padding.bin", "w", force_zip64=True) as f:
                for _ in range(padding_bytes // 2**20):
                    f.write(os.urandom(2**20))
    return path


def test_datasets_upload_list_get_and_delete(api, monkeypatch, capsys, keep_root_logging, tmp_path):
    archive = dataset_zip(tmp_path / "squares.zip", padding_bytes=2 * 2**20)
    rc, out, err = run_cli(monkeypatch, capsys, api, "datasets", "upload", str(archive), "--name", "squares")
    assert rc == 0, err
    ds_id = out.strip().splitlines()[-1]
    assert "upload squares.zip [" in err and "100.0%" in err and "2 images" in err
    rc, out, err = run_cli(monkeypatch, capsys, api, "datasets", "list", "--json")
    assert rc == 0 and [d["id"] for d in json.loads(out)] == [ds_id]
    rc, out, err = run_cli(monkeypatch, capsys, api, "datasets", "get", ds_id, "--json")
    assert rc == 0 and json.loads(out)["name"] == "squares" and json.loads(out)["num_images"] == 2
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("readme.txt", "no metadata")
    rc, out, err = run_cli(monkeypatch, capsys, api, "datasets", "upload", str(bad), "--no-progress")
    assert rc == 1 and "invalid_dataset" in err and err.count("upload bad.zip") == 0
    rc, out, err = run_cli(monkeypatch, capsys, api, "datasets", "delete", ds_id, "--json")
    assert rc == 0 and json.loads(out) == {"deleted": "dataset", "id": ds_id}


def test_models_list_get_download(api, settings, make_tenant, client, monkeypatch, capsys, keep_root_logging,
                                  tmp_path, tiny_pipeline_dir):
    rc, out, err = run_cli(monkeypatch, capsys, api, "models", "list", "--json")
    assert rc == 0 and [m["id"] for m in json.loads(out)] == [api.model_id]
    rc, out, err = run_cli(monkeypatch, capsys, api, "models", "get", api.model_id, "--json")
    assert rc == 0 and json.loads(out)["name"] == "tiny"

    rc, out, err = run_cli(monkeypatch, capsys, api, "models", "download", api.model_id, "-o", str(tmp_path / "m"))
    assert rc == 0, err
    local = sorted(p.relative_to(tiny_pipeline_dir).as_posix() for p in tiny_pipeline_dir.rglob("*") if p.is_file())
    got = sorted(p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert got == local and "checksums verified" in err
    for rel in local:
        assert (tmp_path / "m" / rel).read_bytes() == (tiny_pipeline_dir / rel).read_bytes()
    listing = api.model_files(api.model_id)
    assert all(i["url"].startswith("http") and len(i["sha256"]) == 64 for i in listing["items"])

    # Another tenant cannot list its files; stored bytes that were changed are refused, not kept.
    _, other = make_tenant()
    assert client.get(f"/v1/models/{api.model_id}/files", headers={"Authorization": f"Bearer {other}"}).status_code == 404
    with session_scope(settings) as s:
        from shared.models import Model

        prefix = s.get(Model, api.model_id).key
    victim = next(i for i in listing["items"] if i["path"].endswith(".json"))
    key = f"{prefix.rstrip('/')}/{victim['path']}"
    # New bytes with their own checksum: each file checks out, the model's content hash does not.
    storage = get_storage(settings)
    data = storage.get_bytes(key)
    storage.put_bytes(key, data + b" ")
    with pytest.raises(ApiError, match="content hash"):
        api.download_model(api.model_id, tmp_path / "m2")


@pytest.mark.slow
def test_a_dataset_upload_streams_from_disk_in_bounded_memory(stack, settings, make_tenant, tmp_path):
    """64 MiB through a real `ldmq api` process: the client's peak Python allocation stays a few
    MiB (its 64 KiB chunks), far below the file."""
    import tracemalloc

    stack.start_api()
    _, key = make_tenant()
    archive = dataset_zip(tmp_path / "big.zip", padding_bytes=64 * 2**20)
    size = archive.stat().st_size
    seen = []
    with Client(stack.url, key, timeout=120) as c:
        tracemalloc.start()
        try:
            ds = c.upload_dataset(archive, name="big", progress=lambda done, total: seen.append((done, total)))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert ds["num_images"] == 2
    assert seen[-1] == (size, size) and len(seen) > 100  # progress as it went, to the last byte
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB upload"
