"""AdamW with weight-decay groups, and the warmup + decay learning-rate schedule.

Decay only shrinks matrices (linear weights, stacked expert weights, the tied embedding): decaying gains,
biases, the LTI/Parcae injection parameters, the ACT halting head or the depth-LoRA's per-loop scale table
(an embedding of gains, one row per loop step) would pull the loop's dynamics towards arbitrary values instead
of regularising capacity.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mythos_train.config import OptimConfig

# Modules whose parameters are dynamics, control or gain parameters, never decayed even when 2-D.
NO_DECAY_MODULES = ("injection", "act", "scale")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW weight decay applies to the parameter `name` (a DTensor's ndim is its global one)."""
    parts = name.split(".")
    return param.ndim >= 2 and not any(part in NO_DECAY_MODULES for part in parts)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with `weight_decay`, everything else without."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over the (possibly sharded) parameters, fused on CUDA and CPU (the devices the trainer runs on).

    On CPU the fused kernel is about 4x faster than the for-each one (benchmarks/bench_optimizer.py): it reads and
    writes each parameter's four tensors once instead of once per op."""
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup to 1, then cosine / WSD / constant to min_lr_ratio."""
    warmup = min(cfg.warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        decay_steps = max(total_steps - warmup, 1)
        progress = min((step - warmup + 1) / decay_steps, 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # wsd: hold the peak, then decay linearly over the last wsd_decay_fraction of the steps
        decay_steps = max(min(round(total_steps * cfg.wsd_decay_fraction), total_steps - warmup), 1)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        shape = 1.0 - min((step - decay_start + 1) / decay_steps, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """LambdaLR over `lr_factor`; its state is just the step count, so resuming only needs `last_epoch`."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
