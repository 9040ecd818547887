"""A small typed client of the ldmq REST API (``docs/api.md``), on httpx.

    from ldmq.client import Client

    with Client("http://127.0.0.1:8000", key) as c:          # or LDMQ_API_URL / LDMQ_API_KEY
        job = c.submit_csv("prompts.csv", model=model_id, steps=20)
        for state in c.follow(job.id):                       # its event stream; yields on every change
            print(state.status, state.progress)
        for ev in c.stream(job.id):                          # or the events themselves (resumes by itself)
            print(ev.type, ev.data)
        c.download(job.id, "out/")                           # PNGs + manifest, checksums verified
        c.download_archive(job.id, "job.tar")                # or everything as one tar, streamed
        c.reproduce("out/000001-000.png")                    # the same image again, as a new job
        ds = c.upload_dataset("digits.zip")                  # streamed from disk
        trained = c.wait(c.train(ds["id"], steps=500).id)   # a train job's model_id: the model it made
        c.download_model(trained.model_id, "model/")         # each file checked against its SHA-256

Errors from the API raise :class:`ApiError` (status, code, message, details: the error envelope).
Unknown response fields are kept in each object's ``raw`` (the contract only ever adds fields).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
URL_ENV, KEY_ENV = "LDMQ_API_URL", "LDMQ_API_KEY"
PNG_CHUNK = "ldmq"  # the PNG text chunk that holds an image's parameters as JSON (worker.jobs.provenance)


class ApiError(Exception):
    """A 4xx/5xx answer of the API, from its error envelope."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or []
        self.retry_after = retry_after  # seconds, from a 429's or 503's Retry-After header

    def __str__(self) -> str:
        lines = [f"{self.status} {self.code}: {self.message}"]
        for d in self.details:
            where = ", ".join(f"{k}={d[k]}" for k in ("row", "column", "field") if k in d)
            lines.append(f"  - {where + ': ' if where else ''}{d.get('message', d)}")
        return "\n".join(lines)


def _build(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)} - {"raw"}
    return cls(**{k: data.get(k) for k in names}, raw=data)


@dataclass(frozen=True)
class Job:
    id: str
    type: str
    status: str
    progress: float
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: dict[str, Any] | None
    params: dict[str, Any]
    model_id: str | None
    outputs_count: int
    attempts: int
    progress_detail: dict[str, Any] | None = None
    total_items: int | None = None
    webhook: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return _build(cls, data)


@dataclass(frozen=True)
class Output:
    row: int
    prompt: str
    seed: int
    index: int
    key: str
    url: str
    width: int
    height: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Output:
        return _build(cls, data)


@dataclass(frozen=True)
class Outputs:
    items: list[Output]
    manifest_url: str | None
    output_format: str = "png"
    shards: list[dict[str, Any]] = field(default_factory=list)  # webdataset: key, url, sha256, bytes, images


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict[str, Any]
    created_at: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        return _build(cls, data)


@dataclass(frozen=True)
class Events:
    items: list[Event]
    next_after_id: int
    has_more: bool


@dataclass(frozen=True)
class StreamEvent:
    """One message of ``GET /v1/jobs/{id}/stream``. ``type``: ``"job"`` (the job as it is when the
    stream opens; ``data`` is the job's JSON, see :attr:`job`), a job event's type (``started``,
    ``progress``, ``row_done``, ``checkpoint``, ``requeued``, ``succeeded``, ``failed``,
    ``canceled``: ``id`` is its id and ``data`` its data), or ``"end"`` (the last one: the job has
    ended, ``data`` = ``{"reason": "final", "status"}``, or was deleted, ``{"reason": "deleted"}``)."""

    type: str
    id: int | None
    data: dict[str, Any]
    created_at: str | None = None

    @property
    def job(self) -> Job | None:
        return Job.from_json(self.data) if self.type == "job" else None

    def to_json(self) -> dict[str, Any]:
        return {"event": self.type, "id": self.id, "data": self.data, "created_at": self.created_at}


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Server-sent events from a response's lines, as the HTML standard reads them (written here:
    httpx has no SSE reader and the package that adds one is a dependency for 30 lines):
    ("message", {"id", "event", "data", "retry"} as present) per blank-line-ended block,
    ("comment", {"text"}) per ``:`` line (heartbeats: a reader can check its deadline on them)."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if fields:
                yield "message", fields
            fields = {}
            continue
        if line.startswith(":"):
            yield "comment", {"text": line[1:].strip()}
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data" and "data" in fields:
            fields["data"] += "\n" + value
        elif name in ("id", "event", "data", "retry"):
            fields[name] = value


