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


# ---- ldmq jobs: the REST API from the command line (ldmq.client) -----------------------------------

def _client(args):
    from ldmq.client import Client

    return Client(args.url, args.key, timeout=args.timeout)


def _print_json(obj) -> None:
    import json

    print(json.dumps(obj, indent=1, default=str))


class _ProgressBar:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line per change otherwise)."""

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
        filled = int(round(frac * self.width))
        detail = job.progress_detail or {}
        extra = ""
        if job.type == "sample" and job.total_items:
            extra = f" {job.outputs_count}/{job.total_items} images"
        elif "step" in detail and "total_steps" in detail:
            extra = f" step {detail['step']}/{detail['total_steps']}"
            if isinstance(detail.get("loss"), (int, float)):
                extra += f" loss {detail['loss']:.4f}"
        line = f"{job.id[:8]} [{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}% {job.status}{extra}"
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
    import httpx

    from ldmq.client import ApiError

    try:
        with _client(args) as c:
            return int(args.jobs_fn(c, args) or 0)
    except ValueError as exc:  # no URL / key, a PNG without ldmq's parameters
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
    """A job just submitted: followed to its end with --follow, else printed (its id alone last)."""
    if args.follow:
        print(f"submitted job {job.id}", file=sys.stderr)
        return _follow(c, job.id, args)
    _print_json(job.raw)
    print(job.id)
    return 0


def _jobs_estimate(c, args) -> int:
    _print_json(c.estimate_csv(args.csv, model=args.model, scheduler=args.scheduler, steps=args.steps,
                               guidance_scale=args.guidance_scale))
    return 0


def _jobs_get(c, args) -> int:
    _print_json(c.get(args.job_id).raw)
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
    _print_json(c.cancel(args.job_id).raw)
    return 0


def _jobs_follow(c, args) -> int:
    return _follow(c, args.job_id, args)


def _jobs_download(c, args) -> int:
    paths = c.download(args.job_id, args.dir, overwrite=args.overwrite)
    print(f"{len(paths)} image(s) in {Path(args.dir).resolve()}", file=sys.stderr)
    for p in paths:
        print(p)
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
        return 0

    return run


DELETE_HELP = {
    "job": ("delete a final job: its record, images, manifest and checkpoints",
            "A queued or running job is refused (409 job_not_final): cancel it first.\n\n"
            "examples:\n  ldmq jobs cancel 3f2a...\n  ldmq jobs follow 3f2a...    # until it has ended\n  ldmq jobs delete 3f2a..."),
    "model": ("delete a model and its stored files (over the API)",
              "Refused (409 model_in_use) while a queued or running job samples from it or trains on it,\n"
              "or another model names it as its base_model. Jobs that used it keep their records.\n\n"
              "examples:\n  LDMQ_API_URL=http://127.0.0.1:8000 LDMQ_API_KEY=ldmq_... ldmq models delete 9c1e..."),
    "dataset": ("delete a dataset and its archive (over the API)",
                "Refused (409 dataset_in_use) while a queued or running train job uses it.\n\n"
                "examples:\n  ldmq datasets delete 51b0... --url http://127.0.0.1:8000 --key ldmq_..."),
}


def _add_delete_parser(sub, kind: str, conn: argparse.ArgumentParser) -> None:
    """``ldmq {jobs,models,datasets} delete ID``: over the REST API, like ``ldmq jobs``."""
    summary, epilog = DELETE_HELP[kind]
    p = sub.add_parser("delete", parents=[conn], help=summary, description=summary[0].upper() + summary[1:] + ".",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", help=f"the {kind} id")
    p.set_defaults(fn=cmd_jobs, jobs_fn=_delete(kind))


def _conn_parser() -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", help="API base URL (default: $LDMQ_API_URL)")
    conn.add_argument("--key", help="API key (default: $LDMQ_API_KEY)")
    conn.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")
    return conn


def _add_jobs_parser(sub) -> None:
    from shared.catalog import OUTPUT_FORMATS

    conn = _conn_parser()
    follow = argparse.ArgumentParser(add_help=False)
    follow.add_argument("--follow-timeout", type=float, default=None, help="give up after this many seconds (exit 3)")
    follow.add_argument("--json", action="store_true",
                        help="while following: each event of the job's stream as one JSON object a line on stdout "
                             "(no progress bar, no final job)")
    sample = argparse.ArgumentParser(add_help=False)
    sample.add_argument("csv", help="CSV of prompts (header row; prompt required)")
    sample.add_argument("--model", required=True, help="model id")
    sample.add_argument("--scheduler", help=f"one of {', '.join(SCHEDULERS)} (GET /v1/schedulers)")
    sample.add_argument("--steps", type=int)
    sample.add_argument("--guidance-scale", type=float)

    j = sub.add_parser("jobs", help="submit, follow and download jobs over the REST API")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    p = jsub.add_parser("submit", parents=[conn, sample, follow], help="upload a CSV as a sample job; prints the job id last")
    p.add_argument("--webhook-url")
    p.add_argument("--webhook-events", help="comma-separated: started,progress,row_done,checkpoint,succeeded,failed,canceled")
    p.add_argument("--idempotency-key")
    p.add_argument("--follow", action="store_true", help="then follow the job to its end")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS,
                   help="png (default): a PNG per image; webdataset: tar shards of <key>.png + <key>.json")
    p.set_defaults(jobs_fn=_jobs_submit)
    p = jsub.add_parser("reproduce", parents=[conn, follow],
                        help="submit again the image a PNG made by ldmq records (its model, prompts, seed, steps, "
                             "guidance, sampler, size); prints the job id last")
    p.add_argument("png", help="a PNG made by ldmq (it carries its parameters in an 'ldmq' text chunk)")
    p.add_argument("--idempotency-key")
    p.add_argument("--follow", action="store_true", help="then follow the job to its end")
    p.set_defaults(jobs_fn=_jobs_reproduce)
    p = jsub.add_parser("estimate", parents=[conn, sample], help="dry run: validate a CSV and estimate its GPU time")
    p.set_defaults(jobs_fn=_jobs_estimate)
    p = jsub.add_parser("get", parents=[conn], help="print a job")
    p.add_argument("job_id")
    p.set_defaults(jobs_fn=_jobs_get)
    p = jsub.add_parser("list", parents=[conn], help="list jobs, newest first (the tenant's usage and quotas "
                        "first, on stderr)")
    p.add_argument("--status")
    p.add_argument("--type")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="the jobs as one JSON list (no usage lines)")
    p.set_defaults(jobs_fn=_jobs_list)
    p = jsub.add_parser("cancel", parents=[conn], help="cancel a job")
    p.add_argument("job_id")
    p.set_defaults(jobs_fn=_jobs_cancel)
    p = jsub.add_parser("follow", parents=[conn, follow], help="a progress bar until the job ends (exit 0: succeeded)")
    p.add_argument("job_id")
    p.set_defaults(jobs_fn=_jobs_follow)
    p = jsub.add_parser("download", parents=[conn], help="download a job's images (checksums verified)")
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


def cmd_keys_create(args) -> int:
    from shared.db import session_scope
    from shared.security import create_key

    with session_scope(_settings()) as s:
        key = create_key(s, args.tenant)
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
    pg = tsub.add_parser("get", parents=[out], help="print a tenant's settings")
    pg.add_argument("--tenant", required=True)
    tsub.add_parser("list", parents=[out], help="every tenant's settings")
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
    p = argparse.ArgumentParser(prog="ldmq", description="ldmq: a job-queue backend for latent diffusion.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("migrate", help="upgrade the database to the latest schema").set_defaults(fn=cmd_migrate)

    a = sub.add_parser("api", help="serve the REST API")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--log-level", default="info")
    a.add_argument("--no-access-log", dest="access_log", action="store_false")
    a.add_argument("--workers", type=int, default=int(os.environ.get("LDMQ_API_WORKERS", "1")),
                   help="API processes (uvicorn workers; one per core is typical; env LDMQ_API_WORKERS)")
    a.set_defaults(fn=cmd_api)

    w = sub.add_parser("worker", help="run a Celery worker")
    w.add_argument("--queues", default="sample,train")
    w.add_argument("--concurrency", type=int, default=1, help=(
        "jobs run at once, each in its own executor process (N > 1: Celery's thread pool, whose "
        "threads only supervise)"))
    w.add_argument("--log-level", default="info")
    w.add_argument("--name", default="ldmq@%h")
    w.set_defaults(fn=cmd_worker)

    sw = sub.add_parser("sweeper", help="re-enqueue lost jobs, fail poison jobs, apply LDMQ_RETENTION_DAYS (runs forever)")
    sw.add_argument("--interval", type=float, default=None)
    sw.add_argument("--once", action="store_true")
    sw.set_defaults(fn=cmd_sweeper)

    wh = sub.add_parser("webhooks", help="deliver job events to webhooks (runs forever)")
    wh.add_argument("--once", action="store_true", help="one pass, print its counts")
    wh.set_defaults(fn=cmd_webhooks)

    _add_jobs_parser(sub)
    u = sub.add_parser("usage", parents=[_conn_parser()], help="your tenant's usage and quotas (GET /v1/usage)")
    u.add_argument("--json", action="store_true", help="print the JSON answer")
    u.set_defaults(fn=cmd_jobs, jobs_fn=_usage)
    _add_tenants_parser(sub)

    k = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True)
    kc = k.add_parser("create", help="create a key (and its tenant); prints the key on the last line")
    kc.add_argument("--tenant", required=True)
    kc.set_defaults(fn=cmd_keys_create)
    kr = k.add_parser("revoke", help="revoke a key (the key or its prefix)")
    kr.add_argument("key")
    kr.set_defaults(fn=cmd_keys_revoke)

    m = sub.add_parser("models", help="models").add_subparsers(dest="models_cmd", required=True)
    mi = m.add_parser("import", help="copy a diffusers-format pipeline directory into storage and register it")
    mi.add_argument("dir")
    mi.add_argument("--tenant", required=True)
    mi.add_argument("--name")
    mi.set_defaults(fn=cmd_models_import)
    _add_delete_parser(m, "model", _conn_parser())

    ds = sub.add_parser("datasets", help="datasets").add_subparsers(dest="datasets_cmd", required=True)
    _add_delete_parser(ds, "dataset", _conn_parser())

    d = sub.add_parser("demo", help="train on builtin:digits, then generate a batch (no servers needed)")
    d.add_argument("--quick", action="store_true", help="a short training run (a smoke test, poor images)")
    d.add_argument("--images-per-digit", type=int, default=4)
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks that print figures")
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
