"""Aux-loss-free expert balancing (DeepSeek-V3): bias += rate * sign(mean_load - load), once per optimizer step.

Loads are counted over every loop iteration of the step (gradient-free ones too; the model returns them as
iteration outputs, so activation-checkpoint recompute never counts twice), summed over micro-batches and over all
ranks: data-parallel ranks see different tokens, and under sequence parallelism each tp rank routes its own slice
of the sequence (with expert parallelism the counts are taken before dispatch, so the same sum applies). The update runs in an optimizer pre-step hook, in fp32 on a buffer FSDP never casts
(mixed precision casts parameters only), and is identical on every rank because its input is an all-reduce result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.profiler import record_function

if TYPE_CHECKING:
    from parallel.mesh import ParallelDims


class RouterBiasBalancer:
    def __init__(self, model: nn.Module, dims: ParallelDims | None, rate: float):
        plan = model.parallel_plan()
        self.router = model.get_submodule(plan.router)  # read the buffer through it: to_empty() replaces buffers
        self.loop = model.get_submodule(plan.loop)  # its `last_stats` holds the last forward's expert loads
        self.group = dims.world_mesh.get_group() if dims is not None else None
        self.rate = rate
        self.counts = torch.zeros_like(self._bias())  # [E] tokens routed to each expert since the last step

    def _bias(self) -> torch.Tensor:
        bias = self.router.expert_bias  # [E]
        if bias.dtype != torch.float32:
            raise TypeError(f"router expert_bias must stay float32, got {bias.dtype}")
        return bias

    def accumulate(self) -> None:
        """Add the last forward's expert loads (the loop's `LoopStats.tokens_per_expert` [n_iters, E])."""
        self.counts += self.loop.last_stats.tokens_per_expert.sum(0).to(self.counts)

    def reset(self) -> None:
        """Drop the counts (e.g. after a skipped, non-finite step)."""
        self.counts.zero_()

    @torch.no_grad()
    def step(self) -> None:
        if self.rate == 0:
            return self.reset()
        with record_function("mythos:router_bias"):  # a named range for `python -m mythos_train profile`
            if self.group is not None and dist.is_initialized():
                dist.all_reduce(self.counts, group=self.group)
            self._bias().add_(self.rate * torch.sign(self.counts.mean() - self.counts))
        self.reset()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run `step` right before every optimizer step; returns the hook handle."""
        return optimizer.register_step_pre_hook(lambda *_: self.step())
