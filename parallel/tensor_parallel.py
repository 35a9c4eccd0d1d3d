"""Tensor parallelism from torch's DTensor styles (`parallelize_module`), driven by the model's plan.

The model's plan (ParallelPlan.tensor_parallel, mythos_train/model/parallel_plan.py) names a layout per submodule; each becomes a torch style here:
- colwise: `ColwiseParallel`, weight Shard(0): this rank's heads / hidden units; the replicated input's
  gradient is all-reduced in backward (Megatron's f);
- rowwise: `RowwiseParallel`, weight Shard(1); the output is all-reduced to Replicate (Megatron's g);
- attention_input / ffn_input: `PrepareModuleInput` turning the module's input x into a Replicate DTensor, so
  that its colwise projections (q/k/v, or w1/w3) add their input gradients as one Partial and all-reduce once;
- heads: `PrepareModuleInputOutput` around MLA's rope-key broadcast: a Replicate input expanded to all heads,
  then split over heads (a local slice); in backward the head-split gradient is all-gathered and summed over
  every head, so the shared key (and kv_down) get the full gradient;
- vocab_embedding: `RowwiseParallel` on the embedding, weight Shard(0) over the vocabulary, lookup all-reduced;
- vocab_head_input: `PrepareModuleOutput` making the final norm's output a Replicate DTensor, so the tied head
  `F.linear(norm(h), tok_embeddings.weight)` runs on the vocabulary shard and returns Shard(-1) logits; the
  loss then needs `loss_context` (torch's `loss_parallel`) around forward and backward.
Parameters outside the plan stay plain tensors: each tp rank holds and updates the same copy (FSDP shards them
over the data-parallel mesh only). Collectives per transformer block: forward 2 all-reduces, backward 2
(GQA) or 4 all-reduces + 1 all-gather (MLA: its three up-projections have different inputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)

from parallel.mesh import ParallelDims


def _style(layout: str) -> ParallelStyle:
    if layout == "colwise":
        return ColwiseParallel()
    if layout == "rowwise":
        return RowwiseParallel()
    if layout in ("attention_input", "ffn_input"):  # attention takes (x, rope, cache), an FFN (x,)
        layouts = (Replicate(), None, None) if layout == "attention_input" else (Replicate(),)
        return PrepareModuleInput(input_layouts=layouts, desired_input_layouts=layouts, use_local_output=False)
    if layout == "heads":  # [B, S, heads, rope]: dim 2 is the head dim
        return PrepareModuleInputOutput(
            input_layouts=(Replicate(),),
            desired_input_layouts=(Replicate(),),
            output_layouts=(Replicate(),),
            desired_output_layouts=(Shard(2),),
            use_local_input=False,
            use_local_output=True,
        )
    if layout == "vocab_embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if layout == "vocab_head_input":
        return PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Replicate(), use_local_output=False
        )
    raise ValueError(f"unknown tensor-parallel layout {layout!r}")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str]) -> None:
    """Split every submodule `plan` names over `tp_mesh` (in place, before AC, compile and FSDP)."""
    parallelize_module(model, tp_mesh, {path: _style(layout) for path, layout in plan.items()})


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
