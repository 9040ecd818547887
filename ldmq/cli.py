"""The ``ldmq`` command line: one entry point for every process of the system."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ldmq.bench import BENCHES
from shared.catalog import SCHEDULERS


def _settings():
    from shared.settings import get_settings

    return get_settings()


def cmd_migrate(args) -> int:
    from migrations import upgrade

    s = _settings()
    upgrade(s.effective_database_url)
    print(f"database at head: {s.effective_database_url.split('@')[-1]}")
    return 0


def cmd_api(args) -> int:
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before anything imports prometheus_client: the workers (spawned by uvicorn, inheriting
        # the environment) share their request metrics through this folder (see api.metrics).
        import atexit
        import shutil
        import tempfile

        path = tempfile.mkdtemp(prefix="ldmq-api-metrics-")
        atexit.register(shutil.rmtree, path, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    import uvicorn

    from shared.logctx import log_format

    # JSON logs: no uvicorn logging config of its own, so its loggers reach the root's JSON handler.
    log_config = None if log_format() == "json" else uvicorn.config.LOGGING_CONFIG
    common = dict(host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                  log_config=log_config)
    if args.workers == 1:
        from api.app import create_app

        uvicorn.run(create_app(_settings()), **common)
    else:  # each worker process builds the app from the environment's settings
        _settings()  # a bad setting fails here, once, not in every worker
        uvicorn.run("api.app:create_app", factory=True, workers=args.workers, **common)
    return 0


def cmd_worker(args) -> int:
    from worker.runtime import multiproc

    try:  # before anything imports prometheus_client: the worker's processes share their samples
        multiproc.prepare()
        from worker.runtime import metrics

        port = metrics.configured_port()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from worker.celery_app import app

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    valid = {"train", "sample"}
    bad = [q for q in queues if q not in valid]
    if bad or not queues:
        print(f"unknown queue(s) {bad or queues}; valid: {', '.join(sorted(valid))}", file=sys.stderr)
        return 2
    argv = ["worker", "-Q", ",".join(queues), "-c", str(args.concurrency), "-l", args.log_level.upper(),
            "--pool", "solo" if args.concurrency == 1 else "threads", "-n", args.name, "--without-gossip",
            "--without-mingle"]
    from shared.logctx import log_format

    if log_format() == "json":
        argv.insert(0, "--quiet")  # no banner: stdout and stderr stay one JSON object a line
    if port is not None:
        metrics.start_server(port)
    app.worker_main(argv)
    return 0


def cmd_sweeper(args) -> int:
    from shared.processes.sweeper import run_forever, sweep_once

    s = _settings()
    if args.once:
        print(sweep_once(s))
        return 0
    run_forever(s, args.interval or s.sweep_interval_s)
    return 0


def cmd_webhooks(args) -> int:
    import json
    import signal
    import threading

    from shared.processes.webhook_sender import WebhookSettings, deliver_once, run_forever

    s, ws = _settings(), WebhookSettings()
    if args.once:
        print(json.dumps(deliver_once(s, ws)))
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_forever(s, ws, stop)
    logging.getLogger("ldmq.webhooks").info("webhooks: stopped")
    return 0


# ---- the REST API from the command line (ldmq.client): jobs, train, datasets, models -------------

def _client(args):
    from ldmq.client import Client

    return Client(args.url, args.key, timeout=args.timeout)


def _print_json(obj) -> None:
    import json

    print(json.dumps(obj, indent=1, default=str))


def _out(args, obj, human=None) -> None:
    """Print ``obj``: one compact JSON document with ``--json`` (for scripts), else ``human()`` when
    given, else indented JSON."""
    import json

    if getattr(args, "json", False):
        print(json.dumps(obj, default=str), flush=True)
    elif human is not None:
        human()
    else:
        _print_json(obj)


def _bar(frac: float, width: int) -> str:
    filled = int(round(max(0.0, min(1.0, frac)) * width))
    return f"[{'#' * filled}{'.' * (width - filled)}]"


class _ProgressBar:
    """A one-line progress bar of a job on stderr (redrawn in place on a terminal, a line per change
    otherwise): images for a sample job, stage, steps and loss for a train job."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last = ""

    def note(self, text: str) -> None:
        """A line of its own (a checkpoint's metrics) above the bar, which is drawn again."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        if self.tty and self.last:
            self.stream.write(self.last)
        self.stream.flush()

    def update(self, job) -> None:
        frac = max(0.0, min(1.0, float(job.progress or 0)))
        detail = job.progress_detail or {}
        extra = ""
        if job.type == "sample" and job.total_items:
            extra = f" {job.outputs_count}/{job.total_items} images"
        elif "step" in detail and "total_steps" in detail:
            extra = f" {detail['stage']}" if detail.get("stage") else ""
            extra += f" step {detail['step']}/{detail['total_steps']}"
            if isinstance(detail.get("loss"), (int, float)):
                extra += f" loss {detail['loss']:.4f}"
        line = f"{job.id[:8]} {_bar(frac, self.width)} {frac * 100:5.1f}% {job.status}{extra}"
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            if job.is_final:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class _BytesBar:
    """Progress of a transfer on stderr: redrawn at most 10 times a second on a terminal, else a
    line per tenth done (an upload reads 64 KiB chunks: thousands of calls)."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.width = label, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_t, self.last_tenth = 0.0, -1

    def __call__(self, done: int, total: int) -> None:
        import time

        frac = done / total if total else 1.0
        tenth, now = int(frac * 10), time.monotonic()
        if self.tty and done < total and now - self.last_t < 0.1:
            return
        if not self.tty and tenth == self.last_tenth:
            return
        self.last_t, self.last_tenth = now, tenth
        line = f"{self.label} {_bar(frac, self.width)} {frac * 100:5.1f}% {done / 2**20:.1f}/{total / 2**20:.1f} MiB"
        self.stream.write(("\r\x1b[K" + line + ("\n" if done >= total else "")) if self.tty else line + "\n")
        self.stream.flush()


