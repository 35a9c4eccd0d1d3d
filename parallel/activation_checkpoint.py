"""Activation checkpointing: per loop iteration (the model calls `wrap_iteration(fn, *args)`), optionally per block.

The loop is where activations pile up (k gradient iterations of a MoE block), so 'loop' recomputes each
gradient iteration in backward and keeps only its inputs. 'full' also recomputes each block outside the loop.
Non-reentrant checkpointing: works with FSDP2 hooks, autograd-only inputs, and torch.compile'd blocks. The
iteration function returns its expert counts as outputs, so the recompute never counts tokens twice.

With expert parallelism the recompute would repeat the token all-to-alls; a selective-checkpoint policy keeps
their outputs instead (as torchtitan's op-level SAC does), so backward only runs the all-to-alls' own backward.
Not with `reshard_per_iteration`: FSDP hooks inside the checkpointed region issue different ops in forward and
recompute, which selective checkpointing rejects.

Tiling (`tile_module`, parallel.shared_expert_chunks) nests a checkpoint per token chunk inside the iteration's:
written here because the presets' shared experts are n_shared x top_k x expert_dim wide, so at long sequences one
iteration's shared SwiGLU activations dominate the backward's peak (the planner shows it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from parallel.expert_parallel import ExpertParallel

_ALL_TO_ALL = torch.ops._c10d_functional.all_to_all_single.default


def _save_collectives(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Only the all-to-alls: saving every `wait_tensor` would also keep TP's gathered sequence (and re-gather it
    anyway). The recompute's wait on a saved all-to-all result finds no pending work and returns it as is.
    Never a `wait_tensor` in a compiled block (the looped block's TP gathers): Inductor drops a wait's result and
    reads its input, so the recompute read an all-gather SAC never waited on (NaN gradients; docs/design.md)."""
    return CheckpointPolicy.MUST_SAVE if op is _ALL_TO_ALL else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_iteration(fn: Callable, *args):
    """The `wrap_iteration` the model calls for each gradient iteration."""
    return checkpoint(fn, *args, use_reentrant=False)


def checkpoint_iteration_keep_collectives(fn: Callable, *args):
    """`checkpoint_iteration` that saves all-to-all results rather than re-communicating them in backward."""
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_collectives)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)


def checkpoint_module(module: nn.Module) -> None:
    """Recompute `module`'s forward in backward. Patches the instance's forward, so parameter names stay as they are."""
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed_forward


def tile_module(module: nn.Module, chunks: int) -> None:
    """Run a row-wise module (x [N, D] -> [N, D']) over `chunks` row chunks, each recomputed in its own backward
    (tiled MLP, as in Arctic long-sequence training): its wide hidden activations are never kept, and its backward
    holds one chunk's. Rows are independent, so the output is the untiled one. Names stay as they are."""
    forward = module.forward

    @functools.wraps(forward)
    def tiled_forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # gradient-free iterations, eval: chunks only bound the transients
            return torch.cat([forward(rows) for rows in x.chunk(chunks)])
        return torch.cat([checkpoint(forward, rows, use_reentrant=False) for rows in x.chunk(chunks)])

    module.forward = tiled_forward


def apply_activation_checkpointing(
    model: nn.Module, policy: str, keep_collectives: bool = True, shared_expert_chunks: int = 1
) -> Callable | None:
    """Returns the loop's `wrap_iteration` (None for policy 'none'); 'full' also wraps the plan's blocks.

    keep_collectives: save expert all-to-all outputs when the model has ExpertParallel modules (see above).
    shared_expert_chunks > 1 tiles the plan's shared experts (`tile_module`), whatever the policy.
    """
    if policy not in ("none", "loop", "full"):
        raise ValueError(f"parallel.activation_checkpoint: unknown policy {policy!r} (none | loop | full)")
    plan = model.parallel_plan()
    if shared_expert_chunks > 1 and plan.shared_experts is not None:
        tile_module(model.get_submodule(plan.shared_experts), shared_expert_chunks)
    if policy == "none":
        return None
    if policy == "full":
        for block in plan.blocks:
            checkpoint_module(model.get_submodule(block))
    if keep_collectives and any(isinstance(m, ExpertParallel) for m in model.modules()):
        return checkpoint_iteration_keep_collectives
    return checkpoint_iteration
