"""The device mesh: one world of data-parallel ranks, viewed two ways.

Dense weights see (dp_replicate, dp_shard): HSDP across nodes, FSDP inside. Expert weights see
(dp_replicate, efsdp, ep): `ep` borrows the innermost ranks of each dp_shard group (so the all-to-all stays
on the fastest links) and `efsdp = dp_shard / ep` is what is left over to shard each expert group with FSDP.
Both views are `_unflatten`s of the same 1-D world mesh, so DTensors on them share a root mesh (FSDP and DCP
need that to combine the ep sharding with the efsdp sharding).
With tensor parallelism, `tp` is the innermost axis of both views (HSDP x FSDP x TP, tp inside a node); the
data-parallel ranks are then the world with tp folded out, and FSDP collectives run between ranks with the same tp
index. Under sequence parallelism every tp rank routes its own tokens, so the tp ranks are folded into EP: the
experts' group is (ep, tp) flattened, ep x tp ranks (experts split over them, not replicated over tp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mythos_train.distributed import local_device, start_process_group
from mythos_train.errors import ConfigError
from parallel.config import ParallelConfig, mesh_sizes


@dataclass
class ParallelDims:
    """Resolved axis sizes and the meshes built from them (sizes are those of `parallel.config.mesh_sizes`)."""

    dp_replicate: int
    dp_shard: int
    ep: int
    efsdp: int
    device_type: str
    world_mesh: DeviceMesh
    "1-D mesh over every rank; with data parallelism only, it is also the data-parallel mesh."
    fsdp_mesh: DeviceMesh
    "Dense weights: (dp_shard,) or (dp_replicate, dp_shard) for HSDP."
    efsdp_mesh: DeviceMesh
    "Expert weights' own data-parallel mesh: (efsdp,) or (dp_replicate, efsdp)."
    ep_mesh: DeviceMesh | None
    "Expert-parallel mesh: (ep, tp) flattened, the experts' group; None when ep x tp == 1."
    tp: int = 1
    tp_mesh: DeviceMesh | None = None
    "Tensor-parallel mesh (innermost ranks); None when tp == 1."
    data_mesh: DeviceMesh | None = None
    "(dp_replicate x dp_shard) flattened when tp > 1; None = the world mesh is the data-parallel mesh."

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_mesh(self) -> DeviceMesh:
        """Ranks that see different tokens (dp_replicate x dp_shard flattened): data loader rank/world."""
        return self.data_mesh if self.data_mesh is not None else self.world_mesh

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.dp_mesh.size()

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def ep_enabled(self) -> bool:
        """Routed experts split over ranks: ep > 1, or tp > 1 (folded into EP)."""
        return self.ep_mesh is not None


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str = "auto") -> ParallelDims:
    """Validate the axis sizes (ConfigError before any collective), init the process group if needed, build meshes.

    The process group is started here when the caller has not (mythos_train/distributed.start_process_group: torchrun
    env vars, or an in-memory store for a lone process).
    """
    sizes = mesh_sizes(parallel, world_size)
    device = local_device(device_type)
    if not dist.is_initialized():
        start_process_group(parallel, device)
    if dist.get_world_size() != world_size:
        raise ConfigError(f"build_mesh: world_size {world_size} != process group size {dist.get_world_size()}")
    replicate, shard, ep, efsdp, tp = (sizes[name] for name in ("dp_replicate", "dp_shard", "ep", "efsdp", "tp"))
    world = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    if tp > 1:
        dense = world._unflatten(0, (replicate, shard, tp), ("dp_replicate", "dp_shard", "tp"))
        sparse = world._unflatten(0, (replicate, efsdp, ep, tp), ("dp_replicate", "efsdp", "ep", "tp"))
        tp_dims = {"tp": tp, "tp_mesh": dense["tp"], "data_mesh": dense["dp_replicate", "dp_shard"]._flatten("data")}
        experts = sparse["ep", "tp"]._flatten("ep_tp")
    else:
        dense = world._unflatten(0, (replicate, shard), ("dp_replicate", "dp_shard"))
        sparse = world._unflatten(0, (replicate, efsdp, ep), ("dp_replicate", "efsdp", "ep"))
        tp_dims, experts = {}, sparse["ep"] if ep > 1 else None
    return ParallelDims(
        dp_replicate=replicate,
        dp_shard=shard,
        ep=ep,
        efsdp=efsdp,
        device_type=device.type,
        world_mesh=world,
        fsdp_mesh=dense["dp_replicate", "dp_shard"] if replicate > 1 else dense["dp_shard"],
        efsdp_mesh=sparse["dp_replicate", "efsdp"] if replicate > 1 else sparse["efsdp"],
        ep_mesh=experts,
        **tp_dims,
    )
