"""parallel/ in one process: config errors before any collective, activation checkpointing, a world of one,
no host syncs in a training step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from distributed_testing import CollectiveCounter
from test_parallel_fsdp_ep import global_batch, lm_loss, tiny_config
from torch.distributed.tensor import DTensor

from mythos_train.config import ConfigError
from mythos_train.model import MythosModel
from parallel import build_mesh, clip_grad_norm_, parallelize
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.config import ParallelConfig


@pytest.mark.parametrize(
    "parallel, world, match",
    [
        (ParallelConfig(ep=3), 4, "ep"),
        (ParallelConfig(dp_replicate=3), 4, "world size"),
        (ParallelConfig(dp_replicate=2, dp_shard=3), 4, "world size"),
    ],
)
def test_bad_mesh_is_a_config_error_before_any_process_group(parallel, world, match):
    with pytest.raises(ConfigError, match=match):
        build_mesh(parallel, world, "cpu")
    assert not dist.is_initialized()


def test_build_mesh_starts_the_group_through_the_one_process_group_owner(monkeypatch):
    """build_mesh without a group goes through distributed.start_process_group (as the trainer's start does): a
    multi-process world without torchrun's MASTER_ADDR is refused there, with parallel.timeout_s applied otherwise."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="without MASTER_ADDR"):
        build_mesh(ParallelConfig(), 2, "cpu")
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append(kwargs))
    with pytest.raises(ValueError):  # no group was really started: the mesh cannot be built
        build_mesh(ParallelConfig(timeout_s=123.0), 1, "cpu")
    assert [(type(c["store"]).__name__, c["timeout"].total_seconds(), c["world_size"]) for c in calls] == [
        ("HashStore", 123.0, 1)
    ]


def grads_after_step(model, wrap, n=2, k=3):
    lm_loss(model, global_batch(0, 2), n, k, wrap).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("policy, shared_expert_chunks", [("loop", 1), ("full", 1), ("loop", 3), ("none", 3)])
def test_activation_checkpointing_gives_identical_grads_and_counts(policy, shared_expert_chunks):
    cfg = tiny_config()
    torch.manual_seed(0)
    plain = MythosModel(cfg.model)
    model = copy.deepcopy(plain)
    wrap = apply_activation_checkpointing(model, policy, shared_expert_chunks=shared_expert_chunks)
    expected = grads_after_step(plain, None)
    got = grads_after_step(model, wrap)
    # Bitwise, except that tiling sums a weight's gradient chunk by chunk (another order of fp32 additions).
    tol = {"rtol": 0, "atol": 0} if shared_expert_chunks == 1 else {"rtol": 1e-5, "atol": 1e-7}
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, **tol, msg=name)
    # Expert counts come out of the iteration, so the recompute in backward does not add to them.
    assert torch.equal(model.recurrent.last_stats.tokens_per_expert, plain.recurrent.last_stats.tokens_per_expert)


def test_no_checkpointing_policy():
    assert apply_activation_checkpointing(MythosModel(tiny_config().model), "none") is None
    with pytest.raises(ValueError, match="policy"):
        apply_activation_checkpointing(MythosModel(tiny_config().model), "sometimes")


def test_world_of_one_matches_plain_model():
    """The trainer's single-process path: build_mesh starts its own process group, FSDP over one rank is exact."""
    cfg = tiny_config(activation_checkpoint="full")
    torch.manual_seed(0)
    plain = MythosModel(cfg.model)
    model = copy.deepcopy(plain)
    try:
        dims = build_mesh(cfg.parallel, 1, "cpu")
        wrap = parallelize(model, dims, cfg)
        assert isinstance(model.tok_embeddings.weight, DTensor) and dims.dp_size == 1 and dims.ep_mesh is None
        expected = grads_after_step(plain, None)
        got = grads_after_step(model, wrap)
        for name, g in expected.items():
            torch.testing.assert_close(got[name].full_tensor(), g, rtol=1e-6, atol=1e-7, msg=name)
        norm = clip_grad_norm_(model.parameters(), 0.1, dims)
        ref_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
        torch.testing.assert_close(norm, ref_norm)
        for p, rp in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), rp.grad, rtol=1e-5, atol=1e-8)
    finally:
        dist.destroy_process_group()


def test_training_step_never_waits_for_the_device():
    """Forward + backward of the parallelized model (FSDP, per-loop checkpointing, several depths) issues no op that
    makes the host wait for the device (.item(), bool(t), masks, data-dependent shapes), so a GPU never idles
    inside the loop. Without expert parallelism there is nothing to wait for; with it only the split sizes (whose
    `.tolist()` a CPU run cannot see: tests/distributed_testing.py)."""
    cfg = tiny_config(activation_checkpoint="loop")
    torch.manual_seed(0)
    model = MythosModel(cfg.model)
    try:
        wrap = parallelize(model, build_mesh(cfg.parallel, 1, "cpu"), cfg)
        lm_loss(model, global_batch(0, 2), 1, 2, wrap).backward()  # lazy init outside the count
        with CollectiveCounter() as counter:
            for n, k in [(0, 1), (3, 2), (6, 2)]:
                lm_loss(model, global_batch(n, 2), n, k, wrap).backward()
        assert not counter.host_syncs, counter.host_syncs
        with CollectiveCounter() as control:  # the counter does see syncs
            loss = lm_loss(model, global_batch(0, 2), 1, 1, wrap)
            loss.item(), loss.view(1)[loss.view(1) > 0]
        assert control.host_syncs == {"_local_scalar_dense": 1, "index": 1}, control.host_syncs
    finally:
        dist.destroy_process_group()


def test_bf16_blocks_rotate_with_fp32_rope_tables(monkeypatch):
    """FSDP2 casts floating-point forward inputs to param_dtype unless told not to: the RoPE tables passed to every
    block must reach the rotation in fp32 while the activations run in bf16."""
    import mythos_train.model.attention as attention

    seen, rotate = set(), attention.apply_rope

    def spy(x, cos, sin):
        seen.add((x.dtype, cos.dtype, sin.dtype))
        return rotate(x, cos, sin)

    monkeypatch.setattr(attention, "apply_rope", spy)
    cfg = tiny_config(param_dtype="bfloat16")
    model = MythosModel(cfg.model)
    try:
        wrap = parallelize(model, build_mesh(cfg.parallel, 1, "cpu"), cfg)
        lm_loss(model, global_batch(0, 2), 1, 1, wrap)
    finally:
        dist.destroy_process_group()
    assert seen == {(torch.bfloat16, torch.float32, torch.float32)}, seen


def test_clip_grad_norm_plain_tensors_matches_torch():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, twin in zip(params, twins):
        p.grad = torch.randn_like(p)
        twin.grad = p.grad.clone()
    expected_inf = torch.nn.utils.get_total_norm([t.grad for t in twins], float("inf"))
    torch.testing.assert_close(clip_grad_norm_(params, 0.0, norm_type=float("inf")), expected_inf)
    torch.testing.assert_close(clip_grad_norm_(params, 1.0), torch.nn.utils.clip_grad_norm_(twins, 1.0))
    for p, twin in zip(params, twins):
        torch.testing.assert_close(p.grad, twin.grad)
