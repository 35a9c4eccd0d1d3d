"""plan_activations' per-op formula against what autograd really saves (CPU, fp32, one process).

Per block: every tensor handed to `saved_tensors_hooks` during one loop step / one dense block, deduplicated by
storage, weights, buffers and the block's inputs excluded. Whole model: allocator growth from the start of the
forward to the loss (torch profiler memory events, see tests/plan_testing.py), per checkpointing policy. If the
model changes what it saves, these fail and the formula's docstring table needs the same change.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.graph as autograd_graph
from plan_testing import allocation_curve
from torch.profiler import ProfilerActivity, profile

from mythos_train.config import load_config
from mythos_train.loss import cross_entropy_sum
from mythos_train.model import MythosModel
from mythos_train.planner.activations import dense_block_bytes, loop_step_bytes, micro_batch_activations
from parallel.activation_checkpoint import apply_activation_checkpointing, tile_module

B, S = 2, 32
VARIANTS = {
    "mla v = nope + rope": [],
    "mla v < nope + rope": ["--model.v_head_dim=16"],
    "mla v > nope + rope": ["--model.v_head_dim=48"],
    "gqa": ["--model.attn_type=gqa"],
    "gqa, kv heads = heads": ["--model.attn_type=gqa", "--model.n_kv_heads=4"],
    "parcae, no shared experts": ["--model.injection=parcae", "--model.n_shared_experts=0"],
    "wide ffn": ["--model.dense_ffn_dim=512", "--model.expert_dim=96", "--model.n_experts_per_tok=3"],
    "tiled shared experts": ["--parallel.shared_expert_chunks=4", "--model.expert_dim=96"],
    "no depth LoRA, no loop embedding": ["--model.lora_rank=0", "--model.loop_embedding=false"],
}


def saved_bytes(model: torch.nn.Module, fn, inputs: list[torch.Tensor]) -> int:
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *inputs]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            storages[key] = t.untyped_storage().nbytes()
        return t

    with autograd_graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_formulas_match_saved_tensors(variant: str):
    cfg = load_config("configs/debug.toml", VARIANTS[variant])
    m = cfg.model
    torch.manual_seed(0)
    model = MythosModel(m)
    chunks = cfg.parallel.shared_expert_chunks
    if chunks > 1:  # what parallelize applies from outside
        tile_module(model.recurrent.block.moe.shared, chunks)
    rope = model.rope(0, S)
    h, e = (torch.randn(B, S, m.dim, requires_grad=True) for _ in range(2))
    input_term = model.recurrent.injection.input_term(e)
    step = saved_bytes(model, lambda: model.recurrent.iteration(h, e, input_term, 1, rope), [h, e, input_term])
    dense = saved_bytes(model, lambda: model.prelude[0](h, rope), [h])
    # The formulas count the block's input (h) as its own: the measurement excluded it.
    assert loop_step_bytes(m, 4, True, 1, chunks) * B * S == pytest.approx(step + m.dim * 4 * B * S, rel=0.01)
    assert dense_block_bytes(m, 4, True) * B * S == pytest.approx(dense + m.dim * 4 * B * S, rel=0.01)


@pytest.mark.parametrize(
    "policy, chunks, n, initial_state",
    [("none", 1, 1, "prelude"), ("loop", 1, 1, "prelude"), ("full", 1, 1, "prelude"), ("none", 4, 1, "prelude")]
    + [("full", 1, 0, "zero"), ("loop", 1, 0, "noise")],  # h_0 is not e: both are saved
)
def test_saved_at_end_of_forward(policy: str, chunks: int, n: int, initial_state: str):
    cfg = load_config("configs/debug.toml", ["--model.vocab_size=512", f"--model.initial_state={initial_state}"])
    torch.manual_seed(0)
    model = MythosModel(cfg.model)
    wrap = apply_activation_checkpointing(model, policy, shared_expert_chunks=chunks)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 65))
    k = 3
    cross_entropy_sum(model(tokens[:, :-1], n_nograd=n, n_grad=k, wrap_iteration=wrap), tokens[:, 1:]).backward()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits = model(tokens[:, :-1], n_nograd=n, n_grad=k, wrap_iteration=wrap)
        loss = cross_entropy_sum(logits, tokens[:, 1:])
    _, held = allocation_curve(prof)
    predicted = micro_batch_activations(cfg.model, 4 * 64, k, n, policy, 4, True, shared_chunks=chunks).saved
    assert predicted == pytest.approx(held, rel=0.05)
    del logits, loss
