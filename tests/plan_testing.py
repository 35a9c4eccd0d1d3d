"""Measure what a real sharded training step holds on one CPU rank, for the planner's validation tests.

Memory is measured twice. The torch profiler's allocation events (`profile_memory=True`): on CPU every tensor
allocation and free goes through c10's allocator, which reports them with sizes, so the running sum of the
events after a point in time is exactly the bytes allocated since then. And the growth of the process's peak
resident set (RSS, the kernel's high-water mark): it tracks live tensors only when glibc returns freed blocks to
the system at once, so the processes must start with MALLOC_MMAP_THRESHOLD_=65536 (RSS_ENV; by default glibc
keeps freed arenas and the growth of one step reads 4-80% of what it allocated). Saved-tensor hooks would miss
checkpoint inputs and FSDP buffers.
"""

from __future__ import annotations

import collections
import math
import re
from contextlib import nullcontext

import pytest
import torch
from torch.distributed.tensor.parallel import loss_parallel
from torch.profiler import ProfilerActivity, profile

from mythos_train.bench.sweep import allocation_curve, tensor_bytes
from mythos_train.config import JobConfig
from mythos_train.loss import cross_entropy_sum
from mythos_train.optim import build_optimizer
from mythos_train.trainer import build_model
from parallel import build_mesh

RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"Set before the measuring processes start: blocks of 64 KiB and more are mapped on malloc and unmapped on free."


class PeakRSS:
    """`with PeakRSS() as p: ...` -> p.growth: the process's peak RSS inside the block minus RSS at its start.

    Exact, no sampling: writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the
    current RSS (Linux 4.0+), and VmHWM at the end is the largest RSS since.
    """

    @staticmethod
    def _status_bytes(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) * 1024

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._base = self._status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.growth = self._status_bytes("VmHWM") - self._base


class StepUnderTest:
    """A sharded model after one real AdamW step (so gradients and optimizer state exist) and one warm-up
    micro-batch (lazy allocations, first-call caches). Each later micro-batch runs with gradients already
    allocated, like every micro-batch after the first of a step: what it allocates on top is activations plus
    FSDP's gathered parameters and gradient buffers."""

    def __init__(self, rank: int, world: int, cfg: JobConfig, n_nograd: int, n_grad: int):
        torch.manual_seed(0)
        self.model, self.wrap = build_model(cfg, build_mesh(cfg.parallel, world, "cpu"), torch.device("cpu"))
        self.optimizer = build_optimizer(self.model, cfg.optim, "cpu")
        self.depth = (n_nograd, n_grad)
        B, S = cfg.train.micro_batch_size, cfg.train.seq_len
        g = torch.Generator().manual_seed(rank)
        self.batches = [torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=g) for _ in range(5)]
        self.forward(self.batches[0])[1].backward()
        self.optimizer.step()
        self.forward(self.batches[1])[1].backward()

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(tokens[:, :-1], n_nograd=self.depth[0], n_grad=self.depth[1], wrap_iteration=self.wrap)
        return logits, cross_entropy_sum(logits, tokens[:, 1:])


def rss_growth(step: StepUnderTest) -> int:
    """Peak RSS growth of one micro-batch's forward + backward (logits held through it, as the trainer does)."""
    with PeakRSS() as rss:
        logits, loss = step.forward(step.batches[4])
        loss.backward()
        del logits, loss
    return rss.growth


def measure_step(step: StepUnderTest) -> dict:
    """Static bytes held, allocator peak of a profiled forward + backward, and the collectives of one more."""
    model, optimizer = step.model, step.optimizer
    params = tensor_bytes(model.parameters())
    grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optim = tensor_bytes(t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))
    buffers = tensor_bytes(model.buffers())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof_fwd:
        logits, loss = step.forward(step.batches[2])
    fwd_peak, saved = allocation_curve(prof_fwd)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof_bwd:
        loss.backward()
    bwd_peak, _ = allocation_curve(prof_bwd)
    del logits, loss
    # Under EP the net of a window sometimes includes buffers that are freed just after it (0.5-3.4 MB seen, on
    # 7.4 MB): held bytes are only ever over-read, so the smaller of two forwards is the reading.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof_again:
        logits, loss = step.forward(step.batches[2])
    loss.backward()
    del logits, loss
    return {
        "params": params, "grads": grads, "optimizer": optim, "buffers": buffers,
        "saved": min(saved, allocation_curve(prof_again)[1]), "peak": max(fwd_peak, saved + bwd_peak),
        "traffic": count_traffic(model, step.wrap, step.batches[3], *step.depth),
    }  # fmt: skip


