"""Sample outputs are encoded, uploaded and recorded in a process of their own.

Why a process and not a thread pool beside the model: the model's thread needs the GIL between
every kernel (a diffusers U-Net step is hundreds of Python-level calls, on the CPU and when it
launches GPU kernels), and the writer's work is Python too (boto3 signs and parses every request,
~1.7 ms of CPU per PUT; the DB records). In one process they take turns on the GIL, so the model
waited on storage after all: the tiny model on 2 CPU cores made 33.6 and 28.9 images/s with a
writer thread, 40.4 and 32.7 with this process (interleaved runs, 256 images each).

- The executor process converts a batch to 8-bit pixels (rounding as diffusers' ``numpy_to_pil``)
  and sends it down a pipe with where it goes; the writer process encodes PNGs, uploads them
  create-only under their deterministic keys (a few threads, for the storage round trips), then
  records the batch and the job's progress in one transaction fenced by the attempt. One batch at
  a time, in order, so progress only moves forward.
- The sender waits once more than ``MAX_PENDING`` batches are unanswered: memory stays bounded.
- A failure is sent back as its kind and text and raised again in the executor as the same kind
  of error (a lost lease, storage unreachable, the database unreachable), so the job ends as it
  would have with the work done in-process. A writer that dies takes the attempt with it
  (``WorkerProcessDied``: the job is requeued while it has attempts left).
- ``output_format: webdataset``: the same PNGs go into tar shards (``worker.runtime.shards``),
  each stored once complete and recorded with its images in one fenced transaction.
- One writer per executor, kept across jobs (spawned once: ~1 s of imports). It exits when its
  parent goes, even by SIGKILL, so a killed executor leaves no writer behind; the writes it had
  under way are create-only and fenced, so a late one can neither clobber nor double-record.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from shared import jobstate
from shared.settings import Settings
from shared.storage import output_key
from worker.runtime.child import start_child, tune_engine
from worker.runtime.errors import WorkerProcessDied, error_kind, raise_kind
from worker.runtime.shards import ShardSpools, add_images, write_shards

log = logging.getLogger(__name__)
MAX_PENDING = 2
UPLOAD_THREADS = 4


def to_uint8(arrays):
    """Float images (N, H, W, 3) in [0, 1] to 8-bit, rounding exactly as diffusers' numpy_to_pil."""
    return (arrays * 255).round().astype("uint8")


def png_bytes(pixels, text: dict[str, str] | None = None) -> bytes:
    """PNG of one 8-bit (H, W, 3) image; level 1: the fastest zlib level, lossless all the same.
    ``text``: text chunks to add (keyword → text; tEXt, or iTXt for text beyond Latin-1),
    uncompressed: they change no pixel and cost next to nothing."""
    from PIL import Image, PngImagePlugin

    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for keyword, value in text.items():
            info.add_text(keyword, value)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1, pnginfo=info)
    return buf.getvalue()


@dataclass(frozen=True)
class Batch:
    """One model batch's images of one job, as the writer needs them (picklable)."""

    settings_json: str
    job_id: str
    attempt: int
    tenant_id: str
    lead: bool  # the job the run is for; a packed job that lost its lease does not stop the run
    made: int  # the job's images done once this batch is recorded
    total: int
    meta: list[tuple[int, int, int]]  # (row, index, seed) per image
    pixels: object  # uint8 (N, H, W, 3)
    text: list[dict[str, str]] | None = None  # PNG text chunks per image (how to make it again)
    shards: list[tuple[int, int]] | None = None  # webdataset: (shard, images in that shard) per image
    run_id: str = ""  # the row the run holds, whose attempt fences the writes: a piece of the job, or "" (the job)

    @property
    def fence_id(self) -> str:
        return self.run_id or self.job_id


@dataclass(frozen=True)
class Forget:
    """A run is over: drop the unfinished shards of these jobs (a run that stopped mid-shard)."""

    job_ids: tuple[str, ...]


# ================================================================================================
# The writer process
# ================================================================================================

