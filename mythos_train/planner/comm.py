"""Collective traffic of one optimizer step per rank, and how long it takes on a cluster's links.

Counts per micro-batch follow what parallel/ issues (checked by tests/test_plan.py with a dispatch mode that
sees every collective of a real step):
  * all-gather: the root once (kept gathered through backward), every other FSDP unit twice (forward and
    backward). With reshard_per_iteration the looped block is gathered once per forward iteration (n + k) and
    once per gradient iteration in backward (k; the checkpoint's recompute runs inside that window).
  * reduce-scatter: each unit once per micro-batch (FSDP2 reduces every micro-batch); HSDP adds an all-reduce
    of the reduced shard over dp_replicate.
  * expert all-to-all: a dispatch and a combine per MoE call: n + k calls forward and k in backward (the
    gradients travel back the same way). Activation checkpointing keeps the all-to-all outputs instead of
    re-communicating them (parallel/activation_checkpoint.py), except with reshard_per_iteration, where the
    recompute runs them again (k more).
  * tensor parallelism (tp > 1): per micro-batch the sequence-parallel all-gathers and reduce-scatters of
    planner/tensor_parallel.py's `tp_calls` (linear in depth), each of a [micro_batch_size * seq_len, dim]
    activation in param_dtype, and the vocabulary-parallel loss's three all-reduces; on the critical path.
A group of size 1 issues nothing. Bytes are what one rank sends: (w - 1) / w of the reduce-scatter input or of
the all-to-all input (uniform routing), (w - 1) times its shard for an all-gather, 2 (w - 1) / w for all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

from mythos_train.config import JobConfig
from mythos_train.planner.hardware import COLLECTIVE_EFFICIENCY, Accelerator
from mythos_train.planner.memory import UnitSizes
from mythos_train.planner.tensor_parallel import tp_calls

LATENCY_S = {"intra": 20e-6, "inter": 50e-6}
"Fixed cost per collective call (NCCL small-message latency, about 10-30 us in a node and 30-80 us across)."


@dataclass
class Collective:
    """One kind of collective over one mesh axis: calls and bytes this rank sends per optimizer step."""

    name: str
    axis: str
    calls: int
    payload: int
    "Sum over calls of the input tensor bytes (all-gather: this rank's shard)."
    sent: int
    "Bytes this rank puts on the wire."
    seconds: float = 0.0
    overlapped: bool = True
    "FSDP traffic hides behind compute (prefetch); the expert all-to-all sits on the critical path."


def exposed_loop_gather_s(
    cfg: JobConfig,
    sizes: dict[str, int],
    units: UnitSizes,
    param_bytes: int,
    gpus_per_node: int,
    hw: Accelerator,
    dense_block_s: float,
) -> float:
    """Seconds per step the looped unit's all-gathers stay exposed under expert parallelism (0 without).

    With `prefetch_chain` (parallel/fsdp.py) the looped unit is gathered while the unit before it computes: in forward the last
    prelude block's forward (`dense_block_s`), in backward the first coda block's backward (twice that). Its
    gather (dense part over dp_shard, experts over efsdp) usually takes longer: the rest is exposed. Without a
    prelude (coda) block only the root's small embedding (head) precedes it, counted as no overlap.
    """  # fmt: skip
    if sizes["ep"] == 1:
        return 0.0
    loop = units.loop_units
    gathers = [
        Collective("all-gather", axis, 1, 0, (sizes[axis] - 1) * sum(shard.get(u, 0) for u in loop) * param_bytes)
        for shard, axis in ((units.dense_sharded, "dp_shard"), (units.expert_sharded, "efsdp"))
        if sizes[axis] > 1
    ]
    time_collectives(gathers, sizes, gpus_per_node, hw)
    gather_s = sum(g.seconds for g in gathers)
    forward = max(0.0, gather_s - (dense_block_s if units.blocks_before_loop else 0.0))
    backward = max(0.0, gather_s - (2 * dense_block_s if units.blocks_after_loop else 0.0))
    return cfg.train.grad_accum_steps * (forward + backward)


def _axis_groups(sizes: dict[str, int]) -> dict[str, int]:
    return {
        "dp_shard": sizes["dp_shard"],
        "efsdp": sizes["efsdp"],
        "ep": sizes["ep"],
        "dp_replicate": sizes["dp_replicate"],
        "tp": sizes.get("tp", 1),
    }


def step_collectives(
    cfg: JobConfig,
    sizes: dict[str, int],
    units: UnitSizes,
    n_nograd: float,
    n_grad: float,
    param_bytes: int,
    reduce_bytes: int,
) -> list[Collective]:
    """Collectives of one optimizer step (grad_accum_steps micro-batches) at (mean) depth n + k."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    groups = _axis_groups(sizes)
    micro = t.grad_accum_steps
    out: list[Collective] = []

    def add(
        name: str, axis: str, calls: float, payload_per_call: float, sent_per_call: float, overlapped: bool = True
    ) -> None:
        if groups[axis] > 1 and calls > 0:
            out.append(
                Collective(
                    name,
                    axis,
                    round(calls * micro),
                    round(calls * micro * payload_per_call),
                    round(calls * micro * sent_per_call),
                    overlapped=overlapped,
                )
            )

    for shard, axis in ((units.dense_sharded, "dp_shard"), (units.expert_sharded, "efsdp")):
        group = groups[axis]
        for unit, numel in shard.items():
            if unit == "root":
                gathers = 1
            elif unit == units.loop_block:  # a unit of its own only with reshard_per_iteration
                gathers = n_nograd + 2 * n_grad
            else:
                gathers = 2
            add("all-gather", axis, gathers, numel * param_bytes, (group - 1) * numel * param_bytes)
            add("reduce-scatter", axis, 1, group * numel * reduce_bytes, (group - 1) * numel * reduce_bytes)
            replicas = groups["dp_replicate"]
            sent = 2 * (replicas - 1) / replicas * numel * reduce_bytes
            add("all-reduce", "dp_replicate", 1, numel * reduce_bytes, sent)
    if sizes["ep"] > 1:
        ep = sizes["ep"]
        # routed (token, choice) slots per rank; under tp each rank routes its seq_len / tp tokens
        rows = t.micro_batch_size * t.seq_len * m.n_experts_per_tok // groups["tp"]
        recomputed = n_grad if p.activation_checkpoint != "none" and p.reshard_per_iteration else 0
        calls = 2 * (n_nograd + n_grad + recomputed + n_grad)
        payload = rows * m.dim * param_bytes
        add("all-to-all", "ep", calls, payload, payload * (ep - 1) / ep, overlapped=False)
    tp = groups["tp"]
    calls = tp_calls(cfg, n_nograd, n_grad)
    tokens = t.micro_batch_size * t.seq_len
    whole = tokens * m.dim * param_bytes  # one gathered activation
    add("all-gather", "tp", calls.all_gathers, whole / tp, whole * (tp - 1) / tp, overlapped=False)
    add("reduce-scatter", "tp", calls.reduce_scatters, whole, whole * (tp - 1) / tp, overlapped=False)
    add("all-reduce", "tp", calls.loss_all_reduces, tokens * 4, 2 * (tp - 1) / tp * tokens * 4, overlapped=False)
    return _merge(out)


