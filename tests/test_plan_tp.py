"""The planner's tensor parallelism against counts made here by hand: weights per rank from the meta model's modules,
TP collectives per loop iteration, a layout that fits the 100B preset at its 8192-token sequence; and against the
memory a real TP step holds on gloo (tests/plan_testing.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from distributed_testing import run_distributed
from plan_testing import RSS_ENV, assert_memory_matches, measure_cases
from test_plan import LOOP_HEAVY, small_debug
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from mythos_train.config import ConfigError, load_config
from mythos_train.model import MythosModel
from mythos_train.model.attention import GQAttention, MLAttention
from mythos_train.model.moe import FeedForward, GroupedExperts
from mythos_train.planner.comm import step_collectives
from mythos_train.planner.memory import model_parameters, model_plan, static_memory, unit_sizes
from mythos_train.planner.plan import alternatives, build_plan, memory_plan
from mythos_train.planner.tensor_parallel import tp_mesh_sizes
from parallel.tensor_parallel import apply_tensor_parallel

DEBUG = "configs/debug.toml"
SPLITS = {  # module type -> {linear attribute: dim of its weight that tensor parallelism cuts}
    MLAttention: {"q_up_nope": 0, "q_up_rope": 0, "kv_up": 0, "wo": 1},
    GQAttention: {"wq": 0, "wk": 0, "wv": 0, "wo": 1},
    FeedForward: {"w1": 0, "w3": 0, "w2": 1},
}


def numel_by_hand(cfg, tp: int, dp_shard: int) -> int:
    """Elements rank 0 holds: each weight cut per the Megatron rules, by module type (vocabulary rows of the
    embedding, heads, FFN hidden units; the routed experts whole, E / tp per rank), then FSDP's torch.chunk of dim 0
    over dp_shard; everything else replicated over tp."""
    with torch.device("meta"):
        model = MythosModel(cfg.model)
    local: dict[int, tuple[int, ...]] = {id(p): tuple(p.shape) for p in model.parameters()}

    def cut(param: torch.Tensor, dim: int, parts: int) -> None:
        shape = list(param.shape)
        assert shape[dim] % parts == 0
        shape[dim] //= parts
        local[id(param)] = tuple(shape)

    for module in model.modules():
        for kind, splits in SPLITS.items():
            if isinstance(module, kind):
                for attr, dim in splits.items():
                    cut(getattr(module, attr).weight, dim, tp)
        if isinstance(module, GroupedExperts):
            for w in (module.w1, module.w2, module.w3):
                cut(w, 0, tp)
    cut(model.tok_embeddings.weight, 0, tp)
    return sum(-(-shape[0] // dp_shard) * math.prod(shape[1:]) if shape else 1 for shape in local.values())


@pytest.mark.parametrize("attn", ["mla", "gqa"])
@pytest.mark.parametrize("tp,world", [(1, 1), (2, 2), (2, 4)])
def test_weights_per_rank_by_hand(attn: str, tp: int, world: int):
    cfg = load_config(DEBUG, [f"--model.attn_type={attn}", "--parallel.ep=1", f"--parallel.tp={tp}"])
    params, _ = model_parameters(cfg.model)
    sizes = tp_mesh_sizes(cfg.parallel, world)
    assert static_memory(params, 0, sizes, 0).param_numel == numel_by_hand(cfg, tp, world // tp)


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_split_dims_are_the_ones_the_tp_styles_shard(attn: str):
    """Each parameter's tp_dim, read off the model's plan, is the dim parallel/'s DTensor styles shard it on (a
    one-rank tp mesh keeps the placements), and None exactly where they leave a plain replicated tensor."""
    cfg = load_config(DEBUG, [f"--model.attn_type={attn}"])
    params, _ = model_parameters(cfg.model)
    model = MythosModel(cfg.model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        apply_tensor_parallel(
            model, init_device_mesh("cpu", (1,), mesh_dim_names=("tp",)), model.parallel_plan().tensor_parallel
        )
        sharded = {
            name: next(placement.dim for placement in p.placements if isinstance(placement, Shard))
            for name, p in model.named_parameters()
            if isinstance(p, DTensor) and any(isinstance(placement, Shard) for placement in p.placements)
        }  # sequence-parallel norms are Replicate DTensors
    finally:
        dist.destroy_process_group()
    assert {p.name: p.tp_dim for p in params if p.tp_dim is not None} == sharded
    assert len(sharded) > 10


def test_tp_halves_the_split_weights():
    """At tp 2 rank 0 holds the replicated parameters whole and half of everything else, so the sum over the tp
    group exceeds the model by exactly the replicated part."""
    cfg = load_config(DEBUG, ["--parallel.ep=1"])
    params, _ = model_parameters(cfg.model)
    one = static_memory(params, 0, tp_mesh_sizes(cfg.parallel, 1), 0).param_numel
    cfg.parallel.tp = 2
    two = static_memory(params, 0, tp_mesh_sizes(cfg.parallel, 2), 0).param_numel
    replicated = sum(math.prod(p.shape) for p in params if p.tp_dim is None and not p.expert)
    assert one == sum(math.prod(p.shape) for p in params)
    assert 2 * two == one + replicated and replicated < one / 10


def tp_calls_per_micro_batch(cfg, n: int, k: int, name: str) -> int:
    sizes = tp_mesh_sizes(cfg.parallel, 4)
    params, _ = model_parameters(cfg.model)
    collectives = step_collectives(cfg, sizes, unit_sizes(params, sizes, model_plan(cfg.model)), n, k, 2, 4)
    return sum(c.calls for c in collectives if c.axis == "tp" and c.name == name) // cfg.train.grad_accum_steps


@pytest.mark.parametrize("policy,per_grad_iteration", [("loop", 6), ("none", 4)])
def test_tp_collectives_grow_linearly_with_depth(policy: str, per_grad_iteration: int):
    """Per iteration: attention and FFN each gather their input and reduce-scatter their output, forward and
    backward (+ the recompute under 'loop'); a gradient-free iteration only forward. FSDP's calls do not move."""
    cfg = load_config(
        DEBUG, ["--parallel.tp=2", f"--parallel.activation_checkpoint={policy}", "--train.grad_accum_steps=3"]
    )
    dense = cfg.model.prelude_layers + cfg.model.coda_layers
    for name in ("all-gather", "reduce-scatter"):
        counts = [tp_calls_per_micro_batch(cfg, 2, k, name) for k in range(1, 5)]
        assert [b - a for a, b in zip(counts, counts[1:])] == [per_grad_iteration] * 3
        assert tp_calls_per_micro_batch(cfg, 3, 1, name) - counts[0] == 2
        assert counts[0] == 2 * 2 + per_grad_iteration + dense * 4 + 2  # n=2, k=1, dense blocks, embedding/head
    sizes = tp_mesh_sizes(cfg.parallel, 4)
    params, _ = model_parameters(cfg.model)
    fsdp = [
        sum(
            c.calls
            for c in step_collectives(cfg, sizes, unit_sizes(params, sizes, model_plan(cfg.model)), 2, k, 2, 4)
            if c.axis in ("dp_shard", "efsdp")
        )
        for k in (1, 4)
    ]
    assert fsdp[0] == fsdp[1]


