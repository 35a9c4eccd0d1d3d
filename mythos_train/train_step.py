"""One optimizer step, the one place it is written: the trainer runs it, and so does every benchmark.

A step runs one loop depth (n gradient-free + k gradient iterations) over its micro-batches. The loss is the summed
cross-entropy divided by the step's *global* token count, so every token weighs the same whatever the rank,
micro-batch or masking; FSDP averages gradients over the data-parallel ranks, hence the factor dp_size. Then global
gradient clipping, one host read of loss and norm, and the optimizer step (the router-bias update runs in its
pre-step hook) with the learning-rate schedule, or, when loss or norm is not finite, a skip: no update at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.profiler import record_function

import parallel
from mythos_train.config import JobConfig
from mythos_train.distributed import all_reduce_sum
from mythos_train.loss import cross_entropy_sum, loss_labels, token_count
from mythos_train.optim import build_lr_scheduler, build_optimizer
from mythos_train.router_bias import RouterBiasBalancer

Forward = Callable[[dict[str, torch.Tensor], int, int], torch.Tensor]
"forward(micro_batch, n_nograd, n_grad) -> logits [B, S, vocab]."


@dataclass
class StepResult:
    """Host values of one optimizer step (read with a single device sync)."""

    loss: float
    grad_norm: float
    lr: float
    "Learning rate this step used."
    skipped: bool
    n_nograd: int
    n_grad: int
    loss_tokens: float
    "Labels that counted in the loss over all ranks (fewer than the tokens processed under a loss mask)."


def model_forward(model: nn.Module, wrap_iteration=None) -> Forward:
    """Our model's forward at a step's depth, with the activation-checkpoint wrapper and document masking."""

    def forward(batch: dict[str, torch.Tensor], n_nograd: int, n_grad: int) -> torch.Tensor:
        return model(
            batch["input_ids"],
            n_nograd=n_nograd,
            n_grad=n_grad,
            wrap_iteration=wrap_iteration,
            doc_starts=batch.get("doc_starts"),
        )

    return forward


def time_mark(device: torch.device) -> float | torch.cuda.Event:
    """A time mark: a recorded CUDA event (read at log time, so no sync per step) or perf_counter on CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


@dataclass
class TrainStep:
    """`step(micro_batches, n_nograd, n_grad) -> StepResult`; each micro-batch has input_ids and labels [B, S]
    (optional loss_mask, doc_starts). `forward` may be another model's (the open-mythos reference in `bench`);
    the router-bias balancer needs ours."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward: Forward
    max_grad_norm: float
    dims: parallel.ParallelDims | None = None
    "Data-parallel size and the clipping group; None: one process."
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    balancer: RouterBiasBalancer | None = None
    marks: tuple = ()
    "Time marks of the last step: start of forward, end of backward, end of the optimizer (see time_mark)."

    def _data_group(self):
        """The data-parallel ranks: tp ranks see the same tokens, so tokens and losses are counted once per tp group."""
        return self.dims.dp_mesh.get_group() if self.dims is not None else None

    def forward_backward(
        self, micro_batches: list[dict[str, torch.Tensor]], n_nograd: int, n_grad: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the step's loss, without a host sync; returns (this rank's summed CE [], global tokens [])."""
        # Global token count first (one all-reduce, no host sync): each micro-batch's loss is its share of the
        # step's mean.
        local_tokens = sum(token_count(loss_labels(mb)) for mb in micro_batches).float()
        global_tokens = all_reduce_sum(local_tokens.reshape(1), self._data_group())[0]
        dp_size = self.dims.dp_size if self.dims is not None else 1
        scale = dp_size / global_tokens.clamp(min=1)  # a step whose every label is masked: loss 0
        loss_sum = torch.zeros((), device=local_tokens.device)
        start = time_mark(local_tokens.device)
        for mb in micro_batches:
            # No name holds the logits [B, S, vocab]: the loss keeps what its backward needs, nothing more.
            with parallel.loss_context(self.dims):  # vocabulary-parallel cross-entropy under TP, else nothing
                ce = cross_entropy_sum(self.forward(mb, n_nograd, n_grad), loss_labels(mb))
                with record_function("mythos:backward"):  # named ranges: what `python -m mythos_train profile` reads
                    (ce * scale).backward()
            loss_sum += ce.detach()
            if self.balancer is not None:
                self.balancer.accumulate()
        self.marks = (start, time_mark(local_tokens.device))
        return loss_sum, global_tokens

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]], n_nograd: int, n_grad: int) -> StepResult:
        """Forward/backward over the micro-batches at this depth, clip, and update (or skip)."""
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum, global_tokens = self.forward_backward(micro_batches, n_nograd, n_grad)
        parallel.reduce_sequence_parallel_grads(self.model, self.dims)  # under TP: the loop's, summed over tp
        with record_function("mythos:clip_grad"):
            grad_norm = parallel.clip_grad_norm_(self.model.parameters(), self.max_grad_norm, self.dims)
        loss = all_reduce_sum(loss_sum.reshape(1), self._data_group())[0] / global_tokens.clamp(min=1)
        # the step's one host sync
        loss_value, norm_value, loss_tokens = torch.stack([loss, grad_norm.to(loss), global_tokens.to(loss)]).tolist()
        skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        with record_function("mythos:optimizer"):
            if not skipped:
                self.optimizer.step()  # the router-bias update runs in its pre-step hook
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
            elif self.balancer is not None:
                self.balancer.reset()  # this step's expert loads must not move the next step's bias
            self.optimizer.zero_grad(set_to_none=True)
        self.marks += (time_mark(loss.device),)
        return StepResult(loss_value, norm_value, lr, skipped, n_nograd, n_grad, loss_tokens)


def build_train_step(
    cfg: JobConfig, dims: parallel.ParallelDims, device: torch.device, model: nn.Module, wrap_iteration=None
) -> TrainStep:
    """The trainer's step for a built model (`build_model`): AdamW groups, learning-rate schedule, router-bias balancer."""
    optimizer = build_optimizer(model, cfg.optim, device.type)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.steps)
    balancer = RouterBiasBalancer(model, dims, cfg.train.router_bias_rate)
    balancer.attach(optimizer)
    return TrainStep(
        model=model,
        optimizer=optimizer,
        forward=model_forward(model, wrap_iteration),
        max_grad_norm=cfg.train.max_grad_norm,
        dims=dims,
        lr_scheduler=lr_scheduler,
        balancer=balancer,
    )
