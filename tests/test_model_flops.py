"""Loop-aware FLOPs formula vs torch's FlopCounterMode on a real forward + backward."""

import pytest
import torch
import torch.nn.functional as F
from model_testing import tiny_model_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from mythos_train.model import MythosModel
from mythos_train.model.flops import training_flops_per_token


@pytest.mark.parametrize(
    ("attn_type", "injection", "use_act", "n_nograd", "n_grad"),
    [
        ("mla", "lti", False, 2, 3),
        ("gqa", "parcae", True, 0, 2),
        ("mla", "lti", True, 3, 1),
    ],
)
def test_flops_match_flop_counter(attn_type, injection, use_act, n_nograd, n_grad):
    # v_head_dim = nope + rope, so SDPA needs no padding and the math kernel's matmuls are exactly the model's
    cfg = tiny_model_config(
        vocab_size=512,
        max_seq_len=64,
        max_loop_iters=4,
        coda_layers=2,
        attn_type=attn_type,
        kv_lora_rank=32,
        q_lora_rank=48,
        v_head_dim=16,
        expert_dim=32,
        lora_rank=8,
        injection=injection,
        use_act=use_act,
    )
    B, S = 2, 32
    model = MythosModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    # CPU SDPA kernels are not in the counter's registry; the math kernel is plain (counted) matmuls.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(tokens, n_nograd=n_nograd, n_grad=n_grad)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    counted = counter.get_total_flops()

    N = B * S
    head = cfg.dim // cfg.n_heads
    qk, v = (16, 16) if attn_type == "mla" else (head, head)
    full_attention = 2 * cfg.n_heads * (qk + v) * S  # per token, forward: the math kernel computes masked scores too
    causal_attention = 2 * cfg.n_heads * (qk + v) * (S + 1) / 2
    layer_passes = (cfg.prelude_layers + cfg.coda_layers + n_grad) * 3 + n_nograd
    counted += N * layer_passes * (causal_attention - full_attention)
    if not any("grouped_mm" in str(op) for op in flop_registry):  # not counted by torch 2.13: add it by hand
        routed_forward = 2 * N * cfg.n_experts_per_tok * 3 * cfg.dim * cfg.expert_dim
        counted += routed_forward * (3 * n_grad + n_nograd)

    expected = training_flops_per_token(cfg, S, n_nograd, n_grad) * N
    print(f"counted {counted:.4g} formula {expected:.4g}")
    assert abs(counted - expected) / expected < 0.01, (counted, expected)  # every matmul is accounted for
