"""Process-group setup and teardown, safe across torchrun's elastic restarts.

There is always a process group, also for a single process: FSDP2, the device mesh and DCP then take one code
path. Under torchrun the env:// rendezvous is used; a plain `python` process (tests, a laptop) gets a
world-size-1 group on an in-process HashStore, so it needs no port and cannot collide with other runs.

Restarts: by default torchrun (c10d rendezvous) hands its workers a TCPStore that the agent keeps alive across
restarts, so the keys of the previous attempt are still in it; gloo or NCCL then read a dead peer's address
("connectFullMesh ... Connection refused", NCCL "Failed to connect", or a hang: pytorch issue 135712).
Prefixing keys with TORCHELASTIC_RESTART_COUNT is not enough: the count is kept per node and differs between
nodes after one of them failed. So under a shared store each attempt gets a fresh store of its own, hosted by
rank 0, whose address is published in the shared one; a stale address is recognised because no live store
answers there with this attempt's token. `launch/env.sh` also sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which
makes torchrun itself start a fresh store per attempt; both are safe together.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mythos_train.config import JobConfig
from parallel.config import ParallelConfig

logger = logging.getLogger(__name__)

FAULT_ENV = "MYTHOS_FAULT_KILL_AT_STEP"
ATTEMPT_STORE_KEY = "mythos_train/attempt_store"


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


def restart_count() -> int:
    """How often torchrun has restarted this node's workers (0 on the first attempt and outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def local_device(want: str = "auto") -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is requested or available ('auto'), else cpu."""
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_backend(parallel: ParallelConfig, device: torch.device) -> str:
    """parallel.backend, with 'auto' = nccl on CUDA, gloo on CPU."""
    backend = parallel.backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("parallel.backend = 'nccl' needs CUDA; use 'gloo' or 'auto' on CPU")
    return backend


def _answers(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port (a refused probe costs a millisecond, no log spam)."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def attempt_store(rank: int, timeout: timedelta) -> dist.Store:
    """A TCPStore that holds this attempt's keys only, bootstrapped through torchrun's shared store.

    Rank 0 starts it on a free port and publishes "port token" in the shared store; the others read that entry
    until it names a store that is up and holds the token (an entry left by an earlier attempt names a store
    that died with that attempt's rank 0, or one without this token).
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    shared = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(host, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set(token, "")
        shared.set(ATTEMPT_STORE_KEY, f"{store.port} {token}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        store_port, token = shared.get(ATTEMPT_STORE_KEY).decode().split()
        if _answers(host, int(store_port)):
            try:  # a short timeout first: whatever answers there may not be a TCPStore
                store = dist.TCPStore(host, int(store_port), is_master=False, timeout=timedelta(seconds=5))
                if store.check([token]):
                    store.set_timeout(timeout)
                    return store
            except RuntimeError:  # DistError: not a store, or it went away
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank}: no store of this attempt published by rank 0 within {timeout} (last entry: port {store_port})"
            )
        time.sleep(0.1)


def init_process_group(parallel: ParallelConfig, device: torch.device) -> None:
    """Start the default process group (through start_process_group): the one call of dist.init_process_group.

    Under torchrun (MASTER_ADDR set): env://, or a fresh store of this attempt's own when torchrun's store is
    shared across restarts (`attempt_store`). A plain process: a world-size-1 group on an in-memory HashStore.
    Backend per `resolve_backend`, timeout parallel.timeout_s; `device` is this process's (already current) device.
    """
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = resolve_backend(parallel, device)
    timeout = timedelta(seconds=parallel.timeout_s)
    if "MASTER_ADDR" not in os.environ:
        if world_size != 1:
            raise RuntimeError(f"WORLD_SIZE={world_size} without MASTER_ADDR: launch multi-process runs with torchrun")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if local_rank == 0 and "TORCHELASTIC_RESTART_COUNT" in os.environ:
        logger.info(
            "torchrun attempt: restart %d of at most %s on this node, world size %d, process-group store: %s",
            restart_count(),
            os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"),
            world_size,
            "fresh for this attempt (torchrun's is shared across restarts)"
            if shared
            else "torchrun's, fresh per attempt",
        )
    store = attempt_store(rank, timeout) if shared else None  # None: env:// (rank 0 hosts a new store)
    device_id = device if device.type == "cuda" else None
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id
    )


def start_process_group(parallel: ParallelConfig, device: torch.device) -> None:
    """Bind this process to `device` (local_device) and start the default process group unless it runs: the one
    place that does both (init_distributed and parallel/mesh.build_mesh call it)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        init_process_group(parallel, device)


def init_distributed(cfg: JobConfig) -> DistInfo:
    """Start (or join) the default process group and bind this process to its device (train.device)."""
    device = local_device(cfg.train.device)
    start_process_group(cfg.parallel, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Tear every group down (idempotent), so a test process can start the next run.

    On a clean exit all ranks first meet in a barrier: when they tear down at different times (rank 0 prints
    the summary), torch 2.13 sometimes aborts a process at exit ("terminate called without an active
    exception": 7 of 80 two-process CPU runs here, none of 40 with the barrier). While an exception propagates
    there is no barrier: a failing rank must exit at once, so that torchrun restarts the group.
    """
    if dist.is_initialized():
        if sys.exc_info()[0] is None and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum a small tensor over the group in place and return it (no-op for one rank)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def fault_point(where: str, step: int) -> None:
    """Test-only fault injection; does nothing unless MYTHOS_FAULT_KILL_AT_STEP is set.

    MYTHOS_FAULT_KILL_AT_STEP=RANK:STEP[:WHERE] makes global rank RANK SIGKILL itself at STEP, on the first
    torchrun attempt only (so the restarted run goes on): WHERE 'step' (default) = right after that optimizer
    step, before its log and checkpoint; 'save' = while its checkpoint is saved, after every shard is written
    and before the COMPLETE marker. The trainer calls this at both places.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or restart_count() != 0:
        return
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[:2]) or parts[2:] not in ([], ["step"], ["save"]):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected RANK:STEP or RANK:STEP:step|save")
    rank = int(os.environ.get("RANK", "0"))
    if (int(parts[0]), int(parts[1]), (parts[2:] or ["step"])[0]) == (rank, step, where):
        print(f"fault injection: SIGKILL rank {rank} at {where} {step} (unix time {time.time():.3f})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
