"""Spread sample jobs: a big job split into pieces that several workers run at once.

**What a piece is.** A sample job of more than ``LDMQ_SAMPLE_PIECE_IMAGES`` images is split when it
is submitted into pieces of at most that many (as even as they come: 300 at 128 → 100, 100, 100).
A piece is a child row of ``jobs`` (``parent_id``; the images ``[item_start, item_end)``, counted
over the job's rows in row order, each row's ``num_images``), so everything a job row already has
serves a piece unchanged: the scheduler's claim (fair share, priority, aging, ``FOR UPDATE SKIP
LOCKED``), the lease and heartbeat, ``attempts`` as the fencing token, release, retry and the
sweeper's recovery, and the cancel poll. The parent (``pieces`` > 0) is never claimed itself. A
piece inherits its job's tenant, priority, ``sched_key`` and ``max_attempts``, so a job's pieces
stay together in its tenant's order; it carries no model or params (it runs its parent's).

**One job to the client.** A piece writes its images under the parent's id and keys, and records
them in ``job_outputs`` under the parent: the unique (job, row, index) makes each image exactly
once whichever piece or attempt makes it. The parent's progress, outputs count and events
(``started``, ``progress``, ``row_done``, the final state) are the only ones a client, a stream or
a webhook sees; pieces are hidden from listings, lookups, usage and metrics, and have their own
events (``started``/``requeued`` per attempt) for operators. The transitions are
``shared.jobstate``'s (its docstring has the state machine); this module holds what a piece *is*:
the split (:func:`split`), which images a piece makes (:class:`Piece`), and the manifest's turn
(:func:`manifest_turn`).

**Why split at submit, not lazily.** The pieces exist in the transaction that records the job, so
a 202 still means every piece is recorded, the wake-ups (one per piece) are sent after the same
commit, and the claim stays one statement over one table: a lazy split would need the first
worker to split under a lock (a second kind of claim) and would leave the other idle workers
asleep until it had. A 10,000-image job at 128 images a piece is 79 extra rows.

**Why child rows, not a ``pieces`` table.** ``shared.scheduler``'s statement could run over a
second table (``claim_sql`` takes its name), but the lease, heartbeat, release, retry, sweeper and
cancel code would all need a second copy. As rows of ``jobs`` they are the same code; the price is
a ``pieces = 0`` condition in the claim and ``parent_id IS NULL`` in what clients read.

**Output formats.** A ``webdataset`` job is split at shard boundaries: a shard's images are made
and stored by one run (``worker.runtime.shards``), so each piece makes whole shards, as many as
fit in ``LDMQ_SAMPLE_PIECE_IMAGES`` and at least one (``LDMQ_WDS_SHARD_IMAGES``, 1000 by default,
is then the piece: a million-image job is a thousand pieces). Its pieces' ``[item_start,
item_end)`` count images in shard order (``worker.jobs.shards``: by steps and guidance, then row
and index), not row order, and are multiples of the job's ``shard_images``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import select

from shared.db import session_scope
from shared.models import Job, JobRow, JobStatus, JobType, new_id
from shared.settings import Settings


def plan(total: int, per_piece: int, unit: int = 1) -> list[tuple[int, int]]:
    """The pieces ``[start, end)`` of a job of ``total`` images, each of whole ``unit``\ s (a
    WebDataset job's shard size; 1 for PNGs) and of at most ``per_piece`` images unless one unit is
    more, as even as they come; [] when the job runs whole (``per_piece`` 0, or one piece holds it)."""
    if per_piece <= 0 or unit <= 0:
        return []
    units = -(-total // unit)
    per = max(1, per_piece // unit)
    if units <= per:
        return []
    n = -(-units // per)
    bounds = [min(total, (i * units // n) * unit) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def splits(job: Job) -> bool:
    """Whether a job of this kind may be split at all (sample jobs)."""
    return job.type == JobType.sample.value


def unit(job: Job) -> int:
    """The images a piece of ``job`` holds a whole number of: a WebDataset job's shard size, else 1."""
    params = job.params or {}
    return int(params["shard_images"]) if params.get("output_format") == "webdataset" else 1


def split(job: Job, per_piece: int) -> list[Job]:
    """The pieces of ``job`` (not yet added to a session), or [] when it runs whole. Call it once
    the job's tenant, priority, ``sched_key``, times and ``max_attempts`` are set (a piece copies
    them); it gives the job its id and its count of ``pieces``."""
    spans = plan(job.total_items or 0, per_piece, unit(job)) if splits(job) else []
    if not spans:
        return []
    job.id = job.id or new_id()
    job.pieces = len(spans)
    return [Job(id=new_id(), parent_id=job.id, item_start=start, item_end=end, total_items=end - start,
                tenant_id=job.tenant_id, type=job.type, status=JobStatus.queued.value, priority=job.priority,
                params={}, max_attempts=job.max_attempts, created_at=job.created_at,
                enqueued_at=job.enqueued_at, sched_key=job.sched_key)
            for start, end in spans]


@dataclass(frozen=True)
class Piece:
    """A claimed piece, as the worker needs it: which job it belongs to and which of its images it makes."""

    id: str
    parent_id: str
    start: int
    end: int

    @classmethod
    def of(cls, job: Job) -> Piece | None:
        """The piece ``job`` is, or None for a job that runs whole."""
        if job.parent_id is None:
            return None
        return cls(job.id, job.parent_id, int(job.item_start or 0), int(job.item_end or 0))

    def images(self, rows: list[JobRow]) -> set[tuple[int, int]]:
        """The (row, index) pairs this piece makes, ``rows`` being its job's in row order."""
        out: set[tuple[int, int]] = set()
        first = 0  # position of the row's image 0 among the job's images
        for r in rows:
            lo, hi = max(self.start, first), min(self.end, first + r.num_images)
            out.update((r.row, i - first) for i in range(lo, hi))
            first += r.num_images
            if first >= self.end:
                break
        return out

    def narrow(self, items: list, rows: list[JobRow], done: set[tuple[int, int]],
               mine: set[tuple[int, int]] | None = None) -> tuple[list, int, int]:
        """The job's images still to make (``items``, each with ``row`` and ``index``) cut down to
        this piece's; with the piece's images already made and its total (its progress). ``mine``:
        the piece's images when they are not :meth:`images` (a WebDataset job's, in shard order)."""
        mine = self.images(rows) if mine is None else mine
        return [it for it in items if (it.row, it.index) in mine], len(mine & done), len(mine)


@contextmanager
def manifest_turn(settings: Settings, job_id: str) -> Iterator[None]:
    """Hold the parent's row lock while a piece of it writes the job's manifest (a no-op for a job
    that runs whole). The manifest lists every output recorded so far; pieces end in any order and
    may end together, so each writes it at its end, one after another: the last one to take its
    turn lists every output, because every other piece recorded its outputs before its own turn.
    Outputs are recorded under the same lock (``jobstate.record_outputs``), so a turn sees a whole
    batch or none of it. The lock is held for one manifest PUT (milliseconds)."""
    with session_scope(settings) as s:
        parent = s.scalar(select(Job.parent_id).where(Job.id == job_id))
    if parent is None:  # no transaction left open around the PUT
        yield
        return
    with session_scope(settings) as s:
        s.execute(select(Job.id).where(Job.id == parent).with_for_update())
        yield
