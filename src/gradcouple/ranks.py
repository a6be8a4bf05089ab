"""Rank primitives of a ``torchrun`` job: who am I, how many are we, wait, decide, deal work.

    torchrun --nproc-per-node K -m gradcouple extract ...                       (one machine)
    torchrun --nnodes 2 --node-rank R --nproc-per-node K \\
             --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m gradcouple extract ...   (several)

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them (or with ``WORLD_SIZE``
1) nothing here starts a process group and every stage runs as one process, unchanged. The
process group is gloo on CPU, NCCL for CUDA tensors (``cpu:gloo,cuda:nccl``); everything the
stages send (decisions, Gram parts, top-k lists) is a CPU tensor or object, so it goes over gloo.
The run directory must be one shared file system for every node.

extract and couple split their work across the ranks (:mod:`gradcouple.stages.resume`,
:mod:`gradcouple.stages.gram_share`); ``ripple``, ``report``, ``download`` and ``run`` run on
rank 0 alone (:func:`runs_here`). Only rank 0 shows progress, writes merged results and prints
summaries. This module imports nothing of gradcouple but its errors: every layer may ask it.
"""

from __future__ import annotations

import atexit
import datetime
import heapq
import os
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

#: commands that split their work across the ranks of a torchrun job; the others run on rank 0 alone
DISTRIBUTED_COMMANDS = ("extract", "couple")
#: how long a rank waits for the others at a collective (a dead rank ends the job sooner: torchrun stops them all)
TIMEOUT = datetime.timedelta(hours=3)

_single = False  # set by runs_here: this torchrun process runs a single-process command alone


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def world_size() -> int:
    """Processes of this torchrun job (1 outside torchrun)."""
    return 1 if _single else max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return 0 if world_size() == 1 else _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (0 outside torchrun)."""
    return 0 if world_size() == 1 else _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on rank 0, which shows progress, writes the merged results and prints summaries."""
    return rank() == 0


def runs_here(argv: Sequence[str]) -> bool:
    """Whether this process runs the command line ``argv`` (``python -m gradcouple`` / ``torchrun``).

    extract and couple run on every rank. Any other command under torchrun runs on rank 0 alone,
    as one process (it stays single-process: ripple and report read what extract and couple
    wrote); the other ranks exit at once.
    """
    global _single
    if world_size() == 1:
        return True
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in DISTRIBUTED_COMMANDS:
        return True
    on_main = _env_int("RANK", 0) == 0
    _single = True
    return on_main


def rank_device(spec: str) -> str:
    """The device this rank computes on: under torchrun on a CUDA machine ``auto`` and ``cuda``
    become ``cuda:LOCAL_RANK`` (one GPU per process); anything else is kept as given.

    Raises:
        ConfigError: ``auto-map`` (one model spread over every GPU of a machine) with more than
            one process per machine.
    """
    if world_size() == 1:
        return spec
    if spec == "auto-map" and _env_int("LOCAL_WORLD_SIZE", 1) > 1:
        raise ConfigError("--device auto-map spreads one model over every GPU of a machine, so it needs one process per "
                          "machine: run torchrun with --nproc-per-node 1 (and --nnodes N), or use --device auto.")
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return spec


def _destroy() -> None:
    import torch.distributed as dist  # deferred: torch.distributed, only under torchrun

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (exiting anyway)
        pass


def group():
    """Start this torchrun job's process group (once; from torchrun's environment). No-op in one process.

    Raises:
        ConfigError: torch was built without torch.distributed.
    """
    if world_size() == 1:
        return None
    import torch.distributed as dist  # deferred: torch.distributed, only under torchrun

    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run gradcouple without torchrun.")
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and dist.is_nccl_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        atexit.register(_destroy)
    return dist.group.WORLD


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        import torch.distributed as dist  # deferred: torch.distributed, only under torchrun

        group()
        dist.barrier()


def decide(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 alone; its value (or the exception it raised) on every rank.

    In one process this is ``fn()``.
    """
    if world_size() == 1:
        return fn()
    import torch.distributed as dist  # deferred: torch.distributed, only under torchrun

    group()
    box: list = [None]
    error = None
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 (re-raised on every rank)
            error, box[0] = e, ("error", e)
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise value
    return value


def balance(weights: Sequence[float], parts: int) -> list[list[int]]:
    """Greedy longest-processing-time: the indices of ``weights`` dealt to ``parts`` bins, heaviest
    first, each to the bin with the smallest sum so far (ties: the lower index, the lower bin).
    The sums come out about equal (LPT is within 4/3 of the optimum); each bin is sorted."""
    bins: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0.0, b) for b in range(parts)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + float(weights[i]), b))
    return [sorted(b) for b in bins]


__all__ = ["DISTRIBUTED_COMMANDS", "TIMEOUT", "balance", "barrier", "decide", "group", "is_main", "local_rank", "rank",
           "rank_device", "runs_here", "world_size"]
