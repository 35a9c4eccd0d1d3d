"""DeepSeekMoE feed-forward: fine-grained routed experts (one grouped GEMM) plus always-on shared experts.

Routing, sorting and gating live in `MoE.forward`; only the expert compute lives in `GroupedExperts`, the module
expert parallelism replaces with an all-to-all version. Nothing here syncs with the host or has data-dependent
shapes, so it compiles and never stalls the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mythos_train.config import ModelConfig


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (open-mythos `Expert`: w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Linear):
    """Top-k router. `expert_bias` (fp32, no gradient) shifts which experts are selected, never the gates.

    Aux-loss-free balancing (DeepSeek-V3): the bias is nudged from outside by observed load; gates are the
    unbiased softmax scores of the selected experts, renormalised to sum to 1 (open-mythos `MoEFFN`).
    """

    def __init__(self, dim: int, n_experts: int, top_k: int):
        super().__init__(dim, n_experts, bias=False)
        self.top_k = top_k
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))

    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.weight, std=init_std)
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor, recorded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (gates [N, k] fp32, selected experts [N, k] int64).

        recorded [N, k] int64: experts to route to, -1 where the router chooses (an activation-checkpoint recompute
        passes its forward's choice, which rounding, ties or a changed bias could otherwise flip; the forward passes
        all -1, so that both run one compiled graph). The gates are always this call's.
        """
        logits = F.linear(x.float(), self.weight.float())  # [N, E] fp32: bf16 logits tie and flip the top-k
        scores = logits.softmax(dim=-1)
        # detached: the choice has no gradient, and a recompute that reuses it saves the same tensors
        selected = (logits.detach() + self.expert_bias).topk(self.top_k, dim=-1).indices
        if recorded is not None:
            selected = torch.where(recorded >= 0, recorded, selected)
        gates = scores.gather(-1, selected)
        return gates / gates.sum(dim=-1, keepdim=True), selected


def grouped_swiglu(
    x: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of expert-sorted rows x [N, dim] with stacked weights w1/w3 [E, dim, hidden], w2 [E, hidden, dim].

    offsets [E] int32 = cumsum of rows per expert. grouped_mm writes no row past offsets[-1] (left uninitialised,
    not zero); here offsets[-1] = N, every row belongs to an expert.
    """
    hidden = F.silu(F.grouped_mm(x, w1, offs=offsets)) * F.grouped_mm(x, w3, offs=offsets)
    return F.grouped_mm(hidden, w2, offs=offsets)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[i]] = i."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


class GatherRows(torch.autograd.Function):
    """x [M, dim] -> x[index // copies] [M * copies, dim], where index is a permutation of the M * copies slots
    (slot s = copy s % copies of row s // copies) and inverse is its inverse.

    The same rows as `index_select`, whose backward zero-fills a [M, dim] gradient and scatter-adds into it; knowing
    that index permutes, backward is a gather (grad[inverse], summed over each row's copies): no fill, no scatter,
    and only the index is kept for backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, copies: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return x.index_select(0, index // copies if copies > 1 else index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad_x = grad.index_select(0, inverse)  # [M * copies, dim], slot order
        if ctx.copies > 1:
            grad_x = grad_x.view(-1, ctx.copies, grad.shape[-1]).sum(1)  # [M, dim]
        return grad_x, None, None, None


class GroupedExperts(nn.Module):
    """n_experts SwiGLU experts stored stacked ([E, in, out], so expert e computes x @ w[e]) and run as grouped GEMMs."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def init_weights(self, init_std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=init_std)

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted [N, dim] grouped by expert, tokens_per_expert [E] (any integer dtype) -> [N, dim]."""
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        return grouped_swiglu(x_sorted, offsets, self.w1, self.w2, self.w3)


class MoE(nn.Module):
    """Routed experts + shared experts. The n_shared_experts shared SwiGLUs (each expert_dim * top_k wide, as in
    open-mythos) are stored as one SwiGLU of n_shared times the width: the same sum, computed in one matmul.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.n_experts_per_tok
        self.router = Router(cfg.dim, cfg.n_experts, cfg.n_experts_per_tok)
        self.experts = GroupedExperts(cfg.dim, cfg.expert_dim, cfg.n_experts)
        self.shared = FeedForward(cfg.dim, cfg.shared_expert_dim) if cfg.shared_expert_dim else None

    def forward(
        self, x: torch.Tensor, recorded: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, dim] -> (out [B, T, dim], tokens_per_expert [E] float32, selected experts [N, k] int64).

        recorded: experts to route to, -1 where the router chooses (`Router.forward`).
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, dim]
        gates, selected = self.router(x, recorded)  # [N, k] each
        flat_experts = selected.flatten()  # [N * k], slot i = (token i // k, choice i % k)
        order = flat_experts.argsort(stable=True)  # slots grouped by expert
        tokens_per_expert = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        tokens_per_expert.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))
        inverse = inverse_permutation(order)
        routed = self.experts(GatherRows.apply(x, order, inverse, self.top_k), tokens_per_expert)  # [N * k, dim]
        routed = GatherRows.apply(routed, inverse, order, 1)  # [N * k, dim], from expert order back to slot order
        out = torch.bmm(gates.to(routed.dtype).unsqueeze(1), routed.view(-1, self.top_k, shape[-1])).squeeze(1)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape), tokens_per_expert.float(), selected
