"""Which kernel runs the routed experts (issue 13.5): said at start-up, the slow CUDA fallback refused unless asked.

The rule is torch's own dispatch condition for `grouped_mm`'s fused kernel (bf16 on sm90/sm100; see
parallel/expert_kernel.py); the CUDA cases are decided from a stated capability, so they run on CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from test_parallel_fsdp_ep import tiny_config

from mythos_train.config import ConfigError
from mythos_train.model import MythosModel
from parallel import build_mesh, parallelize
from parallel.expert_kernel import check_expert_kernel, expert_kernel


@pytest.mark.parametrize(
    "dtype, capability, fused, reason",
    [
        (torch.bfloat16, (9, 0), True, "fused grouped GEMM (bfloat16 on sm90)"),
        (torch.bfloat16, (10, 0), True, "fused grouped GEMM (bfloat16 on sm100)"),
        (torch.bfloat16, (8, 0), False, "needs sm90/sm100, this GPU is sm80"),
        (torch.float32, (9, 0), False, "needs bfloat16, compute is torch.float32"),
    ],
)
def test_cuda_expert_kernel(dtype, capability, fused, reason):
    got, why = expert_kernel("cuda", dtype, capability)
    assert got == fused and reason in why


def test_slow_cuda_fallback_is_refused_unless_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100
    with pytest.raises(ConfigError, match="parallel.allow_slow_experts"):
        check_expert_kernel("cuda", torch.bfloat16, allow_slow=False)
    assert "host sync" in check_expert_kernel("cuda", torch.bfloat16, allow_slow=True)


def test_start_up_says_which_kernel_runs(caplog):
    cfg = tiny_config()
    try:
        with caplog.at_level(logging.INFO, logger="parallel.expert_kernel"):
            parallelize(MythosModel(cfg.model), build_mesh(cfg.parallel, 1, "cpu"), cfg)
    finally:
        dist.destroy_process_group()
    assert "routed experts: per-expert loop: cpu has no fused grouped GEMM" in caplog.text
