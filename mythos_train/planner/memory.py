"""Per-rank parameter, gradient and optimizer bytes under FSDP2 + EP, from the real model built on the meta device.

Sharding follows parallel/fsdp.py and parallel/expert_parallel.py exactly, on the model's own parallel plan:
  * FSDP units: the plan's `fsdp_units` (each prelude block, `recurrent`, each coda block; with
    parallel.reshard_per_iteration also `recurrent.block`), and the root (embedding = tied head, final norm).
  * dense parameters are chunked along dim 0 over dp_shard (torch.chunk: ceil(rows / shards) rows each, the last
    ranks get fewer or none); replicated over dp_replicate (HSDP).
  * expert weights [E, ...] are first split over ep (E / ep rows each), then chunked over efsdp on dim 0, or on
    dim 1 when there are fewer local experts than efsdp ranks (`parallel.fsdp.expert_shard_dim`).
  * under tensor parallelism (sizes['tp'] > 1) a split parameter is first cut tp ways on its `tp_dim` (the layout
    the plan's `tensor_parallel` gives its module: planner/tensor_parallel.py's `tp_split_dim`), and FSDP chunks
    that local piece; the experts' ep is then parallel.ep x tp.
  * FSDP2 stores each shard padded to ceil(rows / shards) rows (`_sharded_param_data`), and gradients are views
    into the padded reduce-scatter output; AdamW's exp_avg / exp_avg_sq are `zeros_like` of the *unpadded*
    local shard, plus a 4-byte fp32 `step` per parameter.
Master weights, gradients and optimizer state are fp32 (the model is built in fp32; FSDP's param_dtype only
changes the gathered copies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from mythos_train.config import ModelConfig
from mythos_train.planner.tensor_parallel import tp_split_dim
from parallel.fsdp import expert_shard_dim

if TYPE_CHECKING:
    from mythos_train.model import MythosModel, ParallelPlan

FP32 = 4
LOOP_PARTS = ("routed experts", "shared experts", "attention")
"Parts of the looped block a plan reports, largest first; where each is comes from `ParallelPlan.loop_parts`."


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the unsharded model: name, global shape, FSDP unit, and whether EP splits it."""

    name: str
    shape: tuple[int, ...]
    unit: str
    expert: bool
    loop_part: str | None = None
    "Its part of the looped block (LOOP_PARTS or 'rest'); None outside the loop."
    tp_dim: int | None = None
    "The dimension tensor parallelism splits (None: replicated over tp)."

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    def tp_local(self, tp: int) -> ParamInfo:
        """This parameter as one tp rank holds it."""
        if tp == 1 or self.tp_dim is None:
            return self
        shape = tuple(n // tp if d == self.tp_dim else n for d, n in enumerate(self.shape))
        return replace(self, shape=shape)


def _within(name: str, module: str) -> bool:
    """Whether parameter `name` lies inside the module at path `module`."""
    return name.startswith(module + ".")


def fsdp_unit(name: str, plan: ParallelPlan, reshard_per_iteration: bool) -> str:
    """The FSDP module (parallel/fsdp.py) a parameter belongs to: the innermost unit holding it, else the root."""
    if reshard_per_iteration and _within(name, plan.loop_block):
        return plan.loop_block
    return next((unit for unit in plan.fsdp_units if _within(name, unit)), "root")


def loop_part(name: str, plan: ParallelPlan) -> str | None:
    """ParamInfo.loop_part of parameter `name`."""
    if not _within(name, plan.loop):
        return None
    return next((part for part in LOOP_PARTS if _within(name, plan.loop_parts[part])), "rest")


def _meta_model(m: ModelConfig) -> MythosModel:
    from mythos_train.model import MythosModel  # keeps `plan --help` fast

    with torch.device("meta"):
        return MythosModel(m)


def model_plan(m: ModelConfig) -> ParallelPlan:
    """The parallel plan of `MythosModel(m)`, built on the meta device (no memory)."""
    return _meta_model(m).parallel_plan()


def parameter_infos(model: nn.Module, plan: ParallelPlan, reshard_per_iteration: bool = False) -> list[ParamInfo]:
    """ParamInfo of every parameter of `model`, placed (FSDP unit, experts, loop part, TP split) by its `plan`."""
    return [
        ParamInfo(
            name,
            tuple(p.shape),
            fsdp_unit(name, plan, reshard_per_iteration),
            _within(name, plan.experts),
            loop_part(name, plan),
            tp_split_dim(name, plan.tensor_parallel),
        )
        for name, p in model.named_parameters()
    ]


def model_parameters(m: ModelConfig, reshard_per_iteration: bool = False) -> tuple[list[ParamInfo], int]:
    """Every parameter of `MythosModel(m)` built on the meta device (no memory), and the bytes of its buffers."""
    model = _meta_model(m)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return parameter_infos(model, model.parallel_plan(), reshard_per_iteration), buffers


def chunk_rows(rows: int, shards: int, shard_rank: int) -> tuple[int, int]:
    """(rows this shard holds, padded rows every shard stores) of torch.chunk(rows, shards) as FSDP2 does it."""
    padded = -(-rows // shards)
    return min(padded, max(0, rows - shard_rank * padded)), padded


def mesh_coords(rank: int, sizes: dict[str, int]) -> dict[str, int]:
    """A global rank's coordinates on parallel/mesh.py's meshes: (dp_replicate, dp_shard) and (dp_replicate, efsdp, ep)."""
    return {
        "dp_shard": rank // sizes.get("tp", 1) % sizes["dp_shard"],
        "efsdp": (rank // sizes["ep"]) % sizes["efsdp"],
        "ep": rank % sizes["ep"],
    }


def shard_layout(p: ParamInfo, sizes: dict[str, int], rank: int) -> tuple[int, int, int]:
    """(local elements, padded elements, shard count) of parameter `p` on global rank `rank`."""
    coords = mesh_coords(rank, sizes)
    p = p.tp_local(sizes.get("tp", 1))
    if len(p.shape) == 0:
        return 1, 1, 1
    if p.expert and sizes["ep"] > 1:
        local_experts = p.shape[0] // sizes["ep"]
        if expert_shard_dim(local_experts, sizes["efsdp"]) == 1:
            row_numel = local_experts * math.prod(p.shape[2:])
            local, padded = chunk_rows(p.shape[1], sizes["efsdp"], coords["efsdp"])
        else:
            row_numel = p.row_numel
            local, padded = chunk_rows(local_experts, sizes["efsdp"], coords["efsdp"])
        return local * row_numel, padded * row_numel, sizes["efsdp"]
    local, padded = chunk_rows(p.shape[0], sizes["dp_shard"], coords["dp_shard"])
    return local * p.row_numel, padded * p.row_numel, sizes["dp_shard"]


@dataclass
class StaticMemory:
    """Bytes one rank holds for the whole run (fp32 master weights, gradients, AdamW state, buffers)."""

    params: int
    "Padded fp32 shards as allocated."
    grads: int
    "Padded fp32 gradient shards (views into the reduce-scatter output)."
    optimizer: int
    "exp_avg + exp_avg_sq of the unpadded shards, and one fp32 step per parameter."
    buffers: int
    "Unsharded buffers (RoPE tables, router expert_bias)."
    param_numel: int
    "Unpadded local elements (what `sum(p.to_local().numel())` reports)."

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers


def static_memory(params: list[ParamInfo], buffers: int, sizes: dict[str, int], rank: int = 0) -> StaticMemory:
    padded_numel = local_numel = 0
    for p in params:
        local, padded, _ = shard_layout(p, sizes, rank)
        padded_numel += padded
        local_numel += local
    return StaticMemory(
        params=padded_numel * FP32,
        grads=padded_numel * FP32,
        optimizer=2 * local_numel * FP32 + FP32 * len(params),
        buffers=buffers,
        param_numel=local_numel,
    )


@dataclass
class UnitSizes:
    """Per FSDP unit: elements of the gathered (unsharded, padded) parameters on one rank, dense and expert part;
    and where each unit sits in the model's plan, which the comm and working-memory counts read."""

    loop: str
    "The plan's loop unit: gathered once per step at any depth."
    loop_block: str
    "The plan's loop block: with reshard_per_iteration a unit of its own, gathered once per iteration."
    blocks_before_loop: tuple[str, ...]
    "The plan's dense blocks the forward runs before the loop (prelude), in forward order."
    blocks_after_loop: tuple[str, ...]
    "The plan's dense blocks after the loop (coda), in forward order."
    gathered: dict[str, int] = field(default_factory=dict)
    "Unit -> elements of its all-gather outputs, padded (experts: only this rank's E / ep experts)."
    unsharded: dict[str, int] = field(default_factory=dict)
    "Unit -> elements of its unsharded parameters without padding (the shape their gradients have)."
    dense_sharded: dict[str, int] = field(default_factory=dict)
    "Unit -> padded elements of its dp_shard-sharded parameters on one rank (what an all-gather sends)."
    expert_sharded: dict[str, int] = field(default_factory=dict)
    "Unit -> padded elements of its efsdp-sharded expert parameters on one rank."
    largest_param: dict[str, int] = field(default_factory=dict)
    "Unit -> elements of its largest gathered parameter (size of one fresh gradient before accumulation)."
    loop_parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys([*LOOP_PARTS, "rest"], 0))
    "Gathered elements of the looped block by part (LOOP_PARTS, then the rest: norms, router, injection, LoRA), so a plan can say which part to shrink."

    @property
    def loop_units(self) -> list[str]:
        """The loop's unit, and its block when that is a unit of its own (reshard_per_iteration)."""
        return [unit for unit in (self.loop, self.loop_block) if unit in self.gathered]


def unit_sizes(params: list[ParamInfo], sizes: dict[str, int], plan: ParallelPlan) -> UnitSizes:
    """UnitSizes of `params` (model_parameters) on the mesh `sizes`, their units placed by the model's `plan`."""
    loop_index = plan.fsdp_units.index(plan.loop)
    out = UnitSizes(plan.loop, plan.loop_block, plan.fsdp_units[:loop_index], plan.fsdp_units[loop_index + 1 :])
    for p in params:
        _, padded, shards = shard_layout(p, sizes, 0)
        p = p.tp_local(sizes.get("tp", 1))
        gathered = padded * shards
        out.gathered[p.unit] = out.gathered.get(p.unit, 0) + gathered
        rows = p.shape[0] // sizes["ep"] if p.expert and sizes["ep"] > 1 else (p.shape[0] if p.shape else 1)
        out.unsharded[p.unit] = out.unsharded.get(p.unit, 0) + rows * p.row_numel
        out.largest_param[p.unit] = max(out.largest_param.get(p.unit, 0), gathered)
        if p.loop_part is not None:
            out.loop_parts[p.loop_part] += gathered
        part = out.expert_sharded if p.expert and sizes["ep"] > 1 else out.dense_sharded
        part[p.unit] = part.get(p.unit, 0) + padded
    return out


def parameter_counts(params: list[ParamInfo], m: ModelConfig) -> dict[str, int]:
    """Total, expert and active-per-token parameter counts of the unsharded model."""
    total = sum(math.prod(p.shape) for p in params)
    experts = sum(math.prod(p.shape) for p in params if p.expert)
    active = total - experts + experts * m.n_experts_per_tok // m.n_experts
    return {"total": total, "experts": experts, "active": active}


def working_memory(
    phases: dict[str, int],
    units: UnitSizes,
    param_bytes: int,
    policy: str,
    sizes: dict[str, int],
    reduce_bytes: int = FP32,
) -> dict[str, int]:
    """Activation phases plus the FSDP buffers live at each: bytes above the static memory, per candidate peak.

    Gathered copies (padded, as FSDP2 allocates them) and their gradients (unpadded: autograd makes them in
    the parameters' shapes) are in param_dtype (`param_bytes`). The root (embedding = tied head) stays
    gathered from forward to the end of backward; its gradient is born at the head and finished at the
    embedding, so from the head's backward on it lives too. The loop's unit stays gathered
    through the loop's backward and accumulates gradients over the k iterations: with recomputation the peak
    step is a later one, when every gradient of the unit already exists; without, it is the first, when only
    the gradient of the largest weight (an expert matrix, differentiated first) has been born. The next unit
    in backward order is being prefetched.

    'loop_reduce': after the loop's backward FSDP2 frees the gathered weights and, param group by param group
    (dense on dp_shard, experts on efsdp), copies the gradients (param_dtype) into a padded reduce-scatter input in
    reduce_dtype (`reduce_bytes`; torch's foreach_reduce), frees them, and allocates the output shard; a group of
    one rank with a divide factor (expert parallelism sets one) also makes a divided copy of the whole input.
    Each input is kept until the next unit's reduce waits for it. So under bf16 / fp32 the loop's gradients cost
    2 + 4 bytes per element at this moment, and more for a group of one rank (`reduce_buffers`).
    """
    gathered, unsharded = units.gathered, units.unsharded
    root = gathered.get("root", 0)
    loop_units = units.loop_units
    loop_weights = sum(gathered[u] for u in loop_units)
    loop_grads = (
        sum(unsharded[u] for u in loop_units) if policy != "none" else max(units.largest_param[u] for u in loop_units)
    )
    before, after = units.blocks_before_loop, units.blocks_after_loop
    last_block = gathered[after[-1]] if after else loop_weights  # the first unit backward gathers
    last_block_before_loop = gathered[before[-1]] if before else 0  # prefetched during the loop's backward
    out = {
        "head": phases["head"] + root * param_bytes,
        "head_grad": phases["head_grad"] + (root + unsharded.get("root", 0) + last_block) * param_bytes,
        "loop": phases["loop"]
        + (root + unsharded.get("root", 0) + loop_weights + loop_grads + last_block_before_loop) * param_bytes,
    }
    groups = [
        (sum(units.dense_sharded.get(u, 0) for u in loop_units), sizes["dp_shard"]),
        (sum(units.expert_sharded.get(u, 0) for u in loop_units), sizes["efsdp"]),
    ]
    out["loop_reduce"] = (
        phases["loop_reduce"]
        + (root + unsharded.get("root", 0) + last_block_before_loop) * param_bytes
        + reduce_buffers(groups, param_bytes, reduce_bytes, divide=sizes["ep"] > 1)
    )
    if before:  # a dense block before the loop being differentiated (they are all alike)
        block = before[0]
        out["dense"] = (
            phases["dense"]
            + (root + unsharded.get("root", 0) + gathered[block] + units.largest_param[block]) * param_bytes
        )
    return out


def reduce_buffers(groups: list[tuple[int, int]], param_bytes: int, reduce_bytes: int, divide: bool) -> int:
    """Peak bytes of one unit's gradient reduction (`working_memory`'s 'loop_reduce'), the worse group order.

    groups: (padded shard elements, shard count) per param group; gradients counted at their padded size."""
    worst = 0
    for order in (groups, groups[::-1]):
        # every group's unsharded gradients
        grads = sum(shard_numel * shard_count for shard_numel, shard_count in order) * param_bytes
        held = 0  # inputs of the groups already reduced
        for shard_numel, shard_count in order:
            full = shard_numel * shard_count * reduce_bytes
            worst = max(worst, grads + held + full)  # copy-in: gradients and the new input
            grads -= shard_numel * shard_count * param_bytes
            worst = max(
                worst, grads + held + full + shard_numel * reduce_bytes + (full if shard_count == 1 and divide else 0)
            )
            held += full
    return worst