def _merge(collectives: list[Collective]) -> list[Collective]:
    merged: dict[tuple[str, str, bool], Collective] = {}
    for c in collectives:
        key = (c.name, c.axis, c.overlapped)
        if key in merged:
            merged[key].calls += c.calls
            merged[key].payload += c.payload
            merged[key].sent += c.sent
        else:
            merged[key] = c
    return list(merged.values())


def axis_span(axis: str, sizes: dict[str, int], gpus_per_node: int) -> str:
    """'intra' when every group of this mesh axis sits inside one node, else 'inter'.

    parallel/mesh.py lays ranks out as (dp_replicate, dp_shard) and (dp_replicate, efsdp, ep), innermost
    contiguous: ep groups are `ep` consecutive ranks, dp_shard and efsdp groups live inside dp_shard
    consecutive ranks, dp_replicate groups stride over dp_shard. A tp axis is innermost of all (tp consecutive
    ranks, inside a node): every data axis then strides over it.
    """
    tp = sizes.get("tp", 1)
    world = sizes["dp_replicate"] * sizes["dp_shard"] * tp
    if axis == "tp":
        return "intra" if tp <= gpus_per_node else "inter"
    if axis == "ep":
        return "intra" if sizes["ep"] <= gpus_per_node else "inter"
    if axis in ("dp_shard", "efsdp"):
        return "intra" if sizes["dp_shard"] * tp <= gpus_per_node else "inter"
    return "intra" if world <= gpus_per_node else "inter"


def time_collectives(collectives: list[Collective], sizes: dict[str, int], gpus_per_node: int, hw: Accelerator) -> None:
    """Fill `seconds`: bytes sent / (link bandwidth x collective efficiency) + a fixed latency per call."""
    for c in collectives:
        span = axis_span(c.axis, sizes, gpus_per_node)
        bandwidth = (hw.intra_node_gbps if span == "intra" else hw.inter_node_gbps) * 1e9 * COLLECTIVE_EFFICIENCY
        c.seconds = c.sent / bandwidth + c.calls * LATENCY_S[span]