def measure_cases(rank: int, world: int, cases: list[tuple[JobConfig, int, int]]) -> list[dict]:
    """For each (cfg, n_nograd, n_grad), in one process (spawning costs seconds): measure_step, and rss_growth
    first for all of them, before any profiling (its many small buffers, once freed, leave holes in glibc's heap
    that later steps fill without growing RSS)."""
    rss = [_measured(rss_growth, rank, world, case) for case in cases]
    return [_measured(measure_step, rank, world, case) | {"rss_growth": r} for case, r in zip(cases, rss)]


def _measured(measure, rank: int, world: int, case: tuple[JobConfig, int, int]):
    """`measure(StepUnderTest(...))`, under TP inside torch's `loss_parallel` (vocabulary-parallel logits: the
    trainer's `parallel.loss_context`, entered once around every forward and backward of the step)."""
    cfg, n, k = case
    with loss_parallel() if cfg.parallel.tp > 1 else nullcontext():
        return measure(StepUnderTest(rank, world, cfg, n, k))


COLLECTIVE_EVENTS = {
    "c10d::_allgather_base_": "all-gather", "c10d::_reduce_scatter_base_": "reduce-scatter", "c10d::allreduce_": "all-reduce",
    "gloo:all_to_all": "all-to-all", "gloo:all_reduce": "gloo all-reduce",
}  # fmt: skip


def count_traffic(model, wrap, tokens: torch.Tensor, n_nograd: int, n_grad: int, elem_bytes: int = 4) -> dict:
    """Collectives of one micro-batch as the profiler sees them issued to the process group (so an all-to-all
    that selective checkpointing replays from its cache does not count): calls and input bytes per kind.

    All-gather and reduce-scatter inputs are the op's second argument; all-to-alls count only the routed rows
    (2-D inputs), not the 1-D expert-count exchanges. c10d's all-reduce event has no shapes, and gloo runs a
    reduce-scatter as an all-reduce of its whole input, so HSDP's all-reduce bytes are gloo's all-reduce bytes
    minus the reduce-scatter inputs.
    """
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        logits = model(tokens[:, :-1], n_nograd=n_nograd, n_grad=n_grad, wrap_iteration=wrap)
        cross_entropy_sum(logits, tokens[:, 1:]).backward()
    calls: collections.Counter = collections.Counter()
    payload: collections.Counter = collections.Counter()
    for event in prof.events():
        kind = COLLECTIVE_EVENTS.get(event.name)
        if kind == "all-reduce":
            calls[kind] += 1
            continue
        shape = (
            (event.input_shapes[1] if kind in ("all-gather", "reduce-scatter") else event.input_shapes[0])
            if kind
            else None
        )
        if kind and (kind != "all-to-all" or len(shape) == 2):
            calls[kind] += 1
            payload[kind] += math.prod(shape) * elem_bytes
    payload["all-reduce"] = payload.pop("gloo all-reduce", 0) - payload.get("reduce-scatter", 0)
    calls.pop("gloo all-reduce", None)
    return {"calls": dict(calls), "payload": dict(payload)}


def assert_rss_matches(rss_growth: int, working: int, label) -> None:
    """RSS growth cross-checks an allocator peak: at most 25% above it (memory the allocator's reading would miss)
    and at least half of it. It can read low, never high: a step's blocks under MALLOC_MMAP_THRESHOLD_ may land in
    heap holes its set-up left without growing RSS (tiny configs read 0.71-0.73 of the peak in 1-2 runs of 3 of
    test_plan_matches_sharded_step after other test files, with the for-each AdamW as with the fused one)."""
    assert 0.5 * working <= rss_growth <= 1.25 * working, label


def assert_memory_matches(got: dict, plan, label: str, rel: float = 0.25) -> str:
    """One rank's measure_step against its MemoryPlan: static bytes exactly (unpadded numel and padded storage),
    the activations saved at the end of forward and the allocator peak within `rel`, the RSS peak as assert_rss_matches.
    Returns the line for the test's report."""
    st = plan.static
    assert got["params"] == (st.param_numel * 4, st.params), label
    assert got["grads"] == (st.param_numel * 4, st.grads), label
    assert got["optimizer"][1] == st.optimizer and got["buffers"][1] == st.buffers, label
    working = plan.peak - st.total
    line = (f"{label}: forward end {got['saved']} vs {plan.forward_end}, peak {got['peak']} (RSS growth "
            f"{got['rss_growth']}) vs {working} ({plan.peak_phase})")  # fmt: skip
    assert got["saved"] == pytest.approx(plan.forward_end, rel=rel), line
    assert got["peak"] == pytest.approx(working, rel=rel), line
    assert_rss_matches(got["rss_growth"], working, line)
    return line
