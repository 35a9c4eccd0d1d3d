"""Tensor parallelism (DTensor styles) against a single-process model on the same tokens.

Every rank builds the same seeded model twice: a plain reference fed the whole global batch, and a parallel copy
(tp ranks see the same tokens, data-parallel ranks their slice). Logits, every parameter's full gradient
(`DTensor.full_tensor()`) and the parameters after a few AdamW steps must agree within fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_testing import CollectiveCounter, run_distributed
from test_parallel_fsdp_ep import (
    clip_and_step,
    full,
    global_batch,
    lm_loss,
    parallel_and_reference,
    param_error,
    tiny_config,
)
from torch.distributed.tensor import DTensor

import parallel
from mythos_train.config import ConfigError, validate
from mythos_train.depth import DepthSampler
from mythos_train.loss import cross_entropy_sum
from mythos_train.model import MythosModel
from parallel import build_mesh, loss_context, parallelize

STEPS = 3
TP_MODEL = dict(n_heads=4, n_kv_heads=2)  # both split over tp 2: GQA keeps 2 query heads per kv head per rank


def tp_config(attn_type: str, **parallel):
    cfg = tiny_config(**parallel)
    cfg.model.attn_type = attn_type
    for key, value in TP_MODEL.items():
        setattr(cfg.model, key, value)
    return cfg


def check_tp(rank: int, world: int, attn_type: str, overrides: dict) -> dict:
    """Max errors of logits, loss, full grads, clipped norm and params after STEPS steps vs the reference."""
    cfg = tp_config(attn_type, **overrides)
    model, ref, dims, wrap, opt, ref_opt = parallel_and_reference(cfg, world)
    sampler = DepthSampler(cfg.train)
    err = {"logits": 0.0, "loss": 0.0, "grad": 0.0, "norm": 0.0, "param": 0.0}
    for step in range(STEPS):
        n, k = sampler.sample(step)
        tokens = global_batch(step, dims.dp_size)
        mine = tokens.chunk(dims.dp_size)[dims.dp_rank]
        with torch.no_grad():
            logits, ref_logits = model(mine[:, :-1], n_nograd=n, n_grad=k), ref(mine[:, :-1], n_nograd=n, n_grad=k)
        err["logits"] = max(err["logits"], (full(logits) - ref_logits).abs().max().item())
        with loss_context(dims):  # vocabulary-parallel logits: torch's loss_parallel, forward and backward
            logits = model(mine[:, :-1], n_nograd=n, n_grad=k, wrap_iteration=wrap)
            loss = cross_entropy_sum(logits, mine[:, 1:]) / mine[:, 1:].numel()
            loss.backward()
        ref_loss = lm_loss(ref, tokens, n, k)
        ref_loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # every tp rank holds its data-parallel slice's loss
        err["loss"] = max(err["loss"], abs(mean_loss.item() / world - ref_loss.item()))
        for (name, p), (ref_name, rp) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            assert name == ref_name, (name, ref_name)
            scale = rp.grad.abs().max().item() + 1e-6
            grad_err = (full(p.grad) - rp.grad).abs().max().item() / scale
            if grad_err > err["grad"]:
                err["grad"], err["worst_grad"] = grad_err, f"{name} at step {step}"
        clip_and_step(model, ref, opt, ref_opt, dims, err)
    err["param"] = param_error(model, ref)
    with parallel.full_logits(model):  # generation reads whole-vocabulary logits
        prompt = global_batch(STEPS, 1)[:1, :4]
        err["generate"] = torch.equal(model.generate(prompt, 4, n_loops=2), ref.generate(prompt, 4, n_loops=2))
    err["wo_placements"] = str(model.prelude[0].attn.wo.weight.placements)
    err["logits_placements"] = str(logits.placements)
    err["embedding_placements"] = str(model.tok_embeddings.weight.placements)
    err["experts"] = type(model.recurrent.block.moe.experts).__name__
    return err


def assert_close(errors: list[dict]) -> None:
    for err in errors:
        assert err["logits"] < 1e-5 and err["loss"] < 1e-5 and err["generate"], err
        assert err["grad"] < 1e-4 and err["norm"] < 1e-4 and err["param"] < 1e-4, err


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_tp2_matches_one_process(attn_type):
    """tp 2 alone (no FSDP sharding: dp_shard 1), GQA and MLA."""
    errors = run_distributed(check_tp, 2, attn_type, {"tp": 2}, timeout=600)
    assert "Shard(dim=1)" in errors[0]["wo_placements"], errors[0]
    assert "Shard(dim=2)" in errors[0]["logits_placements"], errors[0]  # vocabulary-parallel logits
    assert "Shard(dim=0)" in errors[0]["embedding_placements"], errors[0]
    assert_close(errors)


def test_tp2_tiled_shared_experts():
    """tp 2 with the looped block's shared experts run in 2 row chunks (each chunk through the TP styles)."""
    assert_close(run_distributed(check_tp, 2, "mla", {"tp": 2, "shared_expert_chunks": 2}))