def test_tp_stays_inside_a_node_and_divides_heads():
    cfg = load_config(DEBUG, ["--parallel.tp=2", "--parallel.ep=1"])
    with pytest.raises(ConfigError, match="gpus-per-node"):
        build_plan(cfg, 2, 1, "h100")
    cfg = load_config(DEBUG, ["--parallel.tp=8", "--parallel.ep=1", "--model.n_heads=4"])
    with pytest.raises(ConfigError, match="n_heads"):
        build_plan(cfg, 1, 8, "h100")


def test_100b_at_seq_8192_fits_with_tp():
    """Without TP no layout fits the 100B preset at 8192 tokens on 8 H100 nodes (issue 16); with TP one does."""
    cfg = load_config("configs/mythos_100b.toml")
    assert not build_plan(cfg, 8, 8, "h100").fits
    fitting = [
        plan
        for change, plan in alternatives(cfg, 8, 8, "h100")
        if plan.sizes.get("tp", 1) > 1 and "seq_len" not in change and "nodes" not in change
    ]
    assert fitting and all(plan.fits and plan.memory.peak <= plan.capacity for plan in fitting)


def test_sequence_parallel_loop_inputs():
    """Under AC 'loop' a gradient iteration keeps its fp32 input h and EP's two all-to-all outputs: sequence
    parallelism leaves each tp rank seq_len / tp tokens of both. The TP region collectives (gathered inputs,
    reduce-scattered outputs) are recomputed, not kept (parallel/activation_checkpoint.py saves all-to-alls only)."""
    cfg = load_config(DEBUG, ["--parallel.tp=2"])
    per_step = {}
    for tp in (1, 2):
        cfg.parallel.tp = tp
        a, b = (memory_plan(cfg, 4, device="cpu", n_grad=k, n_nograd=1).activations.saved for k in (2, 4))
        per_step[tp] = (b - a) / 2
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    D, k = cfg.model.dim, cfg.model.n_experts_per_tok
    assert cfg.parallel.param_dtype in ("auto", "float32")  # fp32 on CPU
    assert per_step[1] == tokens * (D + 2 * k * D) * 4
    assert per_step[2] == per_step[1] / 2


