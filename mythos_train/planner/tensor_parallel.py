"""Tensor (+ sequence) parallelism in the planner: which weights tp splits, the mesh with a tp axis, TP's collectives.

Which weights tp splits, and on which dim, is the model's plan (`ParallelPlan.tensor_parallel`,
mythos_train/model/parallel_plan.py: Megatron-LM's layout, heads and FFN hidden units colwise then rowwise, the
embedding = tied head over the vocabulary, the rest replicated), read by `tp_split_dim`. What the planner adds:
  * why MLA's down-projections may stay replicated, as the plan has them: splitting them would cost one more
    collective per attention to save q_lora_rank x dim weights (0.2% of a 100B looped block's FLOPs);
  * the replicated modules (norms, router, loop injection, depth LoRA, loop embedding, ACT) run in sequence-parallel
    regions (each rank holds seq_len / tp tokens of the residual stream and of the loop state h);
  * routed experts whole, the TP ranks folded into EP: experts split over parallel.ep x tp ranks (`routed_expert_options`
    has the numbers against TP inside each expert).
Mesh: world = dp_replicate x dp_shard x tp, tp innermost (tp consecutive ranks, inside one node); parallel.ep
counts data ranks (it divides dp_shard as without TP) and the experts' group is its ep ranks x their tp ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mythos_train.config import ConfigError, JobConfig, ParallelConfig, check_tensor_parallel, mesh_sizes

SPLIT_DIM = {"colwise": 0, "vocab_embedding": 0, "rowwise": 1}
"""Layout (ParallelPlan.tensor_parallel) -> the dim of its module's weight tp splits, as parallel/tensor_parallel.py's
styles shard it: colwise output features, the embedding's vocabulary rows, rowwise input features. The other
layouts only place activations: their modules' weights are replicated."""


def tp_split_dim(name: str, tensor_parallel: dict[str, str]) -> int | None:
    """The dimension tensor parallelism splits parameter `name` on, or None when it is replicated.

    tensor_parallel: the model's plan, module path -> layout (`ParallelPlan.tensor_parallel`)."""
    module, _, attribute = name.rpartition(".")
    if attribute != "weight":
        return None
    return SPLIT_DIM.get(tensor_parallel.get(module, ""))


