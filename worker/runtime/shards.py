"""WebDataset tar shards, written by the output writer process (``worker.runtime.outputs``) under
the same exactly-once rules as PNGs.

- Each image becomes two members, ``<key>.png`` (the same PNG, text chunks and all, that
  ``output_format: png`` stores) and ``<key>.json`` (its parameters as the manifest records them,
  plus the PNG's SHA-256 and the shard it is in), ``<key>`` = ``<row:06>-<index:03>``.
- A shard is assembled in a temporary file (members appended as their images arrive; memory holds
  one batch's PNGs), then stored in one create-only PUT under its deterministic key
  (``shared.storage.shard_key``) and recorded with its images in one transaction fenced by the
  attempt (``jobstate.record_shard``).
- Found already stored (an earlier attempt stored it and died before recording it, or a stale run
  raced us): the stored shard is kept and its own members' checksums are recorded, never ours.
- The tar is written with the standard library's ``tarfile`` (``shared.tarball``: mtime 0, 0644):
  the same images give the same bytes on every attempt. The ``webdataset`` package is only needed
  to read the shards (tests do).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shared import jobstate
from shared.settings import Settings
from shared.storage import Storage, sample_key, shard_key
from shared.tarball import tar_member

log = logging.getLogger(__name__)


@dataclass
class ShardSpool:
    """One shard being assembled: its tar in a temporary file and the records of its images."""

    job_id: str
    attempt: int
    shard: int
    key: str
    count: int  # images the shard holds when complete
    records: list[dict] = field(default_factory=list)
    run_id: str = ""  # the row whose attempt this is: a piece of the job (its shards are whole), or "" (the job)

    def __post_init__(self):
        self.file = tempfile.TemporaryFile(prefix="ldmq-shard-")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        self.tar.addfile(tar_member(name, len(data)), io.BytesIO(data))

    @property
    def complete(self) -> bool:
        return len(self.records) >= self.count

    def finish(self) -> int:
        """End the tar (its end-of-archive blocks); returns its size in bytes."""
        self.tar.close()  # leaves the file open: it was handed in
        self.file.flush()
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


class ShardSpools:
    """The writer process's unfinished shards, by (job, run, attempt, shard): ``run`` is the piece
    of a spread job the attempt belongs to ("" for a job that runs whole), since each piece counts
    its own attempts."""

    def __init__(self):
        self.open: dict[tuple[str, str, int, int], ShardSpool] = {}

    def get(self, tenant_id: str, job_id: str, attempt: int, shard: int, count: int, run_id: str = "") -> ShardSpool:
        k = (job_id, run_id, attempt, shard)
        if k not in self.open:
            self.drop(job_id, below=attempt, run_id=run_id)  # an earlier attempt's unfinished shards are rebuilt
            self.open[k] = ShardSpool(job_id, attempt, shard, shard_key(tenant_id, job_id, shard), count,
                                      run_id=run_id)
        return self.open[k]

    def pop(self, spool: ShardSpool) -> None:
        self.open.pop((spool.job_id, spool.run_id, spool.attempt, spool.shard), None)

    def drop(self, job_id: str, below: int | None = None, run_id: str = "") -> None:
        """Forget a job's unfinished shards: all of them by default, or those of the run ``run_id``'s
        attempts before ``below``."""
        for k in [k for k in self.open
                  if k[0] == job_id and (below is None or (k[1] == run_id and k[2] < below))]:
            self.open.pop(k).close()


def stored_member_digests(storage: Storage, key: str) -> tuple[dict[str, str], int]:
    """({member name: SHA-256} of the ``.png`` members of a stored shard, its size), read through a
    temporary file."""
    with tempfile.TemporaryFile(prefix="ldmq-shard-") as f:
        size = storage.read_into(key, f)
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            return {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                    for m in tar if m.isfile() and m.name.endswith(".png")}, size


def store_shard(storage: Storage, spool: ShardSpool) -> tuple[str, int]:
    """Store a complete shard create-only; returns (SHA-256, size) of the shard that is stored.
    If one was there already, its records take the stored members' checksums."""
    size = spool.finish()
    digest, created = storage.put_fileobj_once(spool.key, spool.file, content_type="application/x-tar")
    if not created:
        digests, size = stored_member_digests(storage, spool.key)
        want = {f"{sample_key(r['row'], r['index'])}.png" for r in spool.records}
        if set(digests) != want:
            raise RuntimeError(f"shard {spool.key!r} is stored with other images than this run planned "
                               f"({len(digests)} stored, {len(want)} planned)")
        for r in spool.records:
            r["sha256"] = digests[f"{sample_key(r['row'], r['index'])}.png"]
        log.info("job %s: shard %d was stored by an earlier run; kept, with its own checksums",
                 spool.job_id, spool.shard)
    return digest, size


def add_images(spools: ShardSpools, pool: ThreadPoolExecutor, b, encode) -> list[ShardSpool]:
    """Encode the batch's PNGs (``encode(i) -> bytes``, on the pool) and append each with its JSON to
    its shard; returns the shards this batch completed (taken out of ``spools``)."""
    pngs = list(pool.map(encode, range(len(b.meta))))
    done = []
    for i, data in enumerate(pngs):
        row, index, seed = b.meta[i]
        shard, count = b.shards[i]
        spool = spools.get(b.tenant_id, b.job_id, b.attempt, shard, count, b.run_id)
        name = sample_key(row, index)
        digest = hashlib.sha256(data).hexdigest()
        params = json.loads(b.text[i]["ldmq"]) if b.text else {"row": row, "index": index, "seed": seed}
        params.update(key=spool.key, member=f"{name}.png", sha256=digest)
        spool.add(f"{name}.png", data)
        spool.add(f"{name}.json", json.dumps(params, sort_keys=True).encode())
        height, width = b.pixels[i].shape[:2]
        spool.records.append(dict(row=row, index=index, seed=seed, key=spool.key, width=width, height=height,
                                  sha256=digest))
        if spool.complete:
            spools.pop(spool)
            done.append(spool)
    return done


def write_shards(settings: Settings, storage: Storage, session_scope, spools: list[ShardSpool], b, *,
                 event: bool = True) -> None:
    """Store the completed shards, then record them, their images and the job's progress in one
    transaction fenced by the attempt (progress alone when the batch completed none). For a piece of
    a spread job the fence is the piece's row and attempt; the shards are its job's."""
    try:
        stored = [(s, *store_shard(storage, s)) for s in spools]
        with session_scope(settings) as s:
            for spool, digest, size in stored:
                jobstate.record_shard(s, b.fence_id, b.attempt, shard=spool.shard, key=spool.key, sha256=digest,
                                      size=size, records=spool.records)
            jobstate.set_progress(s, b.fence_id, b.attempt, b.made / b.total,
                                  {"images_done": b.made, "images_total": b.total}, event=event)
    finally:
        for spool in spools:
            spool.close()
