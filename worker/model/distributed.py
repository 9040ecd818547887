"""Training across devices: one train job, N ranks, data-parallel (``DistributedDataParallel``).

The job's process is rank 0: it alone talks to the caller (progress, stop requests, checkpoints,
evaluation, the exported model). :func:`launch` starts ranks 1..N−1 as its own spawned children
(``torch.multiprocessing``, start method "spawn": CUDA never meets ``fork``), rendezvous on a
loopback ``TCPStore`` that rank 0 opens on port 0 (the kernel picks a free port and rank 0 holds it,
so there is no window in which another process can take it, as a "find a free port, close it, pass
the number on" dance has), and runs the same function in every rank. Collectives are gloo on the
CPU and NCCL on CUDA devices (rank r uses ``cuda:r`` of the visible devices).

How :mod:`worker.model.training` uses a :class:`World` (every method is the identity on one rank, so
a one-rank run is today's code path, bit for bit):

- every rank keeps the same seeded training generator and draws the *whole* global batch's random
  numbers (batch indices, t, ε, posterior noise, caption dropout), so the random stream is the one
  of a one-rank run; :meth:`World.shard` then keeps this rank's slice of the batch;
- :meth:`World.wrap` puts the trained module in ``DistributedDataParallel``, which averages the
  gradients over the ranks during the backward pass; :meth:`World.weigh` scales each rank's mean
  loss by (local examples × ranks / global batch), so that average is exactly the gradient of the
  global batch's mean loss, even when the batch does not divide evenly;
- :meth:`World.mean_loss` all-reduces the reported loss (the global batch's mean), and
  :meth:`World.agree` broadcasts rank 0's stop decision, so every rank stops at the same step.

A rank never outlives the job's process: the ranks ask the kernel for SIGKILL when their parent
dies (Linux ``PR_SET_PDEATHSIG``, one ``prctl`` call through ctypes, which Python's standard library
lacks), and watch the parent's pid as well (other systems, and the moment before the ``prctl``). So
the executor's SIGKILL of a job's process, or of the whole worker, takes every rank with it. A rank
that dies makes the others' next collective fail (gloo: the connection closes at once; NCCL: after
the collective timeout), and the run ends with an error that names the rank.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: Collective and rendezvous timeout. Rank 0 evaluates at checkpoints while the other ranks wait
#: in the next step's gradient all-reduce, so it must cover the longest evaluation (minutes on a
#: CPU); a dead rank is seen sooner (gloo: at once, as its connection closes).
DEFAULT_TIMEOUT_S = 1800.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def resolve_world_size(setting: str | int, device: torch.device | str, batch_size: int) -> int:
    """The number of ranks for a job on ``device``: ``"auto"`` = every visible CUDA device on a CUDA
    worker, 1 on any other; an int N = N ranks (N gloo processes on the CPU, N CUDA devices, which
    must be visible). Never more ranks than examples in the batch (each rank needs at least one),
    so a batch of 1 trains on one rank. ValueError, with what is wrong, otherwise."""
    device = torch.device(device)
    if setting == "auto":
        wanted = torch.cuda.device_count() if device.type == "cuda" else 1
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        wanted = setting
    else:
        raise ValueError(f"train devices must be 'auto' or a positive integer; got {setting!r}")
    if wanted > 1 and device.type not in ("cpu", "cuda"):
        raise ValueError(f"training across devices runs on cpu (gloo) or cuda (NCCL), not {device.type}")
    if wanted > 1 and device.index is not None:
        raise ValueError(f"training on {wanted} devices takes cuda:0..{wanted - 1} of the visible devices; "
                         f"the worker device must be 'cuda' or 'auto', not {device}")
    if device.type == "cuda" and wanted > torch.cuda.device_count():
        raise ValueError(f"training on {wanted} CUDA devices, but {torch.cuda.device_count()} are visible")
    return max(1, min(wanted, batch_size))


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run."""

    rank: int
    size: int
    device: torch.device

    @classmethod
    def solo(cls, device: torch.device | str) -> World:
        return cls(0, 1, torch.device(device))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports, checkpoints, evaluates and exports."""
        return self.rank == 0

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's slice (along dim 0) of each global-batch tensor: ``torch.tensor_split`` into
        ``size`` near-equal parts, part ``rank``. One rank: the tensors themselves."""
        if self.size == 1:
            return tensors
        return tuple(torch.tensor_split(t, self.size)[self.rank] for t in tensors)

    def weigh(self, loss: torch.Tensor, local: int, total: int) -> torch.Tensor:
        """A mean over this rank's ``local`` examples, scaled so that DDP's average of the ranks'
        gradients is the gradient of the mean over all ``total``: mean_r · local_r · size / total.
        One rank: ``loss`` itself (no multiply, so the one-rank numbers do not move)."""
        if self.size == 1:
            return loss
        return loss * (local * self.size / total)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in ``DistributedDataParallel`` (gradients averaged during backward; rank 0's
        weights broadcast once, here). One rank: ``module`` itself. Call its forward through the
        wrapper: DDP prepares the gradient all-reduce in its forward."""
        if self.size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # The gradients of 1×1 convolutions (the VAE's post_quant_conv) come back with strides that
        # differ from their bucket's only along size-1 dims: the same memory order, a copy of a few
        # floats, but DDP warns once per process. That warning, and only it, is silenced.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets (one copy, not two)
        return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The global batch's mean loss from every rank's weighed loss (Σ_r loss_r / size), the
        same on every rank. One rank: ``loss``."""
        if self.size == 1:
            return loss
        buf = loss.detach().float().reshape(1) / self.size
        dist.all_reduce(buf)
        return buf[0]

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (one tiny broadcast): the stop decision of a step."""
        if self.size == 1:
            return flag
        buf = torch.tensor([1.0 if flag and self.is_main else 0.0], device=self.device)
        dist.broadcast(buf, src=0)
        return bool(buf.item())


# ================================================================================================
# Starting the ranks
# ================================================================================================


class RankFailed(RuntimeError):
    """Rank ``rank`` (≥ 1) of the run failed or died. ``summary`` is one line without paths (its
    exception's type, or its exit code); ``detail`` its traceback, for the log."""

    def __init__(self, rank: int, summary: str, detail: str = ""):
        super().__init__(f"rank {rank} failed: {summary}" + (f"\n{detail}" if detail else ""))
        self.rank, self.summary, self.detail = rank, summary, detail


def launch(size: int, device: torch.device | str, fn: Callable[..., Any], args: tuple, *,
           main_kwargs: dict | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run ``fn(world, *args)`` on ``size`` ranks: rank 0 in this process (with ``main_kwargs``
    too: what cannot cross a process boundary, such as the caller's hooks), ranks 1.. in spawned
    children. ``fn`` must be importable by name and ``args`` picklable. Returns every rank's
    result, rank 0's first. If a rank fails, the others are killed and the error is raised in this
    process: rank 0's own, or :class:`RankFailed` naming the child that failed first."""
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
    ctx = torch.multiprocessing.get_context("spawn")
    children = []
    for rank in range(1, size):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_rank_main, name=f"ldmq-rank-{rank}", daemon=True,
                           args=(rank, size, store.port, backend, device.type, torch.get_num_threads(), os.getpid(),
                                 timeout_s, fn, args, writer))
        proc.start()
        writer.close()
        children.append(_Child(rank, proc, reader))
    log.info("training on %d ranks (%s, rendezvous 127.0.0.1:%d): rank pids %s", size, backend, store.port,
             [c.proc.pid for c in children])
    try:
        world = _join_group(0, size, store, backend, _rank_device(device.type, 0), timeout)
        first = fn(world, *args, **(main_kwargs or {}))
    except BaseException as exc:
        failed = _first_failure(children, wait_s=5.0)  # a dead child is the likelier cause
        _kill(children)
        if failed is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise failed from exc
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    try:
        return [first] + [c.result(timeout_s) for c in children]
    finally:
        _kill(children)


@dataclass
class _Child:
    rank: int
    proc: Any
    conn: Any
    message: tuple | None = None

    def poll(self, wait_s: float) -> tuple | None:
        """The child's ("ok", result) or ("error", summary, traceback), or ("error", exit code, "")
        when it exited without a word; None while it runs."""
        if self.message is None:
            try:
                if self.conn.poll(wait_s):
                    self.message = self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(timeout=5)
                self.message = ("error", f"its process exited with code {self.proc.exitcode}", "")
        return self.message

    def failure(self) -> RankFailed | None:
        msg = self.message
        return RankFailed(self.rank, msg[1], msg[2]) if msg is not None and msg[0] != "ok" else None

    def result(self, timeout_s: float) -> Any:
        if self.poll(timeout_s) is None:
            raise RankFailed(self.rank, f"it did not finish within {timeout_s:g} s of rank 0")
        if self.failure() is not None:
            raise self.failure()
        self.proc.join(timeout=30)
        return self.message[1]


def _first_failure(children: list[_Child], wait_s: float) -> RankFailed | None:
    deadline = time.monotonic() + wait_s
    for child in children:
        child.poll(max(0.0, deadline - time.monotonic()))
        if child.failure() is not None:
            return child.failure()
    return None


def _kill(children: list[_Child]) -> None:
    for child in children:
        if child.proc.is_alive():
            child.proc.kill()
    for child in children:
        child.proc.join(timeout=10)
        child.conn.close()


def _rank_device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _join_group(rank: int, size: int, store, backend: str, device: torch.device, timeout: timedelta) -> World:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    return World(rank, size, device)


def _rank_main(rank: int, size: int, port: int, backend: str, device_type: str, threads: int, parent_pid: int,
               timeout_s: float, fn: Callable[..., Any], args: tuple, conn) -> None:
    """Entry point of a spawned rank: die with the parent, join the group, run ``fn``, send back
    its result or its error. SIGTERM and SIGINT are ignored: a rank stops when rank 0 says so (the
    stop broadcast) or dies with it; a signal to the whole process group (``docker stop``, Ctrl-C,
    a worker's shutdown) must let rank 0 checkpoint at the agreed step, not kill a rank under it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    try:
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timeout)
        world = _join_group(rank, size, store, backend, _rank_device(device_type, rank), timeout)
        conn.send(("ok", fn(world, *args)))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to rank 0, then exit 1
        conn.send(("error", f"it raised {type(exc).__name__}", f"{exc}\n{traceback.format_exc(limit=-8)}"))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` (its parent) dies, even by SIGKILL: Linux's
    PR_SET_PDEATHSIG (note: it fires when the parent *thread* that started us ends; rank 0 starts
    the ranks from the thread that trains and outlives them), plus a pid watch every 0.5 s."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(0.5)

    if os.getppid() != parent_pid:  # it died before the prctl took effect
        os._exit(70)
    threading.Thread(target=watch, name="ldmq-rank-parent-watch", daemon=True).start()
