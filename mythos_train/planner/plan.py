"""The plan itself: will this config fit, how fast will it run, and what to change if it does not.

Sizes a multi-node job before it spends GPU hours. Everything comes from the code that will run: parameter
shapes from `MythosModel(cfg.model)` on the meta device, sharding from `config.mesh_sizes` and parallel/'s
rules (memory.py), activations from a per-op count of what autograd saves (activations.py), collectives
from what FSDP2 and the expert all-to-all issue (comm.py), FLOPs from model/flops.py at the depths
`DepthSampler` draws for the first steps of the run. Step time = compute at a stated share of peak + the
all-to-alls + the FSDP traffic that does not hide behind compute (hardware.py has the assumptions and sources).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from mythos_train.config import ConfigError, JobConfig, validate
from mythos_train.dtypes import DTYPE_BYTES, resolve_param_dtype
from mythos_train.model.flops import block_forward_flops_per_token, training_flops_per_token
from mythos_train.planner.activations import ActivationMemory, micro_batch_activations
from mythos_train.planner.comm import Collective, exposed_loop_gather_s, step_collectives, time_collectives
from mythos_train.planner.hardware import (
    MATMUL_EFFICIENCY,
    USABLE_MEMORY_FRACTION,
    Accelerator,
    get_accelerator,
)
from mythos_train.planner.memory import (
    StaticMemory,
    model_parameters,
    model_plan,
    parameter_counts,
    static_memory,
    unit_sizes,
    working_memory,
)
from mythos_train.planner.tensor_parallel import check_tp, tp_mesh_sizes

GIB = 2**30
DEPTH_SAMPLES = 2048
"Steps of the run's depth schedule averaged for FLOPs (a pure function of (seed, step): these are the real draws)."

_PARAMS: dict[tuple[str, bool], tuple] = {}


def _model_parameters(cfg: JobConfig):
    """model_parameters and the model's plan, cached per (model config, reshard_per_iteration): the alternatives
    search reuses them."""
    key = (repr(cfg.model), cfg.parallel.reshard_per_iteration)
    if key not in _PARAMS:
        _PARAMS[key] = (*model_parameters(cfg.model, cfg.parallel.reshard_per_iteration), model_plan(cfg.model))
    return _PARAMS[key]


@dataclass
class MemoryPlan:
    """Bytes one rank holds: static state plus the largest moment of a micro-batch."""

    static: StaticMemory
    activations: ActivationMemory
    working: dict[str, int]
    "Candidate peak moment -> activation + gathered-weight + unsharded-gradient bytes above the static memory."
    peak_phase: str
    peak: int
    "static.total + working[peak_phase]."
    forward_end: int
    "Above the static memory when the loss is computed: saved activations and the root kept gathered."
    param_dtype: str
    n_grad: int
    "Backprop depth the activations are counted at (the largest the sampler draws)."


def memory_plan(
    cfg: JobConfig,
    world_size: int,
    rank: int = 0,
    device: str = "cuda",
    n_grad: int | None = None,
    n_nograd: int | None = None,
) -> MemoryPlan:
    """Per-rank memory of `cfg` on `world_size` ranks (rank 0 holds the most: FSDP pads the last shards).

    Depth defaults to the worst the sampler draws: k = backprop_depth, with a gradient-free prefix whenever
    max_depth > backprop_depth. `device` picks 'auto' dtypes and the RMSNorm kernel (fused on CUDA)."""
    t, p = cfg.train, cfg.parallel
    sizes = tp_mesh_sizes(p, world_size)
    params, buffers, parallel_plan = _model_parameters(cfg)
    units = unit_sizes(params, sizes, parallel_plan)
    dtype = resolve_param_dtype(p.param_dtype, device)
    param_bytes = DTYPE_BYTES[dtype]
    n_grad = t.backprop_depth if n_grad is None else n_grad
    n_nograd = (1 if t.max_depth > t.backprop_depth else 0) if n_nograd is None else n_nograd
    tokens = t.micro_batch_size * t.seq_len
    acts = micro_batch_activations(
        cfg.model, tokens, n_grad, n_nograd, p.activation_checkpoint, param_bytes, device != "cuda", sizes["ep"], not p.reshard_per_iteration,
        p.shared_expert_chunks, p.tp,
    )  # fmt: skip
    working = working_memory(
        acts.phases, units, param_bytes, p.activation_checkpoint, sizes, DTYPE_BYTES[p.reduce_dtype]
    )
    static = static_memory(params, buffers, sizes, rank)
    phase = max(working, key=working.get)
    forward_end = acts.saved + units.gathered["root"] * param_bytes
    return MemoryPlan(static, acts, working, phase, static.total + working[phase], forward_end, dtype, n_grad)


@dataclass
class DepthStats:
    """The run's depth schedule over its first DEPTH_SAMPLES steps."""

    mean_nograd: float
    mean_grad: float
    max_grad: int
    model_flops_per_token: float
    "Mean of training_flops_per_token over the sampled (n, k)."
    recompute_flops_per_token: float
    "Mean extra forward FLOPs activation checkpointing (and shared-expert tiling) re-runs in backward."


