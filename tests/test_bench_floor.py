"""The kernel floor (bench/floor.py) records every GEMM and attention kernel of a step, counts their FLOPs as torch
does, and replays exactly those kernels and nothing else."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from model_testing import per_expert_swiglu, tiny_model_config
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

from mythos_train.bench.floor import gemm_flops, is_kernel, record_kernels, replay
from mythos_train.model import MythosModel, moe


def _hand_step():
    """A linear layer, causal SDPA and a grouped GEMM over 4 groups (one empty), forward and backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g)
    w = torch.randn(16, 48, generator=g, requires_grad=True)
    experts = torch.randn(4, 16, 8, generator=g, requires_grad=True)
    offsets = torch.tensor([2, 5, 5, 8], dtype=torch.int32)

    def step():
        q, k, v = (x @ w).view(1, 2, 8, 24).split(8, dim=-1)  # [1, 2 heads, 8, 8] each
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).reshape(8, 16)
        (F.grouped_mm(out, experts, offs=offsets) ** 2).sum().backward()

    return step


def test_records_each_kernel_of_a_step_forward_and_backward():
    calls = record_kernels(_hand_step())
    names = sorted(call.op.overloadpacket.__name__ for call in calls)
    assert names == sorted(
        ["mm"] * 2  # x @ w, and the gradient of w (x has none)
        + ["_grouped_mm"] * 3  # forward, the gradient of its input and of the experts
        + ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"]
    )
    # by hand: the linear layer 2 x 2*8*16*48, the grouped GEMM 3 x 2*8*16*8 (each row meets one expert)
    assert sum(map(gemm_flops, calls)) == 2 * 2 * 8 * 16 * 48 + 3 * 2 * 8 * 16 * 8
    grouped = next(call for call in calls if call.op.overloadpacket.__name__ == "_grouped_mm")
    assert grouped.args[2].tolist() == [2, 5, 5, 8]  # integer operands keep their values


def test_replay_runs_the_recorded_kernels_and_nothing_else():
    calls = record_kernels(_hand_step())
    run = replay(calls)
    with profile() as prof:
        run()
    top_level = [event.name for event in prof.events() if event.cpu_parent is None]
    assert top_level == [f"aten::{call.op.overloadpacket.__name__}" for call in calls]
    assert all(is_kernel(call.op) for call in calls)


def test_a_model_step_records_the_gemm_flops_torch_counts():
    """Against torch's FlopCounterMode on the same step with the experts run as per-expert matmuls (it has no
    grouped_mm formula; CPU flash attention, which it does not count either, is left out of gemm_flops)."""
    cfg = tiny_model_config(vocab_size=256, max_loop_iters=3, coda_layers=1, expert_dim=16)
    model = MythosModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))

    def step():
        logits = model(tokens, n_nograd=1, n_grad=2)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()

    calls = record_kernels(step)
    with mock.patch.object(moe, "grouped_swiglu", per_expert_swiglu), FlopCounterMode(display=False) as counter:
        step()
    assert sum(map(gemm_flops, calls)) == counter.get_total_flops() > 0
    attention = [call.op.overloadpacket.__name__ for call in calls if not gemm_flops(call)]
    layers = cfg.prelude_layers + cfg.coda_layers
    assert sum(not name.endswith("_backward") for name in attention) == layers + 1 + 2  # every forward pass
    assert sum(name.endswith("_backward") for name in attention) == layers + 2  # gradient passes only


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "offsets", "expected"),
    [  # expected: the sum over groups of 2 * rows * contracted * columns (dimensions: multiples of 16 bytes)
        ((8, 16), (4, 16, 8), [2, 5, 5, 8], 2 * 16 * 8 * (2 + 3 + 0 + 3)),  # rows split among experts
        ((4, 8, 16), (16, 12), [4, 4, 8, 12], 2 * 8 * 16 * (4 + 0 + 4 + 4)),  # columns split
        ((8, 12), (12, 8), [4, 4, 8, 12], 2 * 8 * 8 * (4 + 0 + 4 + 4)),  # contracted dimension split (dW)
        ((4, 8, 16), (4, 16, 12), None, 2 * 8 * 16 * 12 * 4),  # one group per batch entry
    ],
)
def test_gemm_flops_of_each_grouped_layout(a_shape, b_shape, offsets, expected):
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    offs = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    (call,) = record_kernels(lambda: F.grouped_mm(a, b, offs=offs))
    assert gemm_flops(call) == expected
