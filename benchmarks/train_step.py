"""The trainer's optimizer step on synthetic tokens, for benchmarks that must not depend on prepared data.

Same pieces as `Trainer.train_step`: `build_model` (meta -> parallelize -> materialise -> init), AdamW from
`build_optimizer`, the router-bias balancer, summed cross-entropy scaled by the global token count, global
gradient clipping, `DepthSampler` depths. Only the batches are random token ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import parallel
from mythos_train.config import JobConfig
from mythos_train.depth import DepthSampler
from mythos_train.loss import cross_entropy_sum
from mythos_train.optim import build_optimizer
from mythos_train.trainer import build_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_train_step(cfg: JobConfig, world_size: int, device: torch.device, seed: int = 0) -> Callable[[int], tuple[float, int, int]]:
    """Returns step(i) -> (seconds, n_nograd, n_grad): one full optimizer step at the sampler's depth for step i."""
    dims = parallel.build_mesh(cfg.parallel, world_size, device.type)
    model, wrap = build_model(cfg, dims, device)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    balancer = parallel.RouterBiasBalancer(model, dims, cfg.train.router_bias_rate)
    balancer.attach(optimizer)
    sampler = DepthSampler(cfg.train)
    t = cfg.train
    g = torch.Generator().manual_seed(seed * 1000 + dims.dp_rank)
    batches = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=g).to(device) for _ in range(t.grad_accum_steps)]
    scale = 1.0 / (t.micro_batch_size * t.seq_len * t.grad_accum_steps)  # every rank's tokens count alike

    def step(i: int) -> tuple[float, int, int]:
        n_nograd, n_grad = sampler.sample(i)
        synchronize(device)
        start = time.perf_counter()
        for tokens in batches:
            logits = model(tokens[:, :-1], n_nograd=n_nograd, n_grad=n_grad, wrap_iteration=wrap)
            (cross_entropy_sum(logits, tokens[:, 1:]) * scale).backward()
            balancer.accumulate(model.recurrent.last_stats)
        parallel.clip_grad_norm_(model.parameters(), t.max_grad_norm, dims)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start, n_nograd, n_grad

    return step
