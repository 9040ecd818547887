"""``ldmq demo``: the main job on embedded defaults, with no server to install.

It runs the same code path as production: the REST app (in-process, over ASGI HTTP), SQLite as the
database, a local folder as object storage, Celery over a file-system transport, and a real
``ldmq worker`` process. It trains on ``builtin:digits`` with the defaults a user gets from
``{"dataset": "builtin:digits"}``, then generates a batch from a CSV of prompts, and writes a
contact sheet.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Guidance 2 is where the digits model keeps both accuracy and variety (see shared/train_schema.py).
DEMO_GUIDANCE = 2.0
QUICK_TRAIN = {"steps": 60, "autoencoder_steps": 40, "checkpoint_every": 50, "eval_num_samples": 20,
               "vlb_timesteps": 4}


def _follow(client, headers, job_id: str, label: str, timeout_s: float) -> dict:
    """Print progress until the job is final (polls the API like any client would)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        d = job.get("progress_detail") or {}
        line = f"{label}: {job['status']:9s} {100 * job['progress']:5.1f}%"
        if "stage" in d:
            line += f"  {d['stage']} step {d.get('step')}/{d.get('total_steps')}"
        if d.get("loss") is not None:
            line += f"  loss {d['loss']:.4f}"
        if d.get("eta_s") is not None:
            line += f"  eta {d['eta_s']:.0f}s"
        if "images_done" in d:
            line += f"  images {d['images_done']}/{d['images_total']}"
        if line != last:
            print(line, flush=True)
            last = line
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label} did not finish in {timeout_s:.0f}s")
        time.sleep(1.0)


def contact_sheet(images: list[list[bytes]], out: Path, *, labels: list[str] | None = None, scale: int = 3,
                  gap: int = 4, label_width: int = 64) -> Path:
    """One row per prompt, images enlarged ``scale``× (nearest neighbour: pixels stay pixels) with
    ``gap`` white pixels between them, each row labelled on its left."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [[Image.open(io.BytesIO(b)).convert("RGB") for b in r] for r in images]
    w, h = rows[0][0].size
    tw, th = w * scale, h * scale
    cols = max(len(r) for r in rows)
    left = label_width if labels else 0
    sheet = Image.new("RGB", (left + gap + cols * (tw + gap), gap + len(rows) * (th + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for y, r in enumerate(rows):
        top = gap + y * (th + gap)
        if labels:
            draw.text((gap, top + th // 2), labels[y], fill=(40, 40, 40), font=font, anchor="lm")
        for x, img in enumerate(r):
            sheet.paste(img.resize((tw, th), Image.NEAREST), (left + gap + x * (tw + gap), top))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def run_demo(quick: bool = False, images_per_digit: int = 4) -> int:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from migrations import upgrade
    from shared.db import session_scope
    from shared.security import create_key
    from shared.settings import get_settings

    settings = get_settings()
    print(f"ldmq demo: database {settings.effective_database_url}\n"
          f"           storage  {settings.effective_storage_url}\n"
          f"           broker   {settings.effective_broker_url}", flush=True)
    upgrade(settings.effective_database_url)
    with session_scope(settings) as s:
        key = create_key(s, "demo")
    headers = {"Authorization": f"Bearer {key}"}

    log_path = settings.var_dir / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LDMQ_VAR_DIR": str(settings.var_dir)}
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "ldmq.cli", "worker", "--queues", "train,sample"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"started a worker (pid {worker.pid}; log {log_path})", flush=True)
    try:
        with TestClient(create_app(settings)) as client:
            body = {"dataset": "builtin:digits", **(QUICK_TRAIN if quick else {})}
            r = client.post("/v1/jobs/train", headers=headers, json=body)
            r.raise_for_status()
            t0 = time.monotonic()
            job = _follow(client, headers, r.json()["id"], "train", timeout_s=3600)
            if job["status"] != "succeeded":
                print(f"training {job['status']}: {job['error']}", file=sys.stderr)
                return 1
            model = client.get(f"/v1/models/{job['model_id']}", headers=headers).json()
            print(f"trained model {model['id']} in {time.monotonic() - t0:.0f}s -> {model['uri']}")
            for name in ("accuracy", "frechet", "frechet_floor", "bits_per_dim"):
                if name in model["metrics"]:
                    print(f"  {name}: {model['metrics'][name]}")

            csv_text = "prompt,seed,num_images\n" + "".join(
                f"a handwritten digit {w},{100 * i},{images_per_digit}\n" for i, w in enumerate(DIGITS))
            r = client.post("/v1/jobs/sample/csv", headers=headers,
                            files={"file": ("digits.csv", csv_text.encode(), "text/csv")},
                            data={"model": model["id"], "guidance_scale": str(DEMO_GUIDANCE)})
            r.raise_for_status()
            job = _follow(client, headers, r.json()["id"], "sample", timeout_s=1800)
            if job["status"] != "succeeded":
                print(f"sampling {job['status']}: {job['error']}", file=sys.stderr)
                return 1
            outs = client.get(f"/v1/jobs/{job['id']}/outputs", headers=headers).json()
            grid: list[list[bytes]] = [[] for _ in DIGITS]
            for o in outs["items"]:
                grid[o["row"] - 1].append(_fetch(o["url"]))
            sheet = contact_sheet(grid, settings.var_dir / "demo" / "contact_sheet.png", labels=DIGITS)
            first = urlparse(outs["items"][0]["url"]).path
            print(f"\n{len(outs['items'])} images under {Path(first).parent.parent}")
            print(f"manifest:      {urlparse(outs['manifest_url']).path if outs['manifest_url'] else '-'}")
            print(f"contact sheet: {sheet}  (each row labelled with its digit)")
        return 0
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()


def _fetch(url: str) -> bytes:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path).read_bytes()
    import httpx

    return httpx.get(url, timeout=30).content
