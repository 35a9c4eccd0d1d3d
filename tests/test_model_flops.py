"""Loop-aware FLOPs formula vs torch's FlopCounterMode on a real forward + backward (routed experts included,
counted as a per-expert loop of matmuls: model_testing.counted_training_flops_per_token)."""

import pytest
import torch
from model_testing import counted_training_flops_per_token, per_expert_swiglu, tiny_model_config

from mythos_train.model.flops import training_flops_per_token
from mythos_train.model.moe import grouped_swiglu


def test_per_expert_loop_is_the_grouped_matmul():
    """The counted stand-in computes what grouped_mm computes, ragged and empty groups included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g)
    w1, w3, w2 = (torch.randn(4, *shape, generator=g) for shape in ((8, 12), (8, 12), (12, 8)))
    offsets = torch.tensor([3, 3, 9, 10], dtype=torch.int32)  # expert 1 gets no rows
    torch.testing.assert_close(per_expert_swiglu(x, offsets, w1, w2, w3), grouped_swiglu(x, offsets, w1, w2, w3))


@pytest.mark.parametrize(
    ("attn_type", "injection", "use_act", "n_nograd", "n_grad"),
    [
        ("mla", "lti", False, 2, 3),
        ("gqa", "parcae", True, 0, 2),
        ("mla", "lti", True, 3, 1),
    ],
)
def test_flops_match_flop_counter(attn_type, injection, use_act, n_nograd, n_grad):
    cfg = tiny_model_config(
        vocab_size=512,
        max_seq_len=64,
        max_loop_iters=4,
        coda_layers=2,
        attn_type=attn_type,
        kv_lora_rank=32,
        q_lora_rank=48,
        v_head_dim=12,  # != qk_nope + qk_rope (16): the counted attention is padded, the formula's is not
        expert_dim=32,
        lora_rank=8,
        injection=injection,
        use_act=use_act,
    )
    counted = counted_training_flops_per_token(cfg, 2, 32, n_nograd, n_grad)
    expected = training_flops_per_token(cfg, 32, n_nograd, n_grad)
    print(f"counted {counted:.4g} formula {expected:.4g}")
    assert abs(counted - expected) / expected < 0.01, (counted, expected)  # every matmul is accounted for
