"""MythosModel: embedding -> prelude (dense blocks) -> looped MoE block -> coda (dense blocks) -> norm -> tied head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function

from mythos_train.config import ModelConfig
from mythos_train.model.attention import GQAttention, MLAttention, Rope
from mythos_train.model.documents import document_rope, drop_cached_tail
from mythos_train.model.moe import FeedForward, MoE
from mythos_train.model.parallel_plan import ParallelPlan, mythos_parallel_plan
from mythos_train.model.recurrent import RecurrentBlock, WrapIteration, cache_slot
from mythos_train.model.rope import RotaryEmbedding


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)) with a dense SwiGLU (`ffn`) or a MoE (`moe`)."""

    def __init__(self, cfg: ModelConfig, use_moe: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = MLAttention(cfg) if cfg.attn_type == "mla" else GQAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.moe = MoE(cfg) if use_moe else None
        self.ffn = None if use_moe else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(
        self, x: torch.Tensor, rope: Rope, cache: dict | None = None, recorded: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """x [B, T, dim] -> (out [B, T, dim], routing), routing = (tokens_per_expert [E] float32, selected experts
        [B * T, k] int64) for a MoE block, else None.

        cache: this block's KV-cache slot (a dict filled in place) or None. recorded: experts to route to (`MoE`).
        """
        x = x + self.attn(self.attn_norm(x), rope, cache)
        if self.moe is not None:
            y, tokens_per_expert, selected = self.moe(self.ffn_norm(x), recorded)
            return x + y, (tokens_per_expert, selected)
        return x + self.ffn(self.ffn_norm(x)), None


class MythosModel(nn.Module):
    """Recurrent-depth transformer. The output head reuses `tok_embeddings.weight` (tied, one parameter)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.dim // cfg.n_heads
        self.rope = RotaryEmbedding(rope_dim, cfg.max_seq_len, cfg.rope_theta)
        self.prelude = nn.ModuleList(TransformerBlock(cfg, use_moe=False) for _ in range(cfg.prelude_layers))
        self.recurrent = RecurrentBlock(cfg, TransformerBlock(cfg, use_moe=True))
        self.coda = nn.ModuleList(TransformerBlock(cfg, use_moe=False) for _ in range(cfg.coda_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.sequence_multiple, self.sequence_rank = 1, 0
        "Sequence parallelism (set by parallel/): lengths padded to a multiple of tp; the loop sees slice rank."
        self.init_weights()

    def parallel_plan(self) -> ParallelPlan:
        """Which modules parallel/ and the planner treat as FSDP units, experts, the loop (model/parallel_plan.py)."""
        return mythos_parallel_plan(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in place, as open-mythos does: normal(0, init_std) for linear and
        embedding weights (biases: nn.Linear's default), ones for norms, LTI A = exp(-1) and B = 0.1, zero expert bias, fresh RoPE tables.
        """
        std = self.cfg.init_std
        for module in self.modules():
            if module is self:
                continue
            if isinstance(module, RotaryEmbedding):
                module.init_weights()
            elif hasattr(module, "init_weights"):
                module.init_weights(std)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if (
                    getattr(module, "bias", None) is not None
                ):  # ACT's halting head: nn.Linear's default, kept by open-mythos
                    bound = module.in_features**-0.5
                    nn.init.uniform_(module.bias, -bound, bound)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        n_nograd: int = 0,
        n_grad: int | None = None,
        wrap_iteration: WrapIteration | None = None,
        kv_cache: dict | None = None,
        start_pos: int = 0,
        doc_starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. n_nograd + n_grad loop iterations (n_grad None = max_loop_iters).

        kv_cache: a dict filled in place (one slot per layer and loop step); start_pos: position of tokens[:, 0].
        doc_starts [B, T] (bool): document masking, each packed document attends only to itself and its positions
        start at 0 (start_pos is then unused; a cache continues the last document).
        """
        length, pad = tokens.shape[1], -tokens.shape[1] % self.sequence_multiple
        if pad:  # e.g. a one-token decode under sequence parallelism: pad tokens after it, dropped again below
            tokens = F.pad(tokens, (0, pad))
            doc_starts = None if doc_starts is None else F.pad(doc_starts, (0, pad))
        if doc_starts is None:
            rope = self.rope(start_pos, tokens.shape[1], pad)
        else:
            rope = document_rope(self.rope, doc_starts, kv_cache, pad)
        with record_function("mythos:prelude"):  # named ranges: what `python -m mythos_train profile` reads
            h = self.tok_embeddings(tokens)
            for i, layer in enumerate(self.prelude):
                h, _ = layer(h, rope, cache_slot(kv_cache, f"prelude_{i}"))
        weight = None if not pad else pad_weight(length, tokens.shape[1], h, self.sequence_rank)
        h_0 = self.recurrent.start_state(h, self.sequence_multiple, self.sequence_rank)
        h = self.recurrent(h_0, h, rope, n_nograd, n_grad, wrap_iteration, kv_cache, weight)
        with record_function("mythos:coda"):
            for i, layer in enumerate(self.coda):
                h, _ = layer(h, rope, cache_slot(kv_cache, f"coda_{i}"))
        with record_function("mythos:head"):
            logits = F.linear(self.norm(h), self.tok_embeddings.weight)
        if pad:
            drop_cached_tail(kv_cache, pad)
            logits = logits[:, :length]
        return logits

    @torch.no_grad()
    def generate(
        self, prompt: torch.Tensor, max_new_tokens: int, n_loops: int, greedy: bool = True, temperature: float = 1.0
    ) -> torch.Tensor:
        """prompt [B, S0] -> [B, S0 + max_new_tokens]: prefill once, then one token per step from the KV cache."""
        kv_cache: dict = {}
        tokens, new = prompt, prompt
        for _ in range(max_new_tokens):
            logits = self(new, n_grad=n_loops, kv_cache=kv_cache, start_pos=tokens.shape[1] - new.shape[1])[:, -1]
            if greedy:
                new = logits.argmax(dim=-1, keepdim=True)
            else:
                new = torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), num_samples=1)
            tokens = torch.cat([tokens, new], dim=1)
        return tokens


def pad_weight(length: int, padded: int, h: torch.Tensor, rank: int) -> torch.Tensor:
    """Telemetry weights [S] of h [B, S, dim], this rank's slice of the padded sequence (the whole one without
    sequence parallelism): 0 on padding, padded / length on real tokens, so the slices' weighted means averaged
    over the ranks are the real tokens' mean, as unpadded."""
    positions = torch.arange(h.shape[1], device=h.device) + rank * h.shape[1]
    return (positions < length).float() * (padded / length)
