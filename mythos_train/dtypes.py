"""Dtype names as configs and the CLI spell them (torch's attribute names), their sizes, and what
parallel.param_dtype = 'auto' means: one home for FSDP's policy, the planner and export.

Torch-free at import, so the CLI's argument parser can read the names without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
"Bytes per element of each dtype name."


def resolve_param_dtype(param_dtype: str, device_type: str) -> str:
    """parallel.param_dtype with 'auto' resolved: bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow there)."""
    if param_dtype != "auto":
        return param_dtype
    return "bfloat16" if device_type == "cuda" else "float32"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a name in DTYPE_BYTES stands for."""
    import torch

    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPE_BYTES)})")
    return getattr(torch, name)
