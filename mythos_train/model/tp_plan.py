"""Which submodules tensor parallelism splits, and how: module path -> layout name (parallel/tensor_parallel.py
maps each name to one of torch's DTensor styles; the model itself never imports torch.distributed).

Megatron's layout: a colwise projection splits its output features (heads, FFN hidden units), the rowwise one
after it splits its input features and all-reduces its output. The tied embedding / LM head is split over the
vocabulary: the lookup all-reduces, the head's logits stay split over the vocabulary (a DTensor, Shard(-1)) for
torch's vocabulary-parallel cross-entropy (`loss_parallel`). Everything else (norms, the loop's injection,
LoRA, ACT, the router, the routed experts, MLA's low-rank down-projections) stays replicated: every tp rank
computes it on the same tokens. Kept here until the model's parallel plan (model/parallel_plan.py) takes it.
"""

from __future__ import annotations

from torch import nn

ATTENTION = {
    "gqa": {"attn": "attention_input", "attn.wq": "colwise", "attn.wk": "colwise", "attn.wv": "colwise",
            "attn.wo": "rowwise"},
    # MLA: q_down/q_norm/kv_down/kv_norm stay replicated (their outputs feed every head); the up-projections are
    # per head. The shared rope key is split over heads by `rope_key_heads` (its gradient sums every head's).
    "mla": {"attn.q_up_nope": "colwise", "attn.q_up_rope": "colwise", "attn.kv_up": "colwise",
            "attn.rope_key_heads": "heads", "attn.wo": "rowwise"},
}  # fmt: skip
FFN = {"ffn": "ffn_input", "ffn.w1": "colwise", "ffn.w3": "colwise", "ffn.w2": "rowwise"}
SHARED_EXPERTS = {f"moe.shared{name}": layout for name, layout in {"": "ffn_input", ".w1": "colwise",
                  ".w3": "colwise", ".w2": "rowwise"}.items()}  # fmt: skip


def tensor_parallel_plan(model: nn.Module) -> dict[str, str]:
    """Every split submodule of a MythosModel by its full path (prelude/coda dense blocks, the looped block)."""
    attention = ATTENTION[model.cfg.attn_type]
    blocks = {f"prelude.{i}": FFN for i in range(len(model.prelude))}
    blocks["recurrent.block"] = SHARED_EXPERTS if model.recurrent.block.moe.shared is not None else {}
    blocks.update({f"coda.{i}": FFN for i in range(len(model.coda))})
    plan = {"tok_embeddings": "vocab_embedding", "norm": "vocab_head_input"}
    for block, ffn in blocks.items():
        plan.update({f"{block}.{path}": layout for path, layout in {**attention, **ffn}.items()})
    return plan
