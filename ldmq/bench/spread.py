"""``ldmq bench spread``: one big sample job on two one-thread workers against one (spread jobs).

A job of ``--images`` (768) images of the tiny model, split by the API into pieces of
``--piece-images`` (64: 12 pieces), sampled as a bare request is (the service's default steps,
scheduler and guidance: 20 DPM-Solver++ steps at guidance 5; ``--steps``, ``--scheduler`` and
``--guidance-scale`` set them), end to end: a real ``ldmq api``, Postgres (a fresh database),
Celery on Redis, ``ldmq worker`` processes with one model stream of one torch thread each
(``LDMQ_SAMPLE_STREAMS=1``, ``LDMQ_WORKER_THREADS=1``, no co-batching), PNGs into moto's S3 server
in this process, and a ``redis-server`` of its own as the broker (``--redis``: where none is
installed). Each round times the job with one worker, then starts a second worker, warms it
on a small spread job until both workers have run a piece of it (read from the pieces' ``started``
events), times the job with two, and stops the second worker again. Seconds are from the submit
to the client seeing ``succeeded``; the speed-up is one's time over two's within a round (the
machine is shared and noisy), with the median of the rounds. It also prints how many pieces each
worker ran in the two-worker runs.

What bounds the ratio: two one-thread workers need two free cores *besides* what the rest of the
stack uses (the API, Postgres, Redis, the two output-writer processes encoding and uploading PNGs,
moto and the polling client in this process); on a 2-core machine they share the cores with all
of that, so the ratio there says more about the machine than about the spread (docs/benchmarks.md).
At the service's defaults the model is most of an image's cost: 1.67× (median of five rounds) on
the quiet 2-core VM; at 8 DDIM steps without guidance the rest of the stack is as much as the
model, and two workers made 1.24×.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ldmq.bench.stack import Stack, add_arguments, private_redis, s3_server, stop_all, wait_for_job
from shared.catalog import SCHEDULERS
from shared.sampling_defaults import GLOBAL_DEFAULTS

JOB_TIMEOUT_S = 600  # a stuck job fails the bench instead of hanging it


def _body(model: str, n: int, seed0: int, **sampling) -> dict:
    """A job of ``n`` prompts with the request fields ``sampling``; a field left out (steps,
    scheduler, guidance_scale) is the service's default, as for a user's bare request."""
    return {"model": model, **sampling,
            "prompts": [{"prompt": f"a drawing of a digit number {i % 10}", "seed": seed0 + i} for i in range(n)]}


def _run(client, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = client.post("/v1/jobs/sample", json=body)
    r.raise_for_status()
    job = wait_for_job(client, r.json(), interval_s=0.2, timeout_s=JOB_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    if job["status"] != "succeeded" or job["outputs_count"] != len(body["prompts"]):
        raise RuntimeError(f"bench job ended {job['status']}: {job.get('error')}")
    return elapsed, job


def _pieces_by_worker(database_url: str, job_id: str) -> dict[str, int]:
    """Pieces of the job per worker process (the pid in each piece's last ``started`` event)."""
    from sqlalchemy import create_engine, select

    from shared.models import Job, JobEvent

    engine = create_engine(database_url)
    try:
        with engine.connect() as c:
            rows = c.execute(select(JobEvent.job_id, JobEvent.data).join(Job, Job.id == JobEvent.job_id)
                             .where(Job.parent_id == job_id, JobEvent.type == "started")
                             .order_by(JobEvent.id)).all()
    finally:
        engine.dispose()
    last = {piece: data["worker"].split(":")[1] for piece, data in rows}
    out: dict[str, int] = {}
    for pid in last.values():
        out[pid] = out.get(pid, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ldmq bench spread", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--piece-images", type=int, default=64, help="LDMQ_SAMPLE_PIECE_IMAGES for the API")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the service's, as a bare request gets)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="(default: the service's)")
    ap.add_argument("--guidance-scale", type=float, help="(default: the service's)")
    ap.add_argument("--output-format", choices=["png", "webdataset"], default="png",
                    help="webdataset: tar shards of --piece-images images (LDMQ_WDS_SHARD_IMAGES), a piece each")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of one worker then two; the median ratio is printed")
    add_arguments(ap, redis_db=13)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from worker.model.tiny_pipeline import build_tiny_pipeline

    workdir = Path(tempfile.mkdtemp(prefix="ldmq-bench-spread-"))
    pipe_dir = build_tiny_pipeline(workdir / "tiny")
    env = {"LDMQ_SAMPLE_BATCH_SIZE": str(args.batch_size), "LDMQ_SAMPLE_PIECE_IMAGES": str(args.piece_images),
           "LDMQ_SAMPLE_STREAMS": "1", "LDMQ_WORKER_THREADS": "1", "LDMQ_COBATCH_MAX_ITEMS": "0",
           "LDMQ_CSV_MAX_ROWS": str(max(10_000, args.images))}
    pieces = -(-args.images // args.piece_images)
    sampling = {k: v for k, v in (("steps", args.steps), ("scheduler", args.scheduler),
                                  ("guidance_scale", args.guidance_scale)) if v is not None}
    if args.output_format != "png":
        sampling["output_format"] = args.output_format
        env["LDMQ_WDS_SHARD_IMAGES"] = str(args.piece_images)
    used = {**GLOBAL_DEFAULTS, **sampling}
    print(f"one {args.output_format} job of {args.images} images ({pieces} pieces of <= {args.piece_images}), "
          f"{used['steps']} steps "
          f"{used['scheduler']}, guidance {used['guidance_scale']:g}, batch {args.batch_size}, tiny model, CPU; "
          f"workers of one thread each")
    rounds = []
    with private_redis(args.redis) as broker, s3_server("bench") as endpoint, Stack(
            workdir, pg_admin=args.pg_admin, redis_url=broker, storage_url="s3://bench/objects",
            env={**env, "LDMQ_S3_ENDPOINT_URL": endpoint}) as stack:
        stack.flush_broker()
        key, model = stack.tenant_with_model("bench", pipe_dir)
        stack.start_api()
        stack.start_worker("sample")
        db = stack.env["LDMQ_DATABASE_URL"]
        with stack.client(key, timeout_s=60) as client:
            _run(client, _body(model, 2, 0, **sampling))  # the first worker loads the model
            big = _body(model, args.images, 1000, **sampling)
            for r in range(args.rounds):
                one, _ = _run(client, big)
                second = stack.start_worker("sample")
                warm = _body(model, 4 * args.piece_images, 500, **{**sampling, "steps": 1})
                for _ in range(10):  # until the second worker has run a piece (it imports torch first)
                    _, job = _run(client, warm)
                    if len(_pieces_by_worker(db, job["id"])) >= 2:
                        break
                else:
                    raise RuntimeError("the second worker never ran a piece of the warm-up job")
                two, job = _run(client, big)
                split = sorted(_pieces_by_worker(db, job["id"]).values(), reverse=True)
                stop_all([second])
                stack.procs.remove(second)
                rounds.append({"one_worker_s": round(one, 2), "two_workers_s": round(two, 2),
                               "speedup": round(one / two, 3), "pieces_per_worker": split})
                print(f"  round {r + 1}: one worker {one:6.1f} s ({args.images / one:5.1f} images/s), two workers "
                      f"{two:6.1f} s ({args.images / two:5.1f} images/s): {one / two:.2f}x; pieces per worker {split}")
    med = statistics.median(r["speedup"] for r in rounds)
    print(f"median speed-up of two workers over one: {med:.2f}x (target >= 1.5x: {'met' if med >= 1.5 else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "piece_images": args.piece_images, **used,
                                         "batch_size": args.batch_size, "rounds": rounds, "median_speedup": med},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
