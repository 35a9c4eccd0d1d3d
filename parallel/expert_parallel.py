"""Expert parallelism: each ep rank holds E/ep experts; tokens travel to their expert and back by all-to-all.

`ExpertParallel` replaces the model plan's routed experts with the same call signature, `(x_sorted[N, dim],
tokens_per_expert[E]) -> [N, dim]`, so the router, the sort and the weighted combine in MoE stay untouched.
Its weights are DTensors `Shard(0)` over the ep mesh with the *global* shape [E, ...] and the original names
(w1, w2, w3), so a checkpoint saved at one ep degree loads at any other. The only host sync is the split sizes
of the two all-to-alls (one `.tolist()` per call).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.func import functional_call

from mythos_train.model.moe import GatherRows, inverse_permutation
from parallel.mesh import ParallelDims


def _wait(t: torch.Tensor) -> torch.Tensor:
    """Wait right away: one wait per collective in every run, which selective checkpointing needs to replay."""
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _source_to_expert_order(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Gather index that regroups received tokens from (source rank, local expert) order to (local expert, rank).

    counts: [ep, E_local] tokens from each source rank for each local expert. Returns idx[total] with
    x_by_expert = x_by_source[idx]. Built on device without a host sync (`total` is already known on host).
    """
    ep, n_local = counts.shape
    src_start = _exclusive_cumsum(counts.reshape(-1)).view(ep, n_local).t().reshape(-1)  # [E_local * ep]
    seg_len = counts.t().reshape(-1)  # segment lengths in (expert, rank) order
    dst_start = _exclusive_cumsum(seg_len)
    pos = torch.arange(total, device=counts.device)
    return torch.repeat_interleave(src_start - dst_start, seg_len, output_size=total) + pos


class ExpertParallel(nn.Module):
    """Drop-in for `GroupedExperts` under expert parallelism (see module docstring).

    The local computation is the original module's own forward, run by `functional_call` on a weightless
    (meta) copy with the local expert shards, so the expert math lives in one place (mythos_train/model).
    """

    def __init__(self, experts: nn.Module, ep_mesh: DeviceMesh):
        super().__init__()
        self.ep_mesh = ep_mesh
        self.ep = ep_mesh.size()
        self.group = ep_mesh.get_group()
        rank = ep_mesh.get_local_rank()
        names = [name for name, _ in experts.named_parameters(recurse=False)]
        self.num_experts = getattr(experts, names[0]).shape[0]
        if self.num_experts % self.ep:
            raise ValueError(f"n_experts ({self.num_experts}) must be divisible by ep ({self.ep})")
        self.num_local_experts = self.num_experts // self.ep
        for name in names:
            full = getattr(experts, name)
            local = full.detach()[rank * self.num_local_experts : (rank + 1) * self.num_local_experts].contiguous()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
            self.register_parameter(name, nn.Parameter(dt, requires_grad=full.requires_grad))
        # Weightless (meta) copy of the original module: its forward is the local expert computation.
        meta = {id(p): nn.Parameter(torch.empty_like(p, device="meta")) for p in experts.parameters(recurse=False)}
        object.__setattr__(self, "_local_experts", copy.deepcopy(experts, meta))

    def init_weights(self, *args, **kwargs) -> None:
        """The original module's init, run on the global (DTensor) weights."""
        shell = self._local_experts
        saved = dict(shell._parameters)
        shell._parameters.update(self._parameters)
        try:
            type(shell).init_weights(shell, *args, **kwargs)
        finally:
            shell._parameters.update(saved)

    @torch.compiler.disable  # split sizes are host values: the dispatch stays eager inside a compiled block
    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # x_sorted: [N, dim] sorted by global expert id; tokens_per_expert: [E]
        ep, n_local = self.ep, self.num_local_experts
        send_counts = tokens_per_expert.to(torch.int64)
        recv_counts = _wait(funcol.all_to_all_single(send_counts, None, None, self.group))
        recv_counts = recv_counts.view(ep, n_local)  # [ep, E_local]: row j = rank j's tokens for my experts
        splits = torch.cat([send_counts.view(ep, n_local).sum(1), recv_counts.sum(1)]).tolist()  # the host sync
        send_splits, recv_splits = splits[:ep], splits[ep:]
        total = sum(recv_splits)

        x_recv = funcol.all_to_all_single_autograd(x_sorted, recv_splits, send_splits, self.group)
        x_recv = _wait(x_recv)  # [total, dim] in (source rank, local expert) order
        idx = _source_to_expert_order(recv_counts, total)
        local_weights = {name: p.to_local() for name, p in self.named_parameters(recurse=False)}
        inverse = inverse_permutation(idx)
        x_by_expert = GatherRows.apply(x_recv, idx, inverse, 1)
        y = functional_call(self._local_experts, local_weights, (x_by_expert, recv_counts.sum(0)))
        y_by_source = GatherRows.apply(y, inverse, idx, 1)
        out = funcol.all_to_all_single_autograd(y_by_source, send_splits, recv_splits, self.group)
        return _wait(out)  # [N, dim] in the caller's (global expert) order


def apply_expert_parallel(model: nn.Module, dims: ParallelDims) -> None:
    """Swap the plan's routed experts for an ExpertParallel holding this rank's experts."""
    if not dims.ep_enabled:
        return
    parent, _, name = model.parallel_plan().experts.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, name, ExpertParallel(getattr(owner, name), dims.ep_mesh))