_DRAWS: dict[tuple, list[tuple[int, int]]] = {}


def depth_draws(cfg: JobConfig) -> list[tuple[int, int]]:
    """(n_nograd, n_grad) of the run's first DEPTH_SAMPLES steps, cached per depth schedule."""
    from mythos_train.depth import DepthSampler

    t = cfg.train
    key = (t.seed, t.depth_distribution, t.mean_depth, t.min_depth, t.max_depth, t.backprop_depth, t.steps)
    if key not in _DRAWS:
        sampler = DepthSampler(t)
        _DRAWS[key] = [sampler.sample(step) for step in range(min(max(t.steps, 1), DEPTH_SAMPLES))]
    return _DRAWS[key]


def depth_stats(cfg: JobConfig, draws: list[tuple[int, int]] | None = None) -> DepthStats:
    """FLOPs and depths over the run's first steps, or over the (n_nograd, n_grad) `draws` given (profile's steps)."""
    m, t = cfg.model, cfg.train
    draws = draws or depth_draws(cfg)
    counts: dict[tuple[int, int], int] = {}
    for draw in draws:
        counts[draw] = counts.get(draw, 0) + 1
    per_iteration = block_forward_flops_per_token(m, t.seq_len, looped=True)
    dense_block = block_forward_flops_per_token(m, t.seq_len, looped=False)
    mean_k = sum(k for _, k in draws) / len(draws)
    recompute = {"none": 0.0, "loop": mean_k * per_iteration}
    recompute["full"] = recompute["loop"] + (m.prelude_layers + m.coda_layers) * dense_block
    tiling = (
        mean_k * 2 * 3 * m.dim * m.shared_expert_dim if cfg.parallel.shared_expert_chunks > 1 else 0.0
    )  # its own recompute
    return DepthStats(
        mean_nograd=sum(n for n, _ in draws) / len(draws),
        mean_grad=mean_k,
        max_grad=max(k for _, k in draws),
        model_flops_per_token=sum(c * training_flops_per_token(m, t.seq_len, n, k) for (n, k), c in counts.items())
        / len(draws),
        recompute_flops_per_token=recompute[cfg.parallel.activation_checkpoint] + tiling,
    )


@dataclass
class Plan:
    """Memory, traffic and speed of one config on one cluster shape."""

    nodes: int
    gpus_per_node: int
    gpu: Accelerator
    sizes: dict[str, int]
    params: dict[str, int]
    memory: MemoryPlan
    capacity: float
    "Usable device bytes (USABLE_MEMORY_FRACTION of what the driver reports)."
    depth: DepthStats
    collectives: list[Collective]
    tokens_per_step: int
    compute_s: float
    exposed_fsdp_s: float
    exposed_loop_gather_s: float
    "Under expert parallelism: the looped unit's all-gathers not hidden behind the unit that prefetches them."
    all_to_all_s: float
    loop_parts: dict[str, int]
    "Looped block part -> its gathered bytes in param_dtype on one rank (memory.UnitSizes.loop_parts)."
    tp_s: float = 0.0
    "Tensor parallelism's sequence-parallel gathers / reduce-scatters and loss all-reduces (critical path)."

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.capacity

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_fsdp_s + self.exposed_loop_gather_s + self.all_to_all_s + self.tp_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.world_size / self.step_s

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def mfu(self) -> float:
        return self.depth.model_flops_per_token * self.tokens_per_s_per_gpu / (self.gpu.peak_bf16_tflops * 1e12)


