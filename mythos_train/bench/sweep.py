"""`bench --sweep`: the trainer's real optimizer step over activation-checkpoint policy x micro-batch x loop depth.

Each (policy, micro-batch) builds the model and its step once, exactly like `Trainer` does (meta -> parallelize ->
materialise -> init, then mythos_train/train_step.py: AdamW, schedule, router-bias balancer, global clipping), on
random token ids; each total depth n + k of it then gets one warm-up step and `--steps` timed ones (median). MFU counts the loop-aware FLOPs of the depth that ran.

Peak memory: on CUDA the allocator's own peak. On CPU there is none, so it is the bytes held between steps
(parameters, buffers, optimizer state, batches) plus the peak of one extra, profiled step's allocation events.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

import parallel
from mythos_train.config import ConfigError, JobConfig, load_config, validate
from mythos_train.depth import DepthSampler
from mythos_train.distributed import destroy_distributed, env_world_size, init_distributed
from mythos_train.metrics import peak_flops
from mythos_train.model.flops import training_flops_per_token
from mythos_train.train_step import build_train_step
from mythos_train.trainer import build_model

GIB = 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocation_curve(prof) -> tuple[int, int]:
    """(peak, final) bytes allocated minus freed since the profiler started (CPU allocator events in time order).

    On CPU every allocation and free goes through c10's allocator, which the profiler reports with sizes
    (`profile_memory=True`), so the running sum is exact; RSS lags (glibc keeps freed arenas).
    """
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e[0])
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak, current


def tensor_bytes(tensors) -> tuple[int, int]:
    """(sum of local numel x element size, bytes of the distinct storages behind them)."""
    logical, storages = 0, {}
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        logical += t.numel() * t.element_size()
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return logical, sum(storages.values())


class TimedStep:
    """`step(i, depth=None) -> (seconds, n_nograd, n_grad)`: the trainer's optimizer step (train_step.py) on fixed
    random tokens, at the sampler's depth for step i or at a pinned depth = (n_nograd, n_grad)."""

    def __init__(self, cfg: JobConfig, world_size: int, device: torch.device, seed: int = 0):
        dims = parallel.build_mesh(cfg.parallel, world_size, device.type)
        self.step = build_train_step(cfg, dims, device, *build_model(cfg, dims, device))
        self.model, self.sampler, self.device = self.step.model, DepthSampler(cfg.train), device
        t = cfg.train
        g = torch.Generator().manual_seed(seed * 1000 + dims.dp_rank)
        tokens = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=g).to(device) for _ in range(t.grad_accum_steps)]  # fmt: skip
        self.batches = [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in tokens]  # [B, S] views of [B, S + 1]

    def __call__(self, i: int, depth: tuple[int, int] | None = None) -> tuple[float, int, int]:
        n_nograd, n_grad = depth or self.sampler.sample(i)
        synchronize(self.device)
        start = time.perf_counter()
        self.step(self.batches, n_nograd, n_grad)
        synchronize(self.device)
        return time.perf_counter() - start, n_nograd, n_grad

    def held_bytes(self) -> int:
        """Bytes this step keeps between steps (gradients are freed by zero_grad(set_to_none=True))."""
        optimizer = self.step.optimizer
        states = (t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
        tensors = [*self.model.parameters(), *self.model.buffers(), *states, *(b["input_ids"] for b in self.batches)]
        return tensor_bytes(tensors)[1]


def peak_memory(step: TimedStep, depth: tuple[int, int]) -> int:
    """Peak bytes allocated during one more step at `depth` (see the module docstring for CPU)."""
    if step.device.type == "cuda":
        return torch.cuda.max_memory_allocated(step.device)  # reset before the timed steps
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(0, depth)
    return step.held_bytes() + allocation_curve(prof)[0]


def sweep_config(base: JobConfig, policy: str, micro_batch: int) -> JobConfig:
    cfg = copy.deepcopy(base)
    cfg.parallel.activation_checkpoint = policy
    cfg.train.micro_batch_size = micro_batch
    return cfg


def run_sweep(
    base: JobConfig, policies: list[str], batches: list[int], depths: list[int], backprop: int, steps: int
) -> list[dict]:
    """One row per (policy, micro-batch, total depth); prints the table on rank 0 as rows arrive."""
    created = not dist.is_initialized()
    info = init_distributed(base)
    try:
        peak = peak_flops(info.device, base.metrics)
        seq = base.train.seq_len
        if info.is_main:
            name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
            print(f"device {name} x {info.world_size}; peak {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s per device; "
                  f"seq {seq}, grad_accum {base.train.grad_accum_steps}; 1 warm-up + median of {steps} steps")  # fmt: skip
            print(
                f"{'ac':<5} {'batch':>5} {'n+k':>7} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}",
                flush=True,
            )
        rows = []
        for policy in policies:
            for micro_batch in batches:
                cfg = sweep_config(base, policy, micro_batch)
                step = TimedStep(cfg, info.world_size, info.device)
                tokens = micro_batch * seq * cfg.train.grad_accum_steps  # per rank, per step
                for total in depths:
                    depth = (total - min(backprop, total), min(backprop, total))
                    step(0, depth)
                    if info.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(info.device)
                    seconds = statistics.median(step(0, depth)[0] for _ in range(steps))
                    memory = peak_memory(step, depth)
                    flops_per_token = training_flops_per_token(cfg.model, seq, *depth)
                    flops_per_s = flops_per_token * tokens / seconds  # per device
                    row = {"ac": policy, "batch": micro_batch, "n_nograd": depth[0], "n_grad": depth[1],
                           "tokens_per_s": tokens * info.world_size / seconds, "tflops": flops_per_s / 1e12,
                           "mfu": flops_per_s / peak if peak else float("nan"), "flops_per_token": flops_per_token,
                           "peak_bytes": memory, "step_s": seconds}  # fmt: skip
                    rows.append(row)
                    if info.is_main:
                        print(f"{policy:<5} {micro_batch:>5} {depth[0]:>3}+{depth[1]:<3} {row['tokens_per_s']:>10,.0f} {row['tflops']:>8.3f} "
                              f"{row['mfu']:>6.1%} {memory / GIB:>9.3f}", flush=True)  # fmt: skip
                del step
        return rows
    finally:
        if created:
            destroy_distributed()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="mythos-train bench --sweep", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--config", help="TOML job config; --section.field=value overrides follow it")
    parser.add_argument("--depths", default="2,8,32", help="total loop depths n + k")
    parser.add_argument(
        "--backprop", type=int, default=None, help="k, loop iterations with gradients (default train.backprop_depth)"
    )
    parser.add_argument("--batches", default=None, help="micro-batch sizes (default train.micro_batch_size)")
    parser.add_argument("--ac", default="none,loop", help="activation-checkpoint policies")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row, after one warm-up")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        world_size = env_world_size()
        if world_size == 1 and cfg.parallel.ep > 1:
            print(f"note: parallel.ep {cfg.parallel.ep} -> 1 on one process (experts kept whole)")
            cfg.parallel.ep = 1
        validate(cfg, world_size)
    except ConfigError as err:
        parser.error(str(err))
    backprop = cfg.train.backprop_depth if args.backprop is None else args.backprop
    batches = _ints(args.batches) if args.batches else [cfg.train.micro_batch_size]
    depths = _ints(args.depths)
    if backprop < 1 or min(depths) < 1 or min(batches) < 1 or args.steps < 1:
        parser.error("--backprop, --depths, --batches and --steps must be >= 1")
    policies = args.ac.split(",")
    if unknown := set(policies) - {"none", "loop", "full"}:
        parser.error(f"--ac: unknown policies {sorted(unknown)} (none, loop, full)")
    return run_sweep(cfg, policies, batches, depths, backprop, args.steps)