def render_follow(snapshots, *, json_lines: bool = False, bar: _ProgressBar | None = None):
    """Show a followed job: every snapshot (an ``ldmq.client.Job``, from polling or from a stream of
    events) as a progress bar on stderr, or with ``json_lines`` as one JSON object a line on
    stdout. Returns the last snapshot (None if there was none)."""
    import json

    bar = None if json_lines else (bar or _ProgressBar())
    last = None
    for job in snapshots:
        last = job
        if json_lines:
            print(json.dumps(job.raw, default=str), flush=True)
        else:
            bar.update(job)
    return last


def _checkpoint_line(job_id: str, data: dict) -> str:
    metrics = data.get("metrics") or {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step")
    return f"{job_id[:8]} checkpoint at step {data.get('step', '?')}" + (f": {shown}" if shown else "")


def _follow(client, job_id: str, args) -> int:
    """Follow the job's event stream (``Client.stream``, resumed by itself if the connection
    drops) to its end: a progress bar on stderr (a train job's step/total and latest loss, a line
    per checkpoint with its evaluation), then the final job as JSON on stdout. With ``--json``:
    each event as one JSON object a line on stdout instead (the last one is ``end``)."""
    import json

    from ldmq.client import Job, apply_event

    bar, state, end = _ProgressBar(), {}, {}
    for ev in client.stream(job_id, timeout=args.follow_timeout):
        if args.json:
            print(json.dumps(ev.to_json(), default=str), flush=True)
        if ev.type == "end":
            end = ev.data
            break
        if args.json:
            continue
        if ev.type == "checkpoint" and not Job.from_json(state).is_final:
            bar.note(_checkpoint_line(job_id, ev.data))
        state = apply_event(state, ev)
        bar.update(Job.from_json(state))
    if end.get("reason") == "deleted":
        print(f"job {job_id} was deleted while it was followed", file=sys.stderr)
        return 1
    job = client.get(job_id)
    if not args.json:
        bar.update(job)
        _print_json(job.raw)
    if job.status != "succeeded" and job.error:
        print(f"job {job.id} {job.status}: {job.error.get('message', job.error)}", file=sys.stderr)
    return 0 if job.status == "succeeded" else 1


def cmd_jobs(args) -> int:
    """Run an API command (``args.jobs_fn``) with a client; errors become exit codes and a message."""
    import httpx

    from ldmq.client import ApiError

    try:
        with _client(args) as c:
            return int(args.jobs_fn(c, args) or 0)
    except ValueError as exc:  # no URL / key, a PNG without ldmq's parameters, a bad --set
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except httpx.TransportError as exc:
        print(f"error: cannot reach the API: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unreadable CSV file, an unwritable download folder
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _jobs_submit(c, args) -> int:
    events = [e for e in (args.webhook_events or "").split(",") if e.strip()] or None
    job = c.submit_csv(args.csv, model=args.model, scheduler=args.scheduler, steps=args.steps,
                       guidance_scale=args.guidance_scale, webhook_url=args.webhook_url, webhook_events=events,
                       idempotency_key=args.idempotency_key, output_format=args.output_format)
    return _submitted(c, job, args)


def _jobs_reproduce(c, args) -> int:
    return _submitted(c, c.reproduce(args.png, idempotency_key=args.idempotency_key), args)


def _submitted(c, job, args) -> int:
    """A job just submitted: followed to its end with --follow, else printed (its id alone last;
    with --json the job alone)."""
    if args.follow:
        print(f"submitted job {job.id}", file=sys.stderr)
        return _follow(c, job.id, args)

    def human():
        _print_json(job.raw)
        print(job.id)

    _out(args, job.raw, human)
    return 0


def _jobs_estimate(c, args) -> int:
    _out(args, c.estimate_csv(args.csv, model=args.model, scheduler=args.scheduler, steps=args.steps,
                              guidance_scale=args.guidance_scale))
    return 0


def _jobs_get(c, args) -> int:
    _out(args, c.get(args.job_id).raw)
    return 0


def _jobs_list(c, args) -> int:
    jobs = c.list(status=args.status, type=args.type, max_items=args.limit)
    if args.json:
        _print_json([job.raw for job in jobs])
        return 0
    # The tenant's usage and quotas first, on stderr: stdout stays one job a line for scripts.
    for line in usage_lines(c.usage()):
        print(line, file=sys.stderr)
    for job in jobs:
        print(f"{job.id}  {job.type:6}  {job.status:9}  {job.progress * 100:5.1f}%  {job.created_at}")
    return 0


def _limit(value, unit: str = "") -> str:
    return "unlimited" if value is None else f"{value:g}{unit}"


def usage_lines(u: dict) -> list[str]:
    """``GET /v1/usage`` for a person: three lines."""
    q = u["quotas"]
    rate = "unlimited" if q["rate_per_s"] is None else f"{q['rate_per_s']:g}/s, burst {q['rate_burst']}"
    return [f"tenant {u['tenant']} · weight {u['weight']:g} · GPU-seconds in the last 24 h: {u['gpu_seconds_24h']:.1f}",
            f"running {u['jobs_running']} job(s) (max {_limit(q['max_running'])}) · queued {u['jobs_queued']} job(s);"
            f" images queued {u['images_queued']} (max {_limit(q['max_queued_images'])})",
            f"request rate: {rate}"]


def _usage(c, args) -> int:
    u = c.usage()
    if args.json:
        _print_json(u)
    else:
        print("\n".join(usage_lines(u)))
    return 0


def _jobs_cancel(c, args) -> int:
    _out(args, c.cancel(args.job_id).raw)
    return 0


def _jobs_follow(c, args) -> int:
    return _follow(c, args.job_id, args)


def _jobs_download(c, args) -> int:
    paths = c.download(args.job_id, args.dir, overwrite=args.overwrite)

    def human():
        print(f"{len(paths)} image(s) in {Path(args.dir).resolve()}", file=sys.stderr)
        for p in paths:
            print(p)

    _out(args, {"job_id": args.job_id, "dir": str(Path(args.dir).resolve()), "files": [str(p) for p in paths]}, human)
    return 0


def _jobs_archive(c, args) -> int:
    path = c.download_archive(args.job_id, args.output)
    print(f"{path.stat().st_size} bytes in {path.resolve()}", file=sys.stderr)
    print(path)
    return 0


ARCHIVE_HELP = (
    "Streams GET /v1/jobs/{id}/archive to FILE: a tar of every output of the job (its PNGs, or its\n"
    "WebDataset shards) and, once it has succeeded, manifest.json and manifest.csv, all under a\n"
    "folder named after the job. Written to FILE.part first and renamed once the tar is whole.\n\n"
    "examples:\n"
    "  ldmq jobs archive 3f2a... -o job.tar\n"
    "  tar -tf job.tar             # 3f2a.../rows/000001/000.png ... 3f2a.../manifest.json")


def _delete(kind: str):
    def run(c, args) -> int:
        {"job": c.delete, "model": c.delete_model, "dataset": c.delete_dataset}[kind](args.id)
        print(f"deleted {kind} {args.id}", file=sys.stderr)
        if args.json:
            _out(args, {"deleted": kind, "id": args.id})
        return 0

    return run


# ---- ldmq train --------------------------------------------------------------------------------

TRAIN_FLAGS = ("dataset", "base_model", "steps", "batch_size", "learning_rate", "seed")


def train_body(args) -> dict:
    """The train request from the command line: the JSON document (inline or a file), then the
    flags, then each ``--set FIELD=VALUE`` (VALUE read as JSON, else as a string). A field the
    train schema does not have is refused here, with the valid ones listed."""
    import json

    from shared.train_schema import TrainParams

    body: dict = {}
    if args.params:
        text = args.params if args.params.lstrip().startswith("{") else Path(args.params).read_text()
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"the train parameters are not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ValueError("the train parameters must be a JSON object")
    for name in TRAIN_FLAGS:
        if getattr(args, name, None) is not None:
            body[name] = getattr(args, name)
    for item in args.set or []:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            body[name.strip()] = json.loads(raw)
        except ValueError:
            body[name.strip()] = raw
    valid = set(TrainParams.model_fields)
    unknown = sorted(set(body) - valid - {"webhook"})
    if unknown:
        raise ValueError(f"unknown train parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if "dataset" not in body:
        raise ValueError("no dataset: pass --dataset ID (or builtin:digits), or \"dataset\" in the JSON")
    events = [e for e in (getattr(args, "webhook_events", None) or "").split(",") if e.strip()]
    if getattr(args, "webhook_url", None):
        body["webhook"] = {"url": args.webhook_url, **({"events": events} if events else {})}
    return body


def _train_submit(c, args) -> int:
    body = train_body(args)
    if args.dry_run:
        _out(args, c.estimate_train(**body))
        return 0
    dataset, webhook = body.pop("dataset"), body.pop("webhook", None)
    return _submitted(c, c.train(dataset, webhook=webhook, idempotency_key=args.idempotency_key, **body), args)


def _train_estimate(c, args) -> int:
    _out(args, c.estimate_train(**train_body(args)))
    return 0


# ---- ldmq datasets / models over the API --------------------------------------------------------

def _datasets_upload(c, args) -> int:
    ds = c.upload_dataset(args.file, name=args.name, progress=None if args.no_progress else _BytesBar(
        f"upload {Path(args.file).name}"))

    def human():
        print(f"dataset {ds['name']!r}: {ds['num_images']} images", file=sys.stderr)
        print(ds["id"])

    _out(args, ds, human)
    return 0


def _images_upload(c, args) -> int:
    img = c.upload_image(args.file)

    def human():
        print(f"image {Path(args.file).name}: {img['width']}x{img['height']} {img.get('format', '')}", file=sys.stderr)
        print(img["id"])

    _out(args, img, human)
    return 0


def _images_get(c, args) -> int:
    _out(args, c.image(args.id))
    return 0


def _datasets_list(c, args) -> int:
    items = c.datasets()

    def human():
        for d in items:
            print(f"{d['id']}  {d['num_images']:7d} images  {d['created_at']}  {d['name']}")

    _out(args, items, human)
    return 0


def _datasets_get(c, args) -> int:
    _out(args, c.dataset(args.id))
    return 0


def _models_list(c, args) -> int:
    items = c.models()

    def human():
        for m in items:
            print(f"{m['id']}  {m['created_at']}  {m['name']}")

    _out(args, items, human)
    return 0


def _models_get(c, args) -> int:
    _out(args, c.model(args.id))
    return 0


def _models_download(c, args) -> int:
    def progress(done: int, total: int, path: str) -> None:
        if not args.json:
            print(f"{args.id[:8]} {_bar(done / total, 30)} {done}/{total} files  {path}", file=sys.stderr)

    paths = c.download_model(args.id, args.output, progress=progress)

    def human():
        print(f"model {args.id}: {len(paths)} file(s) in {Path(args.output).resolve()}, checksums verified",
              file=sys.stderr)
        print(Path(args.output).resolve())

    _out(args, {"model_id": args.id, "dir": str(Path(args.output).resolve()), "files": [str(p) for p in paths]},
         human)
    return 0


# ---- the parsers -----------------------------------------------------------------------------------

def _leaf(sub, name: str, summary: str, examples, *, parents=(), more: str = "") -> argparse.ArgumentParser:
    """A command with ``summary`` as its help and description, and its example(s) at the end of its
    ``--help`` (tests/ldmq/test_cli.py checks that every command has one)."""
    examples = [examples] if isinstance(examples, str) else list(examples)
    epilog = ("example:\n" if len(examples) == 1 else "examples:\n") + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, parents=list(parents), help=summary, description=summary[0].upper() + summary[1:] + ".",
                          epilog=(more + "\n\n" + epilog) if more else epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


DELETE_HELP = {
    "job": ("delete a final job: its record, images, manifest and checkpoints",
            "A queued or running job is refused (409 job_not_final): cancel it first.",
            ["ldmq jobs cancel 3f2a...", "ldmq jobs follow 3f2a...    # until it has ended", "ldmq jobs delete 3f2a..."]),
    "model": ("delete a model and its stored files (over the API)",
              "Refused (409 model_in_use) while a queued or running job samples from it or trains on it,\n"
              "or another model names it as its base_model. Jobs that used it keep their records.",
              "LDMQ_API_URL=http://127.0.0.1:8000 LDMQ_API_KEY=ldmq_... ldmq models delete 9c1e..."),
    "dataset": ("delete a dataset and its archive (over the API)",
                "Refused (409 dataset_in_use) while a queued or running train job uses it.",
                "ldmq datasets delete 51b0... --url http://127.0.0.1:8000 --key ldmq_..."),
}


def _add_delete_parser(sub, kind: str, conn: argparse.ArgumentParser) -> None:
    """``ldmq {jobs,models,datasets} delete ID``: over the REST API, like ``ldmq jobs``."""
    summary, more, examples = DELETE_HELP[kind]
    p = _leaf(sub, "delete", summary, examples, parents=[conn], more=more)
    p.add_argument("id", help=f"the {kind} id")
    p.set_defaults(fn=cmd_jobs, jobs_fn=_delete(kind))


def _conn_parser() -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", help="API base URL (default: $LDMQ_API_URL)")
    conn.add_argument("--key", help="API key (default: $LDMQ_API_KEY)")
    conn.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")
    conn.add_argument("--json", action="store_true",
                      help="print one JSON document on stdout (a followed job: one JSON object a line)")
    return conn


def _follow_parser() -> argparse.ArgumentParser:
    follow = argparse.ArgumentParser(add_help=False)
    follow.add_argument("--follow-timeout", type=float, default=None, help="give up after this many seconds (exit 3)")
    return follow


def _add_jobs_parser(sub) -> None:
    from shared.catalog import OUTPUT_FORMATS

    conn, follow = _conn_parser(), _follow_parser()
    sample = argparse.ArgumentParser(add_help=False)
    sample.add_argument("csv", help="CSV of prompts (header row; prompt required)")
    sample.add_argument("--model", required=True, help="model id")
    sample.add_argument("--scheduler", help=f"one of {', '.join(SCHEDULERS)} (GET /v1/schedulers)")
    sample.add_argument("--steps", type=int)
    sample.add_argument("--guidance-scale", type=float)

    j = sub.add_parser("jobs", help="submit, follow and download jobs over the REST API")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    p = _leaf(jsub, "submit", "upload a CSV as a sample job; prints the job id last",
              "ldmq jobs submit prompts.csv --model 9c1e... --steps 20 --follow", parents=[conn, sample, follow])
    p.add_argument("--webhook-url")
    p.add_argument("--webhook-events", help="comma-separated: started,progress,row_done,checkpoint,succeeded,failed,canceled")
    p.add_argument("--idempotency-key")
    p.add_argument("--follow", action="store_true", help="then follow the job to its end")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS,
                   help="png (default): a PNG per image; webdataset: tar shards of <key>.png + <key>.json")
    p.set_defaults(jobs_fn=_jobs_submit)
    p = _leaf(jsub, "reproduce", "submit again the image a PNG made by ldmq records (its model, prompts, seed, "
              "steps, guidance, sampler, size); prints the job id last",
              "ldmq jobs reproduce ./out/000001-000.png --follow", parents=[conn, follow])
    p.add_argument("png", help="a PNG made by ldmq (it carries its parameters in an 'ldmq' text chunk)")
    p.add_argument("--idempotency-key")
    p.add_argument("--follow", action="store_true", help="then follow the job to its end")
    p.set_defaults(jobs_fn=_jobs_reproduce)
    p = _leaf(jsub, "estimate", "dry run: validate a CSV and estimate its GPU time (measured timings when there are some)",
              "ldmq jobs estimate prompts.csv --model 9c1e... --steps 20 --json", parents=[conn, sample])
    p.set_defaults(jobs_fn=_jobs_estimate)
    p = _leaf(jsub, "get", "print a job", "ldmq jobs get 3f2a... --json", parents=[conn])
    p.add_argument("job_id")
    p.set_defaults(jobs_fn=_jobs_get)
    p = _leaf(jsub, "list", "list jobs, newest first (the tenant's usage and quotas first, on stderr)",
              "ldmq jobs list --status running --type train", parents=[conn])
    p.add_argument("--status")
    p.add_argument("--type")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(jobs_fn=_jobs_list)
    p = _leaf(jsub, "cancel", "cancel a job", "ldmq jobs cancel 3f2a...", parents=[conn])
    p.add_argument("job_id")
    p.set_defaults(jobs_fn=_jobs_cancel)
    p = _leaf(jsub, "follow", "a progress bar until the job ends (exit 0: succeeded)",
              ["ldmq jobs follow 3f2a...", "ldmq jobs follow 3f2a... --json | jq .progress    # one JSON a line"],
              parents=[conn, follow])
    p.add_argument("job_id")
    p.set_defaults(jobs_fn=_jobs_follow)
    p = _leaf(jsub, "download", "download a job's images (checksums verified)", "ldmq jobs download 3f2a... ./out",
              parents=[conn])
    p.add_argument("job_id")
    p.add_argument("dir")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(jobs_fn=_jobs_download)
    p = jsub.add_parser("archive", parents=[conn], help="download every output of a job as one tar (streamed)",
                        description="Download every output of a job as one tar (streamed).", epilog=ARCHIVE_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job_id")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the tar")
    p.set_defaults(jobs_fn=_jobs_archive)
    _add_delete_parser(jsub, "job", conn)
    j.set_defaults(fn=cmd_jobs)


def _train_params_parser() -> argparse.ArgumentParser:
    t = argparse.ArgumentParser(add_help=False)
    t.add_argument("params", nargs="?", help="train parameters as JSON: a file, or inline '{...}' (see shared/train_schema.py)")
    t.add_argument("--dataset", help='a dataset id (ldmq datasets upload) or "builtin:digits"')
    t.add_argument("--base-model", help="a model id to fine-tune (only its U-Net is trained)")
    t.add_argument("--steps", type=int, help="U-Net optimisation steps")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--learning-rate", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any other train parameter (VALUE as JSON: --set unet_channels=[32,64]); repeatable")
    return t


def _add_train_parser(sub) -> None:
    conn, follow, params = _conn_parser(), _follow_parser(), _train_params_parser()
    t = sub.add_parser("train", help="submit and estimate training jobs over the REST API")
    tsub = t.add_subparsers(dest="train_cmd", required=True)
    p = _leaf(tsub, "submit", "submit a train job; prints its id last (--follow: a progress bar of steps and loss)",
              ["ldmq train submit --dataset builtin:digits --steps 1400 --follow",
               "ldmq train submit params.json --set checkpoint_every=200 --dry-run"],
              parents=[conn, params, follow])
    p.add_argument("--webhook-url")
    p.add_argument("--webhook-events", help="comma-separated: started,progress,row_done,checkpoint,succeeded,failed,canceled")
    p.add_argument("--idempotency-key")
    p.add_argument("--follow", action="store_true", help="then follow the job to its end")
    p.add_argument("--dry-run", action="store_true", help="validate and estimate only (as `ldmq train estimate`)")
    p.set_defaults(jobs_fn=_train_submit)
    p = _leaf(tsub, "estimate", "dry run: validate train parameters and estimate the job's GPU time",
              "ldmq train estimate --dataset builtin:digits --steps 500 --json", parents=[conn, params])
    p.set_defaults(jobs_fn=_train_estimate)
    t.set_defaults(fn=cmd_jobs)


def _add_images_parser(sub) -> None:
    conn = _conn_parser()
    im = sub.add_parser("images", help="upload input images (image-to-image, inpainting masks) over the REST API")
    isub = im.add_subparsers(dest="images_cmd", required=True)
    p = _leaf(isub, "upload", "upload an input image (PNG or JPEG): an init image, or a mask (white is redrawn); "
              "prints its id last", ["INIT=$(ldmq images upload ./cat.png | tail -n1)",
                                     "ldmq images upload ./mask.png --json"], parents=[conn],
              more="Use the id as a prompt's init_image or mask_image (CSV columns init_image, strength, mask_image).")
    p.add_argument("file")
    p.set_defaults(fn=cmd_jobs, jobs_fn=_images_upload)
    p = _leaf(isub, "get", "print an input image's size, format and checksum", "ldmq images get 7d3e...",
              parents=[conn])
    p.add_argument("id")
    p.set_defaults(fn=cmd_jobs, jobs_fn=_images_get)


def _add_datasets_parser(sub) -> None:
    conn = _conn_parser()
    ds = sub.add_parser("datasets", help="upload, list and delete datasets over the REST API")
    dsub = ds.add_subparsers(dest="datasets_cmd", required=True)
    p = _leaf(dsub, "upload", "upload a dataset archive (zip or tar(.gz) with metadata.csv/jsonl), streamed from "
              "disk with a progress bar; prints its id last", "ldmq datasets upload ./digits.zip --name digits",
              parents=[conn])
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(fn=cmd_jobs, jobs_fn=_datasets_upload)
    p = _leaf(dsub, "list", "list the tenant's datasets, newest first", "ldmq datasets list --json", parents=[conn])
    p.set_defaults(fn=cmd_jobs, jobs_fn=_datasets_list)
    p = _leaf(dsub, "get", "print a dataset", "ldmq datasets get 51b0...", parents=[conn])
    p.add_argument("id")
    p.set_defaults(fn=cmd_jobs, jobs_fn=_datasets_get)
    _add_delete_parser(dsub, "dataset", conn)


def _add_models_parser(sub) -> None:
    conn = _conn_parser()
    m = sub.add_parser("models", help="models: import (on the server), list, get, download, delete")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    mi = _leaf(msub, "import", "copy a diffusers-format pipeline directory into storage and register it (needs "
               "the database: run where ldmq's settings are)", "ldmq models import ./my-pipeline --tenant acme --name sd-small")
    mi.add_argument("dir")
    mi.add_argument("--tenant", required=True)
    mi.add_argument("--name")
    mi.add_argument("--json", action="store_true", help="print the model as one JSON document")
    mi.set_defaults(fn=cmd_models_import)
    p = _leaf(msub, "list", "list the tenant's models, newest first", "ldmq models list --json", parents=[conn])
    p.set_defaults(fn=cmd_jobs, jobs_fn=_models_list)
    p = _leaf(msub, "get", "print a model (config, metrics, links to its evaluation)", "ldmq models get 9c1e...",
              parents=[conn])
    p.add_argument("id")
    p.set_defaults(fn=cmd_jobs, jobs_fn=_models_get)
    p = _leaf(msub, "download", "download a model's files (a diffusers pipeline folder), each checked against its "
              "SHA-256 and the whole against the model's content hash", "ldmq models download 9c1e... -o ./model",
              parents=[conn])
    p.add_argument("id")
    p.add_argument("-o", "--output", required=True, help="folder to write the pipeline into")
    p.set_defaults(fn=cmd_jobs, jobs_fn=_models_download)
    _add_delete_parser(msub, "model", conn)


def cmd_keys_create(args) -> int:
    from shared.db import session_scope
    from shared.security import create_key

    with session_scope(_settings()) as s:
        key = create_key(s, args.tenant)
    if args.json:
        _out(args, {"tenant": args.tenant, "key": key})
        return 0
    print(f"created an API key for tenant {args.tenant!r}; it is shown once:")
    print(key)
    return 0


def cmd_keys_revoke(args) -> int:
    from shared.db import session_scope
    from shared.security import revoke_key

    prefix = args.key.split("_")[1] if args.key.startswith("ldmq_") else args.key
    with session_scope(_settings()) as s:
        ok = revoke_key(s, prefix)
    print("revoked" if ok else "no such active key")
    return 0 if ok else 1


# ---- ldmq tenants: the operator's per-tenant settings, straight in the database ---------------------

TENANT_OPTIONS = {"weight": "weight", "max_running": "max_running", "max_queued_images": "max_queued_images",
                  "rate": "rate_per_s", "burst": "rate_burst"}  # argparse dest -> shared.tenants field

TENANTS_EPILOG = """examples:
  ldmq tenants set --tenant acme --weight 2 --max-running 4 --max-queued-images 5000 --rate 20 --burst 40
  ldmq tenants set --tenant acme --rate none        # back to LDMQ_RATE_PER_S (unset: unlimited)
  ldmq tenants set --tenant acme --max-queued-images 0   # accept no new work (queued work still runs)
  ldmq tenants get --tenant acme --json
  ldmq tenants list

A new rate reaches the API within LDMQ_AUTH_CACHE_S (5 s); quotas apply to the next submit;
max_running to the next claim. 'none' (or 'unlimited') clears a setting; --rate 0 does too."""


def _effective_rate(t) -> tuple[float, int] | None:
    from shared.tenants import effective_rate

    return effective_rate(t.rate_per_s, t.rate_burst, _settings())


def _tenant_rows(items) -> list[str]:
    """A table of tenants' settings; a rate that is the deployment's default is marked ``*``."""
    rows = [f"{'tenant':24} {'weight':>7} {'max_running':>11} {'max_queued_images':>17} {'rate/s':>10} {'burst':>6}"]
    for t in items:
        eff = _effective_rate(t)
        rate = _limit(eff[0] if eff else None) + ("*" if eff and t.rate_per_s is None else "")
        rows.append(f"{t.name[:24]:24} {t.weight:>7g} {_limit(t.max_running):>11} {_limit(t.max_queued_images):>17} "
                    f"{rate:>10} {_limit(eff[1] if eff else None):>6}")
    if any(t.rate_per_s is None for t in items) and _settings().rate_per_s is not None:
        rows.append("* the deployment's default (LDMQ_RATE_PER_S)")
    return rows


def cmd_tenants(args) -> int:
    from shared.db import session_scope
    from shared.registry import TenantNotFound
    from shared.tenants import (InvalidTenantSettings, get_tenant_settings, list_tenant_settings, parse_values,
                                set_tenant_settings)

    try:
        with session_scope(_settings()) as session:
            if args.tenants_cmd == "list":
                items = list_tenant_settings(session)
            elif args.tenants_cmd == "get":
                items = [get_tenant_settings(session, args.tenant)]
            else:
                changes = parse_values({field: getattr(args, dest) for dest, field in TENANT_OPTIONS.items()
                                        if getattr(args, dest) is not None})
                if not changes:
                    print(f"error: nothing to set; give one or more of {', '.join('--' + d.replace('_', '-') for d in TENANT_OPTIONS)}",
                          file=sys.stderr)
                    return 2
                items = [set_tenant_settings(session, args.tenant, changes)]
    except TenantNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except InvalidTenantSettings as exc:
        print("error: invalid tenant settings:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if args.json:
        out = [{**t.as_dict(), "effective_rate": dict(zip(("rate_per_s", "rate_burst"), eff)) if eff else None}
               for t in items for eff in [_effective_rate(t)]]
        _print_json(out if args.tenants_cmd == "list" else out[0])
    else:
        print("\n".join(_tenant_rows(items)))
    return 0


def _add_tenants_parser(sub) -> None:
    t = sub.add_parser("tenants", help="per-tenant weight, quotas and request rate (operator; the database directly)",
                       description="Per-tenant scheduling settings, read and written in the database directly "
                                   "(like `ldmq keys`).", epilog=TENANTS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    tsub = t.add_subparsers(dest="tenants_cmd", required=True)
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON")
    ps = tsub.add_parser("set", parents=[out], help="change a tenant's settings (prints them)", epilog=TENANTS_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ps.add_argument("--tenant", required=True, help="the tenant's name (as in `ldmq keys create --tenant`)")
    ps.add_argument("--weight", help="share of the workers under fair share, > 0 (default 1)")
    ps.add_argument("--max-running", help="jobs running at once, >= 0, or none")
    ps.add_argument("--max-queued-images", help="images queued or in progress (a train job counts 1), >= 0, or none")
    ps.add_argument("--rate", help="requests per second to /v1, > 0; 0 or none: the deployment's LDMQ_RATE_PER_S")
    ps.add_argument("--burst", help="requests at once before the rate applies, >= 1, or none (one second's worth)")
    pg = tsub.add_parser("get", parents=[out], help="print a tenant's settings", epilog=TENANTS_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pg.add_argument("--tenant", required=True)
    tsub.add_parser("list", parents=[out], help="every tenant's settings", epilog=TENANTS_EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    t.set_defaults(fn=cmd_tenants)


def cmd_models_import(args) -> int:
    from shared.db import session_scope
    from shared.pipelines import PipelineRejected
    from shared.registry import TenantNotFound, register_pipeline_dir, tenant_by_name
    from shared.storage import get_storage

    s = _settings()
    try:
        with session_scope(s) as session:
            tenant = tenant_by_name(session, args.tenant)
            model = register_pipeline_dir(session, get_storage(s), tenant.id, Path(args.dir),
                                          name=args.name or Path(args.dir).resolve().name,
                                          extra_config={"source": str(Path(args.dir).resolve())})
    except (TenantNotFound, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineRejected as exc:
        print("error: the directory is not an acceptable pipeline:", file=sys.stderr)
        for p in exc.problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    if args.json:
        _out(args, {"id": model.id, "name": model.name, "uri": model.uri, "sha256": model.config.get("sha256")})
        return 0
    print(f"imported {args.dir} as model {model.name!r} at {model.uri}")
    print(model.id)
    return 0


def cmd_demo(args) -> int:
    from ldmq.demo import run_demo

    return run_demo(quick=args.quick, images_per_digit=args.images_per_digit)


def cmd_bench(args) -> int:
    from ldmq.bench import main as bench_main

    return bench_main(args.what, args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldmq", description="ldmq: a job-queue backend for latent diffusion.",
                                epilog="example:\n  ldmq jobs submit prompts.csv --model 9c1e... --follow",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    _leaf(sub, "migrate", "upgrade the database to the latest schema",
          "LDMQ_DATABASE_URL=postgresql+psycopg://ldmq@db/ldmq ldmq migrate").set_defaults(fn=cmd_migrate)

    a = _leaf(sub, "api", "serve the REST API", "ldmq api --host 0.0.0.0 --port 8000 --workers 2")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--log-level", default="info")
    a.add_argument("--no-access-log", dest="access_log", action="store_false")
    a.add_argument("--workers", type=int, default=int(os.environ.get("LDMQ_API_WORKERS", "1")),
                   help="API processes (uvicorn workers; one per core is typical; env LDMQ_API_WORKERS)")
    a.set_defaults(fn=cmd_api)

    w = _leaf(sub, "worker", "run a Celery worker", "ldmq worker --queues sample,train --concurrency 1")
    w.add_argument("--queues", default="sample,train")
    w.add_argument("--concurrency", type=int, default=1, help=(
        "jobs run at once, each in its own executor process (N > 1: Celery's thread pool, whose "
        "threads only supervise)"))
    w.add_argument("--log-level", default="info")
    w.add_argument("--name", default="ldmq@%h")
    w.set_defaults(fn=cmd_worker)

    sw = _leaf(sub, "sweeper", "re-enqueue lost jobs, fail poison jobs, apply LDMQ_RETENTION_DAYS (runs forever)",
               ["ldmq sweeper", "ldmq sweeper --once --json"])
    sw.add_argument("--interval", type=float, default=None)
    sw.add_argument("--once", action="store_true")
    sw.add_argument("--json", action="store_true", help="with --once: its counts as one JSON document")
    sw.set_defaults(fn=cmd_sweeper)

    wh = _leaf(sub, "webhooks", "deliver job events to webhooks (runs forever)", ["ldmq webhooks", "ldmq webhooks --once"])
    wh.add_argument("--once", action="store_true", help="one pass, print its counts (JSON)")
    wh.set_defaults(fn=cmd_webhooks)

    _add_jobs_parser(sub)
    u = _leaf(sub, "usage", "your tenant's usage and quotas (GET /v1/usage)", "ldmq usage --json",
              parents=[_conn_parser()])
    u.set_defaults(fn=cmd_jobs, jobs_fn=_usage)
    _add_tenants_parser(sub)
    _add_train_parser(sub)

    k = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True)
    kc = _leaf(k, "create", "create a key (and its tenant); prints the key on the last line",
               "KEY=$(ldmq keys create --tenant acme | tail -n1)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--json", action="store_true", help='print {"tenant", "key"} as one JSON document')
    kc.set_defaults(fn=cmd_keys_create)
    kr = _leaf(k, "revoke", "revoke a key (the key or its prefix)", "ldmq keys revoke ldmq_1a2b3c...")
    kr.add_argument("key")
    kr.set_defaults(fn=cmd_keys_revoke)

    _add_models_parser(sub)
    _add_datasets_parser(sub)
    _add_images_parser(sub)

    d = _leaf(sub, "demo", "train on builtin:digits, then generate a batch (no servers needed)", "ldmq demo --quick")
    d.add_argument("--quick", action="store_true", help="a short training run (a smoke test, poor images)")
    d.add_argument("--images-per-digit", type=int, default=4)
    d.set_defaults(fn=cmd_demo)

    b = _leaf(sub, "bench", "benchmarks that print figures (each takes its own flags: ldmq bench NAME --help)",
              ["ldmq bench estimate", "ldmq bench sample --prompts 256 --steps 10"])
    b.add_argument("what", choices=list(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from shared.logctx import configure_logging

    try:
        fmt = configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if fmt == "json":
        # Celery sets up logging of its own unless something answers its setup_logging signal;
        # answering keeps the JSON handler (with the job context) on the root logger.
        from celery.signals import setup_logging

        setup_logging.connect(lambda **_: None, weak=False)
    for noisy in ("httpx", "httpx2", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
