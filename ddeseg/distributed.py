"""Process-group set-up for one process or `torchrun` (single or multi node).

`torchrun` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; without them we run
as a single process and never initialise a process group. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ddeseg.errors import DDESegError


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str | torch.device | None = None, local_rank: int = 0, option: str = "--device") -> torch.device:
    """The torch device of a `--device` value: the one device resolver of ddeseg (a device
    resolved before, e.g. by the demo for the stages it runs, passes through, checked again).

    `None`/"auto": the local GPU (`cuda:{local_rank}`) when present, else the CPU. "cuda" without
    an index is `cuda:{local_rank}`. Raises `DDESegError` (one line naming `option`) for a value
    that is not a torch device string (e.g. "gpu") and for a CUDA device this machine does not
    have, before any work starts rather than at the first tensor moved there.
    """
    if requested in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise DDESegError(
            f"{option} {requested!r} is not a device: use cpu, cuda, cuda:N or auto ({_visible_gpus()})"
        ) from None
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise DDESegError(f"{option} {requested!r}: this machine has no such GPU ({_visible_gpus()}); use {option} cpu")
    return device


def _visible_gpus() -> str:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "no CUDA GPU is visible here"
    return f"visible: {', '.join(f'cuda:{i}' for i in range(count))}"


# How long a collective waits for the other ranks before failing, when no config gives one.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0


def init_distributed(requested_device: str | None = None, timeout_s: float | None = None) -> DistributedContext:
    """Initialise the process group when launched by torchrun; otherwise a single-process context.

    `timeout_s` (`train.collective_timeout_s`): a collective that waits longer for the other
    ranks fails (on gloo directly; on NCCL through its watchdog, with async error handling on, the
    default), so when one rank dies or hangs the others exit instead of waiting forever; torchrun
    then stops the whole job. It must exceed the longest gap between two collectives (e.g. a
    validation or checkpoint write on rank 0 alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s if timeout_s is not None else DEFAULT_COLLECTIVE_TIMEOUT_S)
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op in a single process); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of scalar metrics over ranks (one collective for the whole dict)."""
    if not values or not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    names = sorted(values)
    packed = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= dist.get_world_size()
    return {name: packed[i].item() for i, name in enumerate(names)}
