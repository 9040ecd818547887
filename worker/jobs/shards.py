"""Which images each WebDataset shard of a sample job holds (``output_format: webdataset``).

Shard ``n`` holds images ``n·S … n·S + S − 1`` of the job in the order the model makes them: by
(steps, guidance), then (row, index), the order ``worker.model.sampling.batches`` cuts its batches
in. ``S`` is the job's ``params["shard_images"]``, fixed when the job was submitted
(``LDMQ_WDS_SHARD_IMAGES``). So:

- every attempt plans the same shards with the same keys: a retry skips the shards recorded (their
  images are in ``job_outputs``, recorded with their shard in one transaction) and rebuilds the
  others whole, and a shard an earlier attempt stored but did not record is found by its key;
- the images of a shard reach the writer one after the other, so the writer holds at most one
  unfinished shard per job (on its disk, not in memory).
"""

from __future__ import annotations

from typing import Any

from worker.jobs.provenance import row_steps_guidance

ShardPlan = dict[tuple[int, int], tuple[int, int]]  # (row, index) -> (shard, images in that shard)


def plan_shards(params: dict[str, Any], rows) -> ShardPlan:
    """The shard of every image of the job, with the number of images its shard holds."""
    size = int(params["shard_images"])
    order = sorted((row_steps_guidance(params, r), r.row, i) for r in rows for i in range(r.num_images))
    total = len(order)
    plan: ShardPlan = {}
    for n, (_, row, index) in enumerate(order):
        shard = n // size
        plan[(row, index)] = (shard, min(size, total - shard * size))
    return plan


def piece_images(plan: ShardPlan, size: int, start: int, end: int) -> set[tuple[int, int]]:
    """The images a piece ``[start, end)`` of a spread WebDataset job makes: the shards from
    ``start / size`` to before ``end / size``, whole (``shared.pieces`` cuts such a job at multiples
    of ``size`` counted in this module's shard order)."""
    return {k for k, (shard, _) in plan.items() if start <= shard * size < end}
