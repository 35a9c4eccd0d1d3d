"""Causal self-attention: DeepSeek-V2 multi-latent (MLA) and grouped-query (GQA), both through SDPA.

Projections and scales follow open-mythos 0.5.0 so a state dict maps one to one. Each layer (and each loop
iteration of the looped block) gets its own cache slot, a dict it fills in place, or None when not caching; no
string keys reach a compiled block, so compiled blocks never recompile per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mythos_train.config import ModelConfig
from mythos_train.model.rope import Rope, apply_rope

__all__ = ["GQAttention", "MLAttention", "Rope", "causal_sdpa"]


def causal_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    past: int,
    enable_gqa: bool = False,
    doc_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B, H, T, Dqk] over k/v [B, Hkv, past + T, *] where the first `past` keys are cached.

    doc_mask [B, 1, T, past + T] (bool, causal already) replaces the causal mask: document masking.

    A value width different from the query/key width makes SDPA fall back to its slow math kernel, so the narrower
    side is zero-padded (exact: zero query/key columns add nothing to the scores, zero value columns are cut off).
    """
    T, v_dim = q.shape[-2], v.shape[-1]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    elif v_dim > q.shape[-1]:
        q, k = F.pad(q, (0, v_dim - q.shape[-1])), F.pad(k, (0, v_dim - k.shape[-1]))
    # Each branch passes SDPA a constant is_causal: under torch.compile with a KV cache, `past` and T are symbolic,
    # and a bool computed from them is a SymBool, which SDPA rejects (the `if`s here only add shape guards).
    if doc_mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask, scale=scale, enable_gqa=enable_gqa)
    elif T == 1:  # one-token decode: sees everything cached
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)
    elif past == 0:  # prefill/training: plain causal
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    else:  # a chunk after a cache: causal aligned to the bottom right
        mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return out[..., :v_dim]


def _update_cache(cache: dict | None, **new: torch.Tensor) -> tuple[int, tuple[torch.Tensor, ...]]:
    """Append `new` (each [B, T, ...]) to the slot's tensors; returns (cached length before, full tensors)."""
    if cache is None:
        return 0, tuple(new.values())
    past = cache[next(iter(new))].shape[1] if cache else 0
    full = {name: torch.cat([cache[name], t], dim=1) if cache else t for name, t in new.items()}
    cache.update({name: t.detach() for name, t in full.items()})
    return past, tuple(full.values())


class MLAttention(nn.Module):
    """Multi-latent attention (DeepSeek-V2): K/V come from a small latent c_kv, which is what the cache stores.

    Cache slot: c_kv [B, S, kv_lora_rank] and k_rope [B, S, 1, qk_rope_head_dim] already rotated, the rope key
    being shared by all heads (open-mythos expands it per head first, which rotates every copy identically).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        self.q_down = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
        self.q_up_nope = nn.Linear(cfg.q_lora_rank, cfg.n_heads * self.nope_dim, bias=False)
        self.q_up_rope = nn.Linear(cfg.q_lora_rank, cfg.n_heads * self.rope_dim, bias=False)
        self.kv_down = nn.Linear(cfg.dim, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.kv_up = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.rope_key_heads = HeadBroadcast(cfg.n_heads)

    def forward(self, x: torch.Tensor, rope: Rope, cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope.cos, rope.sin
        c_q = self.q_norm(self.q_down(x))  # [B, T, q_lora_rank]
        q_nope = self.q_up_nope(c_q).view(B, T, -1, self.nope_dim)  # [B, T, H, nope]; H = this rank's heads
        q_rope = apply_rope(self.q_up_rope(c_q).view(B, T, -1, self.rope_dim), cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, T, nope + rope]

        c_kv, k_rope = self.kv_down(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin)  # [B, T, 1, rope]
        past, (c_kv, k_rope) = _update_cache(cache, c_kv=c_kv, k_rope=k_rope)
        S = c_kv.shape[1]

        kv = self.kv_up(self.kv_norm(c_kv)).view(B, S, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, self.rope_key_heads(k_rope)], dim=-1).transpose(1, 2)  # [B, H, S, nope + rope]
        out = causal_sdpa(q, k, v.transpose(1, 2), self.scale, past, doc_mask=rope.doc_mask)  # [B, H, T, v]
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class HeadBroadcast(nn.Module):
    """The rope key every MLA head shares, k_rope [B, S, 1, rope] -> [B, S, n_heads, rope] (a view, no weights).

    A module so that tensor parallelism can give it a layout: each rank keeps its own heads' slice, and the
    key's gradient is the sum over all heads, not only the local ones.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, k_rope: torch.Tensor) -> torch.Tensor:
        return k_rope.expand(-1, -1, self.n_heads, -1)


class GQAttention(nn.Module):
    """Grouped-query attention: n_kv_heads K/V heads, each shared by n_heads // n_kv_heads query heads.

    Cache slot: k [B, S, n_kv_heads, head_dim] already rotated, v [B, S, n_kv_heads, head_dim].
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope.cos, rope.sin
        # -1 heads: under tensor parallelism each rank holds n_heads / tp query and n_kv_heads / tp kv heads
        q = apply_rope(self.wq(x).view(B, T, -1, self.head_dim), cos, sin)  # [B, T, H, head_dim]
        k = apply_rope(self.wk(x).view(B, T, -1, self.head_dim), cos, sin)  # [B, T, Hkv, head_dim]
        v = self.wv(x).view(B, T, -1, self.head_dim)
        past, (k, v) = _update_cache(cache, k=k, v=v)
        out = causal_sdpa(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            self.head_dim**-0.5,
            past,
            enable_gqa=self.n_kv_heads != self.n_heads,
            doc_mask=rope.doc_mask,
        )  # [B, H, T, head_dim]
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))
