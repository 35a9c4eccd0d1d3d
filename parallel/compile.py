"""torch.compile per transformer block, never the loop: a new sampled depth re-runs the same compiled blocks."""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module, compile_experts: bool = True) -> None:
    """Compile prelude/coda blocks whole (fullgraph) and the looped block (graph breaks allowed: MoE routing and
    the expert-parallel split sizes are data-dependent). `Module.compile` compiles in place: names unchanged.

    compile_experts=False keeps the routed experts eager: torch 2.13's fake-tensor rule for `grouped_mm` accepts
    only bf16, so with fp32 compute (CPU) tracing them fails although the eager CPU kernel runs.
    """
    for block in [*model.prelude, *model.coda]:
        block.compile(fullgraph=True)
    block = model.recurrent.block
    if not compile_experts:
        block.moe.experts.forward = torch.compiler.disable(block.moe.experts.forward)
    block.compile()
