"""``ldmq bench sample``: sampling throughput, printed as figures (not a timed test).

(a) raw:   the pipeline in-process on full batches, nothing else (no PNG, no storage, no DB);
(b) naive: one pipeline call per prompt (the peers' "prompts from file" loop at batch 1);
(c) ldmq:  end to end: CSV over HTTP to a real ``ldmq api`` process, Postgres, Celery on Redis, a
           real ``ldmq worker`` process, PNGs into an S3-protocol server (moto) on loopback.
(a') ldmq's own model loop in-process, outputs dropped (to tell the model loop from the system).
Same tiny model, prompts, steps, guidance and batch size for all. The machines are shared and
noisy, so (a), (a') and (c) run back to back in each of ``--rounds`` rounds and the ratios are
taken within a round; prints images/s, the per-round ratios and their medians, time(c)/time(a)
and throughput(c)/throughput(b).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ldmq.bench.stack import Stack, add_arguments, s3_server, wait_for_job

JOB_TIMEOUT_S = 3600  # one (c) job; a stuck one fails the bench instead of hanging it


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


def bench_model_loop(pipe, prompts, steps, guidance, batch, scheduler) -> float:
    """(a') ldmq's own model loop in-process, outputs dropped: the worker's ``generate`` (fixed padded
    batches, per-image generators, cached text embeddings) on its model streams, as the worker plans
    them for this machine. Tells model-loop differences from the cost of the system around it."""
    from shared.settings import Settings
    from worker.jobs.sample import plan_streams
    from worker.model.sampling import EmbeddingCache, Item, ModelStreams, batches, generate

    items = [Item(i, 0, s, p, "", guidance, steps) for i, (p, s) in enumerate(prompts)]
    emb = EmbeddingCache(pipe, "cpu")
    streams = ModelStreams(pipe, scheduler, *plan_streams(Settings(), "cpu"))
    t0 = time.perf_counter()
    try:
        for _ in streams.imap(lambda view, b: generate(view, b, batch_size=batch, width=32, height=32, device="cpu",
                                                       embeddings=emb), batches(items, batch)):
            pass
        return time.perf_counter() - t0
    finally:
        streams.close()


class EndToEnd:
    """(c): the whole of ldmq on loopback, as :func:`end_to_end` started it."""

    def __init__(self, client, model: str, api_pid: int, worker_pid: int):
        self.client, self.model, self.api_pid, self.worker_pid = client, model, api_pid, worker_pid

    def run(self, rows, steps: int, guidance: float, scheduler: str) -> dict:
        """(c) one CSV job end to end: seconds from the upload to the client seeing it succeeded,
        and where they went (the server's own timestamps)."""
        from datetime import datetime

        csv = "prompt,seed\n" + "".join(f"{p},{s}\n" for p, s in rows)
        t0 = time.perf_counter()
        r = self.client.post("/v1/jobs/sample/csv", files={"file": ("p.csv", csv.encode(), "text/csv")},
                             data={"model": self.model, "steps": str(steps), "guidance_scale": str(guidance),
                                   "scheduler": scheduler})
        r.raise_for_status()
        job = wait_for_job(self.client, r.json(), timeout_s=JOB_TIMEOUT_S,
                           interval_s=0.2)  # a client polling harder would take CPU from the worker it times
        elapsed = time.perf_counter() - t0
        if job["status"] != "succeeded" or job["outputs_count"] != len(rows):
            raise RuntimeError(f"bench job ended {job['status']}: {job.get('error')}")
        at = {k: datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at")}
        return {"seconds": elapsed,
                "queued_s": (at["started_at"] - at["created_at"]).total_seconds(),
                "running_s": (at["finished_at"] - at["started_at"]).total_seconds()}

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds used so far by each part of the stack (Linux /proc; empty elsewhere). The
        bench process itself hosts moto's S3 server and the polling client."""
        clk = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        procs: dict[int, tuple[int, float, str]] = {}
        try:
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return {}
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            procs[pid] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / clk, cmd)
        api, worker = self.api_pid, self.worker_pid
        out: dict[str, float] = {}

        def role(pid: int) -> str | None:
            ppid, _, cmd = procs[pid]
            if pid == os.getpid():
                return "bench (moto S3, client)"
            if pid == api or ppid == api:
                return "api"
            if pid == worker:
                return "worker (Celery)"
            if ppid == worker:
                return "executor (model)"
            if ppid in procs and procs[ppid][0] == worker:
                return "output writer"
            name = os.path.basename(cmd.split(" ")[0]) if cmd else ""
            if name.startswith("postgres"):  # backends name themselves "postgres: ..."
                return "postgres"
            if name.startswith("redis"):
                return "redis"
            return None

        for pid, (_, cpu, _) in procs.items():
            r = role(pid)
            if r:
                out[r] = out.get(r, 0.0) + cpu
        return out


@contextmanager
def end_to_end(pipe_dir: Path, batch: int, pg_admin: str, redis_url: str, workdir: Path,
               n_prompts: int) -> Iterator[EndToEnd]:
    """The whole of ldmq on loopback: a real ``ldmq api`` and ``ldmq worker`` (processes), Postgres
    (a fresh database), Celery on Redis and moto's S3 server (in this process)."""
    with s3_server("bench") as endpoint, Stack(
            workdir, pg_admin=pg_admin, redis_url=redis_url, storage_url="s3://bench/objects",
            env={"LDMQ_S3_ENDPOINT_URL": endpoint, "LDMQ_SAMPLE_BATCH_SIZE": str(batch),
                 "LDMQ_CSV_MAX_ROWS": str(max(10_000, n_prompts))}) as stack:
        key, model = stack.tenant_with_model("bench", pipe_dir)
        api = stack.start_api()
        worker = stack.start_worker("sample")
        with stack.client(key, timeout_s=60) as client:
            yield EndToEnd(client, model, api.pid, worker.pid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ldmq bench sample", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--naive-prompts", type=int, default=128, help="the naive loop runs on this many (images/s is a rate)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (a), (a') and (c) back to back; medians printed")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--scheduler", default="dpm-solver++", choices=["ddpm", "ddim", "dpm-solver++"])
    add_arguments(ap, redis_db=12)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import logging
    import statistics

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from worker.model.pipelines import load_pipeline_dir
    from worker.model.schedulers import make_scheduler
    from worker.model.tiny_pipeline import build_tiny_pipeline

    workdir = Path(tempfile.mkdtemp(prefix="ldmq-bench-"))
    pipe_dir = build_tiny_pipeline(workdir / "tiny")
    pipe = load_pipeline_dir(pipe_dir)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    prompts = _prompts(args.prompts)
    n = len(prompts)
    steps, guidance, batch = args.steps, args.guidance, args.batch_size
    bench_raw(pipe, prompts[:batch], steps, guidance, batch)  # warm-ups
    bench_model_loop(pipe, prompts[:batch], steps, guidance, batch, args.scheduler)
    naive = prompts[: args.naive_prompts]
    t_b = bench_naive(pipe, naive, steps, guidance)
    b_ips = len(naive) / t_b
    print(f"sampling {n} prompts, {steps} steps {args.scheduler}, guidance {guidance:g}, batch {batch}, tiny model, CPU")
    print(f"  (b) naive batch-1 loop: {b_ips:.2f} images/s (on {len(naive)} prompts)")
    rounds = []
    with end_to_end(pipe_dir, batch, args.pg_admin, args.redis, workdir, n) as e2e:
        e2e.run(prompts[:1], steps, guidance, args.scheduler)  # warm-up: the worker loads and caches the pipeline
        for r in range(args.rounds):
            t_a = bench_raw(pipe, prompts, steps, guidance, batch)
            t_a2 = bench_model_loop(pipe, prompts, steps, guidance, batch, args.scheduler)
            cpu0 = e2e.cpu_by_role()
            c = e2e.run(prompts, steps, guidance, args.scheduler)
            cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in e2e.cpu_by_role().items()}
            rounds.append({"a_raw_s": round(t_a, 3), "a_model_loop_s": round(t_a2, 3), "c_ldmq_s": round(c["seconds"], 3),
                           "c_queued_s": round(c["queued_s"], 3), "c_running_s": round(c["running_s"], 3),
                           "c_over_a": round(c["seconds"] / t_a, 3), "c_over_a_model_loop": round(c["seconds"] / t_a2, 3),
                           "c_cpu_s": cpu})
            print(f"  round {r + 1}: (a) {n / t_a:6.2f}  (a') {n / t_a2:6.2f}  (c) {n / c['seconds']:6.2f} images/s;"
                  f"  c/a {c['seconds'] / t_a:.3f}  c/a' {c['seconds'] / t_a2:.3f};  (c) queued {c['queued_s']:.2f} s,"
                  f" running {c['running_s']:.2f} s, seen {c['seconds'] - c['queued_s'] - c['running_s']:.2f} s later")
            if cpu:
                print("           CPU seconds during (c): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                       sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0))

    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "c_cpu_s"}
    ips = {"a_raw": n / med["a_raw_s"], "a_model_loop": n / med["a_model_loop_s"], "b_naive": b_ips,
           "c_ldmq": n / med["c_ldmq_s"]}
    out = {
        "prompts": n, "steps": steps, "batch_size": batch, "scheduler": args.scheduler, "rounds": rounds,
        "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        "time_c_over_a": med["c_over_a"], "time_c_over_a_model_loop": med["c_over_a_model_loop"],
        "throughput_c_over_b": round(ips["c_ldmq"] / b_ips, 2),
    }
    print(f"medians of {len(rounds)} rounds:")
    print(f"  (a)  raw pipeline loop   {ips['a_raw']:8.2f} images/s")
    print(f"  (a') ldmq's model loop   {ips['a_model_loop']:8.2f} images/s  (in-process, outputs dropped)")
    print(f"  (b)  naive batch-1 loop  {b_ips:8.2f} images/s")
    print(f"  (c)  ldmq end to end     {ips['c_ldmq']:8.2f} images/s")
    print(f"  time c/a = {out['time_c_over_a']:.3f}   (bar: <= 1.10);  c/a' = {out['time_c_over_a_model_loop']:.3f}")
    print(f"  throughput c/b = {out['throughput_c_over_b']:.2f}x   (bar: >= 8)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
