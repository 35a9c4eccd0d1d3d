"""torch.compile per transformer block, never the loop: a new sampled depth re-runs the same compiled blocks."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor


def _wait_outside_graph(_module: nn.Module, _args, output):
    """A tensor-parallel output that feeds a compiled block, made a plain tensor in eager (a copy, autograd kept).

    torch 2.13's AOTAutograd unwraps an AsyncCollectiveTensor graph input with `trigger_wait()`, which returns its
    grad-less inner tensor: the compiled block then has no gradient for that input (the embedding lost its lookup
    gradient; pytorch/pytorch#191113), and an input that is sometimes an ACT recompiles (pytorch/pytorch#187073).
    """
    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


def apply_compile(
    model: nn.Module, compile_experts: bool = True, expert_parallel: bool = False, tensor_parallel: bool = False
) -> None:
    """Compile the plan's blocks and its loop block in place (`Module.compile`: names unchanged).

    The looped block is one graph (fullgraph) unless something in it must stay eager: expert parallelism's
    dispatch (its all-to-all split sizes are host values) or, with compile_experts=False, the routed experts.
    compile_experts=False is for fp32 compute (CPU): torch 2.13's fake-tensor rule for `grouped_mm` accepts only
    bf16, so tracing fp32 experts fails although the eager kernel runs. Under tensor parallelism the same blocks
    compile; the tensor-parallel modules left eager hand them plain tensors (`_wait_outside_graph`).
    """
    plan = model.parallel_plan()
    compiled = (*plan.blocks, plan.loop_block)
    if tensor_parallel:
        for path in plan.tensor_parallel:
            if not any(path == c or path.startswith(f"{c}.") for c in compiled):
                model.get_submodule(path).register_forward_hook(_wait_outside_graph)
    for block in plan.blocks:
        model.get_submodule(block).compile(fullgraph=True)
    if not compile_experts:
        experts = model.get_submodule(plan.experts)
        experts.forward = torch.compiler.disable(experts.forward)
    model.get_submodule(plan.loop_block).compile(fullgraph=compile_experts and not expert_parallel)
