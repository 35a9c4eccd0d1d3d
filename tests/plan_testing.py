"""Measure what a real sharded training step holds on one CPU rank, for the planner's validation tests.

Memory is measured with the torch profiler's allocation events (`profile_memory=True`): on CPU every tensor
allocation and free goes through c10's allocator, which reports them with sizes, so the running sum of the
events after a point in time is exactly the bytes allocated since then. RSS was rejected (glibc keeps freed
arenas, so it lags and never shrinks) and saved-tensor hooks miss checkpoint inputs and FSDP buffers.
"""

from __future__ import annotations

import collections
import math

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mythos_train.bench_sweep import allocation_curve, tensor_bytes
from mythos_train.config import JobConfig
from mythos_train.optim import build_optimizer
from mythos_train.trainer import build_model
from parallel import build_mesh


def measure_step(rank: int, world: int, cfg: JobConfig, n_nograd: int, n_grad: int) -> dict:
    """One real AdamW step (so gradients and optimizer state exist), then a profiled forward + backward.

    The profiled micro-batch runs with gradients already allocated, like every micro-batch after the first
    of a step: what it allocates on top is activations plus FSDP's gathered parameters and gradient buffers.
    """
    torch.manual_seed(0)
    dims = build_mesh(cfg.parallel, world, "cpu")
    model, wrap = build_model(cfg, dims, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    B, S = cfg.train.micro_batch_size, cfg.train.seq_len
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=g) for _ in range(4)]

    def forward(tokens):
        logits = model(tokens[:, :-1], n_nograd=n_nograd, n_grad=n_grad, wrap_iteration=wrap)
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")

    logits, loss = forward(batches[0])
    loss.backward()
    optimizer.step()
    del logits, loss
    params = tensor_bytes(model.parameters())
    grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optim = tensor_bytes(t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))
    buffers = tensor_bytes(model.buffers())

    logits, loss = forward(batches[1])  # warm-up of the measured path (lazy allocations, first-call caches)
    loss.backward()
    del logits, loss
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof_fwd:
        logits, loss = forward(batches[2])
    fwd_peak, saved = allocation_curve(prof_fwd)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof_bwd:
        loss.backward()
    bwd_peak, _ = allocation_curve(prof_bwd)
    del logits, loss
    return {
        "params": params, "grads": grads, "optimizer": optim, "buffers": buffers,
        "saved": saved, "peak": max(fwd_peak, saved + bwd_peak),
        "traffic": count_traffic(model, wrap, batches[3], n_nograd, n_grad),
    }  # fmt: skip


def measure_cases(rank: int, world: int, cases: list[tuple[JobConfig, int, int]]) -> list[dict]:
    """measure_step for each (cfg, n_nograd, n_grad) in one process (spawning costs seconds)."""
    return [measure_step(rank, world, cfg, n, k) for cfg, n, k in cases]


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
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").backward()
    calls: collections.Counter = collections.Counter()
    payload: collections.Counter = collections.Counter()
    for event in prof.events():
        kind = COLLECTIVE_EVENTS.get(event.name)
        if kind == "all-reduce":
            calls[kind] += 1
            continue
        shape = (event.input_shapes[1] if kind in ("all-gather", "reduce-scatter") else event.input_shapes[0]) if kind else None
        if kind and (kind != "all-to-all" or len(shape) == 2):
            calls[kind] += 1
            payload[kind] += math.prod(shape) * elem_bytes
    payload["all-reduce"] = payload.pop("gloo all-reduce", 0) - payload.get("reduce-scatter", 0)
    calls.pop("gloo all-reduce", None)
    return {"calls": dict(calls), "payload": dict(payload)}
