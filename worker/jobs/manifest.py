"""A sample job's manifest: every output with its prompt, seed and checksum, as JSON and CSV."""

from __future__ import annotations

import csv
import io
import json

from shared import jobstate
from shared.db import session_scope
from shared.settings import Settings
from shared.storage import get_storage, manifest_key


def _neutralise(cell):
    """CSV injection: a cell starting with = + - @ would be a formula in a spreadsheet."""
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + cell
    return cell


def write_manifest(settings: Settings, tenant_id: str, job_id: str) -> None:
    storage = get_storage(settings)
    with session_scope(settings) as s:
        entries = [{"row": o.row, "index": o.index, "seed": o.seed, "prompt": r.prompt, "negative_prompt": r.negative_prompt,
                    "key": o.key, "width": o.width, "height": o.height, "sha256": o.sha256}
                   for o, r in jobstate.outputs_with_rows(s, job_id)]
    storage.put_bytes(manifest_key(tenant_id, job_id),
                      json.dumps({"job_id": job_id, "outputs": entries}, indent=1).encode(),
                      content_type="application/json")
    buf = io.StringIO()
    fields = ["row", "index", "seed", "prompt", "negative_prompt", "key", "width", "height", "sha256"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for e in entries:
        w.writerow({k: _neutralise(v) for k, v in e.items()})
    storage.put_bytes(manifest_key(tenant_id, job_id).replace(".json", ".csv"), buf.getvalue().encode(),
                      content_type="text/csv")
