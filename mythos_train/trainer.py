"""The training loop: config -> process group -> mesh -> sharded model -> AdamW -> data -> resume -> steps.

One optimizer step (mythos_train/train_step.py) = one sampled loop depth (n gradient-free + k gradient
iterations, the same on every rank) and `grad_accum_steps` micro-batches. A step whose loss or gradient norm is
not finite is skipped whole (no optimizer, scheduler or router-bias update), and counted here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

import parallel
from data_pipeline import build_loader, tokenizer_path, tokenizer_vocab_size
from mythos_train.checkpoint import CheckpointManager
from mythos_train.config import ConfigError, JobConfig, to_dict
from mythos_train.depth import DepthSampler
from mythos_train.distributed import DistInfo, all_reduce_sum, fault_point
from mythos_train.evaluate import Evaluator
from mythos_train.loss import batch_keys
from mythos_train.metrics import MetricsLogger, console_line, loop_scalars, memory_gib, peak_flops
from mythos_train.model import MythosModel
from mythos_train.model.flops import training_flops_per_token
from mythos_train.preflight import check_paths, checkpoint_folder
from mythos_train.profiling import profiling
from mythos_train.run_lock import RunDirInUse, RunDirLock
from mythos_train.seeded_init import init_weights_seeded
from mythos_train.stop_signals import StopSignals
from mythos_train.train_step import StepResult, build_train_step

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def build_model(cfg: JobConfig, dims: parallel.ParallelDims, device: torch.device) -> tuple[MythosModel, object]:
    """Meta-device model -> parallelize -> materialise on `device` -> seeded init (same values as one process).

    Returns the model and the per-iteration activation-checkpoint wrapper for its forward.
    """
    with torch.device("meta"):
        model = MythosModel(cfg.model)
    wrap_iteration = parallel.parallelize(model, dims, cfg)
    model.to_empty(device=device)
    init_weights_seeded(model, cfg.train.seed)
    return model, wrap_iteration


def check_vocab(cfg: JobConfig) -> None:
    """The tokenizer and the embedding must agree, or token ids index out of range deep inside a kernel."""
    if cfg.data.source_kind == "tokens" and not os.path.isfile(tokenizer_path(cfg.data)):
        vocab, source = cfg.data.vocab_size, "data.vocab_size of the token shards"
    else:
        vocab, source = tokenizer_vocab_size(cfg.data), f"tokenizer {tokenizer_path(cfg.data)}"
    if vocab != cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) != the tokenizer's vocabulary ({vocab}, {source}): "
            f"set model.vocab_size = {vocab}, or prepare the data again with data.vocab_size = {cfg.model.vocab_size}"
        )


def spectral_radius(model: MythosModel) -> float:
    """rho(A) of the loop injection; a collective when its parameters are sharded (call on every rank)."""
    with torch.no_grad():
        radius = model.recurrent.injection.spectral_radius()
        if isinstance(radius, DTensor):
            radius = radius.full_tensor()
    return float(radius)


class Trainer:
    """Owns model, optimizer, schedule, data, checkpoints and metrics of one run; the process group must exist."""

    def __init__(self, cfg: JobConfig, dist_info: DistInfo) -> None:
        check_paths(cfg)
        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.train.run_dir)
        self.dims = parallel.build_mesh(cfg.parallel, dist_info.world_size, self.device.type)
        self.model, wrap_iteration = build_model(cfg, self.dims, self.device)
        self.step_fn = build_train_step(cfg, self.dims, self.device, self.model, wrap_iteration)
        self.optimizer, self.lr_scheduler = self.step_fn.optimizer, self.step_fn.lr_scheduler
        self.depth = DepthSampler(cfg.train)
        t = cfg.train
        self.data_loader = build_loader(
            cfg.data,
            split="train",
            seq_len=t.seq_len,
            micro_batch_size=t.micro_batch_size,
            grad_accum_steps=t.grad_accum_steps,
            dp_rank=self.dims.dp_rank,
            dp_world_size=self.dims.dp_size,
        )
        self.data_iter = None
        self.tokens_per_step = t.seq_len * t.micro_batch_size * t.grad_accum_steps * self.dims.dp_size
        self.checkpoint = CheckpointManager(
            cfg.checkpoint,
            checkpoint_folder(cfg),
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            data_loader=self.data_loader,
            model_config=cfg.model,
        )
        self.metrics = MetricsLogger(cfg.metrics, self.run_dir, enabled=dist_info.is_main)
        self.evaluator = Evaluator(cfg, self.model, self.dims, self.device, self.metrics, self.run_dir)
        self.evaluator.validation_batches()  # read now: an empty validation split must not end the run at its last step
        self.peak_flops = peak_flops(self.device, cfg.metrics)
        self.step = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.loss_range: tuple[float, float] | None = None  # (first, last) finite loss of this process's steps
        self.last_eval: dict[int, float] = {}
        self.stopped_by: str | None = None  # the signal that stopped the run early (after a checkpoint)
        self.run_lock = RunDirLock(self.run_dir)
        self._interval = {"steps": 0, "time": 0.0, "flops": 0.0, "loss_tokens": 0.0}
        self._data_wait_ms = 0.0
        n_params = sum(p.numel() for p in self.model.parameters())  # DTensor numel is the global one
        peak = f"{self.peak_flops / 1e12:.1f} TFLOP/s peak" if self.peak_flops else "peak unknown (no MFU)"
        self.metrics.console(
            f"model {n_params / 1e6:.2f}M params | {dist_info.world_size} ranks on {self.device.type} (dp_replicate "
            f"{self.dims.dp_replicate} x dp_shard {self.dims.dp_shard}, ep {self.dims.ep}, tp {self.dims.tp}) | "
            f"{self.tokens_per_step:,} tokens/step | {peak}"
        )

    # ----------------------------------------------------------------- state

    def train_state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.step * self.tokens_per_step,
            "skipped_in_a_row": self.skipped_in_a_row,
            "skipped_total": self.skipped_total,
            "model_config": to_dict(self.cfg)["model"],
        }

    def resume(self) -> None:
        state = self.checkpoint.load()
        if state is None:
            self.checkpoint.init_from()
        else:
            self.step = state["step"]
            self.skipped_in_a_row = state["skipped_in_a_row"]
            self.skipped_total = state["skipped_total"]

    # ----------------------------------------------------------------- one step

    def next_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        if self.data_iter is None:
            self.data_iter = iter(self.data_loader)
        batches = []
        for _ in range(self.cfg.train.grad_accum_steps):
            batch = next(self.data_iter)
            keys = batch_keys(self.cfg.train.document_masking)
            batches.append({k: batch[k].to(self.device, non_blocking=True) for k in keys if k in batch})
        return batches

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step at this step's sampled depth; a skipped one is counted (and raises after too many)."""
        result = self.step_fn(micro_batches, *self.depth.sample(self.step))
        if result.skipped:
            self._skip(result.loss, result.grad_norm)  # raises after max_skipped_steps in a row
        else:
            self.skipped_in_a_row = 0
        return result

    def _phase_times(self) -> dict[str, float]:
        """Milliseconds of the last step's forward+backward and optimizer phases, plus its data wait."""
        t0, t1, t2 = self.step_fn.marks
        if self.device.type == "cuda":
            t2.synchronize()
            fb, opt = t0.elapsed_time(t1), t1.elapsed_time(t2)
        else:
            fb, opt = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        return {"time/data_wait_ms": self._data_wait_ms, "time/forward_backward_ms": fb, "time/optimizer_ms": opt}

    def _skip(self, loss: float, grad_norm: float) -> None:
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        limit = self.cfg.train.max_skipped_steps
        logger.warning(
            "step %d skipped: loss %s, grad norm %s (%d in a row)",
            self.step + 1,
            loss,
            grad_norm,
            self.skipped_in_a_row,
        )
        if self.skipped_in_a_row >= limit:
            raise NonFiniteError(
                f"step {self.step + 1}: loss or gradient norm non-finite in {self.skipped_in_a_row} consecutive steps "
                f"(train.max_skipped_steps = {limit}); last loss {loss}, grad norm {grad_norm}. Lower optim.lr, "
                f"check the data, or resume from an earlier checkpoint."
            )

    # ----------------------------------------------------------------- loop

    def train(self) -> None:
        """Train to train.steps, or until a stop signal (after a checkpoint)."""
        cfg = self.cfg
        self.lock_run_dir()
        if self.dist.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        self.resume()
        self.model.train()
        with (
            profiling(cfg.profile, self.run_dir, self.dist.rank, self.device) as profiler,
            StopSignals(cfg.train.stop_signals) as stop_signals,
        ):
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                micro_batches = self.next_micro_batches()
                self._data_wait_ms = (time.perf_counter() - t0) * 1e3
                result = self.train_step(micro_batches)
                self.step += 1
                if not result.skipped:
                    self.loss_range = (self.loss_range[0] if self.loss_range else result.loss, result.loss)
                fault_point("step", self.step)  # test-only: MYTHOS_FAULT_KILL_AT_STEP
                self._account(result, time.perf_counter() - t0)
                profiler.step()
                last = self.step == cfg.train.steps
                stopping = stop_signals.agreed(self.device) and not last  # the same answer on every rank
                if self.step % cfg.train.log_every == 0 or self.step == 1 or last:
                    self.log(result)
                saved = self.checkpoint.save(self.step, self.train_state(), last=last or stopping)  # before eval
                self.checkpoint.poll()
                if not stopping and (last or (cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0)):
                    self.last_eval = self.evaluator.run(self.step)
                    stopping = stop_signals.agreed(self.device) and not last  # a signal during the eval
                    if stopping and not saved:
                        self.checkpoint.save(self.step, self.train_state(), last=True)
                if stopping:
                    received = stop_signals.received
                    self.stopped_by = received.name if received else "a stop signal on another rank"
                    break

    def lock_run_dir(self) -> None:
        """Rank 0 takes the run_dir's lock before anything is written there; every rank stops if it cannot."""
        refused = None
        if self.dist.is_main:
            try:
                self.run_lock.acquire()
            except RunDirInUse as err:
                refused = err
        if all_reduce_sum(torch.tensor([float(refused is not None)], device=self.device)).item():
            raise refused or RunDirInUse(f"{self.run_dir} is in use by another run (rank 0 says which)")

    def _account(self, result: StepResult, seconds: float) -> None:
        tokens_per_device = self.tokens_per_step // self.dims.dp_size
        flops = training_flops_per_token(self.cfg.model, self.cfg.train.seq_len, result.n_nograd, result.n_grad)
        self._interval["steps"] += 1
        self._interval["time"] += seconds
        self._interval["flops"] += flops * tokens_per_device  # masked tokens cost the same FLOPs
        self._interval["loss_tokens"] += result.loss_tokens

    def log(self, result: StepResult) -> None:
        """Scalars of this step plus throughput over the steps since the last log (collective: every rank calls it)."""
        interval = self._interval
        seconds = max(interval["time"], 1e-9)
        m = {
            "loss/train": result.loss,
            "optim/lr": result.lr,
            "optim/grad_norm": result.grad_norm,
            "train/tokens_seen": self.step * self.tokens_per_step,
            "train/skipped_steps_total": self.skipped_total,
            "throughput/tokens_per_s": interval["steps"] * self.tokens_per_step / seconds,
            "throughput/tokens_per_s_per_device": interval["steps"]
            * self.tokens_per_step
            / self.dims.dp_size
            / seconds,
            "throughput/tflops_per_device": interval["flops"] / seconds / 1e12,
            "throughput/loss_tokens_per_s": interval["loss_tokens"] / seconds,
            "depth/n_nograd": result.n_nograd,
            "depth/n_grad": result.n_grad,
            "time/step_ms": seconds / interval["steps"] * 1e3,
            **self._phase_times(),
            **memory_gib(self.device),
        }
        if self.peak_flops:
            m["throughput/mfu"] = interval["flops"] / seconds / self.peak_flops
        m.update(self.data_stats())
        if self.cfg.metrics.loop_telemetry:
            m.update(self.loop_telemetry())
        self._interval = {"steps": 0, "time": 0.0, "flops": 0.0, "loss_tokens": 0.0}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.metrics.scalars(self.step, m)
        self.metrics.console(console_line(self.step, self.cfg.train.steps, m))

    def data_stats(self) -> dict[str, float]:
        """Loader epoch/position (the same on every rank) and skipped records/files (summed over ranks)."""
        stats = {k: float(v) for k, v in self.data_loader.stats().items() if isinstance(v, (int, float))}
        skipped = [k for k in sorted(stats) if k.startswith("skipped")]
        if skipped:
            totals = all_reduce_sum(torch.tensor([stats[k] for k in skipped], dtype=torch.float64, device=self.device))
            stats.update(zip(skipped, totals.tolist()))
        return {f"data/{k}": v for k, v in stats.items()}

    def loop_telemetry(self) -> dict[str, float]:
        """Loop statistics of the last micro-batch (under TP: of its whole sequence); expert loads summed over all ranks."""
        stats = self.model.recurrent.last_stats
        load = all_reduce_sum(stats.tokens_per_expert.clone())
        n = len(stats.h_norm)
        means, depth_max = parallel.whole_sequence_stats(
            torch.cat([stats.h_norm, stats.h_delta, stats.halting_depth_mean.reshape(1)]),
            stats.halting_depth_max,
            self.dims,
        )
        scalars = loop_scalars(
            means[:n].cpu(), load.cpu(), float(means[-1]), float(depth_max), spectral_radius(self.model)
        )
        scalars.update({f"loop/h_delta/iter_{t:02d}": v for t, v in enumerate(means[n:-1].tolist())})
        return scalars

    def summary(self) -> str:
        """Where the results are and how far the loss fell in this process's steps (printed at the end of train)."""
        first, last = self.loss_range or (math.nan, math.nan)
        eval_losses = self.last_eval
        lines = [
            f"done: {self.step} steps; train loss {first:.4f} -> {last:.4f} ({(last - first) / first:+.1%})",
            f"  TensorBoard   tensorboard --logdir {self.run_dir / 'tb'}",
            f"  loss vs loops {self.evaluator.folder / 'loss_vs_loops.png'}",
            f"  checkpoints   {self.checkpoint.folder}",
        ]
        if eval_losses:
            lines.insert(1, "  val loss by loops: " + ", ".join(f"{n}: {v:.4f}" for n, v in eval_losses.items()))
        return "\n".join(lines)

    def close(self) -> None:
        self.checkpoint.close()
        self.metrics.close()
        self.data_loader.close()
        self.run_lock.release()
