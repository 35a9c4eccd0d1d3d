"""torch.compile per transformer block, never the loop: a new sampled depth re-runs the same compiled blocks."""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module, compile_experts: bool = True, expert_parallel: bool = False) -> None:
    """Compile the plan's blocks and its loop block in place (`Module.compile`: names unchanged).

    The looped block is one graph (fullgraph) unless something in it must stay eager: expert parallelism's
    dispatch (its all-to-all split sizes are host values) or, with compile_experts=False, the routed experts.
    compile_experts=False is for fp32 compute (CPU): torch 2.13's fake-tensor rule for `grouped_mm` accepts only
    bf16, so tracing fp32 experts fails although the eager kernel runs.
    """
    plan = model.parallel_plan()
    for block in plan.blocks:
        model.get_submodule(block).compile(fullgraph=True)
    if not compile_experts:
        experts = model.get_submodule(plan.experts)
        experts.forward = torch.compiler.disable(experts.forward)
    model.get_submodule(plan.loop_block).compile(fullgraph=compile_experts and not expert_parallel)
