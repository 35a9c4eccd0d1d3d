"""FSDP2 from outside the model: the units the model's plan names (model/parallel_plan.py), then the root.

The looped block runs n + k times per step. Sharding the plan's `loop` (whose forward runs the whole loop) makes
that one FSDP unit: one all-gather in forward, one in backward, one reduce-scatter, at any depth (per-iteration
activation checkpointing recomputes inside the backward unshard window, so it adds none).
`reshard_per_iteration` also shards the plan's `loop_block`, trading one all-gather per iteration for memory.

Expert weights (DTensors over ep after expert parallelism) join the same unit through a per-parameter mesh:
FSDP gives them their own param group over (dp_replicate, efsdp), hooked to the same forward, so they too are
gathered once per step. Their gradients already hold every ep rank's tokens (the all-to-all backward brought
them), so they are summed over efsdp x dp_replicate and divided by the whole data-parallel size.

The parameters every iteration uses (loop dynamics, router gate) get no fp32 unit of their own: the loop reads them
before any of their modules runs (fp32 views, model/recurrent.py), the gate sits inside the compiled block, a nested
bf16 unit for the block would reduce-scatter once per iteration, and one unit holds one gradient dtype. Their k
gradients are summed in fp32 through those views instead, rounded once to param_dtype, then reduced in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from mythos_train.dtypes import resolve_param_dtype, torch_dtype
from parallel.config import ParallelConfig
from parallel.expert_parallel import ExpertParallel
from parallel.mesh import ParallelDims


def mixed_precision_policy(parallel: ParallelConfig, device_type: str) -> MixedPrecisionPolicy:
    """param_dtype 'auto' = bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow there); reductions in reduce_dtype.

    Forward inputs are not cast: activations are already in param_dtype (the embedding's output), and the fp32
    RoPE tables every block receives must stay fp32 (in bf16, cos/sin are off by up to 2e-3 at long positions).
    """
    return MixedPrecisionPolicy(
        param_dtype=torch_dtype(resolve_param_dtype(parallel.param_dtype, device_type)),
        reduce_dtype=torch_dtype(parallel.reduce_dtype),
        cast_forward_inputs=False,
    )


def expert_shard_dim(local_experts: int, efsdp: int) -> int:
    """Dim the efsdp axis shards stacked expert weights [E/ep, ...] on: 0 (experts), or 1 when there are fewer
    local experts than efsdp ranks (dim 0 would pad the shards and every all-gather, e.g. 32 over 64 ranks doubles
    them); torchtitan makes the same switch."""
    return 1 if efsdp > local_experts else 0


def _expert_placement_fn(model: nn.Module, dims: ParallelDims):
    """Per-parameter mesh: expert DTensors shard over efsdp (+ replicate over dp_replicate), the rest default."""
    if not dims.ep_enabled:
        return None
    # Imported only here: torch 2.11 has no ShardPlacementResult, and runs without EP need nothing from it
    # (the GPU image the device checks use has torch 2.11; see benchmarks/gpu_check.sh).
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, HSDPMeshInfo, ShardPlacementResult

    experts = [m for m in model.modules() if isinstance(m, ExpertParallel)]
    expert_params = {id(p) for m in experts for p in m.parameters()}
    local_experts = next(iter(experts[0].parameters())).to_local().shape[0]
    mesh = dims.efsdp_mesh
    if mesh.ndim == 2:
        info = HSDPMeshInfo(mesh, shard_mesh_dim=1, replicate_mesh_dim=0)
    else:
        info = FSDPMeshInfo(mesh, shard_mesh_dim=0)
    expert = ShardPlacementResult(placement=Shard(expert_shard_dim(local_experts, dims.efsdp)), mesh_info=info)
    return lambda p: expert if id(p) in expert_params else None


def prefetch_chain(units: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """(unit, the unit whose all-gather it issues right after its own) in forward and in backward order.

    Under expert parallelism parallel/fsdp.py sets these explicitly (as torchtitan does): the all-to-all's split
    sizes make the host wait for the device inside the looped unit, so FSDP2's implicit schedule (forward: gather
    when the CPU reaches a unit; backward: the next unit in reverse forward order) leaves gathers exposed. Each
    unit prefetches the next one in forward and the previous one in backward; the root (embedding, final norm,
    tied head) stays gathered from forward to the end of backward, so it starts both chains. `units` are the
    plan's `fsdp_units` (forward order); with reshard_per_iteration the loop block's own unit keeps FSDP's
    schedule. The planner counts what stays exposed (planner/comm.exposed_loop_gather_s).
    """
    forward = [("root", units[0]), *zip(units, units[1:])]
    backward = [("root", units[-1]), *zip(units[:0:-1], units[-2::-1])]
    return {"forward": forward, "backward": backward}


def set_explicit_prefetch(model: nn.Module) -> dict[str, list[tuple[str, str]]]:
    """Make FSDP follow `prefetch_chain` on this model; returns the chain."""
    chain = prefetch_chain(model.parallel_plan().fsdp_units)

    def unit(name: str) -> FSDPModule:
        return model if name == "root" else model.get_submodule(name)

    for name, prefetched in chain["forward"]:
        unit(name).set_modules_to_forward_prefetch([unit(prefetched)])
    for name, prefetched in chain["backward"]:
        unit(name).set_modules_to_backward_prefetch([unit(prefetched)])
    return chain


def apply_fsdp(model: nn.Module, dims: ParallelDims, parallel: ParallelConfig) -> None:
    mp = mixed_precision_policy(parallel, dims.device_type)
    mesh = dims.fsdp_mesh
    placement_fn = _expert_placement_fn(model, dims)
    plan = model.parallel_plan()
    for unit in plan.fsdp_units:
        module = model.get_submodule(unit)
        if unit != plan.loop:
            fully_shard(module, mesh=mesh, mp_policy=mp)
        elif parallel.reshard_per_iteration:
            fully_shard(model.get_submodule(plan.loop_block), mesh=mesh, mp_policy=mp, shard_placement_fn=placement_fn)
            fully_shard(module, mesh=mesh, mp_policy=mp)
        else:
            fully_shard(module, mesh=mesh, mp_policy=mp, shard_placement_fn=placement_fn)
    # The root (embedding/tied head, final norm) is needed first in backward: keep it gathered after forward.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        if dims.ep_enabled:
            # Every group (dense and expert) averages over all data-parallel ranks.
            module.set_gradient_divide_factor(float(dims.dp_size))
        if dims.device_type == "cpu" or dist.get_backend() == "gloo":
            _force_sum_reduction(module)
    if dims.ep_enabled:
        set_explicit_prefetch(model)


def _force_sum_reduction(module: FSDPModule) -> None:
    """gloo has no PREMUL_SUM: reduce with SUM and let FSDP divide afterwards, per param group.

    Groups whose reduce-scatter spans one rank (e.g. experts with efsdp = 1) are left alone: they issue no
    reduce-scatter, and torch 2.13's foreach_reduce would divide their gradient twice under forced SUM
    (once in the single-rank copy, once as the post-divide).
    """
    for group in module._get_fsdp_state()._fsdp_param_groups:
        if group.mesh_info.shard_mesh_size > 1:
            group.force_sum_reduction_for_comms = True