def build_plan(
    cfg: JobConfig, nodes: int, gpus_per_node: int, gpu: str | Accelerator, depth: DepthStats | None = None
) -> Plan:
    """Validate `cfg` for nodes x gpus_per_node ranks (ConfigError if the mesh does not work) and plan it."""
    hw = gpu if isinstance(gpu, Accelerator) else get_accelerator(gpu)
    world = nodes * gpus_per_node
    validate(cfg, world)
    check_tp(cfg, gpus_per_node)
    sizes = tp_mesh_sizes(cfg.parallel, world)
    depth = depth or depth_stats(cfg)
    memory = memory_plan(cfg, world, device="cuda")
    params, _, parallel_plan = _model_parameters(cfg)
    units = unit_sizes(params, sizes, parallel_plan)
    param_bytes, reduce_bytes = DTYPE_BYTES[memory.param_dtype], DTYPE_BYTES[cfg.parallel.reduce_dtype]
    collectives = step_collectives(cfg, sizes, units, depth.mean_nograd, depth.mean_grad, param_bytes, reduce_bytes)
    time_collectives(collectives, sizes, gpus_per_node, hw)
    t, tp = cfg.train, cfg.parallel.tp
    tokens_per_rank = t.micro_batch_size * t.seq_len * t.grad_accum_steps // tp  # a tp group shares its tokens' work
    flops = (depth.model_flops_per_token + depth.recompute_flops_per_token) * tokens_per_rank
    peak_flops = hw.peak_bf16_tflops * 1e12 * MATMUL_EFFICIENCY
    compute_s = flops / peak_flops
    fsdp_s = sum(c.seconds for c in collectives if c.overlapped)
    dense_block_s = (
        block_forward_flops_per_token(cfg.model, t.seq_len, looped=False)
        * t.micro_batch_size
        * t.seq_len
        / tp
        / peak_flops
    )
    loop_exposed = exposed_loop_gather_s(cfg, sizes, units, param_bytes, gpus_per_node, hw, dense_block_s)
    return Plan(
        nodes=nodes, gpus_per_node=gpus_per_node, gpu=hw, sizes=sizes, params=parameter_counts(params, cfg.model),
        memory=memory, capacity=hw.memory_gib * GIB * USABLE_MEMORY_FRACTION, depth=depth, collectives=collectives,
        tokens_per_step=tokens_per_rank * world, compute_s=compute_s, exposed_fsdp_s=max(0.0, fsdp_s - compute_s),
        exposed_loop_gather_s=loop_exposed,
        all_to_all_s=sum(c.seconds for c in collectives if not c.overlapped and c.axis != "tp"),
        loop_parts={part: n * param_bytes for part, n in units.loop_parts.items()},
        tp_s=sum(c.seconds for c in collectives if c.axis == "tp"),
    )  # fmt: skip


