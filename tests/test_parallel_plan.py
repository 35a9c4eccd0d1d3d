"""parallel/ applies whatever plan a model names (model/parallel_plan.py) and knows no module names of its own.

A toy model with other names than MythosModel's (stem/before/trunk/cell/after) gets FSDP units, activation
checkpointing and shared-expert tiling where its plan says, and trains exactly like its unparallelized copy.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from mythos_train.config import ModelConfig, load_config
from mythos_train.model import ParallelPlan
from mythos_train.planner.comm import step_collectives
from mythos_train.planner.memory import fsdp_unit, model_plan, parameter_infos, unit_sizes, working_memory
from parallel import build_mesh, parallelize
from parallel.config import ParallelConfig

DIM = 8


class CountedBlock(nn.Module):
    """A dense block that counts its forward calls (a recompute in backward is a second call)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + torch.tanh(self.proj(x))


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(DIM, 2)
        self.mix = nn.Linear(DIM, DIM)
        self.side = nn.Linear(DIM, DIM)
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        rows = h.reshape(-1, DIM)  # [N, DIM]
        y = torch.tanh(self.mix(rows)) * torch.sigmoid(self.gate(rows)).sum(-1, keepdim=True) + self.side(rows)
        return h + 0.5 * y.view(h.shape)


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = Cell()

    def forward(self, h: torch.Tensor, depth: int, wrap_iteration=None) -> torch.Tensor:
        for _ in range(depth):
            h = wrap_iteration(self.cell, h) if wrap_iteration is not None else self.cell(h)
        return h


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(DIM, DIM)
        self.before = nn.ModuleList([CountedBlock(), CountedBlock()])
        self.trunk = Trunk()
        self.after = nn.ModuleList([CountedBlock()])

    def parallel_plan(self) -> ParallelPlan:
        return ParallelPlan(
            fsdp_units=("before.0", "before.1", "trunk", "after.0"),
            loop="trunk",
            loop_block="trunk.cell",
            experts="trunk.cell.mix",
            router="trunk.cell.gate",
            shared_experts="trunk.cell.side",
            loop_parts={},
        )

    def forward(self, x: torch.Tensor, depth: int = 3, wrap_iteration=None) -> torch.Tensor:
        h = self.stem(x)
        for block in self.before:
            h = block(h)
        h = self.trunk(h, depth, wrap_iteration)
        for block in self.after:
            h = block(h)
        return h


def loss_and_grads(model: nn.Module, wrap) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(1))  # [B, T, DIM]
    loss = model(x, wrap_iteration=wrap).square().mean()
    loss.backward()
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize("reshard_per_iteration", [False, True])
def test_parallel_applies_a_plan_with_other_module_names(reshard_per_iteration):
    torch.manual_seed(0)
    plain = Toy()
    model = copy.deepcopy(plain)
    parallel = ParallelConfig(
        activation_checkpoint="full", shared_expert_chunks=2, reshard_per_iteration=reshard_per_iteration
    )
    try:
        wrap = parallelize(model, build_mesh(parallel, 1, "cpu"), SimpleNamespace(parallel=parallel))
        units = {name for name, m in model.named_modules() if isinstance(m, FSDPModule)}
        loop_block = {"trunk.cell"} if reshard_per_iteration else set()
        assert units == {"", "before.0", "before.1", "trunk", "after.0", *loop_block}
        assert wrap is not None

        expected_loss, expected = loss_and_grads(plain, None)
        calls_before = [b.calls for b in model.before] + [model.after[0].calls, model.trunk.cell.calls]
        loss, got = loss_and_grads(model, wrap)
        calls = [b.calls for b in model.before] + [model.after[0].calls, model.trunk.cell.calls]
        # 'full': each block outside the loop runs again in backward; 'loop': each of the 3 iterations does.
        assert [c - c0 for c, c0 in zip(calls, calls_before)] == [2, 2, 2, 6]
        torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()


def test_planner_units_follow_the_models_plan():
    """The planner's FSDP units are those parallel/ shards (read from the same plan), for any names."""
    plan = Toy().parallel_plan()
    assert fsdp_unit("before.1.proj.weight", plan, False) == "before.1"
    assert fsdp_unit("trunk.cell.mix.weight", plan, False) == "trunk"
    assert fsdp_unit("trunk.cell.mix.weight", plan, True) == "trunk.cell"
    assert fsdp_unit("stem.weight", plan, True) == "root"
    mythos = model_plan(ModelConfig(prelude_layers=1, coda_layers=2))
    assert mythos.fsdp_units == ("prelude.0", "recurrent", "coda.0", "coda.1")


def test_planner_counts_follow_the_models_plan():
    """The planner's loop, per-iteration unit, dense blocks and TP split dims come from the plan, whatever the names:
    the toy's cell (with reshard_per_iteration a unit of its own) is gathered once per iteration, its trunk is the
    loop whose weights and gradients the 'loop' moment holds, and its plan's layouts say which weights tp splits."""
    plan = dataclasses.replace(
        Toy().parallel_plan(),
        loop_parts={"routed experts": "trunk.cell.mix", "shared experts": "trunk.cell.side", "attention": "x"},
        tensor_parallel={"stem": "vocab_embedding", "before.0.proj": "colwise", "trunk.cell.mix": "rowwise",
                         "trunk.cell": "ffn_input"},
    )  # fmt: skip
    params = parameter_infos(Toy(), plan, reshard_per_iteration=True)
    split = {p.name: p.tp_dim for p in params if p.tp_dim is not None}
    assert split == {"stem.weight": 0, "before.0.proj.weight": 0, "trunk.cell.mix.weight": 1}
    sizes = {"dp_replicate": 1, "dp_shard": 2, "ep": 1, "efsdp": 2}
    units = unit_sizes(params, sizes, plan)
    assert units.loop_units == ["trunk.cell"]  # the trunk holds no parameter of its own
    assert (units.blocks_before_loop, units.blocks_after_loop) == (("before.0", "before.1"), ("after.0",))
    # Elements by hand (dp_shard 2 pads a 2-row gate weight to 1 row per rank: no padding here).
    linear, gate = DIM * DIM + DIM, 2 * DIM + 2  # nn.Linear(DIM, DIM), nn.Linear(DIM, 2), with biases
    cell = gate + 2 * linear  # gate, mix, side
    phases = dict.fromkeys(("head", "head_grad", "loop", "loop_reduce", "dense"), 0)
    working = working_memory(phases, units, 2, "loop", sizes)
    # root (stem) gathered and its gradient, the cell's weights and gradients, before.1 being prefetched
    assert working["loop"] == (2 * linear + 2 * cell + linear) * 2
    assert working["head_grad"] == (2 * linear + linear) * 2  # + after.0, the first unit backward gathers
    assert working["dense"] == (2 * linear + linear + DIM * DIM) * 2  # before.0, its largest gradient (proj.weight)
    cfg = load_config("configs/debug.toml", ["--train.grad_accum_steps=1"])
    gathers = sum(c.calls for c in step_collectives(cfg, sizes, units, 1, 2, 2, 4) if c.name == "all-gather")
    assert gathers == 1 + 2 + 2 + (1 + 2 * 2) + 2  # root once; blocks twice; the cell n + 2k
