"""Does sharding pay on CPU? Debug-config tokens/s on 2 processes (FSDP2 + EP 2, 1 thread each) vs 1 process
(2 threads), same global batch, same sampled depths; prints the ratio (goal >= 0.8).

The two set-ups alternate for `--rounds` rounds (fresh processes each time, gloo), so drift in machine load hits
both alike; each round times `--steps` optimizer steps after `--warmup`, and the medians over all rounds are
compared. The 1-process run gets the whole global batch in one micro-batch (micro_batch_size x 2).

    python benchmarks/bench_cpu_scaling.py [--config configs/debug.toml] [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mythos_train.bench.sweep import build_train_step
from mythos_train.config import load_config
from parallel.testing import run_distributed


def timed_steps(rank: int, world: int, cfg, warmup: int, steps: int) -> list[float]:
    step = build_train_step(cfg, world, torch.device("cpu"))
    for i in range(warmup):
        step(i)
    return [step(warmup + i)[0] for i in range(steps)]


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/debug.toml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    base = load_config(args.config, ["--parallel.compile=false", "--train.device=cpu", *overrides])
    two = load_config(args.config, ["--parallel.compile=false", "--train.device=cpu", "--parallel.ep=2", *overrides])
    one = load_config(args.config, ["--parallel.compile=false", "--train.device=cpu", "--parallel.ep=1", *overrides])
    one.train.micro_batch_size = 2 * base.train.micro_batch_size
    tokens = 2 * base.train.micro_batch_size * base.train.seq_len * base.train.grad_accum_steps  # global, per step
    times: dict[str, list[float]] = {"1 process x 2 threads": [], "2 processes x 1 thread (FSDP2 + EP 2)": []}
    for _ in range(args.rounds):
        times["1 process x 2 threads"] += run_distributed(
            timed_steps, 1, one, args.warmup, args.steps, threads=2, timeout=900
        )[0]
        per_rank = run_distributed(timed_steps, 2, two, args.warmup, args.steps, threads=1, timeout=900)
        times["2 processes x 1 thread (FSDP2 + EP 2)"] += [
            max(ts) for ts in zip(*per_rank)
        ]  # a step ends on the slowest rank
    rates = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    for name, rate in rates.items():
        print(f"{name:<40} {rate:10.0f} tokens/s   (median of {len(times[name])} steps, {tokens} tokens each)")
    one_rate, two_rate = rates.values()
    ratio = two_rate / one_rate
    print(f"ratio 2 processes / 1 process: {ratio:.2f} (goal >= 0.8)")
    return ratio


if __name__ == "__main__":
    main()
