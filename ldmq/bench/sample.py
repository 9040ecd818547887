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

``--output-format png|webdataset|both``: what (c)'s job writes; with ``both`` each round runs (c)
once per format (their order alternating between rounds) and the overhead of each over (a) is
printed (the issue's target: webdataset ≤ 5 % over the raw loop, on 1,024 prompts at 10 DDIM
steps: ``ldmq bench sample --prompts 1024 --steps 10 --scheduler ddim --output-format both``).
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

    def run(self, rows, steps: int, guidance: float, scheduler: str, output_format: str = "png") -> dict:
        """(c) one CSV job end to end: seconds from the upload to the client seeing it succeeded,
        and where they went (the server's own timestamps)."""
        from datetime import datetime

        csv = "prompt,seed\n" + "".join(f"{p},{s}\n" for p, s in rows)
        t0 = time.perf_counter()
        r = self.client.post("/v1/jobs/sample/csv", files={"file": ("p.csv", csv.encode(), "text/csv")},
                             data={"model": self.model, "steps": str(steps), "guidance_scale": str(guidance),
                                   "scheduler": scheduler, "output_format": output_format})
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
               n_prompts: int, shard_images: int | None = None) -> Iterator[EndToEnd]:
    """The whole of ldmq on loopback: a real ``ldmq api`` and ``ldmq worker`` (processes), Postgres
    (a fresh database), Celery on Redis and moto's S3 server (in this process)."""
    env = {"LDMQ_S3_ENDPOINT_URL": "", "LDMQ_SAMPLE_BATCH_SIZE": str(batch),
           "LDMQ_CSV_MAX_ROWS": str(max(10_000, n_prompts))}
    if shard_images:
        env["LDMQ_WDS_SHARD_IMAGES"] = str(shard_images)
    with s3_server("bench") as endpoint, Stack(
            workdir, pg_admin=pg_admin, redis_url=redis_url, storage_url="s3://bench/objects",
            env={**env, "LDMQ_S3_ENDPOINT_URL": endpoint}) as stack:
        key, model = stack.tenant_with_model("bench", pipe_dir)
        api = stack.start_api()
        worker = stack.start_worker("sample")
        with stack.client(key, timeout_s=60) as client:
            yield EndToEnd(client, model, api.pid, worker.pid)


