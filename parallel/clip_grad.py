"""Global gradient-norm clipping across parameters that live on different meshes.

Dense grads are DTensors on the dense FSDP mesh, expert grads on (efsdp, ep) meshes; DTensor ops cannot mix
meshes, and reducing each mesh's partial norm separately costs one or two collectives per mesh (torchtitan's
`clip_grad_norm_` does that, and is not a dependency here). Every mesh built by `build_mesh` spans the whole
world, so instead: each rank sums |g|^p over its local shards, divided by how many ranks hold a copy of that
shard (the product of the mesh sizes along Replicate axes), and one all-reduce over the world gives the norm.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _copies(grad: torch.Tensor, world_size: int) -> int:
    """Ranks holding the same local values as this one: replicated mesh axes, or every rank for a plain tensor.

    A mesh spanning part of the world (the data-parallel mesh under tensor parallelism) is replicated over the
    ranks it leaves out (the tp ranks of a parameter tensor parallelism does not split).
    """
    if not isinstance(grad, DTensor):
        return world_size
    mesh = grad.device_mesh
    if world_size % mesh.size():
        raise ValueError(f"clip_grad_norm_: gradient mesh {mesh} does not tile all {world_size} ranks")
    replicated = math.prod(size for size, p in zip(mesh.shape, grad.placements) if p.is_replicate())
    return replicated * world_size // mesh.size()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, dims=None, norm_type: float = 2.0
) -> torch.Tensor:
    """Clip in place to a global `max_norm` (0 = measure only); returns the total norm (fp32, the same on all ranks).

    `dims` (ParallelDims) picks the world group; None = the default group (or no communication without one).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    distributed = dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    inf = math.isinf(norm_type)
    local_by_copies: dict[int, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        local_by_copies[_copies(g, world_size)].append(g.to_local() if isinstance(g, DTensor) else g)
    parts = []
    for copies, local in local_by_copies.items():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(local, norm_type)).float(), norm_type)
        parts.append(norm if inf else norm.pow(norm_type) / copies)
    total = torch.stack(parts).max() if inf else torch.stack(parts).sum()
    if distributed and world_size > 1:
        group = dims.world_mesh.get_group() if dims is not None else None
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
    if not inf:
        total = total.pow(1.0 / norm_type)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for local in local_by_copies.values():
            torch._foreach_mul_(local, coef.to(local[0].dtype))
    return total
