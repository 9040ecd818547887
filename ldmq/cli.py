"""The ``ldmq`` command line: one entry point for every process of the system."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


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
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(_settings()), host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log)
    return 0


def cmd_worker(args) -> int:
    from worker.celery_app import app

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    valid = {"train", "sample"}
    bad = [q for q in queues if q not in valid]
    if bad or not queues:
        print(f"unknown queue(s) {bad or queues}; valid: {', '.join(sorted(valid))}", file=sys.stderr)
        return 2
    argv = ["worker", "-Q", ",".join(queues), "-c", str(args.concurrency), "-l", args.log_level.upper(),
            "--pool", "solo" if args.concurrency == 1 else "prefork", "-n", args.name, "--without-gossip",
            "--without-mingle"]
    app.worker_main(argv)
    return 0


def cmd_sweeper(args) -> int:
    from shared.sweeper import run_forever, sweep_once

    s = _settings()
    if args.once:
        print(sweep_once(s))
        return 0
    run_forever(s, args.interval or s.sweep_interval_s)
    return 0


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
    if args.what == "train":
        from worker.bench_train import main as bench_main
    else:
        from ldmq.bench import main as bench_main
    return bench_main(args.rest) or 0


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
    a.set_defaults(fn=cmd_api)

    w = sub.add_parser("worker", help="run a Celery worker")
    w.add_argument("--queues", default="sample,train")
    w.add_argument("--concurrency", type=int, default=1)
    w.add_argument("--log-level", default="info")
    w.add_argument("--name", default="ldmq@%h")
    w.set_defaults(fn=cmd_worker)

    sw = sub.add_parser("sweeper", help="re-enqueue lost jobs, fail poison jobs (runs forever)")
    sw.add_argument("--interval", type=float, default=None)
    sw.add_argument("--once", action="store_true")
    sw.set_defaults(fn=cmd_sweeper)

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

    d = sub.add_parser("demo", help="train on builtin:digits, then generate a batch (no servers needed)")
    d.add_argument("--quick", action="store_true", help="a short training run (a smoke test, poor images)")
    d.add_argument("--images-per-digit", type=int, default=4)
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks that print figures")
    b.add_argument("what", choices=["train", "sample"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
