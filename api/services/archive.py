"""``GET /v1/jobs/{id}/archive``: every output of a sample job (its PNGs, or its WebDataset shards,
and once it has succeeded ``manifest.json`` and ``manifest.csv``) as one tar, streamed.

The tar is written by hand from ``tarfile``'s headers (``shared.tarball``) because ``tarfile``
writes to a file object, not to an iterator a response can consume: each member is a header, the
object's bytes as storage hands them over (``Storage.open_stream``, ``CHUNK_BYTES`` at a time,
checked against the object's SHA-256), and padding. Memory stays at about one chunk whatever the
archive's size (tests/api/test_archive.py measures it), and nothing is spooled to disk.

Members are named ``<job id>/<key under the job's prefix>`` (``<job>/rows/000001/000.png``,
``<job>/shards/000000.tar``, ``<job>/manifest.json``), in row (or shard) order. Only recorded
outputs go in: an object a crashed attempt left behind unrecorded does not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from sqlalchemy.orm import Session

from api.errors import ApiError
from api.services.jobs import get_job, output_format
from shared import jobstate
from shared.models import JobStatus, JobType
from shared.security import TenantRef
from shared.storage import Storage, job_prefix, manifest_key
from shared.tarball import END, tar_header, tar_padding

log = logging.getLogger(__name__)
CHUNK_BYTES = 256 * 1024  # per read from storage: ~100 µs of a 10 Gb/s link, few enough yields per object


def archive_entries(session: Session, storage: Storage, tenant: TenantRef, job_id: str) -> list[tuple[str, str]]:
    """(member name, storage key) of every object the job's archive holds, in order. The manifests
    go in if they are stored (a job from before ``manifest.csv`` existed has only the JSON)."""
    job = get_job(session, tenant, job_id)
    if job.type != JobType.sample.value:
        raise ApiError(409, "not_a_sample_job", f"job {job_id} is a {job.type} job: only a sample job has outputs "
                       "to archive (a train job's model is at GET /v1/models/{id})")
    prefix = job_prefix(tenant.id, job.id) + "/"
    if output_format(job) == "webdataset":
        keys = [sh.key for sh in jobstate.shards_of(session, job.id)]
    else:
        keys = list(dict.fromkeys(o.key for o, _ in jobstate.outputs_with_rows(session, job.id)))
    if job.status == JobStatus.succeeded.value:
        manifest = manifest_key(tenant.id, job.id)
        keys += [k for k in (manifest, manifest.removesuffix(".json") + ".csv") if storage.exists(k)]
    # Only objects under the tenant's own prefix (the keys come from our records; belt and braces).
    return [(f"{job.id}/{k[len(prefix):]}", k) for k in keys if k.startswith(prefix)]


def tar_stream(storage: Storage, entries: list[tuple[str, str]], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The tar of ``entries`` as chunks. A storage failure midway raises out of the iterator: the
    response is cut short, and the client finds no end-of-archive blocks (never a tar that looks
    whole)."""
    for name, key in entries:
        size, chunks = storage.open_stream(key, chunk_bytes)
        yield tar_header(name, size)
        yield from chunks
        if pad := tar_padding(size):
            yield pad
    yield END
