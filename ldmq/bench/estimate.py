"""``ldmq bench estimate``: how far the dry-run estimates are from what the digits demo really takes.

It runs the ``ldmq demo --quick`` path on embedded defaults (SQLite, a local object folder, the REST
app in-process) with the worker's runtime in-process (``worker.runtime.run.run_job``: the same
``run_train`` / ``run_sample`` a Celery worker runs, recording the same step timings): for each round
it asks the API's dry run for an estimate (``POST /v1/jobs/train?dry_run=true``, then
``POST /v1/jobs/sample?dry_run=true`` on the first model trained), runs the job, and prints estimate,
actual wall time of the run and the relative error (estimate − actual) / actual. Round 1 starts with
no measurements (the ``default`` source); later rounds train the same architecture again (another
seed) and sample from that model again, so their estimates come from the timings the earlier
rounds recorded (``measured``; sampling figures are kept per model). ``--var-dir`` continues a
previous invocation's state. The actual time includes what estimates leave out on purpose (fetching
the data, loading the pipeline, registering the model, writing PNGs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldmq bench estimate", description=__doc__.split("\n\n")[0],
                                epilog="example:\n  ldmq bench estimate --rounds 2 --json est.json",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="train + sample rounds (the first has no measurements)")
    p.add_argument("--images-per-digit", type=int, default=4, help="images per digit prompt (10 prompts)")
    p.add_argument("--var-dir", type=Path, default=None, help="state folder (default: a fresh temporary one)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def _row(kind: str, rnd: int, est: dict, source: str, actual: float) -> dict:
    e = est["estimated_gpu_seconds"]
    return {"job": kind, "round": rnd, "source": source, "estimate_s": round(e, 2), "actual_s": round(actual, 2),
            "error": round((e - actual) / actual, 3)}


def _run(settings, job_id: str, job_type: str) -> float:
    from worker.jobs.sample import run_sample
    from worker.jobs.train import run_train
    from worker.runtime.run import run_job

    work = {"train": run_train, "sample": run_sample}[job_type]
    clock = time.perf_counter()
    status = run_job(settings, job_id, job_type, lambda r: work(settings, r))
    if status != "succeeded":
        raise SystemExit(f"{job_type} job {job_id} {status}")
    return time.perf_counter() - clock


def run(args) -> list[dict]:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from ldmq.demo import DEMO_GUIDANCE, DIGITS, QUICK_TRAIN
    from migrations import upgrade
    from shared.db import session_scope
    from shared.security import create_key
    from shared.settings import Settings

    settings = Settings(var_dir=args.var_dir or Path(tempfile.mkdtemp(prefix="ldmq-bench-estimate-")))
    upgrade(settings.effective_database_url)
    with session_scope(settings) as s:
        key = create_key(s, "bench")
    h = {"Authorization": f"Bearer {key}"}
    prompts = [{"prompt": f"a handwritten digit {w}", "seed": 100 * i, "num_images": args.images_per_digit}
               for i, w in enumerate(DIGITS)]
    rows = []
    with TestClient(create_app(settings)) as client:
        for rnd in range(1, args.rounds + 1):
            body = {"dataset": "builtin:digits", **QUICK_TRAIN, "seed": rnd}
            est = client.post("/v1/jobs/train", headers=h, params={"dry_run": "true"}, json=body).json()
            job = client.post("/v1/jobs/train", headers=h, json=body).json()
            rows.append(_row("train", rnd, est, est["source"], _run(settings, job["id"], "train")))
            # Sampling figures are kept per model: sample from the first model trained here (the
            # oldest, with --var-dir a previous invocation's), so later rounds have measurements.
            model_id = client.get("/v1/models", headers=h).json()["items"][-1]["id"]
            sample = {"model": model_id, "prompts": prompts, "guidance_scale": DEMO_GUIDANCE}
            est = client.post("/v1/jobs/sample", headers=h, params={"dry_run": "true"}, json=sample).json()
            job = client.post("/v1/jobs/sample", headers=h, json=sample).json()
            rows.append(_row("sample", rnd, est, est["seconds_per_step_source"], _run(settings, job["id"], "sample")))
            for r in rows[-2:]:
                print(f"round {r['round']} {r['job']:6}  source {r['source']:9}  estimate {r['estimate_s']:7.1f} s  "
                      f"actual {r['actual_s']:7.1f} s  error {100 * r['error']:+6.1f} %", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("LDMQ_LOG_FORMAT", "text")
    rows = run(args)
    print("\njob     round  source     estimate_s  actual_s  error")
    for r in rows:
        print(f"{r['job']:7} {r['round']:5}  {r['source']:9}  {r['estimate_s']:10.1f}  {r['actual_s']:8.1f}  "
              f"{100 * r['error']:+5.1f} %")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
