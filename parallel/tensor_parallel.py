"""Tensor + sequence parallelism from torch's DTensor styles (`parallelize_module`), driven by the model's plan.

Megatron-LM's layout with sequence parallelism (as torchtitan builds it): between TP regions every tp rank holds
its seq_len / tp slice of the residual stream (plain local tensors [B, S / tp, dim]), and each region gathers its
input whole and reduce-scatters its output back to the slices. The model's plan (ParallelPlan.tensor_parallel,
mythos_train/model/parallel_plan.py) names a layout per submodule; each becomes a torch style here:
- colwise: `ColwiseParallel`, weight Shard(0): this rank's heads / hidden units;
- rowwise: `RowwiseParallel`, weight Shard(1), its output left a Partial DTensor for the region to reduce-scatter;
- attention_region / ffn_region (dim 1 of [B, S, dim]) and rows_region (dim 0 of the shared experts' flattened
  rows [N, dim]): `PrepareModuleInputOutput`, the input all-gathered into a Replicate DTensor (the colwise
  projections' input gradients add up as one Partial and are reduce-scattered once in backward), the Partial
  output reduce-scattered to this rank's slice; attention_region_local hands the gathered input on as a plain
  tensor (MLA: its replicated down-projections run on the whole sequence, see docs/design.md);
- heads: `PrepareModuleInputOutput` around MLA's rope-key broadcast: split over heads in forward; in backward the
  head-split gradient is all-gathered and summed over every head, so the shared key gets the full gradient;
- sequence_parallel: `SequenceParallel` (norms): weight a Replicate DTensor, its gradient reduced over tp by DTensor;
- sequence_parallel_head_input: the final norm, sequence-parallel, its output gathered into a Replicate DTensor so
  the tied head `F.linear(norm(h), tok_embeddings.weight)` returns Shard(-1) logits (`loss_context` then);
- vocab_embedding: `RowwiseParallel` on the embedding, weight Shard(0) over the vocabulary, lookup reduce-scattered;
- sequence_local: no style. Plain parameters the loop uses on its sequence slices (injection, LoRA, norm, ACT, the
  router gate): each tp rank gets a partial gradient, summed by `reduce_sequence_parallel_grads` (one bucket).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from parallel.mesh import ParallelDims

SEQUENCE_LOCAL = "sequence_local"


class SequenceParallelGathered(SequenceParallel):
    """`SequenceParallel` whose output is all-gathered into a Replicate DTensor (the tied head's input)."""

    @staticmethod
    def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
        return outputs.redistribute(placements=(Replicate(),))


def _region(dim: int, extra_inputs: int, local_input: bool = False) -> ParallelStyle:
    """Gather the module's first input over the sequence (Shard(dim) -> Replicate), reduce-scatter its output."""
    rest = (None,) * extra_inputs  # attention also takes (rope, cache)
    return PrepareModuleInputOutput(
        input_layouts=(Shard(dim), *rest),
        desired_input_layouts=(Replicate(), *rest),
        use_local_input=local_input,
        output_layouts=(Partial(),),
        desired_output_layouts=(Shard(dim),),
        use_local_output=True,
    )


def _style(layout: str) -> ParallelStyle:
    if layout == "colwise":
        return ColwiseParallel()
    if layout == "rowwise":
        return RowwiseParallel(output_layouts=Partial(), use_local_output=False)
    if layout == "attention_region":
        return _region(1, extra_inputs=2)
    if layout == "attention_region_local":
        return _region(1, extra_inputs=2, local_input=True)
    if layout == "ffn_region":
        return _region(1, extra_inputs=0)
    if layout == "rows_region":
        return _region(0, extra_inputs=0)
    if layout == "heads":  # [B, S, heads, rope]: dim 2 is the head dim
        return PrepareModuleInputOutput(
            input_layouts=(Replicate(),),
            desired_input_layouts=(Replicate(),),
            output_layouts=(Replicate(),),
            desired_output_layouts=(Shard(2),),
            use_local_input=False,
            use_local_output=True,
        )
    if layout == "sequence_parallel":
        return SequenceParallel(use_local_output=True)
    if layout == "sequence_parallel_head_input":
        return SequenceParallelGathered()
    if layout == "vocab_embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    raise ValueError(f"unknown tensor-parallel layout {layout!r}")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str]) -> None:
    """Split every submodule `plan` names over `tp_mesh` (in place, before EP, AC, compile and FSDP).

    The model pads a sequence tp does not divide (`sequence_multiple`): a one-token decode runs tp tokens."""
    styles = {path: _style(layout) for path, layout in plan.items() if layout != SEQUENCE_LOCAL}
    parallelize_module(model, tp_mesh, styles)
    model.sequence_multiple, model.sequence_rank = tp_mesh.size(), tp_mesh.get_local_rank()


@torch.no_grad()
def reduce_sequence_parallel_grads(model: nn.Module, dims: ParallelDims | None) -> None:
    """Sum over the tp ranks the gradients of the plan's `sequence_local` parameters, once per step, after the
    last backward (Megatron's finalize_model_grads): each tp rank's is its own sequence slice's share.

    One all-reduce of one flat bucket over the tp mesh (not one per parameter). FSDP has already reduced them over
    the data ranks; the tp ranks of one data rank hold the same FSDP shard, so their local shards add up."""
    if dims is None or not dims.tp_enabled:
        return
    plan = model.parallel_plan().tensor_parallel
    modules = [model.get_submodule(path) for path, layout in plan.items() if layout == SEQUENCE_LOCAL]
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if not local:
        return
    bucket = _flatten_dense_tensors(local)
    dist.all_reduce(bucket, group=dims.tp_mesh.get_group())
    for g, summed in zip(local, _unflatten_dense_tensors(bucket, local), strict=True):
        g.copy_(summed)


@torch.no_grad()
def whole_sequence_stats(means: torch.Tensor, maxima: torch.Tensor, dims: ParallelDims | None):
    """Statistics each tp rank took over its sequence slice -> the whole sequence's (means averaged over the equal
    slices, maxima maxed), e.g. the loop's telemetry; unchanged without TP. Two small all-reduces over tp."""
    if dims is None or not dims.tp_enabled:
        return means, maxima
    means, maxima = means.clone(), maxima.clone()
    dist.all_reduce(means, group=dims.tp_mesh.get_group())
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=dims.tp_mesh.get_group())
    return means / dims.tp, maxima


def loss_context(dims: ParallelDims | None) -> AbstractContextManager:
    """Around a forward and its backward: vocabulary-parallel cross-entropy on Shard(-1) logits under TP.

    torch's `loss_parallel` swaps DTensor's log-softmax / nll-loss ops for ones that reduce over the vocabulary
    shards; the backward needs them too. Not reentrant: enter it once, around both.
    """
    return loss_parallel() if dims is not None and dims.tp_enabled else nullcontext()


@contextmanager
def full_logits(model: nn.Module) -> Iterator[None]:
    """Inside: the model returns plain logits over the whole vocabulary (all-gathered under TP), for the callers
    that read them rather than take a loss (generation, canary accuracy). A no-op without TP."""
    handle = model.register_forward_hook(lambda _m, _a, out: out.full_tensor() if isinstance(out, DTensor) else out)
    try:
        yield
    finally:
        handle.remove()
