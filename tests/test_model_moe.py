"""MoE: grouped-GEMM routing equals a naive per-token loop; the expert bias moves selection only."""

import torch
import torch.nn.functional as F
from model_testing import tiny_model_config

from mythos_train.model.moe import MoE


def _moe(seed: int = 0, **overrides) -> MoE:
    cfg = tiny_model_config(**(dict(dim=32, n_experts_per_tok=3, n_shared_experts=2) | overrides))
    torch.manual_seed(seed)
    moe = MoE(cfg)
    for module in moe.modules():
        if hasattr(module, "init_weights"):
            module.init_weights(0.2)
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    return moe


def _naive(moe: MoE, x: torch.Tensor, n_shared: int, shared_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: softmax scores, top-k of (logits + bias), renormalised gates, each expert as its own SwiGLU."""
    flat = x.reshape(-1, x.shape[-1])
    w = moe.experts
    out = torch.zeros_like(flat)
    counts = torch.zeros(moe.n_experts)
    for i, token in enumerate(flat):
        logits = moe.router.weight @ token
        chosen = sorted(range(moe.n_experts), key=lambda e: -(logits[e] + moe.router.expert_bias[e]).item())[
            : moe.top_k
        ]
        scores = torch.softmax(logits, dim=0)[chosen]
        for gate, e in zip(scores / scores.sum(), chosen):
            out[i] += gate * ((F.silu(token @ w.w1[e]) * (token @ w.w3[e])) @ w.w2[e])
            counts[e] += 1
        for s in range(n_shared):  # the fused shared SwiGLU is n_shared separate experts of shared_width
            rows = slice(s * shared_width, (s + 1) * shared_width)
            sh = moe.shared
            out[i] += sh.w2.weight[:, rows] @ (F.silu(sh.w1.weight[rows] @ token) * (sh.w3.weight[rows] @ token))
    return out.view(x.shape), counts


def test_moe_equals_naive_per_token_computation():
    moe = _moe()
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.randn(8) * 0.5)  # large enough to change many selections
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        out, tokens_per_expert, _ = moe(x)
        expected, expected_counts = _naive(moe, x, n_shared=2, shared_width=16 * 3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens_per_expert, expected_counts)
    assert tokens_per_expert.dtype == torch.float32 and tokens_per_expert.sum() == 30 * 3


def test_expert_bias_moves_selection_not_gates():
    moe = _moe(seed=1, n_shared_experts=0)
    x = torch.randn(64, 32)
    gates_before, selected_before = moe.router(x)
    with torch.no_grad():
        moe.router.expert_bias[3] = 100.0  # expert 3 is now always chosen
    gates, selected = moe.router(x)
    assert (selected == 3).any(-1).all() and not (selected_before == 3).any(-1).all()
    scores = torch.softmax(x @ moe.router.weight.T, dim=-1).gather(-1, selected)  # unbiased scores of the choice
    torch.testing.assert_close(gates, scores / scores.sum(-1, keepdim=True))


def test_moe_gradients_match_naive():
    moe = _moe(seed=2)
    x = torch.randn(2, 6, 32, requires_grad=True)
    out, _, _ = moe(x)
    weight = torch.randn(2, 6, 32)
    (out * weight).sum().backward()
    ours = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None
    expected, _ = _naive(moe, x, n_shared=2, shared_width=16 * 3)
    (expected * weight).sum().backward()
    for got, want in zip(ours, [p.grad for p in moe.parameters()] + [x.grad]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_empty_experts_are_fine():
    moe = _moe(seed=3, n_shared_experts=0)
    with torch.no_grad():
        moe.router.expert_bias[:] = torch.tensor([50.0, 50.0, 50.0, 0, 0, 0, 0, 0])  # only experts 0-2 used
    x = torch.randn(5, 32, requires_grad=True)
    out, tokens_per_expert, _ = moe(x)
    assert tokens_per_expert.tolist() == [5, 5, 5, 0, 0, 0, 0, 0]
    out.sum().backward()
    assert moe.experts.w1.grad[3:].abs().sum() == 0 and moe.experts.w1.grad[:3].abs().sum() > 0
