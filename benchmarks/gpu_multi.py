"""Two or more GPUs: FSDP2 over all of them, then expert parallelism 2, a few real optimizer steps each.

Run under torchrun (gpu_check.sh does, when it sees 2+ GPUs); rank 0 prints one PASS/FAIL line per part with its
figure (tokens/s/GPU, peak memory): a part passes when its steps finish on every rank (a failure on any rank
raises in the collectives of the others).
`small` with synthetic tokens, bf16, AC loop, depth 4.

    torchrun --standalone --nproc_per_node=2 benchmarks/gpu_multi.py [--steps 5]
    torchrun --standalone --nproc_per_node=2 benchmarks/gpu_multi.py --dry-run   # CPU, gloo, tiny model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from mythos_train.bench.sweep import build_train_step
from mythos_train.config import load_config, validate

PARTS = {"fsdp": ["--parallel.ep=1"], "ep2": ["--parallel.ep=2"]}
SMALL = ("configs/small.toml", [])
DRY_RUN = ("configs/debug.toml", ["--train.seq_len=32", "--train.micro_batch_size=2", "--model.dim=64",
                                  "--model.vocab_size=512", "--model.n_experts=4", "--train.device=cpu"])  # fmt: skip
FIXED_DEPTH = ["--train.depth_distribution=fixed", "--train.mean_depth=4", "--train.max_depth=4",
               "--train.backprop_depth=2", "--parallel.activation_checkpoint=loop", "--checkpoint.enabled=false"]  # fmt: skip


def run_part(name: str, overrides: list[str], base: tuple[str, list[str]], device: torch.device, steps: int) -> str:
    world = dist.get_world_size()
    cfg = load_config(base[0], base[1] + FIXED_DEPTH + overrides)
    validate(cfg, world)
    step = build_train_step(cfg, world, device)
    step(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step(i + 1)[0] for i in range(steps)]
    t = cfg.train
    tokens_per_s = t.micro_batch_size * t.seq_len * t.grad_accum_steps / statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    dist.barrier()
    return f"{name} on {world} ranks: {tokens_per_s:,.0f} tokens/s/GPU, peak {peak:.2f} GiB, {statistics.median(times):.3f} s/step"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny model, 2 steps")
    args = parser.parse_args()
    if args.dry_run:
        device, base, args.steps = torch.device("cpu"), DRY_RUN, 2
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        base = SMALL
        dist.init_process_group("nccl")
    failed = 0
    for name, overrides in PARTS.items():
        try:
            line = "PASS " + run_part(name, overrides, base, device, args.steps)
        except Exception as e:  # report and go on: the next part may still work
            failed += 1
            line = f"FAIL {name}: {type(e).__name__}: {e}"
            traceback.print_exc()
        if dist.get_rank() == 0:
            print(line, flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
