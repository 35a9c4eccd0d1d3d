"""Document masking: packed documents attend only within themselves, with positions restarting at each one.

From doc_starts [B, T] (True where a document starts) come per-row positions for RoPE and a block-diagonal causal
mask for attention, both carried by the model's `Rope` (one tensor more through every block, the loop, activation
checkpointing and compile; nothing else changes). With a KV cache the document ids and next positions of the cached
tokens are kept in the cache under DOCS, so a chunk after a prefill continues the last document (or starts new
ones where its doc_starts says so) and never sees earlier documents.
"""

from __future__ import annotations

import torch

from mythos_train.model.rope import Rope, RotaryEmbedding

DOCS = "documents"
"KV-cache key of the cached tokens' document ids [B, S] and the next position of each row [B]."


def document_rope(
    rotary: RotaryEmbedding, doc_starts: torch.Tensor, kv_cache: dict | None = None, pad: int = 0
) -> Rope:
    """doc_starts [B, T] (bool) -> Rope with per-row positions [B, T] and doc_mask [B, 1, T, past + T]. The last
    `pad` tokens are padding (dropped by the caller): their positions may pass max_seq_len, clamped to its last."""
    B, T = doc_starts.shape
    state = kv_cache.get(DOCS) if kv_cache is not None else None
    index = torch.arange(T, device=doc_starts.device).expand(B, T)  # [B, T]
    starts = doc_starts.clone()
    if state is None:
        starts[:, 0] = True  # a window (or prompt) begins a document
        past_ids = torch.zeros(B, 0, dtype=torch.long, device=doc_starts.device)
        last_id, next_pos = torch.full((B,), -1, device=doc_starts.device), None
    else:
        past_ids, next_pos = state["doc_ids"], state["next_pos"]
        last_id = past_ids[:, -1]
    doc_ids = last_id[:, None] + starts.long().cumsum(dim=1)  # [B, T], from 0 (or the cached last document's id)
    last_start = torch.where(starts, index, torch.full_like(index, -1)).cummax(dim=1).values  # [B, T]
    positions = index - last_start
    if next_pos is not None:  # tokens before this chunk's first start continue the cached document
        positions = torch.where(last_start < 0, next_pos[:, None] + index, positions)
    key_ids = torch.cat([past_ids, doc_ids], dim=1)  # [B, S] with S = past + T
    past = past_ids.shape[1]
    causal = torch.ones(T, past + T, dtype=torch.bool, device=doc_starts.device).tril(diagonal=past)
    doc_mask = (doc_ids[:, :, None] == key_ids[:, None, :]) & causal  # [B, T, S]
    if kv_cache is not None:
        kv_cache[DOCS] = {"doc_ids": key_ids, "next_pos": positions[:, -1] + 1}
    last = int(positions[:, : T - pad].max()) if kv_cache is not None else 0  # (generation syncs anyway)
    if last >= rotary.max_seq_len:
        raise ValueError(f"document position {last} is beyond model.max_seq_len ({rotary.max_seq_len})")
    return rotary.at(positions.clamp(max=rotary.max_seq_len - 1), doc_mask.unsqueeze(1))


def drop_cached_tail(kv_cache: dict | None, n: int) -> None:
    """Forget the last n cached tokens (padding a forward added): every slot's [B, S, ...] tensors, and DOCS."""
    for name, slot in (kv_cache or {}).items():
        if name == DOCS:
            slot.update(doc_ids=slot["doc_ids"][:, :-n], next_pos=slot["next_pos"] - n)
        else:
            slot.update({key: t[:, :-n] for key, t in slot.items()})
