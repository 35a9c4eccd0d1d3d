"""DepthSampler: a pure function of (seed, step) with the documented distributions; truncated backprop."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mythos_train.config import TrainConfig
from mythos_train.depth import DepthSampler

DRAWS = 4000


def sampler(**fields) -> DepthSampler:
    return DepthSampler(TrainConfig(**fields))


def totals(s: DepthSampler) -> np.ndarray:
    return np.array([sum(s.sample(step)) for step in range(DRAWS)])


def test_pure_function_of_seed_and_step():
    a, b = sampler(seed=3), sampler(seed=3)
    forward = [a.sample(step) for step in range(200)]
    backward = [b.sample(step) for step in reversed(range(200))][::-1]  # another instance, another order (resume)
    assert forward == backward
    assert len(set(forward)) > 3  # it does vary with the step
    assert forward != [sampler(seed=4).sample(step) for step in range(200)]


@pytest.mark.parametrize("distribution", ["fixed", "uniform", "poisson-lognormal", "poisson"])
def test_split_into_nograd_and_grad(distribution):
    s = sampler(depth_distribution=distribution, mean_depth=4.0, min_depth=2, max_depth=9, backprop_depth=3)
    for step in range(300):
        n, k = s.sample(step)
        total = n + k
        assert 2 <= total <= 9 and k == min(total, 3) and n == total - k


def test_fixed_and_uniform():
    assert set(totals(sampler(depth_distribution="fixed", mean_depth=5.0))) == {5}
    t = totals(sampler(depth_distribution="uniform", min_depth=2, max_depth=10))
    assert set(t) == set(range(2, 11))  # every value, nothing outside
    assert abs(t.mean() - 6.0) < 4 * math.sqrt((9**2 - 1) / 12 / DRAWS)


def test_poisson_parcae():
    m = 6.0  # total = Poisson(m - 1) + 1: mean m, variance m - 1 (max_depth far in the tail)
    t = totals(sampler(depth_distribution="poisson", mean_depth=m, max_depth=64))
    assert abs(t.mean() - m) < 4 * math.sqrt((m - 1) / DRAWS)
    assert abs(t.var() - (m - 1)) < 0.15 * (m - 1)
    assert t.min() >= 1


def test_poisson_lognormal_huginn():
    m, sigma = 6.0, 0.5  # rate ~ LogNormal with E[rate] = m - 1; total = Poisson(rate) + 1, so E[total] = m
    t = totals(sampler(depth_distribution="poisson-lognormal", mean_depth=m, max_depth=256))
    r = m - 1
    var = r + r**2 * (math.exp(sigma**2) - 1)  # law of total variance: E[rate] + Var[rate]
    assert abs(t.mean() - m) < 4 * math.sqrt(var / DRAWS)
    assert abs(t.var() - var) < 0.2 * var


def test_clamped_to_min_and_max():
    t = totals(sampler(depth_distribution="poisson-lognormal", mean_depth=4.0, min_depth=3, max_depth=5))
    assert set(t) == {3, 4, 5}


def test_truncated_backprop_gives_grads_to_all_that_learn():
    """(n, k) = (2, 2): every parameter gets a nonzero gradient, except the depth-LoRA scales of the gradient-free
    iterations (rows 0, 1) and of iterations never run (rows >= 4), which get exactly zero."""
    from test_parallel_fsdp_ep import global_batch, lm_loss, tiny_config

    from mythos_train.model import MythosModel

    cfg = tiny_config()
    torch.manual_seed(0)
    model = MythosModel(cfg.model)
    n, k = 2, 2
    lm_loss(model, global_batch(0, 4), n, k).backward()
    for name, p in model.named_parameters():
        if name == "recurrent.lora.scale.weight":
            learns = torch.zeros(p.shape[0], dtype=torch.bool)
            learns[n : n + k] = True
            assert (p.grad[learns].abs().sum(1) > 0).all() and (p.grad[~learns] == 0).all(), p.grad
        elif name.startswith("recurrent.block.moe.experts."):
            routed = model.recurrent.last_stats.tokens_per_expert[n:].sum(0) > 0  # experts that saw gradient tokens
            assert (p.grad.flatten(1).abs().sum(1) > 0).eq(routed).all(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    # The gradient-free iterations are exactly that: the same as running them first under no_grad by hand.
    torch.manual_seed(0)
    ref = MythosModel(cfg.model)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    with torch.no_grad():
        full_logits = ref(global_batch(0, 4)[:, :-1], n_nograd=0, n_grad=n + k)
    logits = copy.deepcopy(model)(global_batch(0, 4)[:, :-1], n_nograd=n, n_grad=k)
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=0)


def test_depth_warmup_runs_one_iteration_then_the_distribution_unchanged():
    plain, warm = sampler(seed=5, min_depth=2), sampler(seed=5, min_depth=2, depth_warmup_steps=30)
    assert [warm.sample(step) for step in range(30)] == [(0, 1)] * 30  # below min_depth: the warm-up wins
    assert [warm.sample(step) for step in range(30, 300)] == [plain.sample(step) for step in range(30, 300)]