def test_tp_sizes_must_divide_split_widths():
    cfg = tp_config("gqa", tp=4)
    cfg.model.dense_ffn_dim = 48
    with pytest.raises(ConfigError, match="model.n_kv_heads .2. must be divisible by parallel.tp .4."):
        validate(cfg, 4)
    cfg = tp_config("gqa", tp=3)
    with pytest.raises(ConfigError, match="model.n_heads .4. must be divisible by parallel.tp .3."):
        validate(cfg, 3)


@pytest.mark.parametrize("attn_type,ep", [("gqa", 1), ("mla", 2)])
def test_fsdp2_x_tp2_matches_one_process(attn_type, ep):
    """4 processes, dp_shard 2 x tp 2 (FSDP2 over 2D DTensors), without and with expert parallelism (ep 2)."""
    errors = run_distributed(check_tp, 4, attn_type, {"tp": 2, "ep": ep}, timeout=900)
    assert errors[0]["experts"] == ("ExpertParallel" if ep > 1 else "GroupedExperts"), errors[0]
    assert_close(errors)


class DTensorCollectiveCounter(CollectiveCounter):
    """CollectiveCounter that also sees DTensor's collectives: declining DTensor ops (as torch's CommDebugMode
    does) lets DTensor run and issue its functional collectives, which then pass through this mode."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        return super().__torch_dispatch__(func, types, args, kwargs)


DEPTHS = [(0, 2), (3, 2), (0, 3)]  # (gradient-free n, gradient k)


def count_by_depth(rank: int, world: int, overrides: dict) -> dict:
    """Collectives (by op) of one forward + backward at each depth in DEPTHS, for GQA and MLA."""
    counts = {}
    for attn_type in ("gqa", "mla"):
        cfg = tp_config(attn_type, **overrides)
        torch.manual_seed(0)
        model = MythosModel(cfg.model)
        dims = build_mesh(cfg.parallel, world, "cpu")
        wrap = parallelize(model, dims, cfg)
        tokens = global_batch(0, 1)
        for n, k in [DEPTHS[0], *DEPTHS]:  # the first run initialises FSDP's lazy state outside the count
            with DTensorCollectiveCounter() as counter, loss_context(dims):
                logits = model(tokens[:, :-1], n_nograd=n, n_grad=k, wrap_iteration=wrap)
                cross_entropy_sum(logits, tokens[:, 1:]).backward()
            counts[attn_type, n, k] = dict(counter.counts)
    return counts


def test_tp_collectives_per_loop_iteration():
    """fsdp 2 x tp 2, per-loop AC: each loop iteration adds a fixed number of TP collectives, FSDP's stay constant.

    Per iteration: gradient-free 2 all-reduces (attention's wo, the shared experts' w2); with gradients 2 forward
    + 2 recomputed + the input-gradient all-reduces (GQA 2: attention and shared-expert inputs; MLA 4: q_up_nope,
    q_up_rope, kv_up, shared experts) and, for MLA, 1 all-gather (the rope key's gradient over heads).
    """
    counts = run_distributed(count_by_depth, 4, {"tp": 2}, timeout=900)[0]
    per_grad_iteration = {"gqa": {"all_reduce": 6}, "mla": {"all_reduce": 8, "all_gather_into_tensor": 1}}
    for attn_type, grad_iteration in per_grad_iteration.items():
        base, deeper_nograd, deeper_grad = (counts[attn_type, n, k] for n, k in DEPTHS)
        tp_ops = {"all_reduce", "all_gather_into_tensor"}  # DTensor's functional collectives
        fsdp = {op: c for op, c in base.items() if op not in tp_ops}
        assert fsdp and all(op.endswith("_") for op in fsdp), base  # c10d ops: FSDP's gathers / reduce-scatters
        for deeper, n_more, per_iteration in ((deeper_nograd, 3, {"all_reduce": 2}), (deeper_grad, 1, grad_iteration)):
            assert {op: c for op, c in deeper.items() if op not in tp_ops} == fsdp, (attn_type, base, deeper)
            for op in tp_ops:
                assert deeper.get(op, 0) - base.get(op, 0) == n_more * per_iteration.get(op, 0), (attn_type, op, counts)
