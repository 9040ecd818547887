"""``ldmq bench sample``: sampling throughput, printed as figures (not a timed test).

(a) raw:   the pipeline in-process on full batches, nothing else (no PNG, no storage, no DB);
(b) naive: one pipeline call per prompt (the peers' "prompts from file" loop at batch 1);
(c) ldmq:  end to end: CSV over HTTP to a real ``ldmq api`` process, Postgres, Celery on Redis, a
           real ``ldmq worker`` process, PNGs into an S3-protocol server (moto) on loopback.
Same tiny model, prompts, steps, guidance and batch size for all three. Prints images/s and the
ratios time(c)/time(a) and throughput(c)/throughput(b).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 60) -> None:
    """Poll the API's /healthz until it answers (bounded)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.1)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def _prompts(n: int) -> list[tuple[str, int]]:
    subjects = ["cat", "dog", "house", "tree", "car", "boat", "bird", "flower"]
    styles = ["a photo of a", "a drawing of a", "a painting of a", "a sketch of a"]
    return [(f"{styles[i % 4]} {subjects[(i // 4) % 8]} number {i % 64}", i) for i in range(n)]


def bench_raw(pipe, prompts, steps, guidance, batch):
    import torch

    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        with torch.inference_mode():
            pipe(prompt=[p for p, _ in chunk], negative_prompt=[""] * len(chunk), num_inference_steps=steps,
                 guidance_scale=guidance, generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                 output_type="np")
    return time.perf_counter() - t0


def bench_naive(pipe, prompts, steps, guidance):
    import torch

    t0 = time.perf_counter()
    for p, s in prompts:
        with torch.inference_mode():
            pipe(prompt=p, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(s), output_type="pil")
    return time.perf_counter() - t0


def bench_ldmq(pipe_dir: Path, prompts, steps, guidance, batch, scheduler, pg_admin: str, redis_url: str,
               workdir: Path) -> float:
    import boto3
    import httpx
    from moto.server import ThreadedMotoServer
    from sqlalchemy import create_engine, text

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    s3_port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    db = f"ldmq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    procs: list[subprocess.Popen] = []
    try:
        endpoint = f"http://127.0.0.1:{s3_port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        env = {**os.environ, "LDMQ_DATABASE_URL": pg_admin.rsplit("/", 1)[0] + f"/{db}", "LDMQ_BROKER_URL": redis_url,
               "LDMQ_STORAGE_URL": "s3://bench/objects", "LDMQ_S3_ENDPOINT_URL": endpoint,
               "LDMQ_VAR_DIR": str(workdir / "var"), "LDMQ_SAMPLE_BATCH_SIZE": str(batch),
               "LDMQ_CSV_MAX_ROWS": str(max(10_000, len(prompts)))}

        def cli(*args) -> str:
            r = subprocess.run([sys.executable, "-m", "ldmq.cli", *args], env=env, capture_output=True, text=True, check=True)
            return r.stdout.strip().splitlines()[-1]

        cli("migrate")
        key = cli("keys", "create", "--tenant", "bench")
        model = cli("models", "import", str(pipe_dir), "--tenant", "bench")
        port = _free_port()
        log = open(workdir / "bench-procs.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "ldmq.cli", "api", "--port", str(port), "--log-level",
                                       "warning", "--no-access-log"], env=env, stdout=log, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([sys.executable, "-m", "ldmq.cli", "worker", "--queues", "sample",
                                       "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT))
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60)
        wait_healthy(f"http://127.0.0.1:{port}")

        def run(rows) -> float:
            csv = "prompt,seed\n" + "".join(f"{p},{s}\n" for p, s in rows)
            t0 = time.perf_counter()
            r = api.post("/v1/jobs/sample/csv", files={"file": ("p.csv", csv.encode(), "text/csv")},
                         data={"model": model, "steps": str(steps), "guidance_scale": str(guidance), "scheduler": scheduler})
            r.raise_for_status()
            job_id = r.json()["id"]
            while True:
                job = api.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(0.2)  # a client polling harder would take CPU from the worker it times
            elapsed = time.perf_counter() - t0
            if job["status"] != "succeeded" or job["outputs_count"] != len(rows):
                raise RuntimeError(f"bench job ended {job['status']}: {job.get('error')}")
            return elapsed

        run(prompts[:1])  # warm-up: the worker loads and caches the pipeline
        return run(prompts)
    finally:
        stop_all(procs)
        moto.stop()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ldmq bench sample", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--naive-prompts", type=int, default=128, help="the naive loop runs on this many (images/s is a rate)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--scheduler", default="dpm-solver++", choices=["ddpm", "ddim", "dpm-solver++"])
    ap.add_argument("--pg-admin", default=os.environ.get("LDMQ_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--redis", default=os.environ.get("LDMQ_BENCH_REDIS", "redis://127.0.0.1:6379/12"))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from worker.pipelines import load_pipeline_dir, make_scheduler
    from worker.tiny_pipeline import build_tiny_pipeline

    workdir = Path(tempfile.mkdtemp(prefix="ldmq-bench-"))
    pipe_dir = build_tiny_pipeline(workdir / "tiny")
    pipe = load_pipeline_dir(pipe_dir)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    prompts = _prompts(args.prompts)
    bench_raw(pipe, prompts[: args.batch_size], args.steps, args.guidance, args.batch_size)  # warm-up

    t_a = bench_raw(pipe, prompts, args.steps, args.guidance, args.batch_size)
    naive = prompts[: args.naive_prompts]
    t_b = bench_naive(pipe, naive, args.steps, args.guidance)
    del pipe
    t_c = bench_ldmq(pipe_dir, prompts, args.steps, args.guidance, args.batch_size, args.scheduler, args.pg_admin,
                     args.redis, workdir)

    ips = {"a_raw": len(prompts) / t_a, "b_naive": len(naive) / t_b, "c_ldmq": len(prompts) / t_c}
    out = {
        "prompts": len(prompts), "steps": args.steps, "batch_size": args.batch_size, "scheduler": args.scheduler,
        "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        "seconds": {"a_raw": round(t_a, 2), "b_naive_per_image": round(t_b / len(naive), 4), "c_ldmq": round(t_c, 2)},
        "time_c_over_a": round(t_c / t_a, 3),
        "throughput_c_over_b": round(ips["c_ldmq"] / ips["b_naive"], 2),
    }
    print(f"sampling {len(prompts)} prompts, {args.steps} steps {args.scheduler}, batch {args.batch_size}, tiny model, CPU")
    print(f"  (a) raw in-process loop  {ips['a_raw']:8.2f} images/s  ({t_a:.1f} s)")
    print(f"  (b) naive batch-1 loop   {ips['b_naive']:8.2f} images/s  (on {len(naive)} prompts)")
    print(f"  (c) ldmq end to end      {ips['c_ldmq']:8.2f} images/s  ({t_c:.1f} s)")
    print(f"  time c/a = {out['time_c_over_a']:.3f}   (bar: <= 1.10)")
    print(f"  throughput c/b = {out['throughput_c_over_b']:.2f}x   (bar: >= 8)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