def apply_event(job: dict[str, Any], ev: StreamEvent) -> dict[str, Any]:
    """A job's JSON after one of its stream events (status, attempts, progress): what
    :meth:`Client.follow` and ``ldmq jobs follow`` show between the stream's ``job`` snapshot and
    the job read again once it has ended."""
    if ev.type == "job":
        return dict(ev.data)
    if job.get("status") in FINAL_STATUSES:  # final states never change: what follows is history
        return job
    out = dict(job)
    d = ev.data
    if ev.type == "started":
        out.update(status="running", attempts=d.get("attempt", out.get("attempts")))
    elif ev.type == "requeued":
        out["status"] = "queued"
    elif ev.type == "progress":
        out["progress"] = d.get("progress", out.get("progress"))
        out["progress_detail"] = {k: v for k, v in d.items() if k != "progress"}
        if "images_done" in d:
            out["outputs_count"] = d["images_done"]
    elif ev.type in FINAL_STATUSES:
        out["status"] = ev.type
        if ev.type == "succeeded":
            out["progress"] = 1.0
    return out


def _csv_bytes(csv: str | os.PathLike | bytes) -> tuple[str, bytes]:
    if isinstance(csv, bytes):
        return "prompts.csv", csv
    path = Path(csv)
    return path.name, path.read_bytes()


