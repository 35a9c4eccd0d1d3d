"""Apply every parallelism to a model, in torchtitan's order: TP -> EP (swaps modules) -> AC -> compile -> FSDP."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.expert_kernel import check_expert_kernel
from parallel.expert_parallel import apply_expert_parallel
from parallel.fsdp import apply_fsdp, mixed_precision_policy
from parallel.mesh import ParallelDims
from parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: nn.Module, dims: ParallelDims, cfg) -> Callable | None:
    """`cfg` is the JobConfig. Returns the per-iteration wrapper for `model(..., wrap_iteration=...)`, or None."""
    parallel = cfg.parallel
    compute_dtype = mixed_precision_policy(parallel, dims.device_type).param_dtype
    check_expert_kernel(dims.device_type, compute_dtype, parallel.allow_slow_experts)
    if dims.tp_enabled:
        apply_tensor_parallel(model, dims.tp_mesh, model.parallel_plan().tensor_parallel)
    apply_expert_parallel(model, dims)
    wrap_iteration = apply_activation_checkpointing(
        model,
        parallel.activation_checkpoint,
        keep_collectives=not parallel.reshard_per_iteration,
        shared_expert_chunks=parallel.shared_expert_chunks,
    )
    if parallel.compile:
        apply_compile(
            model,
            compile_experts=compute_dtype == torch.bfloat16,
            expert_parallel=dims.ep_enabled,
            tensor_parallel=dims.tp_enabled,
        )
    apply_fsdp(model, dims, parallel)
    return wrap_iteration
