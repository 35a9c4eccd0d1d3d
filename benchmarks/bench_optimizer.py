"""AdamW's three CPU implementations on the bench model's parameters: for-loop, for-each (the trainer's CPU choice
before) and fused (its choice now, `mythos_train/optim.py`). Round robin, one step of each per round; prints the
medians and the fused kernel's speed-up.

    python benchmarks/bench_optimizer.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mythos_train.bench.throughput import BENCH_SHAPE
from mythos_train.config import ModelConfig
from mythos_train.model import MythosModel

IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "for-each": {"foreach": True}, "fused": {"fused": True}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    model = MythosModel(ModelConfig(**BENCH_SHAPE))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, **kw) for name, kw in IMPLEMENTATIONS.items()}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.warmup + args.rounds):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t[args.warmup :]) for name, t in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"AdamW step over {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, medians of {args.rounds}:"
    )
    for name, seconds in medians.items():
        print(f"  {name:9s} {seconds * 1e3:6.1f} ms  ({seconds / medians['fused']:.1f}x the fused step)")
    return medians


if __name__ == "__main__":
    main()
