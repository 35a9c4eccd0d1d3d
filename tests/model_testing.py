"""A tiny ModelConfig for the model tests (one base of small sizes, each test overriding only what it varies), and
an independent FLOP count of a training step."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mythos_train.config import ModelConfig
from mythos_train.model import MythosModel, moe
from mythos_train.model.open_mythos_compat import load_open_mythos

TINY_MODEL = dict(
    vocab_size=64,
    dim=64,
    n_heads=4,
    n_kv_heads=2,
    max_seq_len=32,
    max_loop_iters=3,
    prelude_layers=1,
    coda_layers=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    n_experts=8,
    n_shared_experts=1,
    n_experts_per_tok=2,
    expert_dim=16,
    lora_rank=4,
)

# dim 32: TINY_MODEL's width, sequence and MLA ranks halved (head dim 8, MLA head dims 4)
DIM32 = {
    key: TINY_MODEL[key] // 2 for key in ("dim", "max_seq_len", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim")
}
DIM32 |= dict(q_lora_rank=16, v_head_dim=4)


def tiny_model_flags(**overrides) -> list[str]:
    """TINY_MODEL (fields replaced by `overrides`) as `--model.field=value` flags over a TOML config's [model]."""
    return [f"--model.{key}={value}" for key, value in (TINY_MODEL | overrides).items()]


def tiny_model_config(**overrides) -> ModelConfig:
    """TINY_MODEL with the given fields replaced (fields not named keep ModelConfig's defaults)."""
    return ModelConfig(**(TINY_MODEL | overrides))


def per_expert_swiglu(x: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor):
    """`moe.grouped_swiglu` as a loop of plain matmuls, one expert at a time (x [N, dim] sorted by expert)."""
    out, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        rows = x[start:end]  # [n_e, dim]
        out.append((F.silu(rows @ w1[expert]) * (rows @ w3[expert])) @ w2[expert])
        start = end
    return torch.cat(out)  # [N, dim]


def counted_training_flops_per_token(cfg: ModelConfig, batch: int, seq_len: int, n_nograd: int, n_grad: int) -> float:
    """FLOPs per token of one forward + backward of a plain model, counted by torch's FlopCounterMode: independent
    of mythos_train/model/flops.py.

    Two things the counter cannot see as the model runs are made visible: the routed experts run as a per-expert
    loop of matmuls (torch 2.13's counter has no grouped_mm entry), and attention runs SDPA's math kernel (plain,
    counted matmuls). That kernel computes every score, padded to the larger of the q/k and v head dims, so its
    count is replaced by the causal half at the true head dims.
    """
    model = MythosModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with (
        mock.patch.object(moe, "grouped_swiglu", per_expert_swiglu),
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False) as counter,
    ):
        logits = model(tokens, n_nograd=n_nograd, n_grad=n_grad)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    if cfg.attn_type == "mla":
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.dim // cfg.n_heads
    computed = 2 * cfg.n_heads * 2 * max(qk, v) * seq_len  # per token and layer, forward: scores and values
    causal = 2 * cfg.n_heads * (qk + v) * (seq_len + 1) / 2  # query i attends to i + 1 keys
    layer_passes = (cfg.prelude_layers + cfg.coda_layers + n_grad) * 3 + n_nograd  # backward = 2 forwards
    return counter.get_total_flops() / (batch * seq_len) + layer_passes * (causal - computed)


def open_mythos_reference():
    """open-mythos 0.5.0's main module, the reference of the parity, preset and bench tests.

    Missing, the calling test is skipped on a developer's machine but fails under CI (`CI=true`), where the Makefile
    installs it: a reference check must never drop out of CI unnoticed.
    """
    module = load_open_mythos()
    if module is None:
        message = "open-mythos 0.5.0 not installed (pip install --no-deps open-mythos==0.5.0, as the Makefile does)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{message}; CI=true: the reference check may not be skipped")
        pytest.skip(message)
    return module
