"""LR schedules against their closed forms, and which parameters get weight decay."""

import math

import pytest
import torch
from model_testing import DIM32, tiny_model_config

from mythos_train.config import OptimConfig
from mythos_train.model import MythosModel
from mythos_train.optim import build_lr_scheduler, build_optimizer, lr_factor, param_groups


def _factors(cfg: OptimConfig, total: int) -> list[float]:
    return [lr_factor(step, cfg, total) for step in range(total)]


def test_cosine_warmup_then_half_cosine_to_min():
    cfg = OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    f = _factors(cfg, 20)
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for step in range(4, 20):
        progress = (step - 3) / 16
        assert f[step] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    cfg = OptimConfig(schedule="wsd", warmup_steps=2, min_lr_ratio=0.0, wsd_decay_fraction=0.25)
    f = _factors(cfg, 20)
    assert f[:2] == pytest.approx([0.5, 1.0])
    assert f[2:15] == pytest.approx([1.0] * 13)
    assert f[15:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])


def test_constant_and_scheduler_drives_the_optimizer():
    assert _factors(OptimConfig(schedule="constant", warmup_steps=2), 5) == pytest.approx([0.5, 1, 1, 1, 1])
    param = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_steps=2, min_lr_ratio=0.0)
    optimizer = torch.optim.AdamW([param], lr=cfg.lr)
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1 * x for x in _factors(cfg, 6)])


def test_weight_decay_only_on_matrices():
    cfg = tiny_model_config(
        **DIM32, max_loop_iters=2, n_experts=4, expert_dim=16, use_act=True, injection="parcae", lora_rank=2
    )
    model = MythosModel(cfg)
    decay_group, no_decay_group = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in decay_group["params"]}
    no_decay = {names[id(p)] for p in no_decay_group["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert (decay_group["weight_decay"], no_decay_group["weight_decay"]) == (0.1, 0.0)
    for name in (
        "tok_embeddings.weight",
        "recurrent.block.moe.experts.w1",
        "recurrent.block.moe.router.weight",
        "prelude.0.attn.q_down.weight",
        "recurrent.lora.down.weight",
    ):
        assert name in decay
    for name in (
        "norm.weight",
        "prelude.0.attn_norm.weight",
        "recurrent.injection.log_A",
        "recurrent.injection.B",
        "recurrent.act.halt.weight",
        "recurrent.act.halt.bias",
        "recurrent.lora.scale.weight",
    ):
        assert name in no_decay
    optimizer = build_optimizer(model, OptimConfig(), "cpu")
    assert optimizer.defaults["fused"] is True  # CPU has the fused kernel too (about 4x the for-each one's speed)
