"""Which kernel runs the routed experts, said at start-up, and a refusal of the slow one on a GPU.

`F.grouped_mm` runs one fused CUTLASS grouped GEMM only for bf16 on sm90/sm100 (H100/H200, B200). Anywhere else
on CUDA (fp32, an A100) torch falls back to a loop over the experts that first copies the offsets to the host:
a device-to-host sync per call, several per loop iteration, which stalls the GPU. On CPU the loop is the only
kernel there is, and no device waits on it.
"""

from __future__ import annotations

import logging

import torch

from mythos_train.config import ConfigError

logger = logging.getLogger(__name__)

FUSED_CAPABILITIES = (9, 10)
"CUDA compute capability majors with torch's fused bf16 grouped GEMM."


def expert_kernel(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> tuple[bool, str]:
    """(fused, why): whether `grouped_mm` gets its fused kernel for this device, compute dtype and capability."""
    if device_type != "cuda":
        return False, f"per-expert loop: {device_type} has no fused grouped GEMM (no device to stall)"
    sm = f"sm{capability[0]}{capability[1]}"
    if dtype != torch.bfloat16:
        return False, f"per-expert loop with a host sync per call: the fused kernel needs bfloat16, compute is {dtype}"
    if capability[0] not in FUSED_CAPABILITIES:
        return False, f"per-expert loop with a host sync per call: the fused kernel needs sm90/sm100, this GPU is {sm}"
    return True, f"fused grouped GEMM (bfloat16 on {sm})"


def check_expert_kernel(device_type: str, dtype: torch.dtype, allow_slow: bool) -> str:
    """Log the experts' kernel; ConfigError for the slow CUDA fallback unless parallel.allow_slow_experts."""
    capability = torch.cuda.get_device_capability() if device_type == "cuda" else None
    fused, why = expert_kernel(device_type, dtype, capability)
    if device_type == "cuda" and not fused and not allow_slow:
        raise ConfigError(
            f"routed experts would run as a {why}. Use parallel.param_dtype = 'bfloat16' on an H100/H200/B200, or "
            f"set parallel.allow_slow_experts = true to run anyway"
        )
    logger.info("routed experts: %s", why)
    return why
