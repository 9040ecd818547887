"""A sample job's manifest: every output with its prompt, seed and checksum and how to make it
again (model id and content hash, sampler, steps, guidance, size, dtype, device, versions, and the
init_image, strength and mask_image of an image made from an init image), as JSON and CSV. The run-wide fields (``provenance.run_params``) are those of the run that writes the
manifest; each PNG's own ``ldmq`` text chunk records those of the run that made it.

A WebDataset job (``output_format: webdataset``) lists the same images, each with ``key`` = its
shard's key and ``member`` = its PNG's name in the shard, and (JSON) ``shards``: every shard's key,
SHA-256, size and number of images."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from shared import jobstate
from shared.db import session_scope
from shared.models import Job
from shared.settings import Settings
from shared.storage import get_storage, manifest_key, sample_key
from worker.jobs.provenance import IMAGE_FIELDS, row_image_fields, row_steps_guidance

FIELDS = ["row", "index", "seed", "prompt", "negative_prompt", "key", "width", "height", "sha256",
          "model_id", "model_sha256", "scheduler", "steps", "guidance_scale", *IMAGE_FIELDS, "dtype", "device",
          "versions"]


def _neutralise(cell):
    """CSV injection: a cell starting with = + - @ would be a formula in a spreadsheet."""
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + cell
    return cell


def _csv_row(entry: dict[str, Any]) -> dict[str, Any]:
    """A manifest entry as CSV cells: ``versions`` as one column per package, every cell neutralised."""
    flat = {k: v for k, v in entry.items() if k != "versions"}
    flat.update({f"{name}_version": v for name, v in sorted(entry["versions"].items())})
    return {k: _neutralise(v) for k, v in flat.items()}


def write_manifest(settings: Settings, tenant_id: str, job_id: str, run: dict[str, Any]) -> None:
    storage = get_storage(settings)
    with session_scope(settings) as s:
        params = s.get(Job, job_id).params
        webdataset = params.get("output_format") == "webdataset"
        shards = [{"shard": sh.shard, "key": sh.key, "sha256": sh.sha256, "bytes": sh.bytes, "images": sh.images}
                  for sh in jobstate.shards_of(s, job_id)] if webdataset else []
        entries = []
        for o, r in jobstate.outputs_with_rows(s, job_id):
            steps, guidance = row_steps_guidance(params, r)
            entries.append({"row": o.row, "index": o.index, "seed": o.seed, "prompt": r.prompt,
                            "negative_prompt": r.negative_prompt, "key": o.key, "width": o.width, "height": o.height,
                            "sha256": o.sha256, "model_id": run["model_id"], "model_sha256": run["model_sha256"],
                            "scheduler": run["scheduler"], "steps": steps, "guidance_scale": guidance,
                            "dtype": run["dtype"], "device": run["device"], "versions": run["versions"],
                            **row_image_fields(r)})
            if webdataset:
                entries[-1]["member"] = f"{sample_key(o.row, o.index)}.png"
    body = {"job_id": job_id, "output_format": params.get("output_format", "png"), "outputs": entries}
    if webdataset:
        body["shards"] = shards
    storage.put_bytes(manifest_key(tenant_id, job_id), json.dumps(body, indent=1).encode(),
                      content_type="application/json")
    buf = io.StringIO()
    version_fields = [f"{name}_version" for name in sorted(run["versions"])]
    w = csv.DictWriter(buf, fieldnames=FIELDS[:-1] + version_fields + (["member"] if webdataset else []))
    w.writeheader()
    for e in entries:
        w.writerow(_csv_row(e))
    storage.put_bytes(manifest_key(tenant_id, job_id).replace(".json", ".csv"), buf.getvalue().encode(),
                      content_type="text/csv")