def write_batch(settings: Settings, pool: ThreadPoolExecutor, b: Batch, spools: ShardSpools,
                progress_events: jobstate.ProgressEvents | None = None) -> None:
    """Encode and upload the batch's PNGs, then record them and the job's progress in one transaction
    (webdataset: append them to their shards, and store and record the shards they complete); a
    ``progress`` event only when ``progress_events`` says so, and at the last batch."""
    from shared.db import session_scope
    from shared.storage import get_storage

    storage = get_storage(settings)
    if b.shards is not None:
        complete = add_images(spools, pool, b, lambda i: png_bytes(b.pixels[i], b.text[i] if b.text else None))
        event = progress_events is None or progress_events.due(b.job_id, force=b.made >= b.total)
        _fenced(b, lambda: write_shards(settings, storage, session_scope, complete, b, event=event))
        return

    def put(i: int) -> dict:
        row, index, seed = b.meta[i]
        pixels = b.pixels[i]
        key = output_key(b.tenant_id, b.job_id, row, index)
        # Create-only: an object an earlier (crashed or stale) attempt left under this key is kept
        # and recorded with its own checksum, never clobbered; same seed, same pixels on one
        # machine, but another GPU may round differently.
        data = png_bytes(pixels, b.text[i] if b.text else None)
        digest, _created = storage.put_bytes_once(key, data, content_type="image/png")
        return dict(row=row, index=index, seed=seed, key=key, width=pixels.shape[1], height=pixels.shape[0],
                    sha256=digest)

    records = list(pool.map(put, range(len(b.meta))))

    def record():
        with session_scope(settings) as s:  # fenced by the attempt (a piece's: jobstate sends them to its job)
            jobstate.record_outputs(s, b.fence_id, b.attempt, records)
            event = progress_events is None or progress_events.due(b.job_id, force=b.made >= b.total)
            jobstate.set_progress(s, b.fence_id, b.attempt, b.made / b.total,
                                  {"images_done": b.made, "images_total": b.total}, event=event)

    _fenced(b, record)


def _fenced(b: Batch, record) -> None:
    """``record()``; a fenced-off run raises for the run's own job, and is logged for a packed one."""
    try:
        record()
    except jobstate.LeaseLost:
        if b.lead:
            raise  # the run's own job: the run stops
        # A packed job was taken over (or canceled and finished): its writes are refused, and the
        # run goes on for the others; its own next check ends it.
        log.warning("job %s: packed job fenced off; its outputs were not recorded", b.job_id)


def _writer_main(batches, results, parent_pid: int) -> None:
    """Entry point of the writer process: batches in, one (seq, error) answer out per batch."""
    from shared.logctx import job_context

    start_child("outputs", parent_pid)
    inbox: queue.Queue = queue.Queue()

    def read():  # take batches off the pipe at once, so the sender never blocks on a full pipe
        while True:
            try:
                inbox.put(batches.recv())
            except (EOFError, OSError):
                inbox.put(None)
                return

    threading.Thread(target=read, name="outputs-reader", daemon=True).start()
    pool = ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="ldmq-upload")
    settings_by_json: dict[str, tuple[Settings, jobstate.ProgressEvents]] = {}
    spools = ShardSpools()
    while (msg := inbox.get()) is not None:
        seq, b = msg
        if isinstance(b, Forget):
            for job_id in b.job_ids:
                spools.drop(job_id)
            continue  # nobody waits for its answer
        found = settings_by_json.get(b.settings_json)
        error = None
        try:
            if found is None:
                if len(settings_by_json) > 16:  # one per worker in practice; tests vary them
                    settings_by_json.clear()
                settings = Settings.model_validate_json(b.settings_json)
                found = settings_by_json[b.settings_json] = (settings, jobstate.ProgressEvents(settings.progress_event_min_s))
                tune_engine(settings)
            with job_context(b.job_id, b.tenant_id):
                write_batch(found[0], pool, b, spools, found[1])
        except Exception as exc:
            kind = error_kind(exc)
            if kind == "internal":
                log.exception("job %s: writing outputs failed", b.job_id)
            # The full text for the executor's log, and what a tenant may read (a storage error's
            # ``public``) so the job's error is the same as if the work had been done in-process.
            error = (kind, f"{type(exc).__name__}: {exc}" if kind == "internal" else str(exc),
                     getattr(exc, "public", None))
        try:
            results.send((seq, error))
        except (EOFError, OSError):
            break
    pool.shutdown(wait=True)