# --------------------------------------------------------------------------- alternatives


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_changes(cfg: JobConfig, nodes: int, gpus_per_node: int) -> list[tuple[dict[str, object], int]]:
    """(parallel/train field changes, node count) pairs: AC policy, micro-batch and, as a last resort, sequence
    length (both keep the tokens per step through more accumulation), EP degree, reshard-per-iteration, tiled
    shared experts, HSDP across nodes, tensor parallelism inside a node (powers of two up to gpus_per_node), and 2x / 4x / 8x the nodes."""
    t, m = cfg.train, cfg.model
    # 8 chunks: the shared SwiGLU's backward share drops 8x, for one more shared forward per gradient iteration
    chunk_options = (
        sorted({1, 8, cfg.parallel.shared_expert_chunks}) if m.n_shared_experts else [cfg.parallel.shared_expert_chunks]
    )
    out = []
    micro_options = [t.micro_batch_size // 2**i for i in range(6) if t.micro_batch_size % 2**i == 0]
    seq_options = [t.seq_len // 2**i for i in range(1, 3) if t.seq_len % 2**i == 0 and t.seq_len // 2**i >= 128]
    batch_options = [(micro, t.seq_len) for micro in micro_options] + [(1, seq) for seq in seq_options]
    tps = [2**i for i in range(4) if gpus_per_node % 2**i == 0]
    for node_count in (nodes, 2 * nodes, 4 * nodes, 8 * nodes):
        world = node_count * gpus_per_node
        replicate_options = {1, node_count} if node_count > 1 else {1}
        for replicate, tp in itertools.product(sorted(replicate_options), tps):
            shard = world // replicate // tp
            eps = [e for e in _divisors(shard) if m.n_experts % (e * tp) == 0]
            for ep in eps:
                for policy in ("none", "loop", "full"):
                    for micro, seq in batch_options:
                        for reshard, chunks in itertools.product((False, True), chunk_options):
                            change = {
                                "parallel.activation_checkpoint": policy, "parallel.ep": ep, "parallel.reshard_per_iteration": reshard,
                                "parallel.shared_expert_chunks": chunks, "parallel.dp_replicate": replicate, "parallel.dp_shard": -1,
                                "parallel.tp": tp,
                                "train.micro_batch_size": micro, "train.seq_len": seq,
                                "train.grad_accum_steps": t.grad_accum_steps * t.micro_batch_size * t.seq_len // (micro * seq),
                            }  # fmt: skip
                            out.append((change, node_count))
    return out


def apply_changes(cfg: JobConfig, change: dict[str, object]) -> JobConfig:
    new = copy.deepcopy(cfg)
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(new, section), name, value)
    return new


def describe_change(cfg: JobConfig, change: dict[str, object], nodes: int, base_nodes: int) -> str:
    """The fields that differ from `cfg` (and the node count), as --section.field=value overrides."""
    parts = [f"{nodes} nodes"] if nodes != base_nodes else []
    for key, value in change.items():
        section, name = key.split(".")
        current = getattr(getattr(cfg, section), name)
        if key == "parallel.dp_shard" or current == value:
            continue
        parts.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(parts) or "(as configured)"


def alternatives(cfg: JobConfig, nodes: int, gpus_per_node: int, gpu: str, limit: int = 8) -> list[tuple[str, Plan]]:
    """Configs near `cfg` that fit: on the same node count (up to `limit`), then up to 2 per larger count."""
    depth_cache: dict[tuple[str, int], DepthStats] = {}
    found = []
    for change, node_count in candidate_changes(cfg, nodes, gpus_per_node):
        new = apply_changes(cfg, change)
        try:
            key = (new.parallel.activation_checkpoint, new.train.seq_len, new.parallel.shared_expert_chunks)
            if key not in depth_cache:
                depth_cache[key] = depth_stats(new)
            plan = build_plan(new, node_count, gpus_per_node, gpu, depth_cache[key])
        except ConfigError:
            continue
        description = describe_change(cfg, change, node_count, nodes)
        if plan.fits and description != "(as configured)":
            found.append((description, plan, new.train.seq_len != cfg.train.seq_len))
    # Same recipe first (a shorter sequence changes what the model learns), then the fastest.
    found.sort(key=lambda item: (item[1].nodes, item[2], -item[1].tokens_per_s_per_gpu))
    found = [(description, plan) for description, plan, _ in found]
    best_per_nodes: list[tuple[str, Plan]] = []
    for node_count in sorted({plan.nodes for _, plan in found}):
        best_per_nodes += [item for item in found if item[1].nodes == node_count][: limit if node_count == nodes else 2]
    return best_per_nodes[:limit]
