"""Names that the API validates and the worker acts on, each listed once.

The API checks requests against these without importing the worker (or torch); the worker's
scheduler factory (``worker.model.schedulers``) and dataset loader (``worker.model.data``) build
exactly these, and refuse any other name listing the valid ones.
"""

from __future__ import annotations

from typing import Literal, get_args

# Samplers of a latent diffusion model: DDPM is the seed's Algorithm 2 (ancestral sampling, 1000
# steps by default); DDIM and DPM-Solver++ reach the same quality in 20-50 steps.
SchedulerName = Literal["ddpm", "ddim", "dpm-solver++"]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
DEFAULT_SCHEDULER: SchedulerName = "dpm-solver++"

# Datasets that ship with the worker (no upload): scikit-learn's 1,797 handwritten 8×8 digits.
BUILTIN_DATASETS: tuple[str, ...] = ("builtin:digits",)

# Job priority (spec 1.1 "Scheduling"): within one tenant higher runs first, FIFO among equals.
PRIORITY_MIN, PRIORITY_MAX = -10, 10
PRIORITY_HELP = f"{PRIORITY_MIN}..{PRIORITY_MAX}: within the tenant, higher runs first (FIFO among equals)"

# Aging (spec 1.1 "Scheduling"): seconds of waiting worth one priority level (LDMQ_SCHED_AGING_S).
# 300 s: a priority-10 job is ahead of a priority-0 job submitted up to 50 minutes before it, and
# no job waits behind later work for longer than that.
SCHED_AGING_S_DEFAULT = 300.0
