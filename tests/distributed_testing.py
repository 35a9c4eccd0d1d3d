"""Run a function on N local gloo processes (tests, and benchmarks/ that put tests/ on sys.path):
`run_distributed(fn, 2, *args)`; count the collectives and host syncs of a region (CollectiveCounter, HostReadCounter).

`fn(rank, world_size, *args)` runs in a spawned process with the default process group initialised; what it
returns comes back as a list indexed by rank. A failure on any rank raises here with that rank's traceback; the
whole job is bounded by `timeout` seconds.
"""

from __future__ import annotations

import collections
import os
import pickle
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, world_size: int, port: int, out_dir: str, threads: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        dist.barrier()  # tear down together (see mythos_train.distributed.destroy_distributed)
    finally:
        dist.destroy_process_group()
    # The result is on disk: skip interpreter teardown, where torch 2.13 CPU processes that ran gloo + DCP
    # occasionally abort ("terminate called without an active exception") after all the work is done.
    os._exit(0)


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, threads: int | None = None) -> list:
    """Spawn `world_size` processes running `fn(rank, world_size, *args)`; returns their results by rank."""
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, _free_port(), out_dir, threads, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_distributed({fn.__name__}, {world_size}) exceeded {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


class CollectiveCounter(TorchDispatchMode):
    """Counts collective calls by op name while active (c10d ops of `torch.distributed` and functional collectives),
    and, in `host_syncs`, the ops that make the host wait for the device (`.item()`, `bool(t)`, masks and other
    data-dependent output shapes). A dispatch mode sees the real calls, in forward and in backward, whoever issues
    them (FSDP hooks, DTensor, all-to-all). Usage: `with CollectiveCounter() as c: ...; c.counts ->
    {"_allgather_base_": 7, ...}`. Not seen: `.tolist()` / `.cpu()` of a CPU tensor (no op is dispatched; see
    HostReadCounter).
    """

    _NOT_COLLECTIVES = {"wait_tensor", "_wrap_tensor_autograd"}
    HOST_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                  "unique_consecutive", "bincount", "equal", "histc"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.host_syncs: collections.Counter = collections.Counter()

    @staticmethod
    def _data_dependent_shape(name: str, args: tuple, kwargs: dict) -> bool:
        """Ops whose output size is read back from the device: boolean-mask indexing, repeat_interleave unsized."""
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        return name == "repeat_interleave" and kwargs.get("output_size") is None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if (
            func.namespace in ("c10d", "_c10d_functional", "_c10d_functional_autograd")
            and name not in self._NOT_COLLECTIVES
        ):
            self.counts[name] += 1
        elif name in self.HOST_SYNCS or self._data_dependent_shape(name, args, kwargs):
            self.host_syncs[name] += 1
        return func(*args, **kwargs)


class HostReadCounter(TorchFunctionMode):
    """Counts the Python-level reads into the host that dispatch no op on a CPU tensor (`.tolist()`, `.numpy()`,
    `.cpu()`), so CollectiveCounter cannot see them, although on a GPU each is a device-to-host copy. `.item()`,
    `bool(t)` and `float(t)` dispatch `_local_scalar_dense`: CollectiveCounter's `host_syncs` has them.
    """

    READS = {"tolist", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS and args and isinstance(args[0], torch.Tensor):
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))
