"""Process-group setup and teardown.

There is always a process group, also for a single process: FSDP2, the device mesh and DCP then take one code
path. Under torchrun the env:// rendezvous is used; a plain `python` process (tests, a laptop) gets a
world-size-1 group on an in-process HashStore, so it needs no port and cannot collide with other runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mythos_train.config import JobConfig


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its compute device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun, or 1; known before any process group exists (for `validate`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(cfg: JobConfig, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is requested or available ('auto'), else cpu."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but torch.cuda.is_available() is False")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_backend(cfg: JobConfig, device: torch.device) -> str:
    """parallel.backend, with 'auto' = nccl on CUDA, gloo on CPU."""
    backend = cfg.parallel.backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("parallel.backend = 'nccl' needs CUDA; use 'gloo' or 'auto' on CPU")
    return backend


def init_distributed(cfg: JobConfig, timeout_s: float = 600.0) -> DistInfo:
    """Start (or join) the default process group and bind this process to its device."""
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = resolve_backend(cfg, device)
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            if world_size != 1:
                raise RuntimeError(f"WORLD_SIZE={world_size} without MASTER_ADDR: launch multi-process runs with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Tear the default group down (idempotent), so a test process can start the next run."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum a small tensor over the group in place and return it (no-op for one rank)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values

