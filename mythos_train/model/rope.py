"""Rotary position embedding in real arithmetic.

open-mythos rotates adjacent feature pairs (x[2i], x[2i+1]) as one complex number times e^{i m theta_i}. Complex
tensors break torch.compile and FSDP mixed precision, so the same rotation is written out with cos/sin tables:
(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Rope(NamedTuple):
    """Where the queries of one forward sit: what every attention layer needs besides its input."""

    cos: torch.Tensor
    "[T, head_dim // 2], or [B, T, head_dim // 2] when positions differ per row (document masking)."
    sin: torch.Tensor
    "Same shape as cos."
    doc_mask: torch.Tensor | None = None
    "[B, 1, T, S] bool, True where query t may see key s (same document, causal); None = plain causal."


def rope_angles(head_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Angles [len(positions), head_dim // 2], computed exactly as open-mythos' `precompute_rope_freqs` (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    return torch.outer(positions.float(), inv_freq)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, D] by tables cos/sin [T, D // 2] or [B, T, D // 2]; computed in fp32,
    returned in x's dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, T, H, D/2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [T, 1, D/2] or [B, T, 1, D/2]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [B, T, H, D/2, 2]
    return rotated.flatten(-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len) as non-persistent buffers (rebuilt by init_weights after to_empty)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        angles = rope_angles(self.head_dim, torch.arange(self.max_seq_len, device=self.cos.device), self.theta)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, start_pos: int, seq_len: int, pad: int = 0) -> Rope:
        """Tables for positions [start_pos, start_pos + seq_len), each [seq_len, head_dim // 2]. The last `pad` are
        padding tokens (no real token attends to them): past max_seq_len they repeat its last position."""
        end = start_pos + seq_len
        if end - pad > self.max_seq_len:
            raise ValueError(f"position {end - pad - 1} is beyond model.max_seq_len ({self.max_seq_len})")
        over = max(end - self.max_seq_len, 0)
        cos, sin = (t[start_pos : end - over] for t in (self.cos, self.sin))
        return Rope(*(torch.cat([t, t[-1:].expand(over, -1)]) for t in (cos, sin)))

    def at(self, positions: torch.Tensor, doc_mask: torch.Tensor) -> Rope:
        """Tables for per-row positions [B, T] (each [B, T, head_dim // 2]) with a document mask."""
        return Rope(self.cos[positions], self.sin[positions], doc_mask)
