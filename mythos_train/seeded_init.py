"""Initialise a sharded model to exactly the values a single process would draw.

`model.init_weights()` on FSDP/EP-sharded DTensors would let every rank draw its shard from the same generator
state, so the weights would depend on the mesh (and DTensor's offset-based RNG does not cover CPU). Here each
`nn.init.*` call and random in-place method (`normal_`, `uniform_`, ...) on a DTensor is replayed on a full-size
tensor drawn from the default generator, in the model's own init order, and each rank keeps its shard of it.
Every rank thus consumes the generator exactly like one unsharded process, for any mesh. Other ops
(`zero_()`, `mul_`, buffers) run on the shards as usual. Costs one full parameter of transient memory at a time,
so it is used only where DTensor has no RNG of its own (CPU meshes, i.e. tests and small runs). On CUDA, DTensor's
offset-based Philox tracker draws each shard at its own offset of the generator, with no full-size copy — the
only way a 1T model's stacked experts (hundreds of GB each) can be initialised. Its values are NOT those of one
process: which Philox output lands on which element depends on the local shard's shape, so on CUDA the initial
weights depend on the mesh (world size, ep, efsdp). A run resumed on another mesh is unaffected (it loads its
checkpoint); two fresh CUDA runs on different meshes start from different weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

_RANDOM_METHODS = {
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
    torch.Tensor.random_,
    torch.Tensor.bernoulli_,
    torch.Tensor.exponential_,
    torch.Tensor.log_normal_,
    torch.Tensor.cauchy_,
    torch.Tensor.geometric_,
}


def _target(func, args: tuple, kwargs: dict) -> DTensor | None:
    """The DTensor an init function or random method fills, if this call is one of those."""
    if func in _RANDOM_METHODS or getattr(func, "__module__", None) == "torch.nn.init":
        tensor = args[0] if args else kwargs.get("tensor")
        if isinstance(tensor, DTensor):
            return tensor
    return None


class _FullTensorInit(TorchFunctionMode):
    """Runs `nn.init.*` and random in-place methods on a full-size tensor, then keeps this rank's shard."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = _target(func, args, kwargs)
        if target is None:
            return func(*args, **kwargs)
        local = target.to_local()
        full = torch.empty(target.shape, dtype=target.dtype, device=local.device)
        if args:
            func(full, *args[1:], **kwargs)
        else:
            func(**(kwargs | {"tensor": full}))
        local.copy_(distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local())
        return target


@torch.no_grad()
def init_weights_seeded(model: nn.Module, seed: int) -> None:
    """`torch.manual_seed(seed)` then `model.init_weights()`; mesh-independent on CPU, mesh-dependent on CUDA."""
    torch.manual_seed(seed)
    param = next(model.parameters(), None)
    if param is not None and isinstance(param, DTensor) and param.device.type == "cuda":
        model.init_weights()  # DTensor's own offset-based RNG: shard-local, values depend on the mesh
        return
    with _FullTensorInit():
        model.init_weights()
