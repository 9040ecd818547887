"""The writer process: outputs land in S3 and Postgres, and its failures end the run as they would in-process."""

import io

import numpy as np
import pytest
from PIL import Image

from shared import jobstate
from shared.db import session_scope
from shared.models import Job, JobOutput
from shared.storage import StorageUnavailable, get_storage, output_key
from worker.runtime.errors import WorkerProcessDied
from worker.runtime.outcome import classify
from worker.runtime.outputs import OutputWriter, png_bytes, to_uint8


def claimed_job(client, settings, tiny_model, n=4):
    _, key, model_id = tiny_model
    r = client.post("/v1/jobs/sample", headers={"Authorization": f"Bearer {key}"},
                    json={"model": model_id, "prompts": [{"prompt": f"p{i}", "seed": i} for i in range(n)]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, "test-owner", 60)
        tenant_id = s.get(Job, job_id).tenant_id
    return job_id, claim.attempt, tenant_id


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def submit(writer, job_id, attempt, tenant_id, rows, arrays, *, lead=True, made=None, total=4):
    writer.submit(job_id=job_id, attempt=attempt, tenant_id=tenant_id, lead=lead, made=made or len(rows),
                  total=total, meta=[(r, 0, 100 + r) for r in rows], arrays=arrays)


def test_batches_are_uploaded_and_recorded_with_progress(client, settings, tiny_model):
    job_id, attempt, tenant_id = claimed_job(client, settings, tiny_model)
    arrays = images(4)
    writer = OutputWriter(settings)
    submit(writer, job_id, attempt, tenant_id, [1, 2], arrays[:2], made=2)
    submit(writer, job_id, attempt, tenant_id, [3, 4], arrays[2:], made=4)
    writer.drain()
    st = get_storage(settings)
    with session_scope(settings) as s:
        outs = s.query(JobOutput).filter_by(job_id=job_id).order_by(JobOutput.row).all()
        job = s.get(Job, job_id)
        assert job.progress == 1.0 and job.outputs_count == 4
        assert [(o.row, o.seed) for o in outs] == [(1, 101), (2, 102), (3, 103), (4, 104)]
    pixels = to_uint8(arrays)
    for k, o in enumerate(outs):
        assert o.key == output_key(tenant_id, job_id, o.row, 0)
        data = st.get_bytes(o.key)
        assert data == png_bytes(pixels[k])
        assert (np.asarray(Image.open(io.BytesIO(data))) == pixels[k]).all()  # lossless, as rounded


def test_a_fenced_lead_job_stops_the_run_a_fenced_packed_job_does_not(client, settings, tiny_model):
    job_id, attempt, tenant_id = claimed_job(client, settings, tiny_model)
    writer = OutputWriter(settings)
    submit(writer, job_id, attempt + 1, tenant_id, [1], images(1), lead=False)  # a stale attempt
    writer.drain()  # a packed job: logged, not raised
    submit(writer, job_id, attempt + 1, tenant_id, [2], images(1), lead=True)
    with pytest.raises(jobstate.LeaseLost):
        writer.drain()
    with session_scope(settings) as s:
        assert s.query(JobOutput).filter_by(job_id=job_id).count() == 0


def test_storage_unreachable_is_raised_as_storage_unavailable(client, settings, tiny_model):
    job_id, attempt, tenant_id = claimed_job(client, settings, tiny_model)
    dead = settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9", "storage_retry_s": 0.0})
    writer = OutputWriter(dead)
    submit(writer, job_id, attempt, tenant_id, [1], images(1))
    with pytest.raises(StorageUnavailable) as err:
        writer.drain()
    assert classify(err.value).error["code"] == "storage_unavailable"
    # The tenant reads what it would have read had the work been done in-process: the retry budget.
    assert "unreachable after 0 s of retries" in classify(err.value).error["message"]
    # The writer goes on serving runs after a failed one.
    writer = OutputWriter(settings)
    submit(writer, job_id, attempt, tenant_id, [1], images(1))
    writer.drain()


def test_a_dead_writer_fails_the_attempt_and_the_next_run_gets_a_new_one(client, settings, tiny_model):
    job_id, attempt, tenant_id = claimed_job(client, settings, tiny_model)
    writer = OutputWriter(settings)
    writer.process.proc.kill()
    writer.process.proc.join()
    with pytest.raises(WorkerProcessDied) as err:
        submit(writer, job_id, attempt, tenant_id, [1], images(1))
        writer.drain()
    assert classify(err.value).kind == "crashed"  # the attempt is spent: requeued while attempts remain
    writer = OutputWriter(settings)
    assert writer.process.alive()
    submit(writer, job_id, attempt, tenant_id, [1], images(1))
    writer.drain()
    with session_scope(settings) as s:
        assert s.query(JobOutput).filter_by(job_id=job_id).count() == 1


def test_answers_of_an_abandoned_run_do_not_reach_the_next(client, settings, tiny_model):
    """A run that stops with batches in flight drops their answers; the next run sees only its own."""
    job_id, attempt, tenant_id = claimed_job(client, settings, tiny_model)
    writer = OutputWriter(settings)
    submit(writer, job_id, attempt + 1, tenant_id, [1], images(1))  # will fail (fenced), answer dropped
    writer.close()
    writer = OutputWriter(settings)
    submit(writer, job_id, attempt, tenant_id, [2], images(1))
    writer.drain()
    assert not writer.process.answers  # the dropped answer was not kept either


def _start_writer_and_report(settings_json, conn):
    from shared.settings import Settings

    writer = OutputWriter(Settings.model_validate_json(settings_json))
    conn.send(writer.process.proc.pid)
    conn.recv()  # wait to be killed


def test_a_killed_executor_leaves_no_writer_behind(settings):
    import multiprocessing as mp
    import os
    import signal
    import time

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    executor = ctx.Process(target=_start_writer_and_report, args=(settings.model_dump_json(), child))
    executor.start()
    assert parent.poll(60), "the stand-in executor did not start its writer"
    writer_pid = parent.recv()
    os.kill(writer_pid, 0)  # alive
    os.kill(executor.pid, signal.SIGKILL)
    executor.join(10)
    deadline = time.monotonic() + 10
    while True:  # the orphan watch checks twice a second
        try:
            os.kill(writer_pid, 0)
        except ProcessLookupError:
            break
        try:  # reap it if it was reparented to us (a subreaper); otherwise init does
            os.waitpid(writer_pid, os.WNOHANG)
        except ChildProcessError:
            pass
        assert time.monotonic() < deadline, "the writer outlived its executor"
        time.sleep(0.1)


def without_text_chunks(png: bytes) -> bytes:
    """The PNG with its tEXt/iTXt/zTXt chunks taken out (each chunk: length, type, data, CRC)."""
    import struct

    out, pos = [png[:8]], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        end = pos + 12 + length
        if png[pos + 4:pos + 8] not in (b"tEXt", b"iTXt", b"zTXt"):
            out.append(png[pos:end])
        pos = end
    return b"".join(out)


def test_text_chunks_only_add_to_the_png():
    """The parameters ride in text chunks: the same pixels, the same bytes once the chunks are out,
    and a prompt beyond Latin-1 is kept whole (iTXt)."""
    pixels = to_uint8(images(1))[0]
    text = {"parameters": "a cat, 猫\nSteps: 2", "ldmq": '{"seed": 1}'}
    data = png_bytes(pixels, text)
    img = Image.open(io.BytesIO(data))
    assert img.text == text
    assert (np.asarray(img) == pixels).all()
    assert without_text_chunks(data) == png_bytes(pixels) and data != png_bytes(pixels)


def test_webdataset_batches_fill_shards_and_an_abandoned_shard_is_rebuilt_whole(client, settings, tiny_model):
    """Images go to their shard across batches; a shard is stored and recorded when its last image
    arrives. A run that stops mid-shard leaves nothing stored or recorded for it, and the next
    attempt's shard holds exactly its own images (nothing of the abandoned one)."""
    import hashlib
    import tarfile
    from datetime import timedelta

    from shared.models import JobShard, utcnow
    from shared.storage import shard_key

    job_id, attempt, tenant_id = claimed_job(client, settings, tiny_model, n=3)
    st = get_storage(settings)
    writer = OutputWriter(settings)
    arrays = images(3)
    meta = [(r, 0, 100 + r) for r in (1, 2, 3)]
    writer.submit(job_id=job_id, attempt=attempt, tenant_id=tenant_id, lead=True, made=2, total=3,
                  meta=meta[:2], arrays=arrays[:2], shards=[(0, 3), (0, 3)])
    writer.drain()
    writer.close()  # the run stops with shard 0 two images short
    assert st.list(f"{tenant_id}/jobs/{job_id}/shards/") == []
    with session_scope(settings) as s:
        assert s.query(JobOutput).filter_by(job_id=job_id).count() == 0
        s.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=5)
    with session_scope(settings) as s:
        attempt2 = jobstate.claim(s, job_id, "test-owner-2", 60).attempt
    writer = OutputWriter(settings)
    writer.submit(job_id=job_id, attempt=attempt2, tenant_id=tenant_id, lead=True, made=1, total=3,
                  meta=meta[:1], arrays=arrays[:1], shards=[(0, 3)])
    writer.submit(job_id=job_id, attempt=attempt2, tenant_id=tenant_id, lead=True, made=3, total=3,
                  meta=meta[1:], arrays=arrays[1:], shards=[(0, 3), (0, 3)])
    writer.drain()
    writer.close()
    key = shard_key(tenant_id, job_id, 0)
    with tarfile.open(fileobj=io.BytesIO(st.get_bytes(key))) as tar:
        names = tar.getnames()
        pngs = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".png")}
    assert names == ["000001-000.png", "000001-000.json", "000002-000.png", "000002-000.json",
                     "000003-000.png", "000003-000.json"]
    pixels = to_uint8(arrays)
    for k, (name, data) in enumerate(sorted(pngs.items())):
        assert (np.asarray(Image.open(io.BytesIO(data))) == pixels[k]).all()
    with session_scope(settings) as s:
        outs = s.query(JobOutput).filter_by(job_id=job_id).order_by(JobOutput.row).all()
        assert [(o.row, o.key, o.attempt) for o in outs] == [(r, key, attempt2) for r in (1, 2, 3)]
        assert [o.sha256 for o in outs] == [hashlib.sha256(pngs[n]).hexdigest() for n in sorted(pngs)]
        shard = s.query(JobShard).filter_by(job_id=job_id).one()
        assert (shard.images, shard.sha256, shard.attempt) == (3, hashlib.sha256(st.get_bytes(key)).hexdigest(), attempt2)
        assert s.get(Job, job_id).outputs_count == 3