def _form(**values: Any) -> dict[str, str]:
    out = {}
    for k, v in values.items():
        if v is None:
            continue
        out[k] = ",".join(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def _raise_for(r: httpx.Response) -> None:
    """ApiError from a 4xx/5xx answer's error envelope (its body must have been read)."""
    if r.status_code < 400:
        return
    retry = r.headers.get("retry-after", "")
    retry_after = float(retry) if retry.isdigit() else None
    try:
        err = r.json()["error"]
        raise ApiError(r.status_code, err.get("code", "error"), err.get("message", r.text), err.get("details"),
                       retry_after)
    except (ValueError, KeyError, TypeError):
        raise ApiError(r.status_code, "http_error", r.text[:500] or r.reason_phrase, None, retry_after) from None


class Client:
    """One API endpoint and key. ``http``: an httpx.Client to use instead of a new one (tests pass
    FastAPI's TestClient); the key is sent on every request to the API, never to storage URLs."""

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: float = 30.0,
                 http: httpx.Client | None = None):
        url = url or os.environ.get(URL_ENV)
        key = key or os.environ.get(KEY_ENV)
        if not url and http is None:
            raise ValueError(f"no API URL: pass url= (--url) or set {URL_ENV}")
        if not key:
            raise ValueError(f"no API key: pass key= (--key) or set {KEY_ENV}")
        self.url = (url or str(http.base_url)).rstrip("/")
        self._auth = {"Authorization": f"Bearer {key}"}
        self._own = http is None
        self.http = http or httpx.Client(base_url=self.url, timeout=timeout)
        self._timeout = timeout

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw) -> Any:
        r = self.http.request(method, path, headers={**self._auth, **(headers or {})}, **kw)
        _raise_for(r)
        if r.status_code == 204:
            return None
        return r.json()

    @staticmethod
    def _idem(key: str | None) -> dict[str, str]:
        return {"Idempotency-Key": key} if key else {}

    # -- submit -------------------------------------------------------------------------------
    def submit_csv(self, csv: str | os.PathLike | bytes, *, model: str, scheduler: str | None = None,
                   steps: int | None = None, guidance_scale: float | None = None, webhook_url: str | None = None,
                   webhook_events: Iterable[str] | None = None, idempotency_key: str | None = None,
                   output_format: str | None = None) -> Job:
        """Upload a CSV of prompts (a path or the bytes) as a sample job; ``output_format``: "png"
        (the default) or "webdataset" (tar shards)."""
        name, data = _csv_bytes(csv)
        form = _form(model=model, scheduler=scheduler, steps=steps, guidance_scale=guidance_scale,
                     webhook_url=webhook_url, webhook_events=list(webhook_events) if webhook_events else None,
                     output_format=output_format)
        return Job.from_json(self._request("POST", "/v1/jobs/sample/csv", headers=self._idem(idempotency_key),
                                           files={"file": (name, data, "text/csv")}, data=form))

    def estimate_csv(self, csv: str | os.PathLike | bytes, *, model: str, scheduler: str | None = None,
                     steps: int | None = None, guidance_scale: float | None = None) -> dict[str, Any]:
        """Dry run: validate the CSV, resolve the model, estimate the GPU time; nothing is stored."""
        name, data = _csv_bytes(csv)
        form = _form(model=model, scheduler=scheduler, steps=steps, guidance_scale=guidance_scale)
        return self._request("POST", "/v1/jobs/sample/csv", params={"dry_run": "true"},
                             files={"file": (name, data, "text/csv")}, data=form)

    def submit_sample(self, model: str, prompts: list[dict[str, Any] | str], *, webhook: dict[str, Any] | None = None,
                      idempotency_key: str | None = None, **options: Any) -> Job:
        """A sample job from prompts (strings or ``{"prompt", "seed", "num_images", ...}``);
        ``options``: scheduler, steps, guidance_scale, width, height, max_attempts, output_format."""
        body = self._sample_body(model, prompts, webhook, options)
        return Job.from_json(self._request("POST", "/v1/jobs/sample", json=body, headers=self._idem(idempotency_key)))

    def estimate_sample(self, model: str, prompts: list[dict[str, Any] | str], **options: Any) -> dict[str, Any]:
        body = self._sample_body(model, prompts, None, options)
        return self._request("POST", "/v1/jobs/sample", json=body, params={"dry_run": "true"})

    @staticmethod
    def _sample_body(model, prompts, webhook, options) -> dict[str, Any]:
        body = {"model": model, "prompts": [{"prompt": p} if isinstance(p, str) else p for p in prompts], **options}
        if webhook is not None:
            body["webhook"] = webhook
        return body

    def train(self, dataset: str, *, webhook: dict[str, Any] | None = None, idempotency_key: str | None = None,
              **params: Any) -> Job:
        """A train job on ``dataset`` (a dataset id or "builtin:digits"); ``params``: steps,
        batch_size, learning_rate, seed, base_model, method ("full" or "lora", with lora_rank,
        lora_alpha, lora_target_modules), ... (see the train schema)."""
        body = {"dataset": dataset, **params}
        if webhook is not None:
            body["webhook"] = webhook
        return Job.from_json(self._request("POST", "/v1/jobs/train", json=body, headers=self._idem(idempotency_key)))

    def estimate_train(self, dataset: str, **params: Any) -> dict[str, Any]:
        """Dry run of :meth:`train`: the request checked as a submit would be, and its estimated
        GPU-seconds (each part with its source: measured timings or the default); nothing is stored."""
        return self._request("POST", "/v1/jobs/train", json={"dataset": dataset, **params}, params={"dry_run": "true"})

    # -- datasets -------------------------------------------------------------------------------
    def upload_dataset(self, path: str | os.PathLike, *, name: str | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Upload a dataset archive (zip or tar(.gz) with metadata.csv/jsonl) streamed from disk in
        64 KiB chunks (httpx's multipart reads a file object piecewise): memory stays flat however
        large the file. ``progress(bytes_sent, total_bytes)`` is called as it goes."""
        path = Path(path)
        total = path.stat().st_size
        with open(path, "rb") as f:
            body = _CountingReader(f, total, progress)
            # No write timeout for our own connection: a large file may take long to send.
            extra = {"timeout": httpx.Timeout(self._timeout, write=None)} if self._own else {}
            return self._request("POST", "/v1/datasets", files={"file": (path.name, body, "application/octet-stream")},
                                 data=_form(name=name), **extra)

    def datasets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/datasets")["items"]

    # -- input images (image-to-image, inpainting) ------------------------------------------------
    def upload_image(self, path: str | os.PathLike | bytes) -> dict[str, Any]:
        """Upload an input image (a PNG or JPEG: an init image, or an inpainting mask, white where
        the image is redrawn); returns ``{"id", "width", "height", ...}``. Use the id as a prompt's
        ``init_image`` or ``mask_image`` (with ``strength``)."""
        if isinstance(path, (bytes, bytearray)):
            name, data = "image", bytes(path)
        else:
            name, data = Path(path).name, Path(path).read_bytes()
        return self._request("POST", "/v1/images", files={"file": (name, data, "application/octet-stream")})

    def image(self, image_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/images/{image_id}")

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}")

    # -- models ---------------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models")["items"]

    def model_files(self, model_id: str) -> dict[str, Any]:
        """The model's stored files: ``{"model_id", "sha256" (content hash), "items": [{"path",
        "sha256", "url"}]}``, each URL presigned."""
        return self._request("GET", f"/v1/models/{model_id}/files")

    def download_model(self, model_id: str, dest: str | os.PathLike, *,
                       progress: Callable[[int, int, str], None] | None = None) -> list[Path]:
        """Write the model's files (a diffusers pipeline folder) under ``dest``, each streamed to disk
        and checked against its SHA-256, then the whole against the model's content hash. Files
        already there with the right checksum are kept (a re-run resumes). ``progress(done, total,
        path)`` after each file. Returns the file paths."""
        from shared.paths import path_within
        from shared.storage.base import content_sha256

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        listing = self.model_files(model_id)
        items, paths = listing["items"], []
        for i, item in enumerate(items, start=1):
            path = path_within(dest, item["path"])  # a path from the server never leaves dest
            if not (path.exists() and _file_sha256(path) == item["sha256"]):
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fetch_to(item["url"], path, item["sha256"])
            paths.append(path)
            if progress is not None:
                progress(i, len(items), item["path"])
        want = listing.get("sha256")
        got = content_sha256((item["path"], item["sha256"]) for item in items)
        if want and got != want:
            raise ApiError(502, "checksum_mismatch", f"model {model_id}: its files' content hash is {got}, "
                                                     f"the model's {want}")
        return paths

    def reproduce(self, png: str | os.PathLike | bytes, *, idempotency_key: str | None = None) -> Job:
        """Submit the image a PNG made by ldmq again: a one-image sample job with its model, prompt,
        negative prompt, seed, steps, guidance, sampler and size (read from its ``ldmq`` chunk).
        An image made from an init image (and a mask) names the same input image ids and strength.
        ValueError if the PNG carries no parameters, or if the model's files are no longer those
        that made it (their content hash differs)."""
        p = png_parameters(png)
        stored = (self.model(p["model_id"]).get("config") or {}).get("sha256")
        if stored and stored != p["model_sha256"]:
            raise ValueError(f"model {p['model_id']} is not the one that made this image: its content hash is "
                             f"{stored}, the image's {p['model_sha256']}")
        prompt = {"prompt": p["prompt"], "seed": p["seed"], "num_images": 1}
        if p.get("negative_prompt"):
            prompt["negative_prompt"] = p["negative_prompt"]
        for f in ("init_image", "strength", "mask_image"):  # an image made from input images: the same ones
            if p.get(f) is not None:
                prompt[f] = p[f]
        return self.submit_sample(p["model_id"], [prompt], idempotency_key=idempotency_key, scheduler=p["scheduler"],
                                  steps=p["steps"], guidance_scale=p["guidance_scale"], width=p["width"],
                                  height=p["height"])

    # -- read -----------------------------------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        """The caller's tenant: ``weight``, ``quotas`` (max_running, max_queued_images, rate_per_s,
        rate_burst; None: unlimited), ``jobs_running``, ``jobs_queued``, ``images_queued`` and
        ``gpu_seconds_24h`` (``GET /v1/usage``)."""
        return self._request("GET", "/v1/usage")

    def schedulers(self) -> list[dict[str, str]]:
        """Every sampler name a sample job accepts, each with a one-line description."""
        return self._request("GET", "/v1/schedulers")["items"]

    def model(self, model_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{model_id}")

    def get(self, job_id: str) -> Job:
        return Job.from_json(self._request("GET", f"/v1/jobs/{job_id}"))

    def list_page(self, *, status: str | None = None, type: str | None = None, limit: int = 50,
                  cursor: str | None = None) -> tuple[list[Job], str | None]:
        params = _form(status=status, type=type, limit=limit, cursor=cursor)
        page = self._request("GET", "/v1/jobs", params=params)
        return [Job.from_json(j) for j in page["items"]], page.get("next_cursor")

    def list(self, *, status: str | None = None, type: str | None = None, page_size: int = 50,
             max_items: int | None = None) -> Iterator[Job]:
        """Jobs, newest first, across pages (up to ``max_items``)."""
        cursor, seen = None, 0
        while True:
            jobs, cursor = self.list_page(status=status, type=type, limit=page_size, cursor=cursor)
            for j in jobs:
                if max_items is not None and seen >= max_items:
                    return
                seen += 1
                yield j
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    # -- delete ---------------------------------------------------------------------------------
    def delete(self, job_id: str) -> None:
        """Delete a final job: its record and its stored objects (images, manifest, checkpoints).
        A queued or running job is an ApiError 409 ``job_not_final``: cancel it, wait, then delete."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def delete_model(self, model_id: str) -> None:
        """Delete a model and its stored files; ApiError 409 ``model_in_use`` while a queued or
        running job samples from it or trains on it, or another model names it as its base."""
        self._request("DELETE", f"/v1/models/{model_id}")

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset and its archive; ApiError 409 ``dataset_in_use`` while a queued or
        running train job uses it."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    def outputs(self, job_id: str) -> Outputs:
        body = self._request("GET", f"/v1/jobs/{job_id}/outputs")
        return Outputs([Output.from_json(o) for o in body["items"]], body.get("manifest_url"),
                       body.get("output_format", "png"), body.get("shards") or [])

    def events(self, job_id: str, *, after_id: int = 0, types: Iterable[str] | None = None, limit: int = 100) -> Events:
        params = _form(after_id=after_id, limit=limit, types=list(types) if types else None)
        body = self._request("GET", f"/v1/jobs/{job_id}/events", params=params)
        return Events([Event.from_json(e) for e in body["items"]], body["next_after_id"], body["has_more"])

    def stream(self, job_id: str, last_event_id: int | None = None, *, timeout: float | None = None,
               reconnect_s: float = 60.0) -> Iterator[StreamEvent]:
        """The job's events as they happen (``GET /v1/jobs/{id}/stream``), ending with the
        ``end`` event. A dropped connection (an API restart, the stream's time limit, a 503) is
        reconnected with ``Last-Event-ID``, so every event comes once, in order; the server's
        ``retry`` is waited before each try, doubling up to 5 s, for up to ``reconnect_s``
        without a message, then the error is raised. Another 4xx raises :class:`ApiError` at once.
        ``timeout``: raise TimeoutError once that long has passed (checked at every message,
        heartbeats included: at least every 15 s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last, retry_s = last_event_id, 1.0
        failures, failing_since = 0, 0.0
        while True:
            try:
                for ev in self._stream_once(job_id, last, deadline):
                    failures = 0
                    if isinstance(ev, float):
                        retry_s = ev
                        continue
                    if ev.id is not None:
                        last = ev.id
                    yield ev
                    if ev.type == "end":
                        return
            except (httpx.TransportError, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status != 503:
                    raise
                failing_since = failing_since if failures else time.monotonic()
                failures += 1
                if time.monotonic() - failing_since > reconnect_s:
                    raise
            wait = min(5.0, retry_s * 2 ** max(0, failures - 1))
            if deadline is not None and time.monotonic() + wait > deadline:
                raise TimeoutError(f"job {job_id}: no end of its stream after {timeout}s")
            time.sleep(wait)

    def _stream_once(self, job_id: str, last: int | None, deadline: float | None) -> Iterator[StreamEvent | float]:
        """One connection's events (and the server's ``retry``, in seconds, as a float)."""
        headers = {**self._auth, **({"Last-Event-ID": str(last)} if last is not None else {})}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/stream", headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            for kind, fields in parse_sse(r.iter_lines()):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id}: no end of its stream after the timeout")
                if kind == "comment":
                    continue
                if fields.get("retry", "").isdigit():
                    yield int(fields["retry"]) / 1000
                if "data" not in fields:
                    continue
                data = json.loads(fields["data"])
                if "id" in fields:  # a job event: data is its {"id", "type", "data", "created_at"}
                    yield StreamEvent(data["type"], int(fields["id"]), data.get("data") or {}, data.get("created_at"))
                else:
                    yield StreamEvent(fields.get("event", "message"), None, data)

    def follow(self, job_id: str, *, timeout: float | None = None) -> Iterator[Job]:
        """The job from its stream: yielded first as it is, then whenever its status, progress or
        output count changes, and last as read again once it has ended (its final record).
        ``timeout``: raise TimeoutError after that long."""
        state: dict[str, Any] = {}
        last = None
        for ev in self.stream(job_id, timeout=timeout):
            if ev.type == "end":
                break
            state = apply_event(state, ev)
            job = Job.from_json(state)
            key = (job.status, job.progress, job.outputs_count)
            if key != last:
                last = key
                if not job.is_final:
                    yield job
        yield self.get(job_id)

    def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """Block until the job is final; return it."""
        job = None
        for job in self.follow(job_id, timeout=timeout):
            pass
        assert job is not None
        return job

    # -- download -------------------------------------------------------------------------------
    def download(self, job_id: str, dest: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
        """Write the job's images to ``dest`` as ``<row:06>-<index:03>.png`` (a webdataset job: its
        shards, as ``<shard:06>.tar``), and ``manifest.json`` once the job succeeded. With a
        manifest every image is checked against its SHA-256 (a shard always is, against its own);
        files already there with the right checksum are kept (a re-run resumes). Returns the paths
        of the images (or shards)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        outs = self.outputs(job_id)
        expected: dict[str, str] = {}
        manifest_bytes = None
        if outs.manifest_url:
            manifest_bytes = self._fetch(outs.manifest_url)
            expected = {e["key"]: e["sha256"] for e in json.loads(manifest_bytes)["outputs"]}
        if outs.output_format == "webdataset":
            expected = {s["key"]: s["sha256"] for s in outs.shards}
            files = [(s["key"], s["url"], dest / s["key"].rsplit("/", 1)[1]) for s in outs.shards]
        else:
            files = [(o.key, o.url, dest / f"{o.row:06d}-{o.index:03d}.png") for o in outs.items]
        paths = []
        for key, url, path in files:
            want = expected.get(key)
            if path.exists() and not overwrite and want and hashlib.sha256(path.read_bytes()).hexdigest() == want:
                paths.append(path)
                continue
            data = self._fetch(url)
            if want and hashlib.sha256(data).hexdigest() != want:
                raise ApiError(502, "checksum_mismatch", f"{key}: the downloaded bytes do not match the manifest")
            _write_atomic(path, data)
            paths.append(path)
        if manifest_bytes is not None:
            _write_atomic(dest / "manifest.json", manifest_bytes)
        return paths

    def download_archive(self, job_id: str, path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> Path:
        """Stream ``GET /v1/jobs/{id}/archive`` (every output of the job and its manifest, one tar)
        to ``path``, a chunk at a time (never the whole archive in memory), through a ``.part``
        file renamed into place once the tar has ended: a cut stream leaves no file that looks
        whole (ApiError ``archive_truncated``). Returns the path."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.part")
        with self.http.stream("GET", f"/v1/jobs/{job_id}/archive", headers=self._auth) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            tail = b""
            try:
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes(chunk_bytes):
                        f.write(chunk)
                        tail = (tail + chunk[-1024:])[-1024:]
                if tail != b"\0" * 1024:  # a tar ends with two zero blocks
                    raise ApiError(502, "archive_truncated", f"the archive of job {job_id} ended early")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        os.replace(tmp, path)
        return path

    def _fetch_to(self, url: str, path: Path, sha256: str) -> None:
        """GET a presigned (or file://) URL into ``path`` chunk by chunk (never whole in memory),
        checked against ``sha256`` before it takes the final name."""
        tmp = path.with_name(f".{path.name}.part")
        h = hashlib.sha256()
        parts = urlsplit(url)
        try:
            with open(tmp, "wb") as out:
                if parts.scheme == "file":
                    with open(unquote(parts.path), "rb") as src:
                        for chunk in iter(lambda: src.read(CHUNK), b""):
                            h.update(chunk)
                            out.write(chunk)
                else:
                    with httpx.stream("GET", url, timeout=self._timeout) as r:
                        if r.status_code != 200:
                            raise ApiError(r.status_code, "download_failed",
                                           f"GET {parts.scheme}://{parts.netloc}{parts.path}: {r.status_code}")
                        for chunk in r.iter_bytes(CHUNK):
                            h.update(chunk)
                            out.write(chunk)
            if h.hexdigest() != sha256:
                raise ApiError(502, "checksum_mismatch", f"{path.name}: the downloaded bytes do not match their SHA-256")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _fetch(self, url: str) -> bytes:
        """GET a presigned (or file://) URL, without the API key."""
        parts = urlsplit(url)
        if parts.scheme == "file":
            return Path(unquote(parts.path)).read_bytes()
        with httpx.Client(timeout=self._timeout) as plain:
            r = plain.get(url)
        if r.status_code != 200:
            raise ApiError(r.status_code, "download_failed", f"GET {parts.scheme}://{parts.netloc}{parts.path}: {r.status_code}")
        return r.content


class _CountingReader:
    """A binary file as httpx's multipart reads it (``read``, ``seek``, ``tell``, ``fileno`` for its
    length), calling ``progress(bytes_read, total)`` on every chunk."""

    def __init__(self, f, total: int, progress: Callable[[int, int], None] | None):
        self.f, self.total, self.progress, self.sent = f, total, progress, 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.sent += len(chunk)
        if self.progress is not None and chunk:
            self.progress(self.sent, self.total)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self.f.seek(offset, whence)
        self.sent = pos
        return pos

    def tell(self) -> int:
        return self.f.tell()

    def fileno(self) -> int:
        return self.f.fileno()


CHUNK = 1 << 20


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def png_parameters(png: str | os.PathLike | bytes) -> dict[str, Any]:
    """The parameters a PNG made by ldmq carries (the JSON of its ``ldmq`` text chunk): model id
    and content hash, prompt, negative prompt, seed, steps, guidance scale, scheduler, size, dtype,
    device, versions, and the job, row and index it was made for. ValueError if it has none."""
    from PIL import Image, UnidentifiedImageError

    name = "the image" if isinstance(png, bytes) else str(png)
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            text = dict(getattr(img, "text", {}))
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise ValueError(f"{name} is not a PNG image: {exc}") from None
    if PNG_CHUNK not in text:
        raise ValueError(f"{name} has no {PNG_CHUNK!r} text chunk: it was not made by ldmq, or a tool removed "
                         "its metadata, so it cannot be reproduced")
    try:
        params = json.loads(text[PNG_CHUNK])
        missing = [k for k in ("model_id", "prompt", "seed", "steps", "guidance_scale", "scheduler", "width", "height")
                   if k not in params]
    except (ValueError, TypeError):
        raise ValueError(f"{name}: its {PNG_CHUNK!r} text chunk is not the JSON ldmq writes") from None
    if missing:
        raise ValueError(f"{name}: its {PNG_CHUNK!r} text chunk lacks {', '.join(missing)}")
    return params


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