def _round(e2e: EndToEnd, pipe, prompts, args, formats: list[str]) -> dict:
    """(a), (a') and (c) once per format, back to back; the figures and ratios of the round."""
    n, steps, guidance, batch = len(prompts), args.steps, args.guidance, args.batch_size
    # CPU seconds too: on a shared machine wall time depends on the neighbours, CPU time much less.
    cpu = time.process_time()
    t_a = bench_raw(pipe, prompts, steps, guidance, batch)
    cpu_a, cpu = time.process_time() - cpu, time.process_time()
    t_a2 = bench_model_loop(pipe, prompts, steps, guidance, batch, args.scheduler)
    cpu_a2 = time.process_time() - cpu
    out = {"a_raw_s": round(t_a, 3), "a_model_loop_s": round(t_a2, 3), "a_raw_cpu_s": round(cpu_a, 2),
           "a_model_loop_cpu_s": round(cpu_a2, 2)}
    line = f"(a) {n / t_a:6.2f} [{cpu_a:.1f} CPU-s]  (a') {n / t_a2:6.2f} [{cpu_a2:.1f} CPU-s]"
    for fmt in formats:
        cpu0 = e2e.cpu_by_role()
        c = e2e.run(prompts, steps, guidance, args.scheduler, fmt)
        cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in e2e.cpu_by_role().items()}
        out.update({f"c_{fmt}_s": round(c["seconds"], 3), f"c_{fmt}_queued_s": round(c["queued_s"], 3),
                    f"c_{fmt}_running_s": round(c["running_s"], 3), f"c_{fmt}_over_a": round(c["seconds"] / t_a, 3),
                    f"c_{fmt}_over_a_model_loop": round(c["seconds"] / t_a2, 3), f"c_{fmt}_cpu_s": cpu})
        line += (f"  (c {fmt}) {n / c['seconds']:6.2f} images/s, c/a {c['seconds'] / t_a:.3f}, "
                 f"queued {c['queued_s']:.2f} s, running {c['running_s']:.2f} s")
    print("  round: " + line)
    for fmt in formats:
        if out[f"c_{fmt}_cpu_s"]:
            # Postgres and Redis may serve other work on a shared machine: left out of the sum.
            own = sum(v for k, v in out[f"c_{fmt}_cpu_s"].items() if k not in ("postgres", "redis"))
            out[f"c_{fmt}_stack_cpu_s"] = round(own, 2)
            print(f"         CPU seconds during (c {fmt}), {own:.1f} without postgres and redis: " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(out[f"c_{fmt}_cpu_s"].items(), key=lambda kv: -kv[1]) if v > 0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ldmq bench sample", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--naive-prompts", type=int, default=128, help="the naive loop runs on this many (images/s is a rate)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (a), (a') and (c) back to back; medians printed")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--scheduler", default="dpm-solver++", choices=["ddpm", "ddim", "dpm-solver++"])
    ap.add_argument("--output-format", default="png", choices=["png", "webdataset", "both"],
                    help="what (c)'s job writes; both: (c) once per format in each round")
    ap.add_argument("--shard-images", type=int, default=None,
                    help="LDMQ_WDS_SHARD_IMAGES for the stack (default: the setting's default)")
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
    formats = ["webdataset", "png"] if args.output_format == "both" else [args.output_format]
    bench_raw(pipe, prompts[:batch], steps, guidance, batch)  # warm-ups
    bench_model_loop(pipe, prompts[:batch], steps, guidance, batch, args.scheduler)
    naive = prompts[: args.naive_prompts]
    t_b = bench_naive(pipe, naive, steps, guidance)
    b_ips = len(naive) / t_b
    print(f"sampling {n} prompts, {steps} steps {args.scheduler}, guidance {guidance:g}, batch {batch}, tiny model, "
          f"CPU; (c) writes {' and '.join(formats)}")
    print(f"  (b) naive batch-1 loop: {b_ips:.2f} images/s (on {len(naive)} prompts)")
    rounds = []
    with end_to_end(pipe_dir, batch, args.pg_admin, args.redis, workdir, n, args.shard_images) as e2e:
        for fmt in formats:  # warm-up: the worker loads and caches the pipeline
            e2e.run(prompts[:1], steps, guidance, args.scheduler, fmt)
        for r in range(args.rounds):
            rounds.append(_round(e2e, pipe, prompts, args, formats if r % 2 == 0 else formats[::-1]))

    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if not k.endswith("_cpu_s")}
    cpu_med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]
               if k.endswith("_cpu_s") and not isinstance(rounds[0][k], dict)}
    ips = {"a_raw": n / med["a_raw_s"], "a_model_loop": n / med["a_model_loop_s"], "b_naive": b_ips,
           **{f"c_{fmt}": n / med[f"c_{fmt}_s"] for fmt in formats}}
    out = {
        "prompts": n, "steps": steps, "batch_size": batch, "scheduler": args.scheduler, "formats": formats,
        "shard_images": args.shard_images, "rounds": rounds, "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        **{f"time_c_{fmt}_over_a": med[f"c_{fmt}_over_a"] for fmt in formats},
        **{f"time_c_{fmt}_over_a_model_loop": med[f"c_{fmt}_over_a_model_loop"] for fmt in formats},
        **{f"throughput_c_{fmt}_over_b": round(ips[f"c_{fmt}"] / b_ips, 2) for fmt in formats},
    }
    print(f"medians of {len(rounds)} rounds:")
    print(f"  (a)  raw pipeline loop   {ips['a_raw']:8.2f} images/s")
    print(f"  (a') ldmq's model loop   {ips['a_model_loop']:8.2f} images/s  (in-process, outputs dropped)")
    print(f"  (b)  naive batch-1 loop  {b_ips:8.2f} images/s")
    for fmt in formats:
        over = out[f"time_c_{fmt}_over_a"]
        per_round = ", ".join(f"{r[f'c_{fmt}_over_a']:.3f}" for r in rounds)
        print(f"  (c)  ldmq end to end, {fmt:10} {ips[f'c_{fmt}']:8.2f} images/s;  time c/a = {over:.3f} "
              f"(overhead {100 * (over - 1):+.1f} %; rounds {per_round});  c/a' = "
              f"{out[f'time_c_{fmt}_over_a_model_loop']:.3f};  throughput c/b = {out[f'throughput_c_{fmt}_over_b']:.2f}x")
    for fmt in formats:
        if f"c_{fmt}_stack_cpu_s" in cpu_med:
            print(f"  CPU seconds (c {fmt}) / (a) = {cpu_med[f'c_{fmt}_stack_cpu_s'] / cpu_med['a_raw_cpu_s']:.3f};  "
                  f"/ (a') = {cpu_med[f'c_{fmt}_stack_cpu_s'] / cpu_med['a_model_loop_cpu_s']:.3f}")
    out["cpu_s_medians"] = cpu_med
    if "webdataset" in formats:
        print(f"  target: webdataset overhead over (a) <= 5 %: "
              f"{'met' if out['time_c_webdataset_over_a'] <= 1.05 else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