def tp_mesh_sizes(parallel: ParallelConfig, world_size: int) -> dict[str, int]:
    """config.mesh_sizes of the world_size / tp data ranks, plus 'tp'; 'ep' is then the experts' group, ep x tp.

    tp 1 returns mesh_sizes without a 'tp' entry, so plans without TP read (and serialize) as they did."""
    tp = parallel.tp
    if tp == 1:
        return {axis: n for axis, n in mesh_sizes(parallel, world_size).items() if axis != "tp"}
    if tp < 1 or world_size % tp:
        raise ConfigError(f"parallel.tp ({tp}) must be >= 1 and divide the world size ({world_size})")
    sizes = mesh_sizes(dataclasses.replace(parallel, tp=1), world_size // tp)  # the data ranks' mesh
    return {**sizes, "ep": sizes["ep"] * tp, "tp": tp}


def check_tp(cfg: JobConfig, gpus_per_node: int) -> None:
    """ConfigError naming the field when tp leaves the node or does not divide what it splits (config's widths,
    plus what the planned layout adds: sequence-parallel tokens and the experts TP folds into EP)."""
    model, tp = cfg.model, cfg.parallel.tp
    if tp == 1:
        return
    check_tensor_parallel(model, tp)
    splits = {
        "--gpus-per-node": gpus_per_node,
        "train.seq_len (sequence parallelism)": cfg.train.seq_len,
        "model.n_experts / parallel.ep": model.n_experts // cfg.parallel.ep,
    }
    for field, value in splits.items():
        if value % tp:
            raise ConfigError(f"parallel.tp ({tp}) must divide {field} ({value}): TP stays inside a node")


@dataclass(frozen=True)
class TPCalls:
    """TP collectives of one micro-batch, each over the tp ranks of one data rank."""

    all_gathers: float
    "Sequence-parallel [tokens, dim] activations gathered whole (forward: into a TP region; backward: its gradient)."
    reduce_scatters: float
    "[tokens, dim] partial sums reduced back to sequence shards (forward: out of a TP region; backward: into one)."
    loss_all_reduces: int
    "Vocabulary-parallel cross-entropy: max, sum of exponentials and target logit, [tokens] fp32 each."


REGIONS_PER_BLOCK = 2
"TP regions per block: attention and FFN (MoE: shared experts and router on the gathered input, routed rows split)."


def tp_calls(cfg: JobConfig, n_nograd: float, n_grad: float) -> TPCalls:
    """Counts of `TPCalls` at depth n + k. Each region gathers its input and reduce-scatters its output in forward,
    and does the reverse in backward; a recomputed forward (activation checkpointing) issues its pair again. So a
    loop iteration costs 2 gathers + 2 reduce-scatters without gradients and 6 + 6 with them under AC 'loop' /
    'full' (4 + 4 under 'none'): linear in depth, unlike FSDP's, which the loop's unit issues once per step.
    The embedding's output is reduce-scattered (vocabulary rows: partial sums), the head's input gathered."""
    m, policy = cfg.model, cfg.parallel.activation_checkpoint
    per_grad_iteration = 2 + (1 if policy != "none" else 0)  # forward, backward, recompute
    dense_passes = 2 + (1 if policy == "full" else 0)
    pairs = REGIONS_PER_BLOCK * (
        n_nograd + per_grad_iteration * n_grad + dense_passes * (m.prelude_layers + m.coda_layers)
    )
    return TPCalls(all_gathers=pairs + 2, reduce_scatters=pairs + 2, loss_all_reduces=3)


@dataclass(frozen=True)
class RoutedExpertOption:
    """One way to place the routed experts under TP, per rank and per MoE call."""

    name: str
    expert_bytes: int
    "This rank's gathered routed-expert weights in param_dtype."
    all_to_all_bytes: int
    "Bytes one rank sends per dispatch (or combine) all-to-all."
    routed_activation_bytes: int
    "Routed rows and SwiGLU hidden rows one gradient iteration saves on this rank."
    expert_hidden: int
    "Width of each expert's GEMM (the grouped matmul's N)."
    flops_share: float
    "Share of its tp group's routed-expert FLOPs this rank runs (1 = every tp rank repeats them)."


def routed_expert_options(cfg: JobConfig, sizes: dict[str, int], param_bytes: int) -> list[RoutedExpertOption]:
    """The routed experts folded into EP (what the planner models) against TP inside each expert, and replicated.

    Folded: each rank routes its seq_len / tp tokens and keeps E / (ep x tp) whole experts. Inside: every tp rank
    routes the whole gathered sequence over its ep group and keeps E / ep experts, each split tp ways. The weights
    per rank come out equal; TP inside each expert sends tp times the all-to-all bytes, saves tp times the routed
    rows and runs GEMMs tp times narrower. Replicated (what a TP without sequence parallelism gets when EP stays on
    the data ranks): E / ep whole experts on every tp rank, each routing the whole sequence: tp times the weights
    (and their gradients), the routed activations and the routed FLOPs."""
    m, t, tp = cfg.model, cfg.train, sizes.get("tp", 1)
    tokens, top_k, ep_data = t.micro_batch_size * t.seq_len, m.n_experts_per_tok, sizes["ep"] // tp
    weights = m.n_experts * 3 * m.dim * m.expert_dim * param_bytes // (ep_data * tp)

    def rows_per_token(group: int) -> int:  # routed rows (+ the all-to-all's output)
        return (3 if group > 1 else 2) * top_k * m.dim * param_bytes

    hidden_per_token = 4 * top_k * m.expert_dim * param_bytes

    def sent(group: int, routed_tokens: int) -> int:
        return routed_tokens * top_k * m.dim * param_bytes * (group - 1) // group

    return [
        RoutedExpertOption(
            "folded into EP", weights, sent(sizes["ep"], tokens // tp),
            (rows_per_token(sizes["ep"]) + hidden_per_token) * tokens // tp, m.expert_dim, 1 / tp,
        ),
        RoutedExpertOption(
            "TP inside each expert", weights, sent(ep_data, tokens),
            rows_per_token(ep_data) * tokens + hidden_per_token * tokens // tp, m.expert_dim // tp, 1 / tp,
        ),
        RoutedExpertOption(
            "replicated over tp", weights * tp, sent(ep_data, tokens),
            (rows_per_token(ep_data) + hidden_per_token) * tokens, m.expert_dim, 1.0,
        ),
    ]  # fmt: skip
