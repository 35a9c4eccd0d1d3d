"""The kernel floor of a step: its GEMMs and attention kernels replayed alone, back to back.

A training step is its library kernels (matmuls, grouped GEMMs, fused attention) plus everything around them:
elementwise ops, norms, routing, copies, the allocator, autograd and Python. Recording the kernels of one real
step (op, shapes, strides, dtypes, and integer arguments such as grouped-GEMM offsets) and replaying them on
random data times the first part alone: how fast that step could run without faster kernels or less work.
`bench --floor` times it in the same rounds as the steps, so "how far is the step from its floor" and "can a target
be reached with these kernels" are measured, not argued.

The floor is optimistic: the replay shares one input tensor per distinct layout, so its operands are warmer in
cache than the step's, and it never waits for anything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"})
ATTENTION_PREFIX = "_scaled_dot_product_"
"Every SDPA backend's forward and backward op (`aten._scaled_dot_product_flash_attention_for_cpu`, ...)."


@dataclass(frozen=True)
class TensorSpec:
    """A floating-point operand's layout; the replay fills one like it with random values."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def make(self) -> torch.Tensor:
        storage = 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride) if size > 0)
        flat = torch.empty(storage, dtype=self.dtype, device=self.device).normal_()
        return flat.as_strided(self.shape, self.stride)


class KernelCall(NamedTuple):
    """One recorded kernel: floating-point tensors as TensorSpecs, integer ones (grouped-GEMM offsets) as values."""

    op: Any
    args: tuple
    kwargs: dict


def _spec(tensor: torch.Tensor) -> TensorSpec | torch.Tensor:
    if tensor.is_floating_point():
        return TensorSpec(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)
    return tensor.clone()


def _name(op) -> str:
    return op.overloadpacket.__name__


def is_kernel(op) -> bool:
    return _name(op) in GEMMS or _name(op).startswith(ATTENTION_PREFIX)


class _Recorder(TorchDispatchMode):
    """Sees every op below autograd (forward and backward); keeps the kernels, runs everything unchanged. A
    kernel's own inner calls (the CPU grouped GEMM's per-group mm) run below the mode and are not seen twice."""

    def __init__(self):
        super().__init__()
        self.calls: list[KernelCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_kernel(func):
            self.calls.append(KernelCall(func, *tree_map_only(torch.Tensor, _spec, (args, kwargs))))
        return func(*args, **kwargs)


def record_kernels(step: Callable[[], Any]) -> list[KernelCall]:
    """Run `step` once and return its GEMM and attention kernels, in order."""
    recorder = _Recorder()
    with recorder:
        step()
    return recorder.calls


def replay(calls: list[KernelCall]) -> Callable[[], None]:
    """A callable that runs `calls` back to back on random operands (allocated once, one per distinct layout)."""
    operands: dict[TensorSpec, torch.Tensor] = {}

    def operand(spec: TensorSpec) -> torch.Tensor:
        if spec not in operands:
            operands[spec] = spec.make()
        return operands[spec]

    prepared = [(call.op, *tree_map_only(TensorSpec, operand, (call.args, call.kwargs))) for call in calls]

    def run() -> None:
        for op, args, kwargs in prepared:
            op(*args, **kwargs)

    return run


def kernel_kind(call: KernelCall) -> str:
    """'attention', 'grouped GEMM' or 'GEMM' (mm, addmm, bmm, baddbmm)."""
    name = _name(call.op)
    return "attention" if name.startswith(ATTENTION_PREFIX) else "grouped GEMM" if name == "_grouped_mm" else "GEMM"


def gemm_flops(call: KernelCall) -> int:
    """Multiply-add FLOPs (2 per MAC) of a recorded GEMM; 0 for attention, whose work depends on its mask.

    Every row of a meets b's last dimension once: for mm, bmm and the grouped GEMM's [M, K] x [E, K, N] (rows split
    among experts), [E, M, K] x [E, K, N] and [M, K] x [K, N] (a weight gradient, groups along K) alike. A
    [E, M, K] x [K, N] grouped GEMM splits b's columns among the E groups instead. Assumes the offsets cover the
    whole grouped dimension (torch skips what lies past the last one), as the MoE's do."""
    name = _name(call.op)
    if name not in GEMMS:
        return 0
    a, b = (call.args[1], call.args[2]) if name in ("addmm", "baddbmm") else (call.args[0], call.args[1])
    if name == "_grouped_mm" and len(a.shape) == 3 and len(b.shape) == 2:
        return 2 * a.shape[1] * a.shape[2] * b.shape[1]
    return 2 * math.prod(a.shape) * b.shape[-1]