# --------------------------------------------------------------------------- against real TP steps


def tp_debug(*overrides: str):
    """tests/test_plan.py's small debug job at tp 2 (its dense FFN 176 wide: dim * 4 // 3 = 170 does not split)."""
    return small_debug("--parallel.tp=2", "--model.dense_ffn_dim=176", *overrides)


TP_CASES = {  # world -> (name, cfg, n_nograd, n_grad): the head's peak, the loop's under 'loop' and 'none'
    2: [
        ("head peak", tp_debug("--parallel.ep=1"), 1, 2),
        ("loop-heavy loop", tp_debug("--parallel.ep=1", *LOOP_HEAVY), 1, 2),
        ("loop-heavy none", tp_debug("--parallel.ep=1", *LOOP_HEAVY, "--parallel.activation_checkpoint=none"), 0, 2),
    ],
    4: [("fsdp 2 x tp 2, ep 2, none", tp_debug(*LOOP_HEAVY, "--parallel.activation_checkpoint=none"), 0, 2)],
}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_plan_matches_tp_step(world: int, monkeypatch):
    """Per rank, a real TP step (sequence parallel, TP folded into EP) against the plan: static bytes exactly,
    activations saved and the micro-batch peak (allocator and RSS) within test_plan.py's 25%. Failed before the
    planner counted the loop's kept TP collectives (AC 'loop': saved 5.26 MB measured, 4.37 planned) and before
    the runtime had SP (params 3.37 MB measured per rank at tp 2, 2.58 MB planned)."""
    for key, value in RSS_ENV.items():
        monkeypatch.setenv(key, value)
    cases = TP_CASES[world]
    measured = run_distributed(measure_cases, world, [case[1:] for case in cases], timeout=600)
    # ep 2 x tp 2: 64 tokens per rank routed over 4 ranks, whose activations measured -22% .. +20% of the plan
    # (uniform routing); their mean is within 2%, asserted within 10%.
    rel = 0.3 if world == 4 else 0.25
    report = []
    for i, (name, cfg, n, k) in enumerate(cases):
        peaks, planned = [], []
        for rank in range(world):
            plan = memory_plan(cfg, world, rank, device="cpu", n_grad=k, n_nograd=n)
            report.append(assert_memory_matches(measured[rank][i], plan, f"{name} w{world} r{rank}", rel))
            peaks.append(measured[rank][i]["peak"])
            planned.append(plan.peak - plan.static.total)
        if world == 4:
            assert sum(peaks) == pytest.approx(sum(planned), rel=0.1), (name, peaks, planned)
    print("\n".join(report))
