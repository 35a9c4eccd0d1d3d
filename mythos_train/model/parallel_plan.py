"""The model's parallel plan: which of its modules parallel/ shards, swaps, checkpoints and compiles.

The layout of the model is named here once. parallel/ applies the plan of whatever model returns one
(`model.parallel_plan()`) and knows no module names; the planner (mythos_train/planner/memory.py) reads the same
plan off the model built on the meta device. Paths are `nn.Module.get_submodule` paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mythos_train.model.model import MythosModel


@dataclass(frozen=True)
class ParallelPlan:
    fsdp_units: tuple[str, ...]
    "Modules sharded as FSDP units of their own, in forward order (the root, i.e. whatever is left, comes last)."
    loop: str
    "The unit among `fsdp_units` whose forward runs the whole loop: gathered once per step at any depth."
    loop_block: str
    """The module one loop iteration runs. The model calls `wrap_iteration(fn, *args)` (its forward's keyword) around
    each gradient iteration, so activation checkpointing is passed in, not patched; with
    parallel.reshard_per_iteration this module is an FSDP unit of its own. Compiled as one graph."""
    experts: str
    "Routed experts (`(x_sorted [N, dim], tokens_per_expert [E]) -> [N, dim]`, weights [E, ...]): what EP swaps."
    router: str
    "Router whose fp32 `expert_bias` buffer the router-bias balancer updates."
    shared_experts: str | None
    "Row-wise shared-expert MLP of the looped block (tiled by parallel.shared_expert_chunks); None without one."
    loop_parts: dict[str, str]
    "Planner part name -> path of that part of the loop block (the planner reports their gathered bytes)."
    tensor_parallel: dict[str, str] = field(default_factory=dict)
    "Module path -> tensor-parallel layout name (parallel/tensor_parallel.py maps each to a DTensor style); empty: none."

    @property
    def blocks(self) -> tuple[str, ...]:
        """The units outside the loop (dense blocks): compiled whole, recomputed by activation_checkpoint 'full'."""
        return tuple(unit for unit in self.fsdp_units if unit != self.loop)


def mythos_parallel_plan(model: MythosModel) -> ParallelPlan:
    """MythosModel's plan: prelude blocks, the recurrent module (loop driver around one MoE block), coda blocks."""
    moe = "recurrent.block.moe"
    return ParallelPlan(
        fsdp_units=(
            *(f"prelude.{i}" for i in range(len(model.prelude))),
            "recurrent",
            *(f"coda.{i}" for i in range(len(model.coda))),
        ),
        loop="recurrent",
        loop_block="recurrent.block",
        experts=f"{moe}.experts",
        router=f"{moe}.router",
        shared_experts=f"{moe}.shared" if model.recurrent.block.moe.shared is not None else None,
        loop_parts={
            "routed experts": f"{moe}.experts",
            "shared experts": f"{moe}.shared",
            "attention": "recurrent.block.attn",
        },
        tensor_parallel=tensor_parallel_plan(model),
    )


# Tensor parallelism, Megatron's layout: a colwise projection splits its output features (heads, FFN hidden units),
# the rowwise one after it splits its input features and all-reduces its output. The tied embedding / LM head is
# split over the vocabulary: the lookup all-reduces, the logits stay split (Shard(-1)) for torch's vocabulary-parallel
# cross-entropy (`loss_parallel`). Everything else (norms, the loop's injection, LoRA, ACT, the router, the routed
# experts, MLA's low-rank down-projections) is replicated: every tp rank computes it on the same tokens.
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


def tensor_parallel_plan(model: MythosModel) -> dict[str, str]:
    """Every split submodule of a MythosModel by its full path (prelude/coda dense blocks, the looped block)."""
    attention = ATTENTION[model.cfg.attn_type]
    blocks = {f"prelude.{i}": FFN for i in range(len(model.prelude))}
    blocks["recurrent.block"] = SHARED_EXPERTS if model.recurrent.block.moe.shared is not None else {}
    blocks.update({f"coda.{i}": FFN for i in range(len(model.coda))})
    plan = {"tok_embeddings": "vocab_embedding", "norm": "vocab_head_input"}
    for block, ffn in blocks.items():
        plan.update({f"{block}.{path}": layout for path, layout in {**attention, **ffn}.items()})
    return plan