# ================================================================================================
# The executor's side
# ================================================================================================

class _Process:
    """The writer process and its two pipes; answers for batches nobody waits for are dropped."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        batch_reader, self.batches = ctx.Pipe(duplex=False)
        self.results, result_writer = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_writer_main, name="ldmq-outputs", daemon=True,
                                args=(batch_reader, result_writer, os.getpid()))
        self.proc.start()
        batch_reader.close()
        result_writer.close()
        self.seq = 0
        self.answers: dict[int, tuple | None] = {}
        self.forgotten: set[int] = set()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def send(self, batch: Batch) -> int:
        self.seq += 1
        try:
            self.batches.send((self.seq, batch))
        except (BrokenPipeError, EOFError, OSError) as exc:
            raise self._died() from exc
        return self.seq

    def wait(self, seq: int) -> tuple | None:
        """The answer for batch ``seq``: None, or (kind, message, public text) of its failure."""
        while seq not in self.answers:
            try:
                got, error = self.results.recv()
            except (EOFError, OSError) as exc:
                raise self._died() from exc
            if got in self.forgotten:
                self.forgotten.discard(got)
            else:
                self.answers[got] = error
        return self.answers.pop(seq)

    def forget(self, seqs) -> None:
        self.forgotten.update(seqs)

    def _died(self) -> WorkerProcessDied:
        self.proc.join(timeout=5)
        return WorkerProcessDied(f"the output writer process died (exit code {self.proc.exitcode})")

    def close(self, timeout: float = 30.0) -> None:
        try:
            self.batches.send(None)
        except (BrokenPipeError, EOFError, OSError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        for c in (self.batches, self.results):
            c.close()


_PROCESS: _Process | None = None
_PROCESS_LOCK = threading.Lock()


def _writer_process() -> _Process:
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None or not _PROCESS.alive():
            if _PROCESS is not None:
                log.warning("outputs: the writer process had exited (code %s); starting another",
                            _PROCESS.proc.exitcode)
                _PROCESS.close(timeout=1)
            _PROCESS = _Process()
        return _PROCESS


def close_writer_process() -> None:
    """Stop the writer process once its queued batches are written (at executor exit)."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is not None:
            _PROCESS.close()
            _PROCESS = None


class OutputWriter:
    """A run's handle on the writer process: ``submit`` a batch, ``drain`` at the end, ``close``
    (after an error: answers still due are dropped; the writer finishes those batches, fenced)."""

    def __init__(self, settings: Settings):
        self.settings_json = settings.model_dump_json()
        self.process = _writer_process()
        self.pending: deque[tuple[int, str]] = deque()
        self.sharded: set[str] = set()  # jobs whose images went to shards

    def submit(self, *, job_id: str, attempt: int, tenant_id: str, lead: bool, made: int, total: int,
               meta: list[tuple[int, int, int]], arrays, text: list[dict[str, str]] | None = None,
               shards: list[tuple[int, int]] | None = None, run_id: str = "") -> None:
        """``job_id``: the job the images belong to (their keys); ``run_id``: the row whose
        ``attempt`` fences the writes when it is not the job (a piece of a spread job)."""
        batch = Batch(self.settings_json, job_id, attempt, tenant_id, lead, made, total, meta, to_uint8(arrays), text,
                      shards, "" if run_id == job_id else run_id)
        if shards is not None:
            self.sharded.add(job_id)
        self.pending.append((self.process.send(batch), job_id))
        while len(self.pending) > MAX_PENDING:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        seq, job_id = self.pending.popleft()
        error = self.process.wait(seq)
        if error is not None:
            raise_kind(*error, job_id=job_id)

    def drain(self) -> None:
        while self.pending:
            self._wait_oldest()

    def close(self) -> None:
        self.process.forget(seq for seq, _ in self.pending)
        self.pending.clear()
        if self.sharded:  # after the batches still queued: shards a stopped run left unfinished go
            try:
                self.process.send(Forget(tuple(sorted(self.sharded))))
            except WorkerProcessDied:
                pass  # and its spools with it
            self.sharded.clear()
