"""The model's parallel plan: which of its modules parallel/ shards, swaps, checkpoints and compiles.

The layout of the model is named here once. parallel/ applies the plan of whatever model returns one
(`model.parallel_plan()`) and knows no module names; the planner (mythos_train/planner/memory.py) reads the same
plan off the model built on the meta device. Paths are `nn.Module.get_submodule` paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mythos_train.model.recurrent import LOOP_DYNAMICS

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


# Tensor parallelism, Megatron's layout with sequence parallelism: between regions each tp rank holds seq_len / tp of
# the residual stream. A region (attention, FFN, shared experts) gathers its input, runs colwise projections
# (output features: heads, FFN hidden units) then a rowwise one (input features), and reduce-scatters the result.
# The tied embedding / LM head is split over the vocabulary: the lookup reduce-scatters, the final norm's output is
# gathered and the logits stay split (Shard(-1)) for torch's vocabulary-parallel cross-entropy (`loss_parallel`).
# Norms are sequence-parallel; the loop's own modules (injection, LoRA, norm, ACT) and the router run on the
# sequence slices with plain parameters (`sequence_local`: their gradients are summed over tp once per step); the
# routed experts are split over ep x tp ranks (parallel/expert_parallel.py); MLA's low-rank down-projections run
# replicated on the gathered sequence (their outputs feed every head).
ATTENTION = {
    "gqa": {"attn": "attention_region", "attn.wq": "colwise", "attn.wk": "colwise", "attn.wv": "colwise",
            "attn.wo": "rowwise"},
    "mla": {"attn": "attention_region_local", "attn.q_up_nope": "colwise", "attn.q_up_rope": "colwise",
            "attn.kv_up": "colwise", "attn.rope_key_heads": "heads", "attn.wo": "rowwise"},
}  # fmt: skip
NORMS = {"attn_norm": "sequence_parallel", "ffn_norm": "sequence_parallel"}
FFN = {"ffn": "ffn_region", "ffn.w1": "colwise", "ffn.w3": "colwise", "ffn.w2": "rowwise"}
SHARED_EXPERTS = {f"moe.shared{name}": layout for name, layout in {"": "rows_region", ".w1": "colwise",
                  ".w3": "colwise", ".w2": "rowwise"}.items()}  # fmt: skip


def tensor_parallel_plan(model: MythosModel) -> dict[str, str]:
    """Every split submodule of a MythosModel by its full path (prelude/coda dense blocks, the looped block)."""
    attention = ATTENTION[model.cfg.attn_type]
    blocks = {f"prelude.{i}": FFN for i in range(len(model.prelude))}
    blocks["recurrent.block"] = SHARED_EXPERTS if model.recurrent.block.moe.shared is not None else {}
    blocks.update({f"coda.{i}": FFN for i in range(len(model.coda))})
    plan = {"tok_embeddings": "vocab_embedding", "norm": "sequence_parallel_head_input"}
    for block, ffn in blocks.items():
        plan.update({f"{block}.{path}": layout for path, layout in {**NORMS, **attention, **ffn}.items()})
    for path in LOOP_DYNAMICS:  # the loop's own modules and the router gate, used on the sequence slices
        owner, _, leaf = path.rpartition(".")
        if getattr(model.recurrent.get_submodule(owner), leaf) is not None:  # ACT is optional
            plan[f"recurrent.{path}"] = "sequence_local"
    return plan
